"""Worker packing: several logical workers per actor compute what the simulator computes."""

import json
import time

import pytest

from relay_ray import cli
from relay_ray.algorithms import build_plan
from relay_ray.config import RunConfig
from relay_ray.engine import RayEngine
from relay_ray.experiment import build_experiment, build_topology
from relay_ray.packing import GroupLayout, PackedRayEngine
from tests.test_engine import _assert_same_rows, _config, _local_rows, _ray_rows

# 8 workers in groups of 3 (3 + 3 + 2): groups are uneven and every layout has crossing edges
PACKED = [
    ("relaysgd", dict(tree="chain"), 3),
    ("relaysgd", dict(tree="double-binary"), 3),
    ("relaysum-grad", dict(tree="double-binary"), 4),
    ("dsgd", dict(topology="ring"), 3),
    ("d2", dict(topology="ring"), 3),
    ("allreduce", {}, 3),
    ("relaysgd", dict(tree="chain"), 8),  # one actor: no crossing edge at all
]


def _plan(algorithm, **layout):
    config = RunConfig(algorithm=algorithm, num_workers=8, dataset="quadratics", backend="local", **layout)
    graph, trees = build_topology(config)
    return build_plan(algorithm, graph, trees)


def test_layout_keeps_chain_messages_in_process():
    layout = GroupLayout.contiguous(_plan("relaysgd", tree="chain"), 3)
    assert layout.groups == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert layout.outgoing == (((2, 3),), ((3, 2), (5, 6)), ((6, 5),))
    assert layout.incoming == (((3, 2),), ((2, 3), (6, 5)), ((5, 6),))


def test_layout_crossing_edges_are_each_sent_and_received_once():
    plan = _plan("relaysgd", tree="double-binary")
    layout = GroupLayout.contiguous(plan, 3)
    sent = [edge for edges in layout.outgoing for edge in edges]
    received = [edge for edges in layout.incoming for edge in edges]
    assert sorted(sent) == sorted(received) and len(set(sent)) == len(sent)
    group_of = {rank: g for g, ranks in enumerate(layout.groups) for rank in ranks}
    every_edge = {(i, j) for i in range(8) for j in plan.neighbors[i]}
    assert set(sent) == {(i, j) for i, j in every_edge if group_of[i] != group_of[j]}


@pytest.mark.ray
@pytest.mark.parametrize("algorithm,layout,per_actor", PACKED,
                         ids=[f"{a}-{'-'.join(l.values()) or 'exact'}-k{k}" for a, l, k in PACKED])
def test_packed_equals_local(ray_local, algorithm, layout, per_actor, tmp_path):
    config = _config(algorithm, layout)
    engine = PackedRayEngine(config, build_experiment(config), workers_per_actor=per_actor)
    try:
        assert len(engine.actors) == -(-8 // per_actor)
        ray_rows = _ray_rows(engine, config, tmp_path)
    finally:
        engine.shutdown()
    _assert_same_rows(ray_rows, _local_rows(config, tmp_path))


@pytest.mark.ray
def test_cli_workers_per_actor(ray_local, tmp_path):
    """`relay-ray run --workers-per-actor 4` on the attached Ray gives the simulator's final numbers."""
    args = ["--dataset", "digits", "--workers", "8", "--model", "logreg", "--steps", "12", "--eval-every", "6",
            "--quiet", "--tree", "double-binary"]
    assert cli.main(["run", *args, "--workers-per-actor", "4", "--out", str(tmp_path / "packed")]) == 0
    assert cli.main(["run", *args, "--backend", "local", "--out", str(tmp_path / "local")]) == 0
    rows = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("packed", "local")]
    _assert_same_rows(*rows)


@pytest.mark.ray
def test_bad_workers_per_actor_is_a_clear_error(ray_local):
    config = _config("dsgd", dict(topology="ring"))
    with pytest.raises(ValueError, match=r"--workers-per-actor must be >= 1"):
        PackedRayEngine(config, build_experiment(config), workers_per_actor=0)


@pytest.mark.ray
@pytest.mark.parametrize("per_actor", [1, 3], ids=["one-actor-per-worker", "packed-k3"])
def test_no_message_or_model_lands_in_the_driver(ray_local, monkeypatch, per_actor, tmp_path):
    """The mlp's messages and models (~38 kB) are small enough for Ray to return them inline to the
    caller, the driver.  Sample the driver's in-process object memory after every submitted step
    and evaluation: it may hold refs and metric dicts, never a message."""
    config = _config("relaysgd", dict(tree="chain"), model="mlp", out=str(tmp_path))
    experiment = build_experiment(config)
    engine = (RayEngine(config, experiment) if per_actor == 1
              else PackedRayEngine(config, experiment, workers_per_actor=per_actor))
    message_bytes = 4 * (experiment.task_data.x_train[0].size * 128 + 128 + 128 * 10 + 10)  # a whole model
    core_worker = ray_local._private.worker.global_worker.core_worker  # private: no public API reports this
    samples = []

    def sampled(method):
        def wrapper(*args, **kwargs):
            result = method(*args, **kwargs)
            time.sleep(0.05)  # let returns of finished tasks arrive
            samples.append(core_worker.get_local_memory_store_bytes_used())
            return result
        return wrapper

    monkeypatch.setattr(engine, "_submit_step", sampled(engine._submit_step))
    monkeypatch.setattr(engine, "_evaluate", sampled(engine._evaluate))
    try:
        engine.run(progress=False)
    finally:
        engine.shutdown()
    assert len(samples) >= config.steps
    assert max(samples) < message_bytes, f"the driver held {max(samples)} bytes; one message is {message_bytes}"
