"""The Ray engine against the in-process simulator, for every number of workers per actor.

K = 1 (one actor per worker), K = 3 (8 workers cut 3 + 3 + 2: uneven groups, crossing edges
everywhere), K = n (one actor, no crossing edge) and auto (the default: one actor per CPU).
"""

import json
import math
import pickle

import numpy as np
import pytest
import ray

from relay_ray.config import EngineOptions, RunConfig
from relay_ray.engine import Engine, WorkerFailure
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
     ("allreduce", {}), ("relaysgd-qgm", dict(tree="chain"))]
    + [(a, dict(topology=t)) for a in ("dsgd", "dsgd-qgm", "d2", "gradient-tracking") for t in ("ring", "chain")]
)


# workers per actor: for 8 workers, one actor each / 3 + 3 + 2 / all in one / the default
K_VALUES = {"K=1": 1, "K=3": 3, "K=n": 8, "auto": "auto"}


def _engine(config, k="auto", **options):
    """An engine on the attached Ray with ``k`` workers per actor."""
    return Engine(config, build_experiment(config), EngineOptions(workers_per_actor=k, **options))


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
    return [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]


def _ray_rows(engine, config, tmp_path):
    config.out = str(tmp_path / "ray")
    engine.run(progress=False)
    return [json.loads(line) for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]


# every layout with uneven groups; every algorithm also with one actor per worker and with one actor
CASES = ([(a, layout, "K=3") for a, layout in LAYOUTS]
         + [(a, layout, k) for a, layout in LAYOUTS if layout.get("topology") != "chain" and layout.get("tree") != "chain"
            for k in ("K=1", "K=n")])


@pytest.mark.parametrize("algorithm,layout,k", CASES,
                         ids=[f"{a}-{'-'.join(l.values()) or 'exact'}-{k}" for a, l, k in CASES])
def test_ray_equals_local_single_node(ray_local, algorithm, layout, k, tmp_path):
    config = _config(algorithm, layout)
    engine = _engine(config, K_VALUES[k])
    try:
        assert len(engine.actors) == -(-8 // K_VALUES[k])
        ray_rows = _ray_rows(engine, config, tmp_path)
    finally:
        engine.shutdown()
    _assert_same_rows(ray_rows, _local_rows(config, tmp_path))


# one layout per algorithm: torch state in the actors (--tensors torch), numpy state in the simulator
TORCH_CASES = [(a, layout) for a, layout in LAYOUTS if layout.get("topology") != "chain" and layout.get("tree") != "chain"
               and not (a == "relaysgd" and layout.get("tree") == "bfs")] + [("relaysgd-qgm", dict(tree="double-binary")),
                                                                           ("choco", dict(topology="ring"))]


@pytest.mark.parametrize("algorithm,layout", TORCH_CASES, ids=[f"{a}-{'-'.join(l.values()) or 'exact'}"
                                                               for a, l in TORCH_CASES])
def test_ray_with_torch_state_equals_local_with_numpy_state(ray_local, algorithm, layout, tmp_path):
    """Crossing messages leave the torch state as numpy and join it again on arrival: the same numbers."""
    config = _config(algorithm, layout, tensors="torch", drop_prob=0.1)
    engine = _engine(config, 3)
    try:
        ray_rows = _ray_rows(engine, config, tmp_path)
    finally:
        engine.shutdown()
    _assert_same_rows(ray_rows, _local_rows(RunConfig(**{**config.to_dict(), "tensors": "numpy"}), tmp_path))


# torch state in the actors for three of them: encoded on the device, the same bytes cross as numpy
COMPRESSED_CASES = [("relaysgd", dict(tree="double-binary"), "topk:0.1", "torch"),
                    ("relaysum-grad", dict(tree="chain"), "sign", "numpy"),
                    ("choco", dict(topology="ring"), "randk:0.2", "torch"), ("allreduce", {}, "qsgd:8", "torch")]


@pytest.mark.parametrize("algorithm,layout,spec,kind", COMPRESSED_CASES,
                         ids=[f"{a}-{c}-{k}" for a, _, c, k in COMPRESSED_CASES])
def test_ray_with_compression_equals_local(ray_local, algorithm, layout, spec, kind, tmp_path):
    """Encoded messages cross the actors like any other (under drops, with the per-edge copies)."""
    config = _config(algorithm, layout, compression=spec, drop_prob=0.1, tensors=kind)
    engine = _engine(config, 3)
    try:
        ray_rows = _ray_rows(engine, config, tmp_path)
    finally:
        engine.shutdown()
    local_rows = _local_rows(RunConfig(**{**config.to_dict(), "tensors": "numpy"}), tmp_path)
    _assert_same_rows(ray_rows, local_rows)
    assert ray_rows[-1]["bytes_sent_per_worker"] == local_rows[-1]["bytes_sent_per_worker"]


# the competitors, time-varying routing and --local-steps: uneven groups, lossy links, a checkpoint
# the actors hold torch state in every other case (the simulator always numpy): each new algorithm's
# own torch state is checked against numpy in test_tensors, the engine's routing of it here
COMPETITOR_CASES = [("dsgd", dict(topology="exponential-one-peer"), "torch"),
                    ("sgp", dict(topology="exponential-directed"), "numpy"),
                    ("sgp", dict(topology="exponential-one-peer"), "torch"),
                    ("momentum-tracking", dict(topology="ring"), "torch"), ("gut", dict(topology="ring"), "torch"),
                    ("qg-gutm", dict(topology="ring"), "torch"),
                    ("btpp", dict(branching=3), "torch"), ("relaysgd", dict(tree="double-binary", local_steps=4), "torch"),
                    ("allreduce", dict(local_steps=4), "numpy")]


@pytest.mark.parametrize("algorithm,layout,kind", COMPETITOR_CASES,
                         ids=[f"{a}-{'-'.join(map(str, l.values()))}-{k}" for a, l, k in COMPETITOR_CASES])
def test_ray_equals_local_for_the_competitors(ray_local, algorithm, layout, kind, tmp_path):
    """The step-dependent plans route the same on both backends: the messages a step does not use
    are empty on both, and bytes count what was sent."""
    config = _config(algorithm, layout, drop_prob=0.1, checkpoint_every=10, tensors=kind)
    engine = _engine(config, 3)
    try:
        ray_rows = _ray_rows(engine, config, tmp_path)
    finally:
        engine.shutdown()
    local_rows = _local_rows(RunConfig(**{**config.to_dict(), "checkpoint_every": None, "tensors": "numpy"}), tmp_path)
    _assert_same_rows(ray_rows, local_rows)
    assert ray_rows[-1]["bytes_sent_per_worker"] == local_rows[-1]["bytes_sent_per_worker"] > 0


RDT_CASES = [("relaysgd", dict(tree="double-binary"), "numpy"), ("dsgd", dict(topology="ring"), "torch")]


@pytest.mark.parametrize("algorithm,layout,kind", RDT_CASES, ids=[f"{a}-{k}" for a, _, k in RDT_CASES])
def test_ray_direct_transport_over_gloo_equals_local(ray_local, algorithm, layout, kind, tmp_path):
    """--transport gloo: crossing bundles go actor to actor as torch tensors through Ray Direct Transport
    (a collective group over the actors, one outbox task per link), evaluations and checkpoints at
    step boundaries included: the same numbers as the simulator."""
    config = _config(algorithm, layout, drop_prob=0.1, tensors=kind, checkpoint_every=10)
    engine = _engine(config, 3, transport="gloo")
    try:
        assert engine.communicator is not None and len(engine.actors) == 3
        ray_rows = _ray_rows(engine, config, tmp_path)
    finally:
        engine.shutdown()
    assert engine.communicator is None
    _assert_same_rows(ray_rows, _local_rows(RunConfig(**{**config.to_dict(), "checkpoint_every": None}), tmp_path))


def test_auto_is_one_actor_per_cpu_and_recorded(ray_local, tmp_path):
    """The default: the 4-CPU Ray gets 4 actors of 2 workers, 1 CPU each; config.yaml and summary.json say so."""
    config = _config("relaysgd", dict(tree="double-binary"))
    engine = _engine(config)
    try:
        assert (engine.shape.num_actors, engine.shape.workers_per_actor, engine.shape.cpus) == (4, 2, 1.0)
        assert engine.shape.describe() == "8 workers on 4 actors (2 per actor, auto), 1 CPU each"
        ray_rows = _ray_rows(engine, config, tmp_path)
    finally:
        engine.shutdown()
    _assert_same_rows(ray_rows, _local_rows(config, tmp_path))
    import yaml

    saved = yaml.safe_load((tmp_path / "ray" / "config.yaml").read_text())["engine"]
    assert saved["workers_per_actor"] == 2 and saved["chosen_by"] == "auto" and saved["num_actors"] == 4
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["engine"]["num_actors"] == 4


def test_auto_never_makes_more_actors_than_workers(ray_local, tmp_path):
    config = _config("dsgd", dict(topology="ring"), num_workers=3)
    engine = _engine(config)
    try:
        assert (engine.shape.num_actors, engine.shape.workers_per_actor) == (3, 1)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("k", ["K=1", "K=3"])
def test_driver_only_fetches_small_metric_dicts(ray_local, monkeypatch, k, tmp_path):
    """Instrument ray.get on the driver: nothing it reads may be a model or a message."""
    config = _config("relaysgd", dict(tree="double-binary"), model="mlp", out=str(tmp_path))
    fetched = []
    real_get = ray_local.get

    def recording_get(refs, *args, **kwargs):
        values = real_get(refs, *args, **kwargs)
        fetched.append(values)
        return values

    monkeypatch.setattr(ray_local, "get", recording_get)  # a public Ray function, not an engine private
    engine = _engine(config, K_VALUES[k])
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


def _at_step(step: int, action):
    """An ``on_step`` hook that calls ``action(engine)`` once step ``step`` has been submitted."""
    def on_step(engine, submitted):
        if submitted == step:
            action(engine)
    return on_step


def _kill_at(step: int, group: int):
    """An ``on_step`` hook that kills actor ``group`` when step ``step`` has been submitted."""
    return _at_step(step, lambda engine: ray.kill(engine.actors[group]))


@pytest.mark.parametrize("k", ["K=1", "K=n"])
def test_dead_actor_is_one_clear_error(ray_local, k, tmp_path):
    config = _config("relaysgd", dict(tree="chain"), steps=400, eval_every=200)
    group = 5 if k == "K=1" else 0
    engine = Engine(config, build_experiment(config), EngineOptions(workers_per_actor=K_VALUES[k], max_restarts=0),
                    on_step=_kill_at(3, group))
    who = "worker 5" if k == "K=1" else r"workers \[0, 1, 2, 3, 4, 5, 6, 7\]"
    try:
        with pytest.raises(WorkerFailure, match=rf"{who} died .*gave up after 0 restart"):
            engine.run(progress=False)
    finally:
        engine.shutdown()


def test_too_many_cpus_is_a_clear_error(ray_local):
    config = _config("dsgd", dict(topology="ring"))
    with pytest.raises(ValueError, match=r"^8 workers in 4 actors x 2 CPU = 8 CPUs, but the cluster has 4 .*fits only 2"):
        _engine(config, 2, cpus_per_actor=2.0)


def group_actor_pids() -> list[int]:
    """The process ids of this machine's worker-group actors (Ray titles an actor's process ray::Class)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::GroupActor")]


def test_dead_actor_through_the_cli_exits_1_with_one_line(ray_local, capsys, tmp_path):
    """`relay-ray run` on the attached Ray, its actor process SIGKILLed from outside once the first
    evaluation is written: one error line, exit code 1."""
    import os
    import signal
    import threading
    import time

    from relay_ray import cli

    out = tmp_path / "run"
    result = {}
    run = threading.Thread(target=lambda: result.update(code=cli.main([
        "run", "--dataset", "digits", "--workers", "8", "--model", "logreg", "--steps", "100000", "--eval-every", "50",
        "--workers-per-actor", "8", "--max-restarts", "0", "--quiet", "--out", str(out)])))
    run.start()
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        assert time.monotonic() < deadline and run.is_alive(), "the run never evaluated"
        time.sleep(0.05)
    pids = group_actor_pids()
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    run.join(timeout=300)
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("relay-ray")]
    assert result.get("code") == 1
    assert len(err_lines) == 1 and err_lines[0].startswith(
        "relay-ray: error: workers [0, 1, 2, 3, 4, 5, 6, 7] died"), err_lines
