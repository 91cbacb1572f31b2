"""The newer heterogeneity-robust competitors: momentum tracking, global update tracking (GUT,
QG-GUTm) and B-ary tree push-pull (BTPP).  Each follows its authors' public code (named per class)."""

from __future__ import annotations

import numpy as np

from relay_ray import tensors
from relay_ray.algorithms.base import Algorithm
from relay_ray.algorithms.gossip import GossipAlgorithm
from relay_ray.tensors import Array


def _host_state(**arrays) -> dict:
    return {name: np.array(tensors.to_host(value)) for name, value in arrays.items()}


class MomentumTracking(GossipAlgorithm):
    """Momentum tracking (Takezawa et al. 2022, arXiv:2209.15505; yukiTakezawa/MomentumTracking,
    ``optimizer/momentum_tracking_optimizer.py``): gradient tracking applied to the momentum,

        v_i^t     = β v_i^{t-1} + ∇F_i(x_i^t) + λ x_i^t                (heavy ball, weight decay inside)
        x_i^{t+1} = sum_j W_ij x_j^t − η (v_i^t − c_i^t)
        c_i^{t+1} = v_i^t + sum_j W_ij (c_j^t − v_j^t)

    so d = v − c tracks the average momentum (d^{t+1} = W d^t + v^{t+1} − v^t).  Both gossip rounds
    travel in one message [x, c − v].  c^0 = 0, so d^0 is the local momentum (the authors start from
    the exactly averaged gradient, with one all-reduce before training).
    """

    name = "momentum-tracking"
    time_varying = True
    local_steps = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.correction = tensors.zeros_like(self.params)  # c

    def local_step(self, grad: Array, lr: float) -> None:
        g = grad + self.optimizer.weight_decay * self.params if self.optimizer.weight_decay else grad
        self.optimizer.buffer = tensors.float32(self.optimizer.momentum * self.optimizer.buffer + g)  # v
        self.update = tensors.float32(-lr * (self.optimizer.buffer - self.correction))

    def outgoing(self) -> list[Array]:
        self.outbox = tensors.concat([self.params, self.correction - self.optimizer.buffer])
        return self._send(self.outbox)

    def incoming(self, inbox: list[Array | None]) -> None:
        mixed = self._mix(self.outbox, inbox)
        d = self.num_params
        self.params = tensors.float32(mixed[:d] + self.update)
        self.correction = tensors.float32(self.optimizer.buffer + mixed[d:])

    def state_dict(self) -> dict:
        return {**super().state_dict(), **_host_state(correction=self.correction)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.correction = tensors.clone(tensors.like(state["correction"], self.params))


class GlobalUpdateTracking(GossipAlgorithm):
    """Global update tracking, GUT (Aketi, Hashemi & Roy 2023, arXiv:2305.04792), as the authors'
    ``aparna-aketi/global_update_tracking`` computes it (``models/gut.py``, ``gossip/distributed.py``):
    the gradient is taken at the gossip average x̄_i = sum_j W_ij x_j (``params``), G_i = x̄_i − x_i, and

        δ^t = g^t − G^t / η
        y^t = δ^t − μ δ^{t−1} + μ W m^{t−1} − μ (1 + β) G^{t−1} / η
        m^t = β m^{t−1} + y^t,      x^{t+1} = x^t − η m^t

    where W m^{t−1} = (x̄^{t−1} − x̄^t) / η_{t−1} comes from the gossip averages already known, so
    one model per neighbour is all that travels.  GUT: β = 0, μ = 0.9 (then x^{t+1} = W x^t − η[g^t +
    μ(W y^{t−1} − g^{t−1})]); ``qg-gutm``: β = --momentum, μ = 0.07 (the authors' test.sh uses
    0.06-0.08), heavy ball.  Weight decay is added to g.  Static graphs only (the code's gossip copies
    accumulate differences over a fixed W).
    """

    name = "gut"
    local_steps = False
    scale = 0.9  # μ

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.raw = self.params  # x_i (params holds x̄_i, where gradients and evaluations look)
        self.gossip = tensors.zeros_like(self.params)  # G^t
        self.previous = {"delta": tensors.zeros_like(self.params), "gossip": tensors.zeros_like(self.params),
                         "mixed": self.params}
        self.previous_lr = 1.0

    @property
    def beta(self) -> float:
        return 0.0

    def local_step(self, grad: Array, lr: float) -> None:
        g = grad + self.optimizer.weight_decay * self.params if self.optimizer.weight_decay else grad
        mu, beta, previous = self.scale, self.beta, self.previous
        delta = g - self.gossip / lr
        mixed_momentum = (previous["mixed"] - self.params) / self.previous_lr  # W m^{t-1}
        tracked = delta - mu * previous["delta"] + mu * mixed_momentum - mu * (1 + beta) * previous["gossip"] / lr
        self.optimizer.buffer = tensors.float32(beta * self.optimizer.buffer + tracked)
        self.half = tensors.float32(self.raw - lr * self.optimizer.buffer)
        self.previous = {"delta": tensors.float32(delta), "gossip": self.gossip, "mixed": self.params}
        self.previous_lr = lr

    def outgoing(self) -> list[Array]:
        return self._send(self.half)

    def incoming(self, inbox: list[Array | None]) -> None:
        self.raw = self.half
        self.params = self._mix(self.half, inbox)
        self.gossip = tensors.float32(self.params - self.raw)

    def state_dict(self) -> dict:
        return {**super().state_dict(), **_host_state(raw=self.raw, gossip=self.gossip, **{
            f"previous_{k}": v for k, v in self.previous.items()}), "previous_lr": np.array([self.previous_lr])}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.raw = tensors.clone(tensors.like(state["raw"], self.params))
        self.gossip = tensors.clone(tensors.like(state["gossip"], self.params))
        self.previous = {k: tensors.clone(tensors.like(state[f"previous_{k}"], self.params))
                         for k in ("delta", "gossip", "mixed")}
        self.previous_lr = float(np.asarray(state["previous_lr"])[0])


class QuasiGlobalGUTMomentum(GlobalUpdateTracking):
    """QG-GUTm: GUT with quasi-global heavy-ball momentum β = --momentum (see ``GlobalUpdateTracking``)."""

    name = "qg-gutm"
    scale = 0.07

    @property
    def beta(self) -> float:
        return self.optimizer.momentum


def _parents(tree: tuple[tuple[int, ...], ...]) -> dict[int, int | None]:
    """Each worker's parent in the tree rooted at 0 (breadth-first)."""
    parents, frontier = {0: None}, [0]
    for node in frontier:
        for child in tree[node]:
            if child not in parents:
                parents[child] = node
                frontier.append(child)
    return parents


class BTPP(Algorithm):
    """B-ary tree push-pull (You & Pu 2024, arXiv:2404.05454; ryou98/BTPP, ``pushpull.py`` and
    ``topology/topo_pp.py``): on the B-ary tree with parent(k) = (k − 1) // B and root 0,

        x^{t+1} = R (x^t − γ y^t),     y^{t+1} = C y^t + g(x^{t+1}) − g(x^t),     y^0 = g(x^0)

    R pulls down the tree rooted at 0 (the root keeps its own x, every other worker takes its parent's
    x − γy) and C = R^T pushes up (a worker's y becomes the sum of its children's plus its gradient change;
    the root also keeps its own), so the root's y tracks the sum of all n gradients: γ = lr / n, as in
    the authors' code.  One vector crosses each tree edge per step in each direction.  The local
    optimizer's momentum (Nesterov, as every algorithm here) acts on y, as in the authors' ``btpp.py``;
    weight decay is added to g, so it is tracked too.  A lost message: the child keeps its own x − γy,
    the parent misses that subtree's y (tracking is then off by it).
    """

    name = "btpp"
    local_steps = False
    own_tree = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.parent = _parents(self.plan.tree_neighbors[0])[self.rank]
        self.weight_decay, self.optimizer.weight_decay = self.optimizer.weight_decay, 0.0  # g carries it
        self.pushed = tensors.zeros_like(self.params)  # (C y^{t-1})_i
        self.last_grad = tensors.zeros_like(self.params)

    def local_step(self, grad: Array, lr: float) -> None:
        g = grad + self.weight_decay * self.params if self.weight_decay else grad
        self.tracker = tensors.float32(self.pushed + g - self.last_grad)  # y^t
        self.last_grad = tensors.float32(g)
        self.update = self.optimizer.update(self.params, self.tracker, lr / self.num_workers)
        self.half = self.params + self.update

    def outgoing(self) -> list[Array]:
        return [self.tracker if j == self.parent else self.half for j in self.neighbors]

    def incoming(self, inbox: list[Array | None]) -> None:
        pushed = self.tracker if self.parent is None else tensors.zeros_like(self.tracker)
        params = self.half
        for j, message in zip(self.neighbors, inbox):
            if message is None:
                continue
            if j == self.parent:
                params = message
            else:
                pushed = pushed + message
        self.params, self.pushed = tensors.float32(params), tensors.float32(pushed)

    def state_dict(self) -> dict:
        return {**super().state_dict(), **_host_state(pushed=self.pushed, last_grad=self.last_grad)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pushed = tensors.clone(tensors.like(state["pushed"], self.params))
        self.last_grad = tensors.clone(tensors.like(state["last_grad"], self.params))
