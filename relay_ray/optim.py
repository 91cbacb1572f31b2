"""Local optimizer and learning-rate schedule (numpy or torch state; the momentum buffer never leaves a worker)."""

from __future__ import annotations

import numpy as np

from relay_ray import tensors


class NesterovSGD:
    """SGD with Nesterov momentum; weight decay is added to the gradient (as torch.optim.SGD).

    ``update`` returns the local update u = -lr * (g + beta * buf) with buf <- beta*buf + g,
    which is what every algorithm adds to its model before communicating (DESIGN §1).
    """

    def __init__(self, num_params: int, momentum: float, weight_decay: float, like=None):
        """``like``: an array of the kind (numpy / torch on a device) the buffer lives in (default numpy)."""
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.buffer = np.zeros(num_params, dtype=np.float32) if like is None else tensors.zeros_like(tensors.float32(like))

    def direction(self, params: np.ndarray, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(descent direction, new momentum buffer) without committing the buffer."""
        g = grad + self.weight_decay * params if self.weight_decay else grad
        if not self.momentum:
            return g, self.buffer
        buffer = self.momentum * self.buffer + g
        return g + self.momentum * buffer, buffer

    def update(self, params, grad, lr: float):
        direction, self.buffer = self.direction(params, grad)
        return tensors.float32(-lr * direction)

    def state_dict(self) -> dict:
        return {"buffer": np.array(tensors.to_host(self.buffer))}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = tensors.clone(tensors.like(state["buffer"], self.buffer))


def learning_rate(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0,
                  decay_at: tuple[float, ...] = (), decay_factor: float = 0.1) -> float:
    """Linear warm-up, then step decay at the given fractions of the run (the paper's schedule)."""
    lr = base_lr
    if warmup_steps and step < warmup_steps:
        lr *= (step + 1) / warmup_steps
    for fraction in decay_at:
        if step >= fraction * total_steps:
            lr *= decay_factor
    return lr
