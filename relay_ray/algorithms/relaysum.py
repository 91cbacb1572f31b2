"""The RelaySum mechanism on one spanning tree (Vogels et al. 2021, Alg. 1 steps 2-4), and the
two algorithms built on it: RelaySGD (relay models) and RelaySum/Grad (relay updates)."""

from __future__ import annotations

import numpy as np

from relay_ray import tensors
from relay_ray.algorithms.base import Algorithm, CommPlan, QuasiGlobalMomentum
from relay_ray.compression import Differential, edge_rng
from relay_ray.optim import NesterovSGD
from relay_ray.tensors import Array


class RelaySumChannel:
    """Relays sums (with counts) of a payload over one tree.

    m_{i->j}^t = payload_i^t + sum_{k in N(i)\\{j}} m_{k->i}^{t-1}
    c_{i->j}^t = 1           + sum_{k in N(i)\\{j}} c_{k->i}^{t-1}
    A lost message counts as m = 0, c = 0, so it is neither used nor forwarded; with
    ``reuse_lost`` the last message received on that edge stands in for it instead.
    Payloads are numpy or torch (``relay_ray.tensors``); on torch a count read from a message is a
    one-element tensor, so relaying never waits for the device.
    """

    def __init__(self, rank: int, neighbors: list[int] | tuple[int, ...]):
        self.rank = rank
        self.neighbors = tuple(neighbors)
        self.received: dict[int, tuple[Array | float, object]] = {j: (0.0, 0) for j in self.neighbors}

    def outgoing(self, payload: Array) -> dict[int, tuple[Array, object]]:
        out = {}
        for j in self.neighbors:
            relay_sum = tensors.clone(payload)
            relay_count = 1
            for k in self.neighbors:
                if k != j:
                    relay_sum += self.received[k][0]
                    relay_count += self.received[k][1]
            out[j] = (relay_sum, relay_count)
        return out

    def incoming(self, payload: Array, inbox: dict[int, tuple[Array, object] | None],
                 reuse_lost: bool = False) -> tuple[Array, object]:
        """Store this step's messages (to relay next step); return (sum of payloads seen, count)."""
        lost = self.received if reuse_lost else {j: (0.0, 0) for j in self.neighbors}
        self.received = {j: (inbox[j] if inbox[j] is not None else lost[j]) for j in self.neighbors}
        total = tensors.clone(payload)
        count = 1
        for relay_sum, relay_count in self.received.values():
            total += relay_sum
            count += relay_count
        return total, count

    def state_dict(self) -> dict:
        return {str(j): (np.array(tensors.to_host(m), dtype=np.float32), int(c)) for j, (m, c) in self.received.items()}

    def load_state_dict(self, state: dict, reference: Array) -> None:
        """``reference``: an array of the kind (numpy / torch on a device) the relayed sums live in."""
        self.received = {j: (tensors.clone(tensors.like(state[str(j)][0], reference)), int(state[str(j)][1]))
                         for j in self.neighbors}


class _RelayAlgorithm(Algorithm):
    """Coordinates are split by stride over the trees (1 tree: all; double binary: even/odd).

    The message to neighbour j packs, for every tree in which j is a neighbour, the relayed
    sum of that tree's coordinates followed by its count (exact in float32 for counts < 2^24).

    With ``--compression`` each relayed sum travels as a compressed difference with error feedback
    (``Differential``: sender and receiver of edge i→j both keep m̂_{i→j}; the sender sends
    C(m_{i→j} − b − m̂_{i→j}) and both add what it decodes to), and the receiver relays and averages
    with m̂_{i→j} + b.  ``b`` = count · x⁰ for RelaySGD (what a sum of ``count`` models is before
    training moves them, known to both ends), 0 for RelaySum/Grad.  What stays exact: the counts
    (sent uncompressed), so every model is still weighted once; what is approximate: each relayed sum,
    off by the compression error not yet fed back (it shrinks as consecutive sums change little).
    """

    uses_trees = True
    compresses = True

    def __init__(self, rank: int, plan: CommPlan, x0: Array, optimizer: NesterovSGD):
        super().__init__(rank, plan, x0, optimizer)
        self.num_trees = len(plan.tree_neighbors)
        self.channels = [RelaySumChannel(rank, tree[rank]) for tree in plan.tree_neighbors]
        self.x0 = tensors.clone(tensors.float32(x0))
        self.sent_hat: dict[tuple[int, int], Differential] = {}   # (tree, j): m̂_{i->j}
        self.heard_hat: dict[tuple[int, int], Differential] = {}  # (tree, j): m̂_{j->i}

    def _slice(self, tree: int) -> slice:
        return slice(tree, None, self.num_trees)

    def _payload(self) -> Array:
        raise NotImplementedError

    def _baseline(self, tree: int, count) -> Array | float:
        """What a relayed sum of ``count`` payloads is known to be near, on both ends (see the class)."""
        return 0.0

    def _size(self, tree: int) -> int:
        return len(range(*self._slice(tree).indices(self.num_params)))

    def _compressor(self, tree: int):
        return self.compressor.contractive(self._size(tree))

    def _differential(self, copies: dict, tree: int, j: int) -> Differential:
        if (tree, j) not in copies:
            copies[(tree, j)] = Differential(tensors.zeros_like(self.x0[self._slice(tree)]))
        return copies[(tree, j)]

    def outgoing(self) -> list[Array]:
        payload = self._payload()
        per_tree = [ch.outgoing(payload[self._slice(t)]) for t, ch in enumerate(self.channels)]
        messages = []
        for j in self.neighbors:
            parts = []
            delivered = not self.links.dropped(self.step, self.rank, j)
            for t, ch in enumerate(self.channels):
                if j in ch.neighbors:
                    relay_sum, relay_count = per_tree[t][j]
                    if self.compressor is not None:
                        relay_sum = self._differential(self.sent_hat, t, j).send(
                            relay_sum - self._baseline(t, relay_count), self._compressor(t),
                            edge_rng(self.links.seed, self.step, self.rank, j, t), delivered)
                    parts += [relay_sum, tensors.count_entry(relay_count, relay_sum)]
            messages.append(tensors.float32(tensors.concat(parts)))
        return messages

    def _unpack(self, inbox: list[Array | None]) -> list[dict[int, tuple[Array, object] | None]]:
        per_tree: list[dict] = [{} for _ in self.channels]
        for j, message in zip(self.neighbors, inbox):
            offset = 0
            for t, ch in enumerate(self.channels):
                if j not in ch.neighbors:
                    continue
                size = self._size(t)
                if self.compressor is not None:
                    size = self._compressor(t).encoded_floats(size)
                if message is None:
                    per_tree[t][j] = None
                elif self.compressor is not None:
                    count = tensors.count_at(message, offset + size)
                    m_hat = self._differential(self.heard_hat, t, j).receive(message[offset:offset + size],
                                                                             self._compressor(t))
                    per_tree[t][j] = (m_hat + self._baseline(t, count), count)
                else:
                    per_tree[t][j] = (message[offset:offset + size], tensors.count_at(message, offset + size))
                offset += size + 1
        return per_tree

    def _relay(self, inbox: list[Array | None], reuse_lost: bool = False) -> list[tuple[slice, Array, object]]:
        payload = self._payload()
        results = []
        for t, (ch, tree_inbox) in enumerate(zip(self.channels, self._unpack(inbox))):
            total, count = ch.incoming(payload[self._slice(t)], tree_inbox, reuse_lost)
            results.append((self._slice(t), total, count))
        return results

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["channels"] = [ch.state_dict() for ch in self.channels]
        if self.sent_hat or self.heard_hat:
            state["compressed"] = {f"{side}:{t}:{j}": tensors.to_host(d.copy) for side, copies in
                                   (("sent", self.sent_hat), ("heard", self.heard_hat)) for (t, j), d in copies.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for ch, ch_state in zip(self.channels, state["channels"]):
            ch.load_state_dict(ch_state, self.params)
        self.sent_hat, self.heard_hat = {}, {}
        for key, copy in state.get("compressed", {}).items():
            side, t, j = key.split(":")
            target = self.sent_hat if side == "sent" else self.heard_hat
            target[(int(t), int(j))] = Differential(tensors.like(copy, self.params))


FILL_RULES = ("x0", "current", "last")


class RelaySGD(_RelayAlgorithm):
    """RelaySGD ("relaysum-model"): relay models; the models not heard from are filled in (DESIGN §1).

    ``fill``: ``x0`` (Algorithm 1: the initial model), ``current`` (the receiver's own x_i^t, its
    latest averaged model, per tree slice: the authors' robustness rule) or ``last`` (a lost message
    is replaced by the last one received on that edge, which is relayed on as if it had arrived;
    the rest is filled with x0).  On reliable links they differ only in the first diam(T) steps.
    """

    name = "relaysgd"

    def __init__(self, rank: int, plan: CommPlan, x0: Array, optimizer: NesterovSGD, fill: str = "x0"):
        super().__init__(rank, plan, x0, optimizer)
        if fill not in FILL_RULES:
            raise ValueError(f"unknown fill rule {fill!r}; choose one of {', '.join(FILL_RULES)}")
        self.fill = fill

    def _payload(self) -> Array:
        return self.half

    def _baseline(self, tree: int, count) -> Array:
        # a count read from a message on the device is a one-element tensor: multiply there, no sync
        return (count if tensors.is_torch(count) else float(count)) * self.x0[self._slice(tree)]

    def incoming(self, inbox: list[Array | None]) -> None:
        params = tensors.empty_like(self.params)
        n = self.num_workers
        fill_model = self.params if self.fill == "current" else self.x0
        for coords, total, count in self._relay(inbox, reuse_lost=self.fill == "last"):
            # Alg. 1 step 4: the n - count models not received are counted as the fill model
            params[coords] = (total + (n - count) * fill_model[coords]) / n
        self.params = params

    def state_dict(self) -> dict:
        return {**super().state_dict(), "fill": self.fill}  # --on-failure switches it to current mid-run

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.fill = state.get("fill", self.fill)


class RelaySGDQuasiGlobalMomentum(QuasiGlobalMomentum, RelaySGD):
    """RelaySGD + quasi-global momentum (``QuasiGlobalMomentum``, Lin et al. 2021, arXiv:2102.04761)
    on the relayed model change instead of a gossip step: an lr-cap variant (benchmarks/lr_cap.py).

    η in m ← βm + (1 − β)(x^t − x^{t+1}) / η is the lr of the local step, the tree's correction
    included.  Dividing by the lr before the correction instead (so that m would estimate the mean
    direction at full size) feeds the relay's transient model changes back ×correction into the next
    steps: on the ζ² = 100 quadratics that diverged at every lr ≤ 0.03 (chain and double binary trees).
    At a fixed point the model change is 0, so m → 0 and the fixed point is RelaySGD's (exact).
    """

    name = "relaysgd-qgm"

    def incoming(self, inbox: list[Array | None]) -> None:
        before = self.params
        super().incoming(inbox)
        self._rebuild_momentum(before, self.params)


class RelaySumGrad(_RelayAlgorithm):
    """RelaySum/Grad: relay the updates u; x^{t+1} = x^t + (sum of updates seen) / n."""

    name = "relaysum-grad"
    local_steps = False  # relays gradients: a step that sends none would lose them

    def _payload(self) -> Array:
        return self.update

    def incoming(self, inbox: list[Array | None]) -> None:
        params = tensors.clone(self.params)
        for coords, total, _ in self._relay(inbox):
            params[coords] += total / self.num_workers
        self.params = params
