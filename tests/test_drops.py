"""--drop-prob: each received message is lost independently, as a function of (seed, step, edge),
so the simulator and the Ray engine (tests/test_recovery.py runs Ray with drops against the
simulator) and a resumed run (tests/test_checkpoint.py) lose exactly the same messages."""

import numpy as np
import pytest

from relay_ray.config import RunConfig
from relay_ray.experiment import build_experiment
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
                       drop_prob=0.2, backend="local")
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
