"""The communication plan of the workers that survive a failure (``--on-failure continue``; pure, no Ray).

The survivors keep their rank numbers; the plan still has all n ranks, the dead ones without
neighbours, and ``members`` names the ranks whose models are averaged.  Relay algorithms re-span the
same kind of tree over the survivors (over the survivors' part of ``--topology`` when one is
given, else over any link, as at the start), gossip keeps the graph minus the dead ranks with
Metropolis-Hastings weights recomputed on it, and all-reduce averages over the survivors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import networkx as nx
import numpy as np

from relay_ray.algorithms import AllReduce, CommPlan, algorithm_class
from relay_ray.errors import UserError
from relay_ray.experiment import Experiment
from relay_ray.titles import layout_name
from relay_ray.topology import metropolis_hastings_weights, spanning_trees, topology_stats


@dataclass(frozen=True)
class SurvivorPlan:
    plan: CommPlan  # its ``members`` are the survivors
    lr_scale: float


class CannotRespan(Exception):
    """The survivors cannot form one connected plan (a cut vertex of --topology died)."""


def _back(graph: nx.Graph, members: list[int], num_workers: int) -> nx.Graph:
    """``graph`` over 0..n'-1 as a graph over the original ranks, the dead ones isolated."""
    full = nx.Graph()
    full.add_nodes_from(range(num_workers))
    full.add_edges_from((members[i], members[j]) for i, j in graph.edges)
    return full


def survivor_plan(experiment: Experiment, members: list[int]) -> SurvivorPlan:
    """The plan and lr scale for ``members`` (the surviving ranks) to go on training together."""
    config, n = experiment.config, experiment.config.num_workers
    members = sorted(members)
    n_alive = len(members)
    local = {rank: i for i, rank in enumerate(members)}
    given = (config.topology is not None or config.topology_file is not None) and config.algorithm != "allreduce"
    cls = algorithm_class(config.algorithm)
    if cls.own_tree or experiment.plan.schedule:
        raise CannotRespan(f"{config.algorithm} on {layout_name(config)} has no plan for the survivors (its tree or "
                           "mixing schedule is built for all the workers)")
    if cls is AllReduce:
        graph = nx.complete_graph(n_alive)
    elif given or not cls.uses_trees:
        graph = nx.relabel_nodes(experiment.graph.subgraph(members), local)
    else:
        graph = nx.complete_graph(n_alive)
    if n_alive > 1 and not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise CannotRespan(f"the survivors of the topology fall apart into {parts} pieces")
    if cls.uses_trees:
        try:
            trees = spanning_trees(config.tree, graph, graph_given=given)
        except UserError as exc:
            raise CannotRespan(str(exc)) from None
        plan = CommPlan.for_trees([_back(tree, members, n) for tree in trees])
        lr_scale = config.lr_scale(topology_stats(graph, trees).lr_correction)
    else:
        small = np.full((n_alive, n_alive), 1.0 / n_alive) if cls is AllReduce else metropolis_hastings_weights(graph)
        weights = np.zeros((n, n))
        weights[np.ix_(members, members)] = small
        plan = CommPlan.for_gossip(_back(graph, members, n), weights)
        lr_scale = config.lr_scale(1.0)
    return SurvivorPlan(replace(plan, members=tuple(members)), lr_scale)
