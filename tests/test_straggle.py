"""--straggle: the spec, its seeded draws, and that delays cost wall time on the engine but never a number."""

import json

import pytest

from relay_ray.config import EngineOptions, RunConfig
from relay_ray.engine import Engine
from relay_ray.errors import UserError
from relay_ray.experiment import build_experiment
from relay_ray.api import run
from relay_ray.simulate import simulate
from relay_ray.straggle import Straggle


def test_slow_set_delays_only_its_ranks_every_step():
    straggle = Straggle.parse("slow:3,5-6:0.05", num_workers=8)
    assert [straggle.seconds(rank, 7) for rank in range(8)] == [0, 0, 0, 0.05, 0, 0.05, 0.05, 0]
    assert straggle.seconds(3, 1) == straggle.seconds(3, 99) == 0.05
    assert straggle.group_seconds([2, 3, 5], 4) == pytest.approx(0.1)


def test_jitter_is_seeded_per_step_and_rank_with_the_given_mean():
    a, b = Straggle.parse("jitter:0.02", seed=1), Straggle.parse("jitter:0.02", seed=1)
    draws = [a.seconds(rank, step) for step in range(1, 201) for rank in range(16)]
    assert draws == [b.seconds(rank, step) for step in range(1, 201) for rank in range(16)]
    assert len(set(draws)) == len(draws) and min(draws) >= 0
    assert sum(draws) / len(draws) == pytest.approx(0.02, rel=0.1)
    assert Straggle.parse("jitter:0.02", seed=2).seconds(0, 1) != a.seconds(0, 1)


def test_terms_add_up():
    both = Straggle.parse("slow:1:0.5+jitter:0.01", seed=4)
    assert both.seconds(1, 3) == pytest.approx(0.5 + Straggle.parse("jitter:0.01", seed=4).seconds(1, 3))


@pytest.mark.parametrize("spec,message", [
    ("slow:0.05", "write slow:RANKS:SECONDS"),
    ("slow:a:0.05", "ranks must look like"),
    ("slow:3-1:0.05", "bad rank range"),
    ("jitter:-1", "seconds must be >= 0"),
    ("jitter:inf", "seconds must be >= 0"),
    ("jitter:fast", "is not a number"),
    ("lag:3", "unknown term 'lag:3'"),
])
def test_bad_specs_are_one_clear_line(spec, message):
    with pytest.raises(UserError, match=message):
        EngineOptions(straggle=spec)


def test_a_rank_that_does_not_exist_is_refused():
    with pytest.raises(UserError, match="rank 9 does not exist"):
        Straggle.parse("slow:9:0.1", num_workers=8)


def test_local_backend_refuses_straggle(tmp_path):
    config = RunConfig(dataset="quadratics", num_workers=4, steps=5, backend="local", out=str(tmp_path))
    with pytest.raises(UserError, match="needs --backend ray"):
        run(config, EngineOptions(straggle="jitter:0.01"), progress=False)


@pytest.mark.ray
def test_delays_cost_wall_time_and_change_no_number(ray_local, tmp_path):
    """A slow worker (rank 5, 150 ms per step) and jitter on everyone: the rows equal the in-process
    simulator's, and the run took at least rank 5's 20 x 150 ms (a lower bound a sleep guarantees,
    several times what these 20 logreg steps take without delays)."""
    settings = dict(algorithm="relaysgd", num_workers=8, dataset="digits", alpha=0.1, model="logreg", steps=20,
                    eval_every=10, seed=3, lr=0.1)
    config = RunConfig(**settings, backend="ray", out=str(tmp_path / "ray"))
    engine = Engine(config, build_experiment(config),
                    EngineOptions(workers_per_actor=2, straggle="slow:5:0.15+jitter:0.005"))
    try:
        summary = engine.run(progress=False)
    finally:
        engine.shutdown()
    assert summary["engine"]["straggle"] == "slow:5:0.15+jitter:0.005"
    assert summary["wall_s"] >= 20 * 0.15
    simulate(RunConfig(**settings, backend="local", out=str(tmp_path / "local")), progress=False)
    rows = [[json.loads(line) for line in (tmp_path / side / "metrics.jsonl").read_text().splitlines()]
            for side in ("ray", "local")]
    for ray_row, local_row in zip(*rows, strict=True):
        for key in ("step", "train_loss", "test_acc_mean", "test_acc_worst", "consensus_distance"):
            assert ray_row[key] == pytest.approx(local_row[key], rel=1e-5, abs=1e-5), key
