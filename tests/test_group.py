"""Worker groups in-process (no Ray): the layout's crossing edges, and K workers per group computing
exactly what the simulator computes, for every K."""

import numpy as np
import pytest

from relay_ray.algorithms import build_plan
from relay_ray.config import RunConfig
from relay_ray.experiment import build_experiment, build_topology
from relay_ray.group import GroupLayout, WorkerGroup
from relay_ray.worker import Worker


def _plan(algorithm, n=8, **layout):
    config = RunConfig(algorithm=algorithm, num_workers=n, dataset="quadratics", backend="local", **layout)
    graph, trees = build_topology(config)
    return build_plan(algorithm, graph, trees)


def test_balanced_groups_are_contiguous_and_larger_first():
    layout = GroupLayout.balanced(_plan("relaysgd", tree="chain"), 3)
    assert layout.groups == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert layout.workers_per_group == 3


def test_chain_messages_stay_in_process_except_at_group_borders():
    layout = GroupLayout.balanced(_plan("relaysgd", tree="chain"), 3)
    assert layout.outgoing == (((1, ((2, 3),)),), ((0, ((3, 2),)), (2, ((5, 6),))), ((1, ((6, 5),)),))
    assert layout.incoming == (((1, ((3, 2),)),), ((0, ((2, 3),)), (2, ((6, 5),))), ((1, ((5, 6),)),))


def test_messages_between_two_groups_travel_as_one_bundle():
    """Double binary trees over 2 groups of 8: 15 tree edges cross each way, in one bundle per direction."""
    plan = _plan("relaysgd", n=16, tree="double-binary")
    layout = GroupLayout.balanced(plan, 2)
    assert [[h for h, _ in links] for links in layout.outgoing] == [[1], [0]]
    assert len(layout.crossing_edges(0)) == len(layout.crossing_edges(1)) == 15
    assert layout.incoming[1] == ((0, layout.outgoing[0][0][1]),) and layout.incoming[0] == ((1, layout.outgoing[1][0][1]),)


@pytest.mark.parametrize("num_groups", [1, 3, 8])
def test_crossing_edges_are_each_sent_and_received_once(num_groups):
    plan = _plan("relaysgd", tree="double-binary")
    layout = GroupLayout.balanced(plan, num_groups)
    sent = [edge for g in range(num_groups) for edge in layout.crossing_edges(g)]
    received = [edge for links in layout.incoming for _, edges in links for edge in edges]
    assert sorted(sent) == sorted(received) and len(set(sent)) == len(sent)
    group_of = {rank: g for g, ranks in enumerate(layout.groups) for rank in ranks}
    every_edge = {(i, j) for i in range(8) for j in plan.neighbors[i]}
    assert set(sent) == {(i, j) for i, j in every_edge if group_of[i] != group_of[j]}
    assert sorted(r for ranks in layout.groups for r in ranks) == list(range(8))
    for g, links in enumerate(layout.outgoing):  # a link's edges all go from g to the group it names
        for h, edges in links:
            assert all(group_of[i] == g and group_of[j] == h for i, j in edges)


@pytest.mark.parametrize("num_groups", [0, 9])
def test_impossible_group_counts_are_refused(num_groups):
    with pytest.raises(ValueError, match=f"cannot cut 8 workers into {num_groups} groups"):
        GroupLayout.balanced(_plan("dsgd", topology="ring"), num_groups)


def groups_after(experiment, num_groups: int, steps: int) -> list[WorkerGroup]:
    """The engine's dataflow without Ray: one step call per group, crossing messages routed by the layout,
    delivered at the end; returns the groups."""
    layout = GroupLayout.balanced(experiment.plan, num_groups)
    groups = [WorkerGroup([experiment.worker_spec(r) for r in ranks], experiment.task_data, None, layout, g)
              for g, ranks in enumerate(layout.groups)]
    outboxes = None
    for _ in range(steps):
        inboxes = layout.route(outboxes) if outboxes is not None else [[] for _ in groups]
        outboxes = [group.step(outboxes is not None, *inbox) for group, inbox in zip(groups, inboxes)]
    for group, inbox in zip(groups, layout.route(outboxes)):
        group.receive(*inbox)
    return groups


def _run_groups(experiment, num_groups: int, steps: int) -> list[np.ndarray]:
    return [w.params() for group in groups_after(experiment, num_groups, steps) for w in group.workers]


def _run_simulator(experiment, steps: int) -> list[np.ndarray]:
    workers = [Worker(experiment.worker_spec(r), experiment.task_data) for r in range(experiment.config.num_workers)]
    outboxes = None
    for _ in range(steps):
        inboxes = experiment.plan.route(outboxes) if outboxes is not None else [[] for _ in workers]
        outboxes = [w.step(*inbox) for w, inbox in zip(workers, inboxes)]
    for w, inbox in zip(workers, experiment.plan.route(outboxes)):
        w.receive(*inbox)
    return [w.params() for w in workers]


ALGORITHM_LAYOUTS = [("relaysgd", dict(tree="chain")), ("relaysgd", dict(tree="double-binary")),
                     ("relaysum-grad", dict(tree="double-binary")), ("allreduce", {}),
                     ("dsgd", dict(topology="ring")), ("dsgd-qgm", dict(topology="ring")), ("d2", dict(topology="ring")),
                     ("gradient-tracking", dict(topology="chain"))]


@pytest.mark.parametrize("num_groups", [8, 3, 1], ids=["K=1", "K=3-uneven", "K=n"])
@pytest.mark.parametrize("algorithm,layout", ALGORITHM_LAYOUTS,
                         ids=[f"{a}-{'-'.join(l.values()) or 'exact'}" for a, l in ALGORITHM_LAYOUTS])
def test_groups_compute_what_the_simulator_computes(algorithm, layout, num_groups):
    config = RunConfig(algorithm=algorithm, num_workers=8, dataset="quadratics", steps=30, backend="local",
                       drop_prob=0.2, seed=4, **layout)
    experiment = build_experiment(config)
    grouped, reference = _run_groups(experiment, num_groups, 30), _run_simulator(experiment, 30)
    for params, ref in zip(grouped, reference):
        np.testing.assert_array_equal(params, ref)
    assert not np.allclose(reference[0], reference[-1])  # the workers differ: the check could fail
