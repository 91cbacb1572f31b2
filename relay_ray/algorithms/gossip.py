"""Gossip averaging (D-SGD) and all-reduce, which is gossip with W = (1/n) 11^T on the complete graph."""

from __future__ import annotations

import numpy as np

from relay_ray import tensors
from relay_ray.algorithms.base import Algorithm
from relay_ray.tensors import Array


def _wide(x: Array) -> Array:
    """float64, as numpy computes float64 weight * float32 array: torch state mixes bit-identically."""
    return x.double() if tensors.is_torch(x) else x


def gossip_mix(own: Array, inbox: list[Array | None], weights: np.ndarray, rank: int,
               neighbors: tuple[int, ...]) -> Array:
    """sum_j W_ij x_j over self and received neighbours, renormalised by the weight received.

    With every message present the renormaliser is exactly 1 (rows of W sum to one).
    """
    mixed = float(weights[rank, rank]) * _wide(own) if tensors.is_torch(own) else weights[rank, rank] * own
    received_weight = weights[rank, rank]
    for j, message in zip(neighbors, inbox):
        if message is not None:
            mixed = mixed + (float(weights[rank, j]) if tensors.is_torch(message) else weights[rank, j]) * _wide(message)
            received_weight += weights[rank, j]
    if abs(received_weight - 1.0) > 1e-12:
        mixed = mixed / (float(received_weight) if tensors.is_torch(mixed) else received_weight)
    return tensors.float32(mixed)


class GossipAlgorithm(Algorithm):
    """Shared plumbing: one message, sent to every neighbour."""

    def _mix(self, own: Array, inbox: list[Array | None]) -> Array:
        return gossip_mix(own, inbox, self.plan.gossip_weights, self.rank, self.neighbors)


class DSGD(GossipAlgorithm):
    """D-SGD: x^{t+1} = W (x^t + u^t)."""

    name = "dsgd"

    def outgoing(self) -> list[Array]:
        return [self.half] * len(self.neighbors)

    def incoming(self, inbox: list[Array | None]) -> None:
        self.params = self._mix(self.half, inbox)


class AllReduce(DSGD):
    """Exact averaging x^{t+1} = mean_i (x_i^t + u_i^t): D-SGD on the complete graph with W = 1/n."""

    name = "allreduce"


class DSGDQuasiGlobalMomentum(GossipAlgorithm):
    """D-SGD + quasi-global momentum (Lin et al. 2021, arXiv:2102.04761).

    The Nesterov step uses buffer beta*m + g, but that buffer change is discarded; the momentum
    is instead rebuilt from the model change the gossip produced: m <- beta m + (1-beta)(x^t - x^{t+1})/lr.
    """

    name = "dsgd-qgm"

    def local_step(self, grad: Array, lr: float) -> None:
        direction, _ = self.optimizer.direction(self.params, grad)
        self.lr = lr
        self.update = tensors.float32(-lr * direction)
        self.half = self.params + self.update

    def outgoing(self) -> list[Array]:
        return [self.half] * len(self.neighbors)

    def incoming(self, inbox: list[Array | None]) -> None:
        new_params = self._mix(self.half, inbox)
        beta = self.optimizer.momentum
        self.optimizer.buffer = tensors.float32(
            beta * self.optimizer.buffer + (1 - beta) * (self.params - new_params) / self.lr)
        self.params = new_params


class D2(GossipAlgorithm):
    """D^2 (Tang et al. 2018): x^{t+1} = W(x^t + u^t + c^t), c^{t+1} = x^{t+1} - x^t - u^t, c^0 = 0."""

    name = "d2"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.correction = tensors.zeros_like(self.params)

    def outgoing(self) -> list[Array]:
        self.corrected = self.half + self.correction
        return [self.corrected] * len(self.neighbors)

    def incoming(self, inbox: list[Array | None]) -> None:
        new_params = self._mix(self.corrected, inbox)
        self.correction = new_params - self.params - self.update
        self.params = new_params

    def state_dict(self) -> dict:
        return {**super().state_dict(), "correction": np.array(tensors.to_host(self.correction))}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.correction = tensors.clone(tensors.like(state["correction"], self.params))


class GradientTracking(GossipAlgorithm):
    """Gradient tracking: x^{t+1} = W(x^t + u^t + c^t); c^{t+1} = W(c^t + u^t) - u^t.

    Both gossip rounds travel in one message: [x + u + c, c + u].
    """

    name = "gradient-tracking"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.correction = tensors.zeros_like(self.params)

    def outgoing(self) -> list[Array]:
        tracked = self.correction + self.update
        self.outbox = tensors.concat([self.half + self.correction, tracked])
        return [self.outbox] * len(self.neighbors)

    def incoming(self, inbox: list[Array | None]) -> None:
        mixed = self._mix(self.outbox, inbox)
        d = self.num_params
        self.correction = mixed[d:] - self.update
        self.params = mixed[:d]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "correction": np.array(tensors.to_host(self.correction))}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.correction = tensors.clone(tensors.like(state["correction"], self.params))
