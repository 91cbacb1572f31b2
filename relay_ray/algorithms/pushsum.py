"""Stochastic gradient push (SGP): push-sum gossip, which averages over directed and time-varying graphs."""

from __future__ import annotations

import numpy as np

from relay_ray import tensors
from relay_ray.algorithms.gossip import GossipAlgorithm
from relay_ray.tensors import Array


class SGP(GossipAlgorithm):
    """Stochastic gradient push (Assran et al. 2019, arXiv:1811.10792, Algorithm 1):

        x_i^{t+1/2} = x_i^t + u_i^t                  u from the local optimizer at the de-biased z_i^t
        x_i^{t+1} = sum_j P_ij^t x_j^{t+1/2},   w_i^{t+1} = sum_j P_ij^t w_j^t,   z_i^{t+1} = x_i^{t+1} / w_i^{t+1}

    with P^t column stochastic (a sender keeps and pushes equal shares 1/(out-degree + 1)), so it
    needs no doubly stochastic weights and runs on directed and time-varying graphs; w^0 = 1.
    ``params`` is z (gradients and evaluation see the de-biased model); x and w travel in one message,
    [x^{t+1/2}, w].  A lost message loses its share of x and of w together: z stays a weighted
    average of the models (push-sum's sums are then no longer preserved).
    """

    name = "sgp"
    push_sum = True
    time_varying = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.numerator = tensors.clone(self.params)  # x
        self.weight = 1.0  # w, float64 on the host: it is one number

    def local_step(self, grad: Array, lr: float) -> None:
        super().local_step(grad, lr)
        self.half_numerator = self.numerator + self.update

    def local_only(self) -> None:
        self.numerator = self.half_numerator
        self.params = tensors.float32(self.numerator / self.weight)

    def outgoing(self) -> list[Array]:
        weight = tensors.like(np.array([self.weight], np.float32), self.half_numerator)
        return self._send(tensors.concat([self.half_numerator, weight]))

    def incoming(self, inbox: list[Array | None]) -> None:
        push = self._weights()
        d = self.num_params
        own = float(push[self.rank, self.rank])
        numerator = own * tensors.float64(self.half_numerator)
        weight = own * self.weight
        for j, message in zip(self.neighbors, inbox):
            if message is not None and push[self.rank, j] != 0:
                share = float(push[self.rank, j])
                numerator = numerator + share * tensors.float64(message[:d])
                weight += share * float(message[d])
        self.numerator = tensors.float32(numerator)
        self.weight = weight
        self.params = tensors.float32(numerator / weight)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "numerator": np.array(tensors.to_host(self.numerator)),
                "weight": np.array([self.weight])}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.numerator = tensors.clone(tensors.like(state["numerator"], self.params))
        self.weight = float(np.asarray(state["weight"])[0])

