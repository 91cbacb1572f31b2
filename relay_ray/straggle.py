"""Injected compute delays (``--straggle SPEC``): stragglers on demand, to measure what a barrier costs.

A spec is one or more terms joined by ``+``:

- ``slow:RANKS:SECONDS`` — the workers in RANKS (``3`` or ``3,7`` or ``0-3``) take SECONDS longer
  for every step: a fixed slow set (an older GPU, a busy node);
- ``jitter:SECONDS`` — every worker takes an extra exponentially distributed delay with mean
  SECONDS at every step (a shared cluster's noise), drawn from (seed, step, rank) so every run with
  the same seed straggles identically, on any placement.

Delays are sleeps in the worker's Ray task: they cost wall time, not CPU, and never change the
numbers a run computes.  A worker group sleeps for the sum of its workers' delays, because a group's
workers take their steps one after the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relay_ray.errors import UserError

_JITTER_STREAM = 0x57A6  # keeps the jitter draws apart from every other (seed, step, rank) stream


def _ranks(text: str, spec: str) -> frozenset[int]:
    ranks: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise UserError(f"--straggle {spec!r}: ranks must look like 3 or 3,7 or 0-3, got {text!r}") from None
        if first < 0 or last < first:
            raise UserError(f"--straggle {spec!r}: bad rank range {part!r}")
        ranks.update(range(first, last + 1))
    return frozenset(ranks)


def _seconds(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--straggle {spec!r}: {text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise UserError(f"--straggle {spec!r}: seconds must be >= 0 and finite, got {text}")
    return value


@dataclass(frozen=True)
class Straggle:
    """Per-(rank, step) extra seconds; picklable, so each actor holds a copy."""

    slow: tuple[tuple[frozenset[int], float], ...] = ()
    jitter: float = 0.0
    seed: int = 0

    @classmethod
    def parse(cls, spec: str | None, seed: int = 0, num_workers: int | None = None) -> "Straggle | None":
        if spec is None or not spec.strip():
            return None
        slow, jitter = [], 0.0
        for term in spec.split("+"):
            kind, _, rest = term.strip().partition(":")
            if kind == "slow":
                ranks, _, seconds = rest.rpartition(":")
                if not ranks:
                    raise UserError(f"--straggle {spec!r}: write slow:RANKS:SECONDS, e.g. slow:3,7:0.05")
                chosen = _ranks(ranks, spec)
                if num_workers is not None and max(chosen) >= num_workers:
                    raise UserError(f"--straggle {spec!r}: rank {max(chosen)} does not exist "
                                    f"(--workers {num_workers})")
                slow.append((chosen, _seconds(seconds, spec)))
            elif kind == "jitter":
                jitter += _seconds(rest, spec)
            else:
                raise UserError(f"--straggle {spec!r}: unknown term {term.strip()!r}; "
                                "use slow:RANKS:SECONDS and/or jitter:SECONDS, joined by +")
        return cls(tuple(slow), jitter, seed)

    def seconds(self, rank: int, step: int) -> float:
        """Worker ``rank``'s extra time for step ``step`` (1-based, like the engine's steps)."""
        extra = sum(seconds for ranks, seconds in self.slow if rank in ranks)
        if self.jitter:
            extra += float(np.random.default_rng([self.seed, step, rank, _JITTER_STREAM]).exponential(self.jitter))
        return extra

    def group_seconds(self, ranks, step: int) -> float:
        return sum(self.seconds(rank, step) for rank in ranks)
