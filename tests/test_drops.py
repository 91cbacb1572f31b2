"""--drop-prob: each received message is lost independently, as a function of (seed, step, edge),
so the simulator and the Ray engine (tests/test_recovery.py runs Ray with drops against the
simulator) and a resumed run (tests/test_checkpoint.py) lose exactly the same messages."""

import json
import shutil

import numpy as np
import pytest

from relay_ray import runner
from relay_ray.config import RunConfig
from relay_ray.experiment import build_experiment
from relay_ray.simulate import simulate
from relay_ray.worker import Worker, message_dropped


def test_drop_rate_and_independence():
    draws = np.array([[message_dropped(0, step, j, i, 0.1) for (j, i) in [(0, 1), (1, 0), (1, 2)]]
                      for step in range(4000)])
    assert 0.085 < draws.mean() < 0.115
    # the two directions of one link and different links are drawn independently
    assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.06
    assert abs(np.corrcoef(draws[:, 1], draws[:, 2])[0, 1]) < 0.06
    assert not any(message_dropped(0, step, 0, 1, 0.0) for step in range(100))


def test_drops_are_a_function_of_seed_step_and_edge():
    first = [message_dropped(7, s, 2, 3, 0.3) for s in range(200)]
    again = [message_dropped(7, s, 2, 3, 0.3) for s in reversed(range(200))][::-1]  # any call order
    other_seed = [message_dropped(8, s, 2, 3, 0.3) for s in range(200)]
    assert first == again and first != other_seed


@pytest.mark.parametrize("algorithm,layout", [("relaysgd", dict(tree="chain")), ("dsgd", dict(topology="ring"))])
def test_worker_hands_none_for_exactly_the_dropped_messages(algorithm, layout):
    config = RunConfig(algorithm=algorithm, num_workers=4, dataset="quadratics", steps=30, drop_prob=0.3,
                       backend="local", seed=11, **layout)
    experiment = build_experiment(config)
    workers = [Worker(experiment.worker_spec(rank), experiment.task_data) for rank in range(4)]
    seen = []
    for w in workers:
        incoming = w.algorithm.incoming

        def recording(inbox, w=w, incoming=incoming):
            seen.append((w.step_count - 1, w.rank, [m is None for m in inbox]))
            incoming(inbox)

        w.algorithm.incoming = recording
    outboxes = [w.step() for w in workers]
    for _ in range(29):
        outboxes = [w.step(*inbox) for w, inbox in zip(workers, experiment.plan.route(outboxes))]
    expected = [(step, rank, [message_dropped(11, step, j, rank, 0.3) for j in experiment.plan.neighbors[rank]])
                for step in range(29) for rank in range(4)]
    assert sorted(seen) == sorted(expected)
    assert 0 < sum(sum(lost) for _, _, lost in seen) < sum(len(lost) for _, _, lost in seen)


def test_relaysgd_with_drops_never_counts_a_model_twice():
    """After every averaging, the models a worker has heard of (its count C) are at most n: a
    dropped message is neither used nor forwarded.  Drops make C < n at times, and the x0 fill
    (n - C) keeps the weights summing to one."""
    config = RunConfig(algorithm="relaysgd", tree="chain", num_workers=6, dataset="quadratics", steps=60,
                       drop_prob=0.2, relay_fill="x0", backend="local")
    experiment = build_experiment(config)
    workers = [Worker(experiment.worker_spec(rank), experiment.task_data) for rank in range(6)]
    counts = []
    outboxes = [w.step() for w in workers]
    for _ in range(59):
        for w, inbox in zip(workers, experiment.plan.route(outboxes)):
            w.receive(*inbox)
            channel = w.algorithm.channels[0]
            counts.append(1 + sum(c for _, c in channel.received.values()))
        outboxes = [w.step() for w in workers]
    assert max(counts) <= 6
    late = counts[6 * 10:]  # after the chain's diameter every worker would count 6 without drops
    assert 6 in late and min(late) < 6


def _relay_workers(fill: str, n: int = 7, tree: str = "double-binary", x0=None):
    from relay_ray.algorithms import build_plan, make_algorithm
    from relay_ray.experiment import build_topology

    config = RunConfig(algorithm="relaysgd", tree=tree, num_workers=n, dataset="quadratics", backend="local")
    graph, trees = build_topology(config)
    plan = build_plan("relaysgd", graph, trees)
    x0 = np.zeros(5, dtype=np.float32) if x0 is None else np.asarray(x0, dtype=np.float32)
    return plan, [make_algorithm("relaysgd", i, plan, x0, momentum=0.0, weight_decay=0.0, relay_fill=fill)
                  for i in range(n)]


def _lossy_rounds(plan, algorithms, rounds: int, drop_prob: float, seed: int = 0):
    """Rounds with no local progress (u = 0) over links that drop messages."""
    for step in range(rounds):
        for a in algorithms:
            a.local_step(np.zeros_like(a.params), lr=0.0)
        outboxes = [a.outgoing() for a in algorithms]
        for i, (a, inbox) in enumerate(zip(algorithms, plan.route(outboxes))):
            a.incoming([None if message_dropped(seed, step, j, i, drop_prob) else m
                        for j, m in zip(a.neighbors, inbox)])


@pytest.mark.parametrize("fill", ["current", "last"])
def test_current_and_last_fills_keep_a_consensus_under_drops(fill):
    """Workers that agree on a model (not x0) keep it when messages are lost: the lost mass is made
    up from the receiver's own model (current) or the edge's last message (last).  The published x0
    fill instead pulls every worker back towards x0 (the collapse measured in benchmarks/drops.py)."""
    agreed = np.arange(1, 6, dtype=np.float32)
    finals = {}
    for rule in (fill, "x0"):
        # the steady state of workers that all hold `agreed` (every relay buffer full), reached on
        # reliable links; then they learn that training started from x0 = 0
        plan, algorithms = _relay_workers(rule, x0=agreed)
        _lossy_rounds(plan, algorithms, rounds=10, drop_prob=0.0)
        for a in algorithms:
            np.testing.assert_allclose(a.params, agreed, rtol=1e-6)
            a.x0 = np.zeros_like(agreed)
        _lossy_rounds(plan, algorithms, rounds=40, drop_prob=0.3)
        finals[rule] = [a.params for a in algorithms]
    for params in finals[fill]:
        np.testing.assert_allclose(params, agreed, rtol=1e-5)
    assert max(np.abs(params - agreed).max() for params in finals["x0"]) > 0.5


def test_last_fill_keeps_counts_exact_and_equals_x0_on_reliable_links():
    plan, last = _relay_workers("last")
    _lossy_rounds(plan, last, rounds=30, drop_prob=0.3)
    for a in last:  # a reused message carries its (subtree) count: every worker still counts n
        for channel in a.channels:
            assert 1 + sum(c for _, c in channel.received.values()) == 7
    # without drops nothing is reused, so `last` is Algorithm 1 exactly
    config = dict(algorithm="relaysgd", tree="chain", num_workers=5, dataset="digits", model="logreg", steps=40,
                  eval_every=20, backend="local", seed=2)
    rows = [simulate(RunConfig(**config, relay_fill=fill), progress=False)["final"] for fill in ("x0", "last")]
    assert rows[0]["test_acc_mean"] == rows[1]["test_acc_mean"]
    assert rows[0]["consensus_distance"] == rows[1]["consensus_distance"]


RESUME_CASES = [("relaysgd", dict(relay_fill="x0")), ("relaysgd", dict(relay_fill="current")),
                ("relaysgd", dict(relay_fill="last")), ("relaysgd-qgm", dict(relay_fill="current")),
                # the competitors' state (push-sum weight, trackers), a time-varying plan whose phase the
                # step carries, and a checkpoint in the middle of a --local-steps period (30 = 4 * 7 + 2)
                ("sgp", dict(topology="exponential-one-peer")), ("momentum-tracking", dict(topology="ring")),
                ("qg-gutm", dict(topology="ring")), ("btpp", {}), ("relaysgd", dict(local_steps=4))]


@pytest.mark.parametrize("algorithm,overrides", RESUME_CASES,
                         ids=[f"{a}-{'-'.join(map(str, o.values()))}" for a, o in RESUME_CASES])
def test_resume_under_drops_gives_the_same_numbers(algorithm, overrides, tmp_path):
    """The fill state (current model, the last message per edge), QGM's buffer and every algorithm's
    own state travel in the checkpoint."""
    settings = dict(algorithm=algorithm, num_workers=6, dataset="digits", model="logreg", alpha=0.1, steps=60,
                    eval_every=10, checkpoint_every=30, drop_prob=0.2, backend="local", seed=3, momentum=0.9,
                    **({"tree": "double-binary"} if algorithm.startswith("relay") else {}), **overrides)
    full = tmp_path / "full"
    simulate(RunConfig(**settings, out=str(full)), progress=False)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000060")
    (cut / "summary.json").unlink()
    resumed = runner.from_resume(str(cut), {})
    assert resumed.checkpoint.step == 30
    simulate(resumed.config, resumed.experiment, progress=False, resume=resumed.checkpoint)
    strip = ("wall_s", "samples_per_s")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in strip}
             for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, cut)]
    assert rows[0] == rows[1] and len(rows[0]) == 6
