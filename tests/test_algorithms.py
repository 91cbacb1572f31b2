"""The per-worker state machines of relay_ray.algorithms against numpy references (pure, fast).

Step semantics used throughout (the order the simulator and the engine call them): step t = 0, 1, ...
of every worker is ``local_step`` (algorithms) then ``outgoing``; once every worker has sent, each
worker runs ``incoming`` with its neighbours' step-t messages.  "After k steps" means after the
``incoming`` of step t = k - 1 (the first step is t = 0).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_ray import topology
from relay_ray.algorithms import ALGORITHMS, CommPlan, RelaySumChannel, algorithm_class, build_plan, make_algorithm
from relay_ray.algorithms.gossip import gossip_mix
from relay_ray.optim import NesterovSGD

# --------------------------------------------------------------------------------------
# helpers


def _random_connected_graph(n: int, p: float, seed: int) -> nx.Graph:
    graph = nx.gnp_random_graph(n, p, seed=seed)
    rng = np.random.default_rng(seed)
    components = [sorted(c) for c in nx.connected_components(graph)]
    for a, b in zip(components, components[1:]):
        graph.add_edge(int(rng.choice(a)), int(rng.choice(b)))
    return graph


def _irregular_graph() -> nx.Graph:
    """Connected, degrees 1..5, so Metropolis-Hastings weights are all different."""
    graph = _random_connected_graph(9, 0.3, seed=4)
    graph.add_edge(8, 9)  # a leaf
    assert nx.is_connected(graph) and len({d for _, d in graph.degree}) >= 3
    return graph


def _workers(name: str, graph: nx.Graph, trees: list[nx.Graph], x0, momentum=0.0, weight_decay=0.0):
    plan = build_plan(name, graph, trees)
    n = plan.num_workers
    x0s = [x0] * n if np.ndim(x0) == 1 else list(x0)
    return [make_algorithm(name, i, plan, np.asarray(x0s[i], dtype=np.float32), momentum, weight_decay)
            for i in range(n)]


def _step(algos, grads, lr, drop=lambda t, i, j: False, t=0):
    """One synchronous step of every worker; ``drop(t, i, j)`` loses the message j -> i."""
    for algo, grad in zip(algos, grads):
        algo.local_step(np.asarray(grad, dtype=np.float32), lr)
    outboxes = [algo.outgoing() for algo in algos]
    plan = algos[0].plan
    for i, algo in enumerate(algos):
        inbox = [None if drop(t, i, j) else outboxes[j][index] for j, index in plan.inbox_order(i)]
        algo.incoming(inbox)
    return outboxes


def _params(algos) -> np.ndarray:
    return np.stack([a.params for a in algos]).astype(np.float64)


def _setup(name: str, tree: str = "chain"):
    """The graph/trees the CLI would use: relay algorithms on their own tree, gossip on a ring."""
    n = 8
    if algorithm_class(name).uses_trees:
        trees = topology.spanning_trees(tree, nx.complete_graph(n), graph_given=False)
        return nx.compose_all(trees), trees
    graph = topology.make_graph("ring", n)
    return graph, topology.spanning_trees("bfs", graph)


# --------------------------------------------------------------------------------------
# the RelaySum mechanism (hypothesis)


def _relay_constant(tree: nx.Graph, payloads: np.ndarray, steps: int) -> list[list[tuple[np.ndarray, int]]]:
    """Relay the constant payload v_i of every worker for ``steps`` steps; result[k-1][j] = (total, count)
    of worker j after k steps."""
    n = tree.number_of_nodes()
    channels = [RelaySumChannel(i, sorted(tree.neighbors(i))) for i in range(n)]
    history = []
    for _ in range(steps):
        out = [ch.outgoing(payloads[i]) for i, ch in enumerate(channels)]
        history.append([ch.incoming(payloads[j], {i: out[i][j] for i in ch.neighbors})
                        for j, ch in enumerate(channels)])
    return history


@st.composite
def _graph_and_trees(draw):
    n = draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    if draw(st.booleans()):
        graph = nx.random_labeled_tree(n, seed=seed)
    else:
        graph = _random_connected_graph(n, draw(st.floats(0.0, 0.4)), seed)
    trees = {
        "chain": topology.spanning_trees("chain", graph, graph_given=False),
        "binary": topology.spanning_trees("binary", graph, graph_given=False),
        "double-binary": topology.spanning_trees("double-binary", graph, graph_given=False),
        "bfs": topology.spanning_trees("bfs", graph, graph_given=True),
    }
    if nx.is_tree(graph):
        trees["random-tree"] = [graph]
    return n, seed, trees


@settings(max_examples=40, deadline=None)
@given(_graph_and_trees())
def test_relaysum_reaches_everyone_after_exactly_diameter_steps(case):
    """After k steps worker j holds exactly the payloads of the workers within tree distance k
    (worker k's payload reaches j delayed by d(j, k) - 1 steps), so (total, count) == (sum_i v_i, n)
    at every worker after exactly diam(T) steps and, for the farthest pair, not one step earlier."""
    n, seed, trees = case
    payloads = np.random.default_rng(seed).integers(-1000, 1000, size=(n, 3)).astype(np.float64)
    for kind, tree_list in trees.items():
        for tree in tree_list:
            diameter = nx.diameter(tree)
            dist = dict(nx.all_pairs_shortest_path_length(tree))
            history = _relay_constant(tree, payloads, diameter + 2)
            for k, state in enumerate(history, start=1):
                for j, (total, count) in enumerate(state):
                    within = [i for i in range(n) if dist[j][i] <= k]
                    assert count == len(within), (kind, k, j)
                    np.testing.assert_array_equal(total, payloads[within].sum(axis=0))
                everyone = all(count == n for _, count in state)
                assert everyone == (k >= diameter), (kind, k, diameter)
            for j, (total, count) in enumerate(history[diameter - 1]):
                assert count == n
                np.testing.assert_array_equal(total, payloads.sum(axis=0))
            if diameter >= 2:
                a, b = max(((a, b) for a in range(n) for b in range(n)), key=lambda ab: dist[ab[0]][ab[1]])
                assert dist[a][b] == diameter
                assert history[diameter - 2][a][1] < n and history[diameter - 2][b][1] < n


def test_relaysum_single_step_single_edge():
    """Two workers: after 1 step each holds both payloads (diameter 1)."""
    a, b = RelaySumChannel(0, [1]), RelaySumChannel(1, [0])
    va, vb = np.array([1.0, 2.0]), np.array([10.0, 20.0])
    out_a, out_b = a.outgoing(va), b.outgoing(vb)
    assert out_a[1][1] == 1 and out_b[0][1] == 1
    total, count = a.incoming(va, {1: out_b[0]})
    np.testing.assert_array_equal(total, va + vb)
    assert count == 2


# --------------------------------------------------------------------------------------
# every algorithm: consensus is preserved


@pytest.mark.parametrize("name", ALGORITHMS)
def test_zero_gradients_keep_identical_models_at_x0(name):
    x0 = np.random.default_rng(0).normal(size=11).astype(np.float32)
    for tree in (["chain", "binary", "double-binary"] if algorithm_class(name).uses_trees else ["bfs"]):
        graph, trees = _setup(name, tree)
        algos = _workers(name, graph, trees, x0, momentum=0.9)
        for t in range(25):
            _step(algos, np.zeros((len(algos), x0.size)), lr=0.1, t=t)
        np.testing.assert_allclose(_params(algos), np.tile(x0, (len(algos), 1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["dsgd", "d2", "gradient-tracking", "dsgd-qgm"])
def test_gossip_with_zero_gradients_preserves_the_mean_and_mixes(name):
    graph = _irregular_graph()
    n = graph.number_of_nodes()
    start = np.random.default_rng(1).normal(size=(n, 4))
    algos = _workers(name, graph, [], start, momentum=0.9)
    for t in range(300):
        _step(algos, np.zeros((n, 4)), lr=0.1, t=t)
    params = _params(algos)
    # float32 messages: D^2 integrates the rounding error of its correction (a Jordan block at 1 on
    # the mean), so its mean drifts by ~1e-5 over 300 steps; a wrong mixing rule moves it by ~1e-1
    np.testing.assert_allclose(params.mean(axis=0), start.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(params, np.tile(start.mean(axis=0), (n, 1)), atol=2e-4)
    assert np.abs(start - start.mean(axis=0)).max() > 0.5  # the workers did start apart


# --------------------------------------------------------------------------------------
# numpy references


def test_allreduce_one_step_is_the_exact_mean():
    n, d, lr, beta = 16, 7, 0.1, 0.9
    rng = np.random.default_rng(2)
    x0 = rng.normal(size=d)
    grads = rng.normal(size=(n, d))
    graph, trees = topology.make_graph("ring", n), topology.spanning_trees("bfs", topology.make_graph("ring", n))
    algos = _workers("allreduce", graph, trees, x0, momentum=beta)
    assert all(len(a.neighbors) == n - 1 for a in algos)
    _step(algos, grads, lr)
    updates = -lr * (1 + beta) * grads  # first Nesterov step: buf = g, direction g + beta * buf
    expected = (x0 + updates).mean(axis=0)
    np.testing.assert_allclose(_params(algos), np.tile(expected, (n, 1)), rtol=1e-5, atol=1e-6)


def _gossip_reference(name: str, w: np.ndarray, x0: np.ndarray, grads_per_step, lr: float, beta: float):
    """DESIGN §1 in float64 numpy, all workers at once (rows = workers)."""
    n = w.shape[0]
    x = np.tile(x0, (n, 1))
    c = np.zeros_like(x)
    m = np.zeros_like(x)
    for grads in grads_per_step:
        if name == "dsgd-qgm":
            direction = grads + beta * (beta * m + grads)
            new = w @ (x - lr * direction)
            m = beta * m + (1 - beta) * (x - new) / lr
            x = new
            continue
        buf = beta * m + grads
        u = -lr * (grads + beta * buf)
        m = buf
        if name == "dsgd":
            x = w @ (x + u)
        elif name == "d2":
            new = w @ (x + u + c)
            c = new - x - u
            x = new
        elif name == "gradient-tracking":
            x = w @ (x + u + c)
            c = w @ (c + u) - u
    return x


@pytest.mark.parametrize("name", ["dsgd", "d2", "gradient-tracking", "dsgd-qgm"])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_gossip_algorithms_match_numpy_reference(name, beta):
    graph = _irregular_graph()
    n, d, lr = graph.number_of_nodes(), 5, 0.05
    w = topology.metropolis_hastings_weights(graph)
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=d)
    grads = [rng.normal(size=(n, d)) for _ in range(6)]
    algos = _workers(name, graph, topology.spanning_trees("bfs", graph), x0, momentum=beta)
    for t, g in enumerate(grads):
        _step(algos, g, lr, t=t)
        expected = _gossip_reference(name, w, x0, grads[:t + 1], lr, beta)
        np.testing.assert_allclose(_params(algos), expected, rtol=1e-5, atol=1e-5)


def test_dsgd_one_step_is_w_times_half_step():
    graph = _irregular_graph()
    n, d, lr = graph.number_of_nodes(), 6, 0.1
    rng = np.random.default_rng(5)
    x0 = rng.normal(size=d)
    grads = rng.normal(size=(n, d))
    algos = _workers("dsgd", graph, [], x0)
    assert [a.neighbors for a in algos] == [tuple(sorted(graph.neighbors(i))) for i in range(n)]
    _step(algos, grads, lr)
    w = topology.metropolis_hastings_weights(graph)
    np.testing.assert_allclose(_params(algos), w @ (np.tile(x0, (n, 1)) - lr * grads), rtol=1e-5, atol=1e-6)


def _delays(trees, n: int) -> list[np.ndarray]:
    """delta_ik = max(d(i, k) - 1, 0) per tree."""
    return [np.maximum(np.array(nx.floyd_warshall_numpy(t, nodelist=range(n))) - 1, 0).astype(int) for t in trees]


def _delayed_average(halves, t: int, delays, x0) -> np.ndarray:
    """x_i^{t+1} = (1/n) sum_k xhalf_k^{t - delta_ik}, xhalf^{<0} = x0, per coordinate's tree (stride split)."""
    n, d = halves[0].shape
    new = np.empty((n, d))
    for i in range(n):
        for coord in range(d):
            delay = delays[coord % len(delays)][i]
            new[i, coord] = sum(halves[t - delay[k]][k, coord] if t - delay[k] >= 0 else x0[coord] for k in range(n)) / n
    return new


def _relay_reference(name, trees, x0, updates_per_step):
    """x_i^{t+1} = (1/n) sum_k xhalf_k^{t - delta_ik} (xhalf^{<0} = x0) for relaysgd, and
    x_i^{t+1} = x_i^t + (1/n) sum_k u_k^{t - delta_ik} (u^{<0} = 0) for relaysum-grad, with
    delta_ik = max(d(i, k) - 1, 0) on the tree that carries the coordinate (stride split)."""
    n, d = len(updates_per_step[0]), x0.size
    delays = _delays(trees, n)
    x = np.tile(x0, (n, 1)).astype(np.float64)
    halves, updates = [], []
    for t, u in enumerate(updates_per_step):
        halves.append(x + u)
        updates.append(u)
        if name == "relaysgd":
            x = _delayed_average(halves, t, delays, x0)
            continue
        new = np.empty_like(x)
        for i in range(n):
            for coord in range(d):
                delay = delays[coord % len(trees)][i]
                new[i, coord] = x[i, coord] + sum(updates[t - delay[k]][k, coord] for k in range(n)
                                                  if t - delay[k] >= 0) / n
        x = new
    return x


def _relaysgd_qgm_reference(trees, x0, grads_per_step, lr: float, beta: float):
    """RelaySGD's delayed average (above) with the quasi-global momentum rule of DSGD-QGM's reference:
    direction g + beta (beta m + g), m <- beta m + (1 - beta)(x^t - x^{t+1}) / lr."""
    n = len(grads_per_step[0])
    delays = _delays(trees, n)
    x = np.tile(x0, (n, 1)).astype(np.float64)
    m = np.zeros_like(x)
    halves = []
    for t, g in enumerate(grads_per_step):
        halves.append(x - lr * (g + beta * (beta * m + g)))
        new = _delayed_average(halves, t, delays, x0)
        m = beta * m + (1 - beta) * (x - new) / lr
        x = new
    return x


@pytest.mark.parametrize("tree", ["chain", "double-binary"])
def test_relaysgd_qgm_matches_its_reference(tree):
    n, d, lr, beta = 8, 5, 0.05, 0.9
    trees = topology.spanning_trees(tree, nx.complete_graph(n), graph_given=False)
    rng = np.random.default_rng(7)
    x0 = rng.normal(size=d)
    algos = _workers("relaysgd-qgm", nx.compose_all(trees), trees, x0, momentum=beta)
    grads = [rng.normal(size=(n, d)) for _ in range(12)]
    for t, g in enumerate(grads):
        _step(algos, g, lr, t=t)
    np.testing.assert_allclose(_params(algos), _relaysgd_qgm_reference(trees, x0, grads, lr, beta), rtol=1e-4, atol=1e-5)
    assert np.abs(algos[0].optimizer.buffer).max() > 0.1  # the momentum did act


@pytest.mark.parametrize("name", ["relaysgd", "relaysum-grad"])
@pytest.mark.parametrize("tree", ["chain", "binary", "double-binary"])
def test_relay_algorithms_match_delay_reference(name, tree):
    """With momentum 0 and gradient g the update is u = -lr g; drive every worker with random
    gradients and compare to the delayed-average formula of DESIGN §1."""
    n, d, lr = 8, 5, 0.1
    trees = topology.spanning_trees(tree, nx.complete_graph(n), graph_given=False)
    rng = np.random.default_rng(6)
    x0 = rng.normal(size=d)
    algos = _workers(name, nx.compose_all(trees), trees, x0)
    grads = [rng.normal(size=(n, d)) for _ in range(12)]
    for t, g in enumerate(grads):
        _step(algos, g, lr, t=t)
    expected = _relay_reference(name, trees, x0, [-lr * g for g in grads])
    np.testing.assert_allclose(_params(algos), expected, rtol=1e-5, atol=1e-5)


def test_relaysgd_double_binary_splits_coordinates_by_stride():
    n, d = 16, 7  # tree 0 relays coords 0, 2, 4, 6 (4 values), tree 1 coords 1, 3, 5 (3 values)
    trees = topology.spanning_trees("double-binary", nx.complete_graph(n), graph_given=False)
    plan = build_plan("relaysgd", nx.compose_all(trees), trees)
    assert len(plan.tree_neighbors) == 2
    algos = _workers("relaysgd", nx.compose_all(trees), trees, np.zeros(d))
    sender = 5
    grads = np.zeros((n, d))
    grads[sender, 0] = 1.0  # an even coordinate: travels on tree 0 only
    grads[sender, 1] = 2.0  # an odd coordinate: travels on tree 1 only
    outboxes = _step(algos, grads, lr=1.0)
    sizes = (4, 3)
    for i, algo in enumerate(algos):
        assert algo.neighbors == tuple(sorted(set(trees[0].neighbors(i)) | set(trees[1].neighbors(i))))
        for j, message in zip(algo.neighbors, outboxes[i]):
            expected = sum(sizes[t] + 1 for t in range(2) if trees[t].has_edge(i, j))
            assert message.dtype == np.float32 and message.shape == (expected,), (i, j)
    # at step 0 a message holds, per tree of the edge, the sender's coordinates of that tree and count 1
    for j, message in zip(algos[sender].neighbors, outboxes[sender]):
        parts, offset = [], 0
        for t in range(2):
            if trees[t].has_edge(sender, j):
                parts.append((t, message[offset:offset + sizes[t]], message[offset + sizes[t]]))
                offset += sizes[t] + 1
        for t, values, count in parts:
            half = np.zeros(d, dtype=np.float32)
            half[0], half[1] = -1.0, -2.0
            np.testing.assert_array_equal(values, half[t::2])
            assert count == 1
    # after one step coordinate 0 moved exactly at the sender's tree-0 neighbours, coordinate 1 at tree 1's
    params = _params(algos)
    moved0 = {i for i in range(n) if params[i, 0] != 0}
    moved1 = {i for i in range(n) if params[i, 1] != 0}
    assert moved0 == {sender} | set(trees[0].neighbors(sender))
    assert moved1 == {sender} | set(trees[1].neighbors(sender))
    assert moved0 != moved1
    np.testing.assert_allclose(params[sorted(moved0), 0], -1.0 / n)
    np.testing.assert_allclose(params[sorted(moved1), 1], -2.0 / n)
    assert not params[:, 2:].any()


def test_comm_plan_for_trees_is_the_union_and_inbox_order_is_consistent():
    trees = topology.spanning_trees("double-binary", nx.complete_graph(16), graph_given=False)
    plan = CommPlan.for_trees(trees)
    for i in range(16):
        for j, index in plan.inbox_order(i):
            assert plan.neighbors[j][index] == i
    assert plan.num_edges == nx.compose_all(trees).number_of_edges()


# --------------------------------------------------------------------------------------
# local optimizer


@pytest.mark.parametrize("beta, weight_decay", [(0.9, 1e-2), (0.5, 0.0), (0.0, 1e-3)])
def test_nesterov_matches_torch_sgd(beta, weight_decay):
    d, lr = 6, 0.05
    rng = np.random.default_rng(7)
    m = rng.normal(size=(d, d))
    hessian, b = m @ m.T / d + np.eye(d), rng.normal(size=d)
    x0 = rng.normal(size=d).astype(np.float32)

    ours = NesterovSGD(d, momentum=beta, weight_decay=weight_decay)
    x = x0.copy()
    param = torch.nn.Parameter(torch.from_numpy(x0.copy()).double())
    opt = torch.optim.SGD([param], lr=lr, momentum=beta, nesterov=beta > 0, weight_decay=weight_decay)
    for _ in range(8):
        x = x + ours.update(x, (hessian @ x - b).astype(np.float32), lr)
        opt.zero_grad()
        param.grad = torch.from_numpy(hessian) @ param.detach() - torch.from_numpy(b)
        opt.step()
        np.testing.assert_allclose(x, param.detach().numpy(), rtol=1e-5, atol=1e-6)
    if beta:
        np.testing.assert_allclose(ours.buffer, opt.state[param]["momentum_buffer"].numpy(), rtol=1e-5, atol=1e-6)


def test_nesterov_direction_does_not_commit_the_buffer():
    opt = NesterovSGD(3, momentum=0.9, weight_decay=0.0)
    direction, buffer = opt.direction(np.zeros(3), np.ones(3))
    np.testing.assert_allclose(direction, 1.9)
    np.testing.assert_allclose(buffer, 1.0)
    assert not opt.buffer.any()


# --------------------------------------------------------------------------------------
# lost messages (inbox entry None)


def test_relaysum_channel_lost_message_counts_zero_and_is_not_forwarded():
    # chain 0 - 1 - 2; the step-0 message 0 -> 1 is lost
    channels = [RelaySumChannel(0, [1]), RelaySumChannel(1, [0, 2]), RelaySumChannel(2, [1])]
    v = [np.array([1.0]), np.array([10.0]), np.array([100.0])]
    out = [ch.outgoing(v[i]) for i, ch in enumerate(channels)]
    total, count = channels[1].incoming(v[1], {0: None, 2: out[2][1]})
    assert (float(total[0]), count) == (110.0, 2)
    channels[0].incoming(v[0], {1: out[1][0]})
    channels[2].incoming(v[2], {1: out[1][2]})
    # step 1: worker 1 relays to 2 only its own payload (nothing from the lost message)
    out = [ch.outgoing(v[i]) for i, ch in enumerate(channels)]
    assert float(out[1][2][0][0]) == 10.0 and out[1][2][1] == 1
    # ... while to worker 0 it relays worker 2's step-0 message
    assert float(out[1][0][0][0]) == 110.0 and out[1][0][1] == 2
    total, count = channels[2].incoming(v[2], {1: out[1][2]})
    assert (float(total[0]), count) == (110.0, 2)
    # step 2 without loss: worker 2 now hears worker 0 through worker 1
    channels[1].incoming(v[1], {0: out[0][1], 2: out[2][1]})
    out = [ch.outgoing(v[i]) for i, ch in enumerate(channels)]
    total, count = channels[2].incoming(v[2], {1: out[1][2]})
    assert (float(total[0]), count) == (111.0, 3)


def test_relaysgd_fills_lost_models_with_x0():
    n, d = 3, 2
    trees = [nx.path_graph(n)]
    x0 = np.array([1.0, -1.0])
    algos = _workers("relaysgd", trees[0], trees, x0)
    grads = np.array([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
    _step(algos, grads, lr=1.0, drop=lambda t, i, j: (i, j) == (1, 0))
    halves = x0 - grads
    # worker 1 heard itself and worker 2; worker 0's model is replaced by x0
    np.testing.assert_allclose(algos[1].params, (halves[1] + halves[2] + x0) / n, rtol=1e-6)
    np.testing.assert_allclose(algos[0].params, (halves[0] + halves[1] + x0) / n, rtol=1e-6)
    # the loss is not relayed on: at step 1 worker 2 still only has workers 1 and 2
    _step(algos, np.zeros((n, d)), lr=1.0, t=1)
    # zero gradients: the step-1 half-step models are the models after step 0
    before = [(halves[0] + halves[1] + x0) / n, (halves[1] + halves[2] + x0) / n, (halves[1] + halves[2] + x0) / n]
    # without the loss worker 1 would relay worker 0's step-0 half-step model to worker 2 (count 2):
    # x_2 = (before[2] + before[1] + halves[0]) / n; with it, it forwards only its own model (count 1)
    np.testing.assert_allclose(algos[2].params, (before[2] + before[1] + x0) / n, rtol=1e-6)
    assert not np.allclose(halves[0], x0)


def test_gossip_mix_renormalises_by_received_weight():
    w = np.array([[0.5, 0.25, 0.25], [0.25, 0.75, 0.0], [0.25, 0.0, 0.75]])
    own, m1, m2 = np.array([1.0]), np.array([4.0]), np.array([8.0])
    # everything received: 0.5*1 + 0.25*4 + 0.25*8 = 3.5
    assert gossip_mix(own, [m1, m2], w, 0, (1, 2))[0] == pytest.approx(3.5)
    # message from 2 lost: (0.5*1 + 0.25*4) / 0.75 = 2
    assert gossip_mix(own, [m1, None], w, 0, (1, 2))[0] == pytest.approx(2.0)
    # everything lost: own model
    assert gossip_mix(own, [None, None], w, 0, (1, 2))[0] == pytest.approx(1.0)
    assert gossip_mix(own, [m1, None], w, 0, (1, 2)).dtype == np.float32


def test_dsgd_with_lost_message_uses_renormalised_weights():
    graph = nx.path_graph(3)  # degrees 1, 2, 1: every edge weight is 1/(2 + 1)
    w = topology.metropolis_hastings_weights(graph)
    np.testing.assert_allclose(w, [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    algos = _workers("dsgd", graph, [], np.zeros(1))
    grads = np.array([[-1.0], [-2.0], [-3.0]])  # half = x0 - lr g = [1, 2, 3]
    _step(algos, grads, lr=1.0, drop=lambda t, i, j: (i, j) == (1, 2))
    # worker 1 lost worker 2's model: (1/3 * 1 + 1/3 * 2) / (2/3) = 1.5 (not 1 without renormalising)
    assert algos[1].params[0] == pytest.approx(1.5)
    assert algos[0].params[0] == pytest.approx(2 / 3 * 1 + 1 / 3 * 2)
    assert algos[2].params[0] == pytest.approx(1 / 3 * 2 + 2 / 3 * 3)
