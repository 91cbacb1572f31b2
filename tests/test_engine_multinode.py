"""The engine on a 3-node ray.cluster_utils.Cluster: workers spread over nodes, same numbers."""

import pytest

from relay_ray.engine import RayEngine
from relay_ray.experiment import build_experiment
from tests.test_engine import _assert_same_rows, _config, _local_rows, _ray_rows

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("algorithm,layout", [("relaysgd", dict(tree="double-binary")),
                                              ("dsgd", dict(topology="ring")),
                                              ("relaysgd", dict(topology="ring", tree="bfs"))])
def test_ray_equals_local_on_three_nodes(ray_three_nodes, algorithm, layout, tmp_path):
    config = _config(algorithm, layout)
    engine = RayEngine(config, build_experiment(config))
    try:
        nodes = engine.node_ids()
        ray_rows = _ray_rows(engine, config, tmp_path)
    finally:
        engine.shutdown()
    assert len(set(nodes)) == 3, f"workers not spread over the 3 nodes: {nodes}"
    _assert_same_rows(ray_rows, _local_rows(config, tmp_path))
