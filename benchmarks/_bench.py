"""Helpers shared by the performance benchmarks (comm.py, scaling.py, throughput.py): a private
Ray instance, the machine's load, the in-flight driving loop and RESULTS.md sections."""

from __future__ import annotations

import collections
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def load_average() -> str:
    """`uptime`'s 1/5/15-minute load: other jobs on this machine make timings noisy, so say it."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}/{five:.2f}/{fifteen:.2f}"


def machine() -> str:
    return (f"{os.cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()}, "
            f"{platform.machine()}")


def start_ray(num_cpus: int | None = None, object_store_gb: float | None = None):
    """A new private local Ray (never one found on the machine); stop it with ray.shutdown()."""
    import ray

    kwargs = dict(address="local", include_dashboard=False, logging_level="ERROR", configure_logging=True)
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if object_store_gb is not None:
        kwargs["object_store_memory"] = int(object_store_gb * 2**30)
    ray.init(**kwargs)
    return ray


def drive(engine, steps: int, warmup: int = 2, window: int | None = None) -> dict:
    """Run ``steps`` steps of the engine's dataflow (no evaluations) after ``warmup`` steps.

    The same loop as ``RayEngine.run``: submit one step, keep at most ``window`` steps in flight
    (waiting, never fetching).  Returns wall seconds per step and the driver's own time per step
    (building and submitting the tasks, not the waiting), both over the timed steps only.
    """
    import ray

    window = window or engine.window
    in_flight: collections.deque = collections.deque()
    outboxes = None
    submit_s = 0.0
    start = cpu_start = None
    for step in range(warmup + steps):
        if step == warmup:
            for refs in in_flight:
                ray.wait(refs, num_returns=len(refs), fetch_local=False)
            in_flight.clear()
            start, cpu_start, submit_s = time.perf_counter(), time.process_time(), 0.0
        t0 = time.perf_counter()
        outboxes = engine._submit_step(outboxes)
        in_flight.append([ref for refs in outboxes for ref in refs])
        submit_s += time.perf_counter() - t0
        if len(in_flight) > window:
            oldest = in_flight.popleft()
            ray.wait(oldest, num_returns=len(oldest), fetch_local=False)
    for refs in in_flight:
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
    wall = time.perf_counter() - start
    return {"step_s": wall / steps, "driver_s": submit_s / steps,
            "driver_cpu_s": (time.process_time() - cpu_start) / steps}


NOTES = "### Reading"  # a hand-written part of a section, kept when the script rewrites the numbers


def write_section(path: Path, title: str, section: str) -> None:
    """Replace (or append) the section ``title`` of RESULTS.md, leaving the others alone.

    A ``### Reading`` subsection (the written diagnosis) survives: it is moved after the new numbers.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    match = pattern.search(text)
    if match:
        old = match.group(0)
        notes = old[old.index(NOTES):].rstrip("\n") if NOTES in old else ""
        section = section.rstrip("\n") + ("\n\n" + notes if notes else "")
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def command_line(script: str, argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join([f".venv/bin/python benchmarks/{script}", *args])


def save_figure(fig, path, command: str, bottom: float = 0.04) -> None:
    """Stamp the command that produced the figure on it, save and close it."""
    import matplotlib.pyplot as plt

    fig.text(0.01, 0.01, f"command: {command}", fontsize=8, family="monospace")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
