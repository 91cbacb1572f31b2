"""A whole node of a 3-node ray.cluster_utils.Cluster is removed mid-run: the engine re-places
its workers on the two nodes left, restores the last checkpoint and ends with the undisturbed numbers."""

import pytest

from relay_ray.engine import RayEngine
from relay_ray.experiment import build_experiment
from relay_ray.simulate import simulate
from tests.test_recovery import _assert_close_rows, _config, _rows

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_removed_node_restarts_workers_on_the_surviving_nodes(ray_three_nodes, tmp_path, monkeypatch, capsys):
    cluster = ray_three_nodes
    config = _config("relaysgd", tmp_path / "ray", num_workers=6, steps=60)
    reference = _config("relaysgd", tmp_path / "local", num_workers=6, steps=60, backend="local")
    simulate(reference, progress=False)

    submit = RayEngine._submit_step
    state = {"calls": 0, "removed": None}

    def removing_submit(self, outboxes):
        state["calls"] += 1
        if state["calls"] == 27:
            used = set(self.node_ids())
            victim = next(node for node in cluster.worker_nodes if node.node_id in used)
            cluster.remove_node(victim)
            state["removed"] = victim.node_id
        return submit(self, outboxes)

    monkeypatch.setattr(RayEngine, "_submit_step", removing_submit)
    engine = RayEngine(config, build_experiment(config))
    try:
        nodes_before = set(engine.node_ids())
        summary = engine.run(progress=False)
        nodes_after = set(engine.node_ids())
    finally:
        engine.shutdown()
    assert len(nodes_before) == 3 and state["removed"] in nodes_before
    assert state["removed"] not in nodes_after and len(nodes_after) == 2, (nodes_after, state["removed"])
    notes = [line for line in capsys.readouterr().err.splitlines() if "restarting" in line]
    assert len(notes) == 1 and "from checkpoint step 20" in notes[0], notes
    assert summary["restarts"] == 1
    _assert_close_rows(_rows(tmp_path / "ray"), _rows(tmp_path / "local"), 1e-6)
