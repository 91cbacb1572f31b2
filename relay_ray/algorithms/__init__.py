"""Decentralized algorithms as pure per-worker state machines (no Ray)."""

from __future__ import annotations

import networkx as nx
import numpy as np

from relay_ray import tensors
from relay_ray.algorithms.base import Algorithm, CommPlan
from relay_ray.algorithms.gossip import D2, DSGD, AllReduce, Choco, DSGDQuasiGlobalMomentum, GradientTracking
from relay_ray.algorithms.pushsum import SGP
from relay_ray.algorithms.tracking import BTPP, GlobalUpdateTracking, MomentumTracking, QuasiGlobalGUTMomentum
from relay_ray.algorithms.relaysum import FILL_RULES, RelaySGD, RelaySGDQuasiGlobalMomentum, RelaySumChannel, RelaySumGrad
from relay_ray.compression import parse_compression
from relay_ray.errors import UserError
from relay_ray.links import Links
from relay_ray.optim import NesterovSGD
from relay_ray.topology import (communication_schedule, is_symmetric, metropolis_hastings_weights, mixing_matrices,
                                push_matrices)

_REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (RelaySGD, RelaySGDQuasiGlobalMomentum, RelaySumGrad, AllReduce, DSGD, DSGDQuasiGlobalMomentum, D2, GradientTracking,
                              Choco, SGP, MomentumTracking, GlobalUpdateTracking, QuasiGlobalGUTMomentum, BTPP)
}
COMPRESSING_ALGORITHMS = tuple(name for name, cls in _REGISTRY.items() if cls.compresses)
ALGORITHMS = tuple(_REGISTRY)
TREE_ALGORITHMS = tuple(name for name, cls in _REGISTRY.items() if cls.uses_trees)
# relay models with a fill rule and the tree's lr correction: RelaySGD and its variants
RELAYSGD_FAMILY = tuple(name for name, cls in _REGISTRY.items() if issubclass(cls, RelaySGD))


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in _REGISTRY:
        raise UserError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return _REGISTRY[name]


def build_plan(name: str, graph: nx.Graph, trees: list[nx.Graph], topology: str | None = None) -> CommPlan:
    """The communication plan of algorithm ``name``: trees for relays, the graph for gossip (its
    schedule of mixing weights when ``topology`` is time-varying or directed; push-sum's weights for sgp)."""
    cls = algorithm_class(name)
    if cls.uses_trees or cls.own_tree:
        return CommPlan.for_trees(trees)
    if cls is AllReduce:
        n = graph.number_of_nodes()
        return CommPlan.for_gossip(nx.complete_graph(n), np.full((n, n), 1.0 / n))
    schedule = communication_schedule(topology, graph)
    if cls.push_sum:
        return CommPlan.for_schedule(graph, push_matrices(schedule))
    if is_symmetric(schedule):
        return CommPlan.for_gossip(graph, metropolis_hastings_weights(graph))
    return CommPlan.for_schedule(graph, mixing_matrices(schedule))


def make_algorithm(name: str, rank: int, plan: CommPlan, x0, momentum: float,
                   weight_decay: float, relay_fill: str | None = None, compression: str | None = None,
                   links: Links | None = None, consensus_lr: float | None = None) -> Algorithm:
    """``relay_fill``: RelaySGD's fill rule (``FILL_RULES``; None = x0); other algorithms take none.
    ``compression``: a ``--compression`` spec (algorithms with ``compresses``); ``links``: the seed
    and loss rate the per-edge compression state follows; ``consensus_lr``: CHOCO's γ.

    The state lives in ``x0``'s kind: numpy on the host, or torch on ``x0``'s device."""
    optimizer = NesterovSGD(int(x0.shape[0]), momentum=momentum, weight_decay=weight_decay,
                            like=x0 if tensors.is_torch(x0) else None)
    if relay_fill is not None:
        algorithm = algorithm_class(name)(rank, plan, x0, optimizer, fill=relay_fill)
    else:
        algorithm = algorithm_class(name)(rank, plan, x0, optimizer)
    algorithm.compressor = parse_compression(compression)
    if algorithm.compressor is not None and not algorithm.compresses:
        raise UserError(f"--compression applies to {', '.join(COMPRESSING_ALGORITHMS)}, not {name}")
    if links is not None:
        algorithm.links = links
    if consensus_lr is not None:
        algorithm.consensus_lr = consensus_lr
    return algorithm


__all__ = ["ALGORITHMS", "COMPRESSING_ALGORITHMS", "FILL_RULES", "RELAYSGD_FAMILY", "TREE_ALGORITHMS", "Algorithm", "CommPlan", "RelaySumChannel", "algorithm_class",
           "build_plan", "make_algorithm"]
