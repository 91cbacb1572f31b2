"""Gossip averaging (D-SGD) and all-reduce, which is gossip with W = (1/n) 11^T on the complete graph."""

from __future__ import annotations

import numpy as np

from relay_ray import tensors
from relay_ray.algorithms.base import Algorithm, QuasiGlobalMomentum, silent
from relay_ray.compression import Differential, edge_rng
from relay_ray.tensors import Array


def _wide(x: Array) -> Array:
    """float64, as numpy computes float64 weight * float32 array: torch state mixes bit-identically."""
    return x.double() if tensors.is_torch(x) else x


def gossip_mix(own: Array, inbox: list[Array | None], weights: np.ndarray, rank: int,
               neighbors: tuple[int, ...]) -> Array:
    """sum_j W_ij x_j over self and received neighbours, renormalised by the weight received.

    With every message present the renormaliser is exactly 1 (rows of W sum to one).  A neighbour
    with W_ij = 0 (not heard at this step of a time-varying plan) sent an empty message: skipped.
    """
    mixed = float(weights[rank, rank]) * _wide(own) if tensors.is_torch(own) else weights[rank, rank] * own
    received_weight = weights[rank, rank]
    for j, message in zip(neighbors, inbox):
        if message is not None and weights[rank, j] != 0:
            mixed = mixed + (float(weights[rank, j]) if tensors.is_torch(message) else weights[rank, j]) * _wide(message)
            received_weight += weights[rank, j]
    if abs(received_weight - 1.0) > 1e-12:
        mixed = mixed / (float(received_weight) if tensors.is_torch(mixed) else received_weight)
    return tensors.float32(mixed)


class GossipAlgorithm(Algorithm):
    """Shared plumbing: one message, sent to every neighbour that uses it at this step."""

    def _weights(self) -> np.ndarray:
        return self.plan.weights_at(self.step)

    def _send(self, message: Array) -> list[Array]:
        """``message`` to each neighbour j with W_ji != 0 at this step, an empty one to the others."""
        weights = self._weights()
        return [message if weights[j, self.rank] != 0 else silent(message) for j in self.neighbors]

    def _mix(self, own: Array, inbox: list[Array | None]) -> Array:
        return gossip_mix(own, inbox, self._weights(), self.rank, self.neighbors)


class DSGD(GossipAlgorithm):
    """D-SGD: x^{t+1} = W (x^t + u^t)."""

    name = "dsgd"
    time_varying = True

    def outgoing(self) -> list[Array]:
        return self._send(self.half)

    def incoming(self, inbox: list[Array | None]) -> None:
        self.params = self._mix(self.half, inbox)


class AllReduce(DSGD):
    """Exact averaging x^{t+1} = mean_i (x_i^t + u_i^t): D-SGD on the complete graph with W = 1/n.

    With ``--compression`` the workers average compressed *updates* instead, x^{t+1} = x^t + mean_i q_i:
    with a biased compressor (topk, sign) as EF-SGD (Stich et al. 2018, arXiv:1809.07599; Karimireddy
    et al. 2019, arXiv:1901.09847: q_i = C(u_i + e_i), e_i <- u_i + e_i − q_i), with an unbiased one
    (randk, qsgd) as QSGD without memory (q_i = Q(u_i), unbiased) — the pair compared by Koloskova
    et al. (arXiv:2009.02388).  Every worker sends the same q_i to all (one draw per sender and step);
    the models stay identical while no message is lost.
    """

    name = "allreduce"
    compresses = True
    time_varying = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.error = None  # EF-SGD's memory, created when a biased compressor is set

    @property
    def error_feedback(self) -> bool:
        return self.compressor is not None and not self.compressor.unbiased

    def outgoing(self) -> list[Array]:
        if self.compressor is None:
            return super().outgoing()
        update = self.update
        if self.error_feedback:
            if self.error is None:
                self.error = tensors.zeros_like(update)
            update = update + self.error
        rng = edge_rng(self.links.seed, self.step, self.rank, self.rank)  # one draw for all receivers
        message, self.sent_update = self.compressor.roundtrip(update, rng)
        if self.error_feedback:
            self.error = update - self.sent_update
        return [message] * len(self.neighbors)

    def incoming(self, inbox: list[Array | None]) -> None:
        if self.compressor is None:
            return super().incoming(inbox)
        updates = {self.rank: self.sent_update}
        updates.update((j, self.compressor.decode(m, self.num_params)) for j, m in zip(self.neighbors, inbox)
                       if m is not None)
        total = tensors.zeros_like(self.sent_update)
        for j in sorted(updates):  # in rank order: every worker adds the same numbers in the same order
            total += updates[j]
        self.params = tensors.float32(self.params + total / np.float32(len(updates)))

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.error is not None:
            state["error"] = np.array(tensors.to_host(self.error))
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.error = tensors.clone(tensors.like(state["error"], self.params)) if "error" in state else None


class DSGDQuasiGlobalMomentum(QuasiGlobalMomentum, GossipAlgorithm):
    """D-SGD + quasi-global momentum (Lin et al. 2021, arXiv:2102.04761): x^{t+1} = W x^{t+1/2}, the
    momentum rebuilt from the model change the gossip produced (``QuasiGlobalMomentum``)."""

    name = "dsgd-qgm"
    time_varying = True

    def outgoing(self) -> list[Array]:
        return self._send(self.half)

    def incoming(self, inbox: list[Array | None]) -> None:
        new_params = self._mix(self.half, inbox)
        self._rebuild_momentum(self.params, new_params)
        self.params = new_params


class D2(GossipAlgorithm):
    """D^2 (Tang et al. 2018): x^{t+1} = W(x^t + u^t + c^t), c^{t+1} = x^{t+1} - x^t - u^t, c^0 = 0."""

    name = "d2"
    local_steps = False  # its correction assumes every step communicates

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
    local_steps = False  # its correction assumes every step communicates
    time_varying = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.correction = tensors.zeros_like(self.params)

    def outgoing(self) -> list[Array]:
        tracked = self.correction + self.update
        self.outbox = tensors.concat([self.half + self.correction, tracked])
        return self._send(self.outbox)

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


class Choco(GossipAlgorithm):
    """CHOCO-SGD (Koloskova, Stich & Jaggi 2019, arXiv:1902.00340, Algorithm 2) on the gossip graph:

        x_i^{t+1/2} = x_i^t + u_i^t
        q_i = C(x_i^{t+1/2} − x̂_i),   x̂_j += q_j  for j in N(i) ∪ {i}  (every neighbour keeps x̂_i)
        x_i^{t+1} = x_i^{t+1/2} + γ Σ_j w_ij (x̂_j − x̂_i)

    with γ = ``--consensus-lr`` and C the contractive view of ``--compression`` (exact differences
    without one: then γ = 1 is D-SGD).  The public copies start at the common x⁰ (the paper: 0; any
    value both ends share works, and x⁰ makes the first differences small).  Kept per directed edge
    (``Differential``): without losses all of i's copies are equal, as in the paper; a lost message
    leaves both ends of its edge unchanged.
    """

    name = "choco"
    local_steps = False  # its correction assumes every step communicates
    compresses = True
    consensus_lr = 0.5

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = {j: Differential(self.params) for j in self.neighbors}   # x̂_i as neighbour j holds it
        self.heard = {j: Differential(self.params) for j in self.neighbors}  # x̂_j

    def outgoing(self) -> list[Array]:
        compressor = self.compressor.contractive(self.num_params) if self.compressor else None
        return [self.sent[j].send(self.half, compressor, edge_rng(self.links.seed, self.step, self.rank, j),
                                  delivered=not self.links.dropped(self.step, self.rank, j))
                for j in self.neighbors]

    def incoming(self, inbox: list[Array | None]) -> None:
        compressor = self.compressor.contractive(self.num_params) if self.compressor else None
        weights = self.plan.gossip_weights
        drift = 0.0
        for j, message in zip(self.neighbors, inbox):
            heard = self.heard[j].receive(message, compressor)
            drift = drift + float(weights[self.rank, j]) * (tensors.float64(heard) - self.sent[j].copy)
        self.params = tensors.float32(self.half + float(np.float32(self.consensus_lr)) * drift)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sent": {str(j): tensors.to_host(d.copy) for j, d in self.sent.items()},
                "heard": {str(j): tensors.to_host(d.copy) for j, d in self.heard.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name, copies in (("sent", self.sent), ("heard", self.heard)):
            for j in copies:
                copies[j].copy = tensors.clone(tensors.like(state[name][str(j)], self.params))
