"""The per-worker state machine every algorithm implements, and the communication plan it runs on.

One step of worker i, in the order the engines call it:
  ``local_step(grad, lr)``  x_i^{t+1/2} = x_i^t + u_i^t
  ``outgoing()``            one flat float32 message per neighbour, in ``neighbors`` order
  ``incoming(inbox)``       the neighbours' messages of the same step (``None`` = lost) -> x_i^{t+1}
The simulator and the Ray engine call exactly these methods, so they compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from relay_ray import tensors
from relay_ray.links import Links
from relay_ray.optim import NesterovSGD
from relay_ray.tensors import Array


@dataclass(frozen=True)
class CommPlan:
    """Who talks to whom: per-worker neighbour lists, gossip weights and relay trees."""

    num_workers: int
    neighbors: tuple[tuple[int, ...], ...]
    gossip_weights: np.ndarray | None = None
    tree_neighbors: tuple[tuple[tuple[int, ...], ...], ...] = ()  # [tree][worker] -> neighbours
    # the ranks still training (None: all); a plan after a worker died (--on-failure continue) keeps
    # the original rank numbers, the dead ranks without neighbours, and averages over the members
    members: tuple[int, ...] | None = None
    # a time-varying or directed plan: W_t = schedule[t % period], W_t[i, j] = the weight of j's message
    # in i's average (0: i does not hear j at step t).  ``neighbors`` is the union over the period, so
    # routing never changes; a message on an edge not used at step t is empty (0 bytes, see ``silent``)
    schedule: tuple[np.ndarray, ...] = ()

    @property
    def period(self) -> int:
        return max(1, len(self.schedule))

    def weights_at(self, step: int) -> np.ndarray:
        """The mixing weights of step ``step``'s messages."""
        return self.schedule[step % len(self.schedule)] if self.schedule else self.gossip_weights

    @property
    def num_members(self) -> int:
        return self.num_workers if self.members is None else len(self.members)

    @property
    def num_edges(self) -> int:
        return sum(len(n) for n in self.neighbors) // 2

    def inbox_order(self, rank: int) -> list[tuple[int, int]]:
        """For each neighbour j of ``rank``: (j, index of ``rank`` among j's neighbours)."""
        return [(j, self.neighbors[j].index(rank)) for j in self.neighbors[rank]]

    def route(self, outboxes: list[list]) -> list[list]:
        """Inboxes from outboxes: inbox of i = [message from j to i for j in neighbours(i)].

        Works on messages and on refs to them alike (the simulator and the Ray driver share it).
        """
        return [[outboxes[j][index] for j, index in self.inbox_order(i)] for i in range(self.num_workers)]

    @staticmethod
    def for_trees(trees: list[nx.Graph]) -> "CommPlan":
        n = trees[0].number_of_nodes()
        per_tree = tuple(tuple(tuple(sorted(tree.neighbors(i))) for i in range(n)) for tree in trees)
        union = tuple(tuple(sorted(set().union(*(t[i] for t in per_tree)))) for i in range(n))
        return CommPlan(num_workers=n, neighbors=union, tree_neighbors=per_tree)

    @staticmethod
    def for_gossip(graph: nx.Graph, weights: np.ndarray) -> "CommPlan":
        n = graph.number_of_nodes()
        neighbors = tuple(tuple(sorted(graph.neighbors(i))) for i in range(n))
        return CommPlan(num_workers=n, neighbors=neighbors, gossip_weights=weights)

    @staticmethod
    def for_schedule(graph: nx.Graph, matrices: list[np.ndarray]) -> "CommPlan":
        """A plan over the undirected union ``graph`` whose weights change with the step (or are
        not symmetric): one matrix per step of the period."""
        if len(matrices) == 1 and np.array_equal(matrices[0], matrices[0].T):
            return CommPlan.for_gossip(graph, matrices[0])
        n = graph.number_of_nodes()
        neighbors = tuple(tuple(sorted(graph.neighbors(i))) for i in range(n))
        return CommPlan(num_workers=n, neighbors=neighbors, schedule=tuple(matrices))


def silent(message: Array) -> Array:
    """The empty message on an edge a time-varying plan does not use this step (or a local step)."""
    return message[:0]

class Algorithm:
    """Base class: holds the model x_i, the local optimizer and the message plumbing.

    ``compressor`` / ``links`` / ``step``: what algorithms with compressed messages use (set by
    ``make_algorithm`` and, before each step's messages, by the worker): the compressor, the seed and
    loss rate of the links (a sender's per-edge state follows what is delivered), and the step."""

    name = "base"
    uses_trees = False
    compresses = False  # takes --compression
    own_tree = False  # talks over its own B-ary tree (--branching), not relay trees (btpp)
    push_sum = False  # mixes with push-sum's column stochastic weights (sgp)
    time_varying = False  # runs on a time-varying or directed plan (``CommPlan.schedule``)
    local_steps = True  # may take plain local steps between communications (--local-steps)
    compressor = None
    links = Links()
    step = 0

    def __init__(self, rank: int, plan: CommPlan, x0: Array, optimizer: NesterovSGD):
        self.rank = rank
        self.plan = plan
        self.num_workers = plan.num_members  # the n of the averages
        self.neighbors = plan.neighbors[rank]
        self.params = tensors.clone(tensors.float32(x0))  # numpy, or torch on the worker's device
        self.num_params = int(self.params.shape[0])
        self.optimizer = optimizer
        self.update = tensors.zeros_like(self.params)
        self.half = self.params

    def local_step(self, grad: Array, lr: float) -> None:
        """x^{t+1/2} = x^t + u^t with the local (Nesterov) optimizer."""
        self.update = self.optimizer.update(self.params, grad, lr)
        self.half = self.params + self.update

    def local_only(self) -> None:
        """A step that does not communicate (--local-steps): x^{t+1} = x^{t+1/2}."""
        self.params = self.half

    def outgoing(self) -> list[Array]:
        raise NotImplementedError

    def incoming(self, inbox: list[Array | None]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Host (numpy) copies of the state, whatever kind it lives in: checkpoints are device-free."""
        return {"params": np.array(tensors.to_host(self.params)), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.params = tensors.clone(tensors.like(state["params"], self.params))
        self.optimizer.load_state_dict(state["optimizer"])


class QuasiGlobalMomentum:
    """Quasi-global momentum (Lin et al. 2021, arXiv:2102.04761), mixed into an algorithm class.

    The local step uses the Nesterov direction with buffer βm + g but discards that buffer change;
    after the averaging, the buffer is rebuilt from the model change the averaging produced:
    m ← βm + (1 − β)(x^t − x^{t+1}) / η, with η the lr the local step got.
    """

    def local_step(self, grad: Array, lr: float) -> None:
        direction, _ = self.optimizer.direction(self.params, grad)
        self.lr = lr
        self.update = tensors.float32(-lr * direction)
        self.half = self.params + self.update

    def local_only(self) -> None:
        self._rebuild_momentum(self.params, self.half)
        self.params = self.half

    def _rebuild_momentum(self, before: Array, after: Array) -> None:
        beta = self.optimizer.momentum
        self.optimizer.buffer = tensors.float32(beta * self.optimizer.buffer + (1 - beta) * (before - after) / self.lr)
