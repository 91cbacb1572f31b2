"""The Ray engine against the in-process simulator, on one node and on three."""

import math
import pickle

import numpy as np
import pytest

from relay_ray.config import RunConfig
from relay_ray.engine import RayEngine, WorkerFailure
from relay_ray.experiment import build_experiment
from relay_ray.simulate import simulate

pytestmark = pytest.mark.ray

NUMERIC_KEYS = ("train_loss", "test_acc_mean", "test_acc_worst", "test_acc_avg_model", "consensus_distance",
                "bytes_sent_per_worker", "samples", "suboptimality", "suboptimality_mean", "suboptimality_worst")

# Every algorithm on the layouts it runs on: relays over chain / double-binary / bfs trees,
# gossip over a ring and a chain graph; all-reduce is always exact.
LAYOUTS = (
    [("relaysgd", dict(tree="chain")), ("relaysgd", dict(tree="double-binary")),
     ("relaysgd", dict(topology="ring", tree="bfs")), ("relaysum-grad", dict(tree="double-binary")),
     ("allreduce", {})]
    + [(a, dict(topology=t)) for a in ("dsgd", "dsgd-qgm", "d2", "gradient-tracking") for t in ("ring", "chain")]
)


def _config(algorithm, layout, **overrides):
    settings = dict(algorithm=algorithm, num_workers=8, dataset="digits", alpha=0.1, model="logreg", steps=20,
                    eval_every=10, seed=3, backend="ray", lr=0.1, momentum=0.9)
    settings.update(layout)
    settings.update(overrides)
    return RunConfig(**settings)


def _assert_same_rows(ray_rows, local_rows):
    assert [r["step"] for r in ray_rows] == [r["step"] for r in local_rows]
    for ray_row, local_row in zip(ray_rows, local_rows):
        for key in NUMERIC_KEYS:
            a, b = ray_row.get(key), local_row.get(key)
            if a is None or b is None:
                assert a is None and b is None, key
            else:
                assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5), (key, a, b)


def _local_rows(config, tmp_path):
    local = RunConfig(**{**config.to_dict(), "alpha": config.alpha, "backend": "local", "out": str(tmp_path / "local")})
    simulate(local, progress=False)
    return [__import__("json").loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]


def _ray_rows(engine, config, tmp_path):
    config.out = str(tmp_path / "ray")
    engine.run(progress=False)
    return [__import__("json").loads(line) for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm,layout", LAYOUTS, ids=[f"{a}-{'-'.join(l.values()) or 'exact'}" for a, l in LAYOUTS])
def test_ray_equals_local_single_node(ray_local, algorithm, layout, tmp_path):
    config = _config(algorithm, layout)
    engine = RayEngine(config, build_experiment(config))
    try:
        ray_rows = _ray_rows(engine, config, tmp_path)
    finally:
        engine.shutdown()
    _assert_same_rows(ray_rows, _local_rows(config, tmp_path))


def test_driver_only_fetches_small_metric_dicts(ray_local, monkeypatch, tmp_path):
    """Instrument ray.get on the driver: nothing it reads may be a model or a message."""
    config = _config("relaysgd", dict(tree="double-binary"), model="mlp", out=str(tmp_path))
    fetched = []
    real_get = ray_local.get

    def recording_get(refs, *args, **kwargs):
        values = real_get(refs, *args, **kwargs)
        fetched.append(values)
        return values

    monkeypatch.setattr(ray_local, "get", recording_get)
    engine = RayEngine(config, build_experiment(config))
    try:
        engine.run(progress=False)
    finally:
        engine.shutdown()
    num_params = engine.experiment.task_data.x_train[0].size * 128 + 128 + 128 * 10 + 10
    assert fetched, "the driver fetched nothing: the instrumentation is broken"
    for values in fetched:
        items = values if isinstance(values, list) else [values]
        for item in items:
            assert not isinstance(item, np.ndarray), "driver fetched an array"
            # a message or model of the mlp is num_params * 4 bytes (~38 kB)
            assert len(pickle.dumps(item)) < num_params * 4 / 10, f"driver fetched a large object: {type(item)}"
        assert any(isinstance(i, dict) for i in items) or all(isinstance(i, (int, bool, type(None))) or
                                                              type(i).__name__ == "PlacementGroup" for i in items)


def test_dead_actor_is_one_clear_error(ray_local, tmp_path):
    config = _config("relaysgd", dict(tree="chain"), steps=400, eval_every=200)
    engine = RayEngine(config, build_experiment(config), max_restarts=0)  # restarts: tests/test_recovery.py
    ray_local.kill(engine.actors[5])
    try:
        with pytest.raises(WorkerFailure, match=r"worker 5 died .*gave up after 0 restart"):
            engine.run(progress=False)
    finally:
        engine.shutdown()


def test_too_many_cpus_is_a_clear_error(ray_local):
    config = _config("dsgd", dict(topology="ring"))
    with pytest.raises(ValueError, match=r"8 workers x 2.0 CPU = 16 CPUs, but the cluster has 4"):
        RayEngine(config, build_experiment(config), cpus_per_worker=2.0)


def test_dead_actor_through_the_cli_exits_1_with_one_line(ray_local, monkeypatch, capsys, tmp_path):
    """`relay-ray run` on the attached Ray: an actor killed mid-run is one error line, exit code 1."""
    from relay_ray import cli

    submit = RayEngine._submit_step
    calls = {"n": 0}

    def killing_submit(self, outboxes):
        calls["n"] += 1
        if calls["n"] == 30:
            ray_local.kill(self.actors[5])
        return submit(self, outboxes)

    monkeypatch.setattr(RayEngine, "_submit_step", killing_submit)
    code = cli.main(["run", "--dataset", "digits", "--workers", "8", "--model", "logreg", "--steps", "100",
                     "--eval-every", "50", "--max-restarts", "0", "--quiet", "--out", str(tmp_path / "run")])
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("relay-ray")]
    assert code == 1
    assert len(err_lines) == 1 and err_lines[0].startswith("relay-ray: error: worker 5 died"), err_lines
