"""Graphs, spanning trees, gossip weights and the lr correction (relay_ray.topology; pure, fast)."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from relay_ray import topology
from relay_ray.algorithms.relaysum import RelaySumChannel
from relay_ray.errors import UserError

NAMED = ["ring", "chain", "star", "complete", "torus", "binary-tree", "exponential"]


# --------------------------------------------------------------------------------------
# named graphs


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("n", [4, 9, 16])
def test_named_graph_is_connected_with_n_nodes(name, n):
    graph = topology.make_graph(name, n)
    assert sorted(graph.nodes) == list(range(n))
    assert nx.is_connected(graph)
    assert nx.number_of_selfloops(graph) == 0


def test_named_graph_shapes():
    n = 16
    assert topology.make_graph("ring", n).number_of_edges() == n
    assert all(d == 2 for _, d in topology.make_graph("ring", n).degree)
    assert nx.is_isomorphic(topology.make_graph("chain", n), nx.path_graph(n))
    star = topology.make_graph("star", n)
    assert sorted(d for _, d in star.degree) == [1] * (n - 1) + [n - 1]
    assert topology.make_graph("complete", n).number_of_edges() == n * (n - 1) // 2
    torus = topology.make_graph("torus", n)  # 4 x 4 periodic grid
    assert all(d == 4 for _, d in torus.degree) and torus.number_of_edges() == 2 * n
    assert nx.is_tree(topology.make_graph("binary-tree", n))
    expo = topology.make_graph("exponential", n)
    assert set(expo.edges) == {tuple(sorted((i, (i + 2**k) % n))) for i in range(n) for k in range(4)}


def test_social_graph_has_32_workers():
    graph = topology.make_graph("social", None)
    assert graph.number_of_nodes() == topology.SOCIAL_NUM_WORKERS == 32
    assert sorted(graph.nodes) == list(range(32))
    assert nx.is_connected(graph)
    with pytest.raises(UserError, match="32"):
        topology.make_graph("social", 16)


@pytest.mark.parametrize("n", [5, 7, 13])
def test_torus_with_prime_worker_count_is_user_error(n):
    with pytest.raises(UserError, match="torus"):
        topology.make_graph("torus", n)


@pytest.mark.parametrize("n", [None, 0, 1])
def test_fewer_than_two_workers_is_user_error(n):
    with pytest.raises(UserError, match="at least 2"):
        topology.make_graph("ring", n)


def test_unknown_graph_is_user_error():
    with pytest.raises(UserError, match="unknown topology"):
        topology.make_graph("hypercube", 8)


# --------------------------------------------------------------------------------------
# --topology-file


def _edge_file(tmp_path, text: str) -> str:
    path = tmp_path / "edges.txt"
    path.write_text(text)
    return str(path)


def test_edge_list_comments_and_blank_lines(tmp_path):
    path = _edge_file(tmp_path, "# a 4-cycle\n\n0 1\n1 2   # inline comment\n   \n2 3\n3 0\n")
    graph = topology.make_graph("file", None, path)
    assert sorted(graph.nodes) == [0, 1, 2, 3]
    assert {tuple(sorted(e)) for e in graph.edges} == {(0, 1), (1, 2), (2, 3), (0, 3)}


def test_edge_list_num_workers_adds_nodes_and_checks_range(tmp_path):
    path = _edge_file(tmp_path, "0 1\n1 2\n")
    # an explicit worker count larger than the ids leaves an isolated worker: disconnected
    with pytest.raises(UserError, match="disconnected"):
        topology.make_graph("file", 4, path)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("0 1\n1 2 3\n", r":2: malformed"),
        ("0 1\n\n# c\nfoo bar\n", r":4: malformed"),
        ("0 1\n1\n", r":2: malformed"),
        ("0 1\n1 1\n", r":2: self-loop"),
        ("0 1\n1 -2\n", r":2: node id -2 out of range"),
    ],
)
def test_edge_list_bad_lines_name_the_line(tmp_path, text, pattern):
    path = _edge_file(tmp_path, text)
    with pytest.raises(UserError, match=pattern):
        topology.make_graph("file", None, path)


@pytest.mark.parametrize("token", ["--2", "2\u00b2"])
def test_edge_list_non_integer_token_is_a_malformed_line(tmp_path, token):
    path = _edge_file(tmp_path, f"0 1\n1 {token}\n")
    with pytest.raises(UserError, match=r":2: malformed"):
        topology.make_graph("file", None, path)


def test_edge_list_out_of_range_id_with_worker_count(tmp_path):
    path = _edge_file(tmp_path, "0 1\n1 2\n2 7\n")
    with pytest.raises(UserError, match=r":3: node id 7 out of range 0\.\.3"):
        topology.make_graph("file", 4, path)


def test_edge_list_disconnected(tmp_path):
    path = _edge_file(tmp_path, "0 1\n2 3\n")
    with pytest.raises(UserError, match=r"disconnected \(2 components\)"):
        topology.make_graph("file", None, path)


def test_edge_list_empty(tmp_path):
    path = _edge_file(tmp_path, "# nothing\n\n")
    with pytest.raises(UserError, match="no edges"):
        topology.make_graph("file", None, path)


def test_edge_list_missing_file(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="does not exist") as info:
        topology.make_graph("file", None, missing)
    assert missing in str(info.value)


# --------------------------------------------------------------------------------------
# spanning trees


def _random_connected_graph(n: int, p: float, seed: int) -> nx.Graph:
    graph = nx.gnp_random_graph(n, p, seed=seed)
    rng = np.random.default_rng(seed)
    components = [sorted(c) for c in nx.connected_components(graph)]
    for a, b in zip(components, components[1:]):  # link consecutive components
        graph.add_edge(int(rng.choice(a)), int(rng.choice(b)))
    assert nx.is_connected(graph)
    return graph


def _tree_depth(tree: nx.Graph, root: int) -> int:
    return max(nx.single_source_shortest_path_length(tree, root).values())


@pytest.mark.parametrize("kind", ["chain", "binary", "double-binary", "bfs"])
@pytest.mark.parametrize("n", [2, 3, 7, 16, 33])
def test_trees_are_spanning_trees(kind, n):
    trees = topology.spanning_trees(kind, nx.complete_graph(n), graph_given=False)
    assert len(trees) == (2 if kind == "double-binary" else 1)
    for tree in trees:
        assert nx.is_tree(tree)
        assert sorted(tree.nodes) == list(range(n))


@pytest.mark.parametrize("seed", range(8))
def test_bfs_tree_uses_graph_edges_and_is_rooted_at_a_centre(seed):
    n = 10 + 3 * seed
    graph = _random_connected_graph(n, 0.12, seed)
    (tree,) = topology.spanning_trees("bfs", graph, graph_given=True)
    assert nx.is_tree(tree) and sorted(tree.nodes) == list(range(n))
    assert all(graph.has_edge(u, v) for u, v in tree.edges)
    root = min(nx.center(graph))
    assert _tree_depth(tree, root) == nx.radius(graph)
    # a shortest-path tree: tree distance from the root == graph distance from the root
    assert nx.single_source_shortest_path_length(tree, root) == nx.single_source_shortest_path_length(graph, root)


def test_auto_tree_is_bfs_of_given_graph_and_chain_otherwise():
    ring = topology.make_graph("ring", 10)
    (auto,) = topology.spanning_trees("auto", ring, graph_given=True)
    (bfs,) = topology.spanning_trees("bfs", ring, graph_given=True)
    assert set(auto.edges) == set(bfs.edges)
    (free,) = topology.spanning_trees("auto", nx.complete_graph(10), graph_given=False)
    assert nx.is_isomorphic(free, nx.path_graph(10)) and set(free.edges) == set(nx.path_graph(10).edges)


def test_double_binary_16_has_diameter_6_chain_15():
    n = 16
    trees = topology.spanning_trees("double-binary", nx.complete_graph(n), graph_given=False)
    assert [nx.diameter(t) for t in trees] == [6, 6]
    assert topology.max_delay(trees) == 6
    chain = topology.spanning_trees("chain", nx.complete_graph(n), graph_given=False)
    assert topology.max_delay(chain) == 15
    assert set(trees[0].edges) != set(trees[1].edges)


@pytest.mark.parametrize("n", [4, 8, 16, 32, 5, 15, 33])
def test_double_binary_trees_are_complementary(n):
    """No worker is an inner node of both trees (for even n; the middle worker of odd n is),
    and every worker has at most 4 relay links in total, so bytes per worker stay balanced."""
    a, b = topology.spanning_trees("double-binary", nx.complete_graph(n), graph_given=False)
    inner_a = {v for v in a if a.degree[v] > 1}
    inner_b = {v for v in b if b.degree[v] > 1}
    assert len(inner_a & inner_b) == (0 if n % 2 == 0 else 1)
    assert max(a.degree[v] + b.degree[v] for v in range(n)) <= 4


@pytest.mark.parametrize("kind, name", [("chain", "star"), ("binary", "ring"), ("double-binary", "ring"),
                                        ("chain", "binary-tree")])
def test_tree_needing_missing_edges_is_user_error(kind, name):
    graph = topology.make_graph(name, 16)
    with pytest.raises(UserError, match=r"needs edge \d+-\d+ that the topology lacks"):
        topology.spanning_trees(kind, graph, graph_given=True)


def test_tree_within_graph_is_accepted():
    # the ring contains the chain 0-1-...-n-1; the complete graph contains every tree
    topology.spanning_trees("chain", topology.make_graph("ring", 8), graph_given=True)
    topology.spanning_trees("double-binary", topology.make_graph("complete", 8), graph_given=True)


def test_unknown_tree_is_user_error():
    with pytest.raises(UserError, match="unknown tree"):
        topology.spanning_trees("star", nx.complete_graph(4))


# --------------------------------------------------------------------------------------
# Metropolis-Hastings weights and spectral gap


@pytest.mark.parametrize("name", NAMED + ["social"])
def test_metropolis_hastings_weights_are_symmetric_doubly_stochastic(name):
    graph = topology.make_graph(name, None if name == "social" else 16)
    w = topology.metropolis_hastings_weights(graph)
    n = graph.number_of_nodes()
    assert w.shape == (n, n)
    np.testing.assert_allclose(w, w.T, atol=0)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    # support = graph edges + diagonal, and the edge weights are 1/(max degree + 1)
    for i in range(n):
        for j in range(n):
            if i != j:
                expected = 1.0 / (max(graph.degree[i], graph.degree[j]) + 1) if graph.has_edge(i, j) else 0.0
                assert w[i, j] == pytest.approx(expected)
    gap = topology.spectral_gap(w)
    assert 0 < gap <= 1


@pytest.mark.parametrize("n", [2, 5, 16])
def test_complete_graph_weights_are_exact_averaging(n):
    w = topology.metropolis_hastings_weights(nx.complete_graph(n))
    np.testing.assert_allclose(w, np.full((n, n), 1.0 / n), atol=1e-15)
    assert topology.spectral_gap(w) == pytest.approx(1.0, abs=1e-12)


def test_ring_spectral_gap_closed_form_and_decreasing():
    gaps = []
    for n in [4, 6, 8, 16, 32, 64]:
        gap = topology.spectral_gap(topology.metropolis_hastings_weights(nx.cycle_graph(n)))
        # W = (I + A)/3 on a ring: eigenvalues 1/3 + 2/3 cos(2 pi k / n)
        eig = 1 / 3 + 2 / 3 * np.cos(2 * np.pi * np.arange(1, n) / n)
        assert gap == pytest.approx(1 - np.abs(eig).max(), abs=1e-12)
        gaps.append(gap)
    assert all(a > b for a, b in zip(gaps, gaps[1:]))


# --------------------------------------------------------------------------------------
# lr correction: closed form vs the message-level RelaySum mechanism


def test_lr_correction_16_workers():
    n = 16
    chain = topology.spanning_trees("chain", nx.complete_graph(n), graph_given=False)
    binary = topology.spanning_trees("binary", nx.complete_graph(n), graph_given=False)
    double = topology.spanning_trees("double-binary", nx.complete_graph(n), graph_given=False)
    assert topology.lr_correction(chain) == pytest.approx(5.375, abs=1e-12)  # paper hand-set x5
    assert topology.lr_correction(binary) == pytest.approx(3.3203125, abs=1e-12)  # paper hand-set x3
    assert topology.lr_correction(double) == pytest.approx(3.3203125, abs=1e-12)
    # a star has every pair within 2 hops: the relay delay is 0 or 1 step
    assert topology.lr_correction([nx.star_graph(n - 1)]) == pytest.approx(1 + (n - 1) * (n - 2) / n**2)
    assert topology.lr_correction([nx.path_graph(2)]) == 1.0


def _impulse_limit(tree: nx.Graph, max_steps: int = 20_000) -> np.ndarray:
    """Run the RelaySum-of-models mechanism on scalars (x0 = 0, one -1 update at step 0) to its limit.

    Per step t: half_i = x_i (minus 1 at t = 0); send channel.outgoing(half_i); then
    (total, count) = channel.incoming(half_i, inbox) and x_i = (total + (n - count) * x0) / n.
    """
    n = tree.number_of_nodes()
    channels = [RelaySumChannel(i, sorted(tree.neighbors(i))) for i in range(n)]
    x0 = 0.0
    model = np.full(n, x0)
    for t in range(max_steps):
        half = [np.array([model[i] - (1.0 if t == 0 else 0.0)]) for i in range(n)]
        out = [channels[i].outgoing(half[i]) for i in range(n)]
        new = np.empty(n)
        for i in range(n):
            total, count = channels[i].incoming(half[i], {j: out[j][i] for j in channels[i].neighbors})
            new[i] = (total[0] + (n - count) * x0) / n
        converged = np.abs(new - model).max() < 1e-14 and np.ptp(new) < 1e-12
        model = new
        if converged and t > 2 * n:
            return model
    raise AssertionError(f"impulse response did not converge in {max_steps} steps: {model}")


def _cases():
    cases = []
    for n in [2, 3, 5, 8, 12, 16, 20]:
        cases.append(("chain", n, 0))
        cases.append(("binary", n, 0))
    for n, seed in [(6, 1), (10, 2), (16, 3), (25, 4), (40, 5)]:
        cases.append(("bfs", n, seed))
    return cases


@pytest.mark.parametrize("kind, n, seed", _cases())
def test_lr_correction_matches_message_level_impulse_response(kind, n, seed):
    if kind == "bfs":
        (tree,) = topology.spanning_trees("bfs", _random_connected_graph(n, 0.15, seed), graph_given=True)
    else:
        (tree,) = topology.spanning_trees(kind, nx.complete_graph(n), graph_given=False)
    limit = _impulse_limit(tree)
    assert np.all(limit < 0)
    assert 1.0 / abs(limit.mean()) == pytest.approx(topology.lr_correction([tree]), rel=1e-9)


def test_topology_stats():
    graph = topology.make_graph("ring", 16)
    trees = topology.spanning_trees("bfs", graph)
    stats = topology.topology_stats(graph, trees)
    assert stats.num_workers == 16
    # any spanning tree of a ring is a path: diameter n - 1, but depth 8 from the centre root 0
    assert stats.diameter == 15
    assert _tree_depth(trees[0], 0) == 8
    assert stats.max_degree == 2
    assert stats.spectral_gap == pytest.approx(topology.spectral_gap(topology.metropolis_hastings_weights(graph)))
    assert stats.lr_correction == pytest.approx(topology.lr_correction(trees))
    d = stats.to_dict()
    assert len(d["graph_edges"]) == 16 and len(d["tree_edges"]) == 1 and len(d["tree_edges"][0]) == 15
    assert math.isfinite(d["lr_correction"])
