"""Helpers shared by the performance benchmarks (comm.py, scaling.py, throughput.py): a private
Ray instance, the machine's load, the engine with given workers per actor, timed steps through
``Engine.run_steps`` and RESULTS.md sections."""

from __future__ import annotations

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


def start_engine(experiment, workers_per_actor="auto", window: int | None = None, group_cls=None,
                 transport: str = "object-store"):
    """relay_ray's ``Engine`` for ``experiment`` with ``EngineOptions(workers_per_actor=...)`` ("auto":
    the default, one actor per CPU core; K: K workers per actor) and otherwise default options;
    ``group_cls``: the public seam for another worker group (default ``WorkerGroup``)."""
    from relay_ray.config import EngineOptions
    from relay_ray.engine import Engine

    options = EngineOptions(workers_per_actor=workers_per_actor, transport=transport,
                            **({"window": window} if window else {}))
    return Engine(experiment.config, experiment, options, **({"group_cls": group_cls} if group_cls else {}))


def drive(engine, steps: int, warmup: int = 2) -> dict:
    """``warmup`` steps, then ``steps`` timed steps of the engine's dataflow, no evaluations.

    Both are ``Engine.run_steps`` (the loop of ``Engine.run``: submit one task per actor and step,
    keep at most ``window`` steps in flight, wait without fetching), which returns once its steps are
    done; consecutive calls continue the dataflow.  Returns, per timed step, the wall seconds, the
    driver's own submitting seconds (building and submitting the tasks, not the waiting) and the
    driver process's CPU seconds (``time.process_time``: Ray's driver-side threads included).
    """
    if warmup:
        engine.run_steps(warmup)
    cpu_start = time.process_time()
    timing = engine.run_steps(steps)
    cpu_s = time.process_time() - cpu_start
    return {"step_s": timing["wall_s"] / steps, "driver_s": timing["submit_s"] / steps,
            "driver_cpu_s": cpu_s / steps}


# The engine before the single one (RayEngine, one actor per worker, messages ray.put; PackedRayEngine
# for --workers-per-actor K): its code and numbers are in git history, RESULTS.md as of this commit.
PREVIOUS_COMMIT = "e83e170"
PREVIOUS_LABEL = "previous engine (one actor per worker, ray.put)"
PREVIOUS_NOTE = (f"The previous engine's numbers (`RayEngine`: one actor per worker, messages `ray.put`; "
                 f"`PackedRayEngine` for `--workers-per-actor K`) are in git history: "
                 f"`git show {PREVIOUS_COMMIT}:benchmarks/RESULTS.md`.")


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


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
