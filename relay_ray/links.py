"""What a link does to a message (pure numpy; no Ray): whether it is lost (``--drop-prob``).

Both ends of a link can tell: the receiver drops the message, and a sender that keeps per-edge
state (the public copies of compressed communication) leaves it unchanged, so the two stay equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_DROP_SALT = 0x64726F70  # "drop": keeps the drop stream apart from every other seeded stream


def message_dropped(seed: int, step: int, sender: int, receiver: int, drop_prob: float) -> bool:
    """Whether the message ``sender -> receiver`` of ``step`` is lost (--drop-prob).

    A pure function of (seed, step, edge): the simulator and the Ray engine drop exactly the same
    messages, independent of timing, and a resumed run drops what the uninterrupted one did.
    """
    if drop_prob <= 0:
        return False
    return bool(np.random.default_rng((_DROP_SALT, seed, step, sender, receiver)).random() < drop_prob)


@dataclass(frozen=True)
class Links:
    """The run's links as an algorithm sees them: the seed of every per-edge stream, and the loss rate."""

    seed: int = 0
    drop_prob: float = 0.0

    def dropped(self, step: int, sender: int, receiver: int) -> bool:
        return message_dropped(self.seed, step, sender, receiver, self.drop_prob)
