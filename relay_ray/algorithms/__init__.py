"""Decentralized algorithms as pure per-worker state machines (no Ray)."""

from __future__ import annotations

import networkx as nx
import numpy as np

from relay_ray import tensors
from relay_ray.algorithms.base import Algorithm, CommPlan
from relay_ray.algorithms.gossip import D2, DSGD, AllReduce, DSGDQuasiGlobalMomentum, GradientTracking
from relay_ray.algorithms.relaysum import FILL_RULES, RelaySGD, RelaySumChannel, RelaySumGrad
from relay_ray.errors import UserError
from relay_ray.optim import NesterovSGD
from relay_ray.topology import metropolis_hastings_weights

_REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (RelaySGD, RelaySumGrad, AllReduce, DSGD, DSGDQuasiGlobalMomentum, D2, GradientTracking)
}
ALGORITHMS = tuple(_REGISTRY)
TREE_ALGORITHMS = tuple(name for name, cls in _REGISTRY.items() if cls.uses_trees)


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in _REGISTRY:
        raise UserError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return _REGISTRY[name]


def build_plan(name: str, graph: nx.Graph, trees: list[nx.Graph]) -> CommPlan:
    """The communication plan of algorithm ``name``: trees for relays, the graph for gossip."""
    cls = algorithm_class(name)
    if cls.uses_trees:
        return CommPlan.for_trees(trees)
    if cls is AllReduce:
        n = graph.number_of_nodes()
        return CommPlan.for_gossip(nx.complete_graph(n), np.full((n, n), 1.0 / n))
    return CommPlan.for_gossip(graph, metropolis_hastings_weights(graph))


def make_algorithm(name: str, rank: int, plan: CommPlan, x0, momentum: float,
                   weight_decay: float, relay_fill: str | None = None) -> Algorithm:
    """``relay_fill``: RelaySGD's fill rule (``FILL_RULES``; None = x0); other algorithms take none.

    The state lives in ``x0``'s kind: numpy on the host, or torch on ``x0``'s device."""
    optimizer = NesterovSGD(int(x0.shape[0]), momentum=momentum, weight_decay=weight_decay,
                            like=x0 if tensors.is_torch(x0) else None)
    if relay_fill is not None:
        return algorithm_class(name)(rank, plan, x0, optimizer, fill=relay_fill)
    return algorithm_class(name)(rank, plan, x0, optimizer)


__all__ = ["ALGORITHMS", "FILL_RULES", "TREE_ALGORITHMS", "Algorithm", "CommPlan", "RelaySumChannel", "algorithm_class",
           "build_plan", "make_algorithm"]
