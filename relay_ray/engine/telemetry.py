"""What the Ray dashboard shows of a run: actors named after the run and the workers they hold, and
``ray.util.metrics`` gauges exported through Ray's Prometheus endpoint (the dashboard's Metrics view).

Gauges (Prometheus names get Ray's ``ray_`` prefix), tagged with the run's name:
``relay_ray_step``, ``relay_ray_steps_per_s``, ``relay_ray_in_flight_steps`` (the dataflow window in
use), ``relay_ray_workers`` (fewer after ``--on-failure continue``), ``relay_ray_restarts``, and at
each evaluation ``relay_ray_consensus_distance`` and ``relay_ray_bytes_sent_per_worker``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

PUBLISH_EVERY_S = 0.5  # the training loop updates the step gauges at most this often


def run_name(out: str | None) -> str:
    """The run's name in the dashboard: its output folder's name and a short id (a sweep's trials
    all write into folders called ``run``; two runs may share a folder name)."""
    folder = Path(out).name if out else "run"
    return f"{folder}-{uuid.uuid4().hex[:6]}"


def actor_name(run: str, group: int, ranks: list[int], generation: int = 0) -> str:
    """``<run>-g1[8:16]`` for workers 8..15 (``[3,7,9]`` when not contiguous); ``-r1``, ``-r2`` for
    the actors that replace a dead one (a dead actor's name may not be free yet)."""
    ranks = sorted(ranks)
    held = f"[{ranks[0]}:{ranks[-1] + 1}]" if ranks == list(range(ranks[0], ranks[-1] + 1)) else \
        "[" + ",".join(map(str, ranks)) + "]"
    return f"{run}-g{group}{held}" + (f"-r{generation}" if generation else "")


class RunGauges:
    """The run's gauges; cheap to call every step (the step gauges publish at most twice a second)."""

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        names = ("step", "steps_per_s", "in_flight_steps", "workers", "restarts", "consensus_distance",
                 "bytes_sent_per_worker")
        self.gauges = {name: Gauge(f"relay_ray_{name}", description=f"relay_ray run {name.replace('_', ' ')}",
                                   tag_keys=("run",)) for name in names}
        self.tags = {"run": run}
        self.last = (time.monotonic(), None)  # when the step gauges were last published, and at which step

    def set(self, name: str, value: float) -> None:
        self.gauges[name].set(float(value), tags=self.tags)

    def step(self, step: int, in_flight: int, workers: int, restarts: int, force: bool = False) -> None:
        """``force``: publish now (a step boundary), whatever the time since the last publication."""
        now = time.monotonic()
        when, at = self.last
        if at is not None and now - when < PUBLISH_EVERY_S and not force:
            return
        if at is not None and step > at:
            self.set("steps_per_s", (step - at) / (now - when))
        self.last = (now, step)
        for name, value in (("step", step), ("in_flight_steps", in_flight), ("workers", workers),
                            ("restarts", restarts)):
            self.set(name, value)

    def evaluation(self, row: dict) -> None:
        for name in ("consensus_distance", "bytes_sent_per_worker"):
            if isinstance(row.get(name), (int, float)):
                self.set(name, row[name])
