"""A whole node of a 3-node ray.cluster_utils.Cluster is removed mid-run: the engine re-places
its actors on the two nodes left (auto re-cuts the groups for the CPUs left), restores the last
checkpoint and ends with the undisturbed numbers; with --on-failure continue / replace nobody rewinds."""

import collections

import pytest

from relay_ray.config import EngineOptions, RunConfig
from relay_ray.engine import Engine
from relay_ray.experiment import build_experiment
from relay_ray.simulate import simulate
from tests.test_failures import _computed, _once, _run
from tests.test_recovery import _assert_close_rows, _config, _rows

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize("k", ["auto", 2])
def test_removed_node_restarts_workers_on_the_surviving_nodes(ray_three_nodes, tmp_path, k, capsys):
    cluster = ray_three_nodes
    config = _config("relaysgd", tmp_path / "ray", num_workers=6, steps=60)
    reference = _config("relaysgd", tmp_path / "local", num_workers=6, steps=60, backend="local")
    simulate(reference, progress=False)

    state = {"removed": None}

    def remove_a_used_node(engine, step):
        if step == 27 and state["removed"] is None:  # once: the replay passes step 27 again
            used = set(engine.node_ids())
            victim = next(node for node in cluster.worker_nodes if node.node_id in used)
            cluster.remove_node(victim)
            state["removed"] = victim.node_id

    # auto: 6 actors of 1 worker, then 4 actors (2 + 2 + 1 + 1) on the 4 CPUs left; K = 2: 3 actors of 2 workers
    engine = Engine(config, build_experiment(config), EngineOptions(workers_per_actor=k), on_step=remove_a_used_node)
    try:
        nodes_before = set(engine.node_ids())
        actors_before = engine.shape.num_actors
        summary = engine.run(progress=False)
        nodes_after = set(engine.node_ids())
        actors_after = engine.shape.num_actors
    finally:
        engine.shutdown()
        if state["removed"] is not None:  # the cluster is the module's: give the next test its 3 nodes back
            cluster.add_node(num_cpus=2, num_gpus=1)
            cluster.wait_for_nodes()
    assert (actors_before, actors_after) == ((6, 4) if k == "auto" else (3, 3))
    assert len(nodes_before) == 3 and state["removed"] in nodes_before
    assert state["removed"] not in nodes_after and len(nodes_after) == 2, (nodes_after, state["removed"])
    notes = [line for line in capsys.readouterr().err.splitlines() if "restarting" in line]
    assert len(notes) == 1 and "from checkpoint step 20" in notes[0], notes
    assert summary["restarts"] == 1
    _assert_close_rows(_rows(tmp_path / "ray"), _rows(tmp_path / "local"), 1e-6)


def test_removed_node_continue_and_replace(ray_three_nodes, tmp_path, capsys):
    """A whole node goes: continue goes on with the workers of the other nodes; replace starts
    fresh actors for the lost ranks on the nodes left (their bundles are re-placed by Ray)."""
    cluster = ray_three_nodes
    for mode in ("continue", "replace"):
        config = RunConfig(algorithm="relaysgd", num_workers=6, dataset="digits", alpha=0.1, model="logreg", steps=60,
                           eval_every=20, seed=5, lr=0.1, tree="double-binary", backend="ray", out=None)
        state = {"removed": None, "ranks": None}

        def remove_a_used_node(engine):
            nodes = engine.node_ids()
            victim = next(node for node in cluster.worker_nodes if node.node_id in nodes)
            state["ranks"] = [rank for rank, node in enumerate(nodes) if node == victim.node_id]
            cluster.remove_node(victim)
            state["removed"] = victim.node_id

        log = tmp_path / f"{mode}.log"
        try:
            # 3 actors of 2 workers, 1 CPU each, spread: a node left with a free CPU can take a replacement
            summary = _run(config, EngineOptions(workers_per_actor=2, cpus_per_actor=1, on_failure=mode),
                           _once(27, remove_a_used_node), log)
        finally:
            if state["removed"] is not None:  # the cluster is the module's: give the next run its 3 nodes back
                cluster.add_node(num_cpus=2, num_gpus=1)
                cluster.wait_for_nodes()
        assert summary["restarts"] == 0 and len(summary["failures"]) == 1, capsys.readouterr().err
        computed = _computed(log)
        assert all(c == 1 for steps in computed.values() for c in collections.Counter(steps).values())
        lost = summary["failures"][0]["lost_workers" if mode == "continue" else "replaced"]
        assert lost == state["ranks"]
        assert summary["workers_at_end"] == (4 if mode == "continue" else 6)
        for rank in set(range(6)) - set(lost):
            assert sorted(computed[rank]) == list(range(1, 61))
        assert summary["final"]["step"] == 60 and summary["final"]["test_acc_worst"] > 0.5
