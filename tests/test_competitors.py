"""Time-varying and directed communication plans, push-sum, local steps and the newer competitors
(momentum tracking, GUT, QG-GUTm, BTPP) against matrix-form references (pure, fast)."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from relay_ray import topology
from relay_ray.algorithms import build_plan, make_algorithm
from relay_ray.config import RunConfig
from relay_ray.errors import UserError
from relay_ray.problems import QuadraticsProblem
from relay_ray.quadratics import make_quadratics
from relay_ray.simulate import simulate


def _algorithms(name: str, graph: nx.Graph, topology_name: str | None, x0s: np.ndarray, momentum: float = 0.0,
                weight_decay: float = 0.0, trees: list[nx.Graph] | None = None):
    plan = build_plan(name, graph, trees or topology.spanning_trees("bfs", graph), topology_name)
    return [make_algorithm(name, i, plan, x0s[i].astype(np.float32), momentum, weight_decay) for i in range(len(x0s))]


def _step(algos, grads, lr: float, t: int) -> None:
    """Step t of every worker, messages routed by the plan as the engines route them."""
    for algo, grad in zip(algos, grads):
        algo.step = t
        algo.local_step(np.asarray(grad, dtype=np.float32), lr)
    inboxes = algos[0].plan.route([algo.outgoing() for algo in algos])
    for algo, inbox in zip(algos, inboxes):
        algo.incoming(inbox)


def _params(algos) -> np.ndarray:
    return np.stack([np.asarray(a.params, dtype=np.float64) for a in algos])


@pytest.mark.parametrize("n", [8, 16, 32])
def test_one_peer_exponential_averages_exactly_after_log2_n_steps(n):
    graph = topology.make_graph("exponential-one-peer", n)
    x0s = np.random.default_rng(n).normal(size=(n, 5))
    algos = _algorithms("dsgd", graph, "exponential-one-peer", x0s)
    steps = int(math.log2(n))
    assert algos[0].plan.period == steps
    zeros = np.zeros_like(x0s)
    for t in range(steps - 1):
        _step(algos, zeros, 0.0, t)
    assert np.abs(_params(algos) - x0s.mean(axis=0)).max() > 1e-2  # one step short: not yet
    _step(algos, zeros, 0.0, steps - 1)
    np.testing.assert_allclose(_params(algos), np.broadcast_to(x0s.mean(axis=0), x0s.shape), atol=1e-6)
    # the topology's statistics say the same: the product of one period is the exact average
    stats = topology.topology_stats(graph, topology.spanning_trees("bfs", graph), "exponential-one-peer")
    assert stats.period == steps and stats.consensus_rate == 0.0


def test_one_peer_exponential_sends_one_model_per_step_and_mixes_inexactly_off_powers_of_two():
    n = 12
    graph = topology.make_graph("exponential-one-peer", n)
    algos = _algorithms("dsgd", graph, "exponential-one-peer", np.ones((n, 3)))
    algos[0].step = 2  # hop 4: 0 sends to 4 only
    algos[0].local_step(np.zeros(3, np.float32), 0.0)
    sizes = dict(zip(algos[0].neighbors, (m.nbytes for m in algos[0].outgoing())))
    assert sizes[4] == 12 and sum(sizes.values()) == 12
    stats = topology.topology_stats(graph, topology.spanning_trees("bfs", graph), "exponential-one-peer")
    assert 0 < stats.consensus_rate < 1 and stats.period == 4


def test_push_sum_weights_stay_positive_and_the_debiased_average_is_preserved():
    """On a star the push shares are 1/2 at the leaves and 1/n at the centre: P is column but not row
    stochastic, so w moves away from 1.  sum x and sum w are preserved, z = x / w reaches the average."""
    n = 7
    graph = topology.make_graph("star", n)
    x0s = np.random.default_rng(0).normal(size=(n, 4))
    algos = _algorithms("sgp", graph, "star", x0s)
    zeros = np.zeros_like(x0s)
    weights = []
    for t in range(200):
        _step(algos, zeros, 0.0, t)
        weights.append([a.weight for a in algos])
        np.testing.assert_allclose(sum(np.asarray(a.numerator, np.float64) for a in algos), x0s.sum(axis=0),
                                   atol=1e-5)
        assert math.isclose(sum(a.weight for a in algos), n, rel_tol=1e-6)  # w travels as float32
    weights = np.array(weights)
    assert weights.min() > 0 and np.ptp(weights[-1]) > 0.5  # positive, and far from uniform
    np.testing.assert_allclose(_params(algos), np.broadcast_to(x0s.mean(axis=0), x0s.shape), atol=1e-5)
    # D-SGD with the same shares would average with weights, not uniformly: push-sum's de-biasing matters
    biased = [np.asarray(a.numerator, np.float64) for a in algos]
    assert np.abs(biased[0] - x0s.mean(axis=0)).max() > 0.1


def test_sgp_on_a_regular_directed_graph_is_dsgd():
    """w stays 1 when every worker has the same out-degree: SGP = D-SGD with the same weights."""
    config = dict(dataset="quadratics", backend="local", num_workers=8, steps=30, topology="exponential-directed")
    sgp = simulate(RunConfig(algorithm="sgp", **config), progress=False)["final"]
    dsgd = simulate(RunConfig(algorithm="dsgd", **config), progress=False)["final"]
    assert math.isclose(sgp["suboptimality"], dsgd["suboptimality"], rel_tol=1e-5)
    # one more float per message: the weight
    d = 10
    assert sgp["bytes_sent_per_worker"] == 30 * 3 * 4 * (d + 1) and dsgd["bytes_sent_per_worker"] == 30 * 3 * 4 * d


def test_local_steps_of_allreduce_are_local_sgd():
    """H = 4: every worker takes 4 plain SGD steps on its own quadratic, then all average (FedAvg
    with equal shards); bytes are sent on the communication steps only."""
    n, d, lr, steps = 4, 10, 0.05, 8
    task = make_quadratics(n, 10.0, seed=0)
    config = RunConfig(algorithm="allreduce", dataset="quadratics", backend="local", num_workers=n, steps=steps,
                       local_steps=4, lr=lr, momentum=0.0, weight_decay=0.0, heterogeneity=10.0, seed=0)
    summary = simulate(config, progress=False)
    problems = [QuadraticsProblem(task, i) for i in range(n)]
    x = np.stack([problems[i].initial_params() for i in range(n)]).astype(np.float64)
    for t in range(steps):
        x = x - lr * np.stack([problems[i].loss_and_grad(x[i].astype(np.float32))[1] for i in range(n)])
        if (t + 1) % 4 == 0:
            x[:] = x.mean(axis=0)
    expected = float(problems[0].evaluate(x[0].astype(np.float32)))
    assert math.isclose(summary["final"]["suboptimality"], expected, rel_tol=1e-4)
    assert summary["final"]["bytes_sent_per_worker"] == 2 * (n - 1) * d * 4


def test_local_steps_and_time_varying_graphs_refuse_algorithms_they_do_not_fit():
    with pytest.raises(UserError, match="--local-steps > 1 is for .* not d2"):
        RunConfig(algorithm="d2", local_steps=4)
    with pytest.raises(UserError, match="not allreduce with --compression"):
        RunConfig(algorithm="allreduce", local_steps=2, compression="topk:0.1")
    with pytest.raises(UserError, match="exponential-one-peer changes with the step; relaysgd needs"):
        RunConfig(algorithm="relaysgd", topology="exponential-one-peer")
    with pytest.raises(UserError, match="exponential-directed is directed; d2 needs"):
        RunConfig(algorithm="d2", topology="exponential-directed")
    with pytest.raises(UserError, match="--local-steps must be at least 1"):
        RunConfig(local_steps=0)


# --------------------------------------------------------------------------------------
# the competitors against their matrix forms, on gradients g_i(x) = a_i * x - b_i


def _problem(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.5, 2.0, size=(n, d)), rng.normal(scale=3.0, size=(n, d))
    return lambda x: a * x - b


def _run(algos, grad, lr: float, steps: int) -> list[np.ndarray]:
    """Every worker's params after each step, stepping with gradients at the params."""
    history = []
    for t in range(steps):
        _step(algos, grad(_params(algos)), lr, t)
        history.append(_params(algos))
    return history


def test_btpp_matches_its_matrix_form_with_the_authors_trees():
    n, d, lr, branching = 10, 3, 0.2, 3
    grad = _problem(n, d)
    tree = topology.b_ary_tree(n, branching)
    pull = np.zeros((n, n))
    pull[0, 0] = 1
    for k in range(1, n):
        pull[k, (k - 1) // branching] = 1  # R: a worker takes its parent's x - γy
    push = pull.T  # C = R^T
    x = np.zeros((n, d))
    y = grad(x)
    gamma = lr / n
    expected = []
    for _ in range(12):
        new_x = pull @ (x - gamma * y)
        y, x = push @ y + grad(new_x) - grad(x), new_x
        expected.append(x)
    algos = _algorithms("btpp", tree, None, np.zeros((n, d)), trees=[tree])
    for got, want in zip(_run(algos, grad, lr, 12), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_momentum_tracking_matches_its_matrix_form():
    n, d, lr, beta, wd = 8, 3, 0.05, 0.9, 0.01
    grad = _problem(n, d)
    graph = topology.make_graph("ring", n)
    weights = topology.metropolis_hastings_weights(graph)
    x, v, c = np.zeros((n, d)), np.zeros((n, d)), np.zeros((n, d))
    expected = []
    for _ in range(15):
        v = beta * v + grad(x) + wd * x
        x, c = weights @ x - lr * (v - c), v + weights @ (c - v)
        expected.append(x)
    algos = _algorithms("momentum-tracking", graph, "ring", np.zeros((n, d)), momentum=beta, weight_decay=wd)
    for got, want in zip(_run(algos, grad, lr, 15), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,beta,mu", [("gut", 0.0, 0.9), ("qg-gutm", 0.9, 0.07)])
def test_global_update_tracking_matches_the_authors_update(name, beta, mu):
    """The authors' quantities, computed directly: gradient at the gossip average Wx, G = (W - I)x,
    δ = g - G/η, y = δ - μδ' + μ W m' - μ(1 + β) G'/η, m = βm' + y, x <- x - ηm; ``params`` is Wx."""
    n, d, lr = 8, 3, 0.05
    grad = _problem(n, d)
    graph = topology.make_graph("ring", n)
    weights = topology.metropolis_hastings_weights(graph)
    x, m = np.zeros((n, d)), np.zeros((n, d))
    delta_prev, gossip_prev = np.zeros((n, d)), np.zeros((n, d))
    expected = []
    for _ in range(15):
        gossip = weights @ x - x
        delta = grad(weights @ x) - gossip / lr
        tracked = delta - mu * delta_prev + mu * weights @ m - mu * (1 + beta) * gossip_prev / lr
        m = beta * m + tracked
        x = x - lr * m
        delta_prev, gossip_prev = delta, gossip
        expected.append(weights @ x)
    algos = _algorithms(name, graph, "ring", np.zeros((n, d)), momentum=beta)
    for got, want in zip(_run(algos, grad, lr, 15), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_sgp_with_momentum_matches_push_sum_on_a_star():
    n, d, lr, beta = 6, 3, 0.05, 0.9
    grad = _problem(n, d)
    graph = topology.make_graph("star", n)
    push = topology.push_matrices(topology.communication_schedule("star", graph))[0]
    x, w, buffer = np.zeros((n, d)), np.ones(n), np.zeros((n, d))
    expected = []
    for _ in range(15):
        z = x / w[:, None]
        g = grad(z)
        buffer = beta * buffer + g
        x = push @ (x - lr * (g + beta * buffer))  # Nesterov at z, applied to x
        w = push @ w
        expected.append(x / w[:, None])
    algos = _algorithms("sgp", graph, "star", np.zeros((n, d)), momentum=beta)
    for got, want in zip(_run(algos, grad, lr, 15), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algorithm,layout", [("btpp", {}), ("btpp", dict(branching=4)),
                                               ("momentum-tracking", dict(topology="ring")),
                                               ("momentum-tracking", dict(topology="exponential-one-peer"))])
def test_trackers_reach_the_exact_optimum_under_heterogeneity(algorithm, layout):
    """zeta^2 = 100, where D-SGD stalls at a floor: every worker reaches the optimum."""
    config = RunConfig(algorithm=algorithm, dataset="quadratics", backend="local", num_workers=16, steps=1500,
                       heterogeneity=100.0, lr=0.02, eval_every=1500, **layout)
    final = simulate(config, progress=False)["final"]
    assert final["suboptimality_worst"] < 1e-6
    floor = simulate(RunConfig(**{**config.to_dict(), "algorithm": "dsgd", "topology": "ring", "branching": 2}),
                     progress=False)["final"]
    assert floor["suboptimality_worst"] > 1e-2


def test_gut_lowers_the_floor_by_its_tracking_scale():
    """GUT's fixed point x = Wx - η(1 - μ)g: with μ = 0.9 the heterogeneity floor of D-SGD drops
    ~(1 - μ)^2 = 100x (not to zero)."""
    config = dict(dataset="quadratics", backend="local", num_workers=16, steps=3000, heterogeneity=100.0, lr=0.02,
                  topology="ring", eval_every=3000)
    gut = simulate(RunConfig(algorithm="gut", **config), progress=False)["final"]["suboptimality"]
    dsgd = simulate(RunConfig(algorithm="dsgd", **config), progress=False)["final"]["suboptimality"]
    assert 30 < dsgd / gut < 300
