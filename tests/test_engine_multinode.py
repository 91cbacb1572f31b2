"""The engine on a 3-node ray.cluster_utils.Cluster (2 CPUs + 1 logical GPU per node): actors
spread over the nodes by default or packed on request, GPU bundles per actor, a clear error when
the cluster cannot hold the actors, and the same numbers as the single-process simulator."""

import collections

import pytest
import ray
from ray.util.placement_group import placement_group_table

from relay_ray import cli
from relay_ray.errors import UserError
from tests.test_engine import _assert_same_rows, _config, _engine, _local_rows, _ray_rows

pytestmark = pytest.mark.ray


def _alive_nodes():
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


@pytest.mark.parametrize("algorithm,layout,k", [("relaysgd", dict(tree="double-binary"), "auto"),
                                                ("dsgd", dict(topology="ring"), 1),
                                                ("relaysgd", dict(topology="ring", tree="bfs"), 3)])
def test_ray_equals_local_on_three_nodes(ray_three_nodes, algorithm, layout, k, tmp_path):
    config = _config(algorithm, layout)
    engine = _engine(config, k)
    try:
        nodes = engine.node_ids()
        ray_rows = _ray_rows(engine, config, tmp_path)
    finally:
        engine.shutdown()
    assert len(set(nodes)) == 3, f"actors not spread over the 3 nodes: {nodes}"
    _assert_same_rows(ray_rows, _local_rows(config, tmp_path))


@pytest.mark.slow
def test_twelve_relaysgd_workers_spread_over_all_nodes_equal_the_single_node_run(ray_three_nodes, tmp_path):
    """The acceptance run: 12 RelaySGD workers on digits, default flags: auto = one actor per CPU
    (6 actors of 2 workers), SPREAD."""
    config = _config("relaysgd", dict(tree="chain"), num_workers=12, steps=12, eval_every=6)
    engine = _engine(config)
    try:
        assert (engine.shape.num_actors, engine.shape.cpus) == (6, 1.0)
        per_node = collections.Counter(engine.node_ids())
        ray_rows = _ray_rows(engine, config, tmp_path)
    finally:
        engine.shutdown()
    assert set(per_node) == _alive_nodes(), f"workers not on every node: {per_node}"
    assert sorted(per_node.values()) == [4, 4, 4]  # each node holds 2 actors of 2 workers
    local_rows = _local_rows(config, tmp_path)
    assert [r["step"] for r in ray_rows] == [6, 12]
    _assert_same_rows(ray_rows, local_rows)


@pytest.mark.slow
def test_pack_puts_workers_that_fit_one_node_on_one_node(ray_three_nodes, tmp_path):
    config = _config("relaysgd", dict(tree="chain"), num_workers=4, steps=4, eval_every=4)
    engine = _engine(config, 1, cpus_per_actor=0.5, placement="pack")
    try:
        packed = engine.node_ids()
        _assert_same_rows(_ray_rows(engine, config, tmp_path), _local_rows(config, tmp_path))
    finally:
        engine.shutdown()
    spread = _engine(config, 1, cpus_per_actor=0.5)   # the default: spread
    try:
        spread_nodes = spread.node_ids()
    finally:
        spread.shutdown()
    assert len(set(packed)) == 1, f"pack placed workers on several nodes: {packed}"
    assert len(set(spread_nodes)) == 3, f"spread left a node empty: {spread_nodes}"


def test_gpu_bundles_reserve_gpus_for_the_actors(ray_three_nodes, tmp_path):
    config = _config("dsgd", dict(topology="ring"), num_workers=6, steps=4, eval_every=4)
    free_gpus = ray.available_resources().get("GPU", 0)
    engine = _engine(config, 1, cpus_per_actor=0.5, gpus_per_actor=0.25)
    try:
        bundles = list(placement_group_table(engine.pg)["bundles"].values())
        reserved = free_gpus - ray.available_resources().get("GPU", 0)
        nodes = engine.node_ids()
        _assert_same_rows(_ray_rows(engine, config, tmp_path), _local_rows(config, tmp_path))
    finally:
        engine.shutdown()
    assert free_gpus == 3
    assert bundles == [{"CPU": 0.5, "GPU": 0.25}] * 6
    assert reserved == pytest.approx(1.5)
    assert len(set(nodes)) == 3


def test_auto_with_gpus_is_one_actor_per_gpu(ray_three_nodes, tmp_path):
    """--gpus-per-actor 1 with auto: the 3 logical GPUs give 3 actors of 2 workers, one per node."""
    config = _config("relaysgd", dict(tree="double-binary"), num_workers=6, steps=4, eval_every=4)
    engine = _engine(config, gpus_per_actor=1.0)
    try:
        bundles = list(placement_group_table(engine.pg)["bundles"].values())
        nodes = engine.node_ids()
        _assert_same_rows(_ray_rows(engine, config, tmp_path), _local_rows(config, tmp_path))
    finally:
        engine.shutdown()
    assert engine.shape.workers_per_actor == 2
    assert bundles == [{"CPU": 2.0, "GPU": 1.0}] * 3
    assert len(set(nodes)) == 3


def test_more_gpus_than_the_cluster_has_is_a_clear_error(ray_three_nodes):
    config = _config("dsgd", dict(topology="ring"), num_workers=16)
    with pytest.raises(UserError, match=r"^16 workers x 0.25 GPU exceed the cluster's 3 GPUs$"):
        _engine(config, 1, cpus_per_actor=0.25, gpus_per_actor=0.25)


def test_bundles_that_fit_no_single_node_are_a_clear_error(ray_three_nodes):
    """4 x 1.5 CPUs = 6 CPUs = the cluster's total, but a bundle cannot straddle nodes: 3 fit."""
    config = _config("dsgd", dict(topology="ring"), num_workers=8)
    with pytest.raises(UserError, match=r"8 workers in 4 actors x 1.5 CPU = 6 CPUs, but the cluster has 6 "
                                        r"\(nodes: 2, 2, 2\) and fits only 3"):
        _engine(config, 2, cpus_per_actor=1.5)


def test_cannot_fit_through_the_cli_is_one_line_and_exit_2(ray_three_nodes, capsys, tmp_path):
    code = None
    try:
        cli.main(["run", "--dataset", "digits", "--workers", "12", "--workers-per-actor", "1", "--cpus-per-actor", "1",
                  "--steps", "2",
                  "--address", ray_three_nodes.address, "--out", str(tmp_path / "run"), "--quiet"])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("relay-ray: error: 12 workers x 1 CPU = 12 CPUs"), err
    assert ray.is_initialized()          # the CLI did not shut down the Ray it did not start


def test_a_run_waits_for_a_node_that_joins_while_it_waits(ray_three_nodes, tmp_path, capsys, monkeypatch):
    """What an autoscaler does, by hand: 4 actors x 2 CPUs do not fit the 3 x 2 CPUs alive; with
    --placement-timeout the run waits, says so, and starts once a fourth node joins."""
    import threading
    import time

    from relay_ray.engine import placement

    monkeypatch.setattr(placement, "WAITING_LINE_EVERY_S", 1.0)
    config = _config("dsgd", dict(topology="ring"), num_workers=8, steps=4, eval_every=4)
    built = {}

    def start():  # the engine waits in a thread; a node can only be added from the main thread
        try:
            built["engine"] = _engine(config, 2, cpus_per_actor=2, placement_timeout=60)
        except BaseException as error:  # reported by the assertions below, in the main thread
            built["error"] = error
        built["waited"] = time.monotonic() - started

    started = time.monotonic()
    waiting = threading.Thread(target=start)
    waiting.start()
    time.sleep(2.5)
    node = ray_three_nodes.add_node(num_cpus=2, num_gpus=0)
    try:
        waiting.join(timeout=90)
        assert "error" not in built, built.get("error")
        engine = built["engine"]
        try:
            assert engine.shape.num_actors == 4 and len(set(engine.node_ids())) == 4
            rows = _ray_rows(engine, config, tmp_path)
        finally:
            engine.shutdown()
    finally:
        ray_three_nodes.remove_node(node)
    assert built["waited"] >= 2.5
    lines = [line for line in capsys.readouterr().err.splitlines() if "waiting for the cluster" in line]
    assert lines and lines[0] == ("relay-ray: waiting for the cluster to place 4 actors x {'CPU': 2}: 1s of 60s "
                                  "(now 3 nodes, 6 CPUs)"), lines
    _assert_same_rows(rows, _local_rows(config, tmp_path))


def test_without_a_placement_timeout_a_run_that_does_not_fit_fails_at_once_and_says_how_to_wait(ray_three_nodes):
    config = _config("dsgd", dict(topology="ring"), num_workers=8)
    with pytest.raises(UserError, match=r"fits only 3; .* \(an autoscaling cluster that will grow: "
                                        r"--placement-timeout SECONDS waits for it\)$"):
        _engine(config, 2, cpus_per_actor=2)
