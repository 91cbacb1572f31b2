"""Driver overhead and step time of the Ray engine from 4 to 256 logical workers, for several actor layouts.

A tiny model (logistic regression on scikit-learn digits, 650 parameters), RelaySGD on double
binary trees, no evaluations: what is measured is the engine, not the model.  For every number of
workers n and every layout, after warm-up steps, ``Engine.run_steps`` (the dataflow loop of
``Engine.run``, window 4) takes ``--steps`` steps and reports

  driver ms / worker-step   time the driver spends building and submitting a step's tasks
                            (routing refs, one ``.remote`` call per actor), divided by n: the
                            ``submit_s`` of ``Engine.run_steps`` (which, for now, also counts the
                            window's back-pressure wait: see the TODO in ``_bench.drive``); the
                            target is <= 0.5 ms for the default layout from 4 to 256 workers
  driver CPU ms             the driver process's CPU time per worker-step (Ray's threads included)
  step ms                   wall time per step of the whole system (n worker-steps)

Layouts (``relay_ray.engine.Engine`` with ``EngineOptions(workers_per_actor=...)``): ``auto``, the
default (no --workers-per-actor: one actor per CPU core, 2 actors here); ``K=1``, one actor per
worker, only up to ``--max-unpacked`` workers (each actor is a process that imports torch, ~150 MB);
and ``K=16`` for n > 16.  The in-process simulator's step time is shown for reference.

    .venv/bin/python benchmarks/scaling.py       # budget 10 min: 5 min 2 s under load 7-25 (2 cores)
    .venv/bin/python benchmarks/scaling.py --workers 4 16 64 256 --repeats 2   # about a third
    .venv/bin/python benchmarks/scaling.py --workers 4 32 --steps 5 --repeats 1 --no-results   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (  # noqa: E402
    PREVIOUS_COMMIT, PREVIOUS_LABEL, PREVIOUS_NOTE, command_line, drive, load_average, machine, save_figure,
    start_engine, start_ray, verdict, write_section)

from relay_ray.config import RunConfig  # noqa: E402
from relay_ray.data import load_dataset  # noqa: E402
from relay_ray.experiment import build_experiment  # noqa: E402
from relay_ray.worker import Worker  # noqa: E402

SECTION = "## Scaling"
LAYOUTS = ("auto", "K=1", "K=16")  # auto: no --workers-per-actor, the default and the headline
TARGET_MS = 0.5  # driver ms per worker-step
# The previous engine's K=1 rows (RayEngine: one actor per worker, messages ray.put), from the
# quiet-machine re-run in RESULTS.md of e83e170: n: (driver ms, driver CPU ms, step ms, ms per
# worker-step, start-up s).
PREVIOUS = {4: (0.459, 1.469, 19.5, 4.87, 5.1), 8: (0.339, 1.685, 47.6, 5.95, 8.1),
            16: (0.393, 1.850, 130.4, 8.15, 20.7), 32: (0.493, 1.889, 273.7, 8.55, 48.4)}


def config_for(n: int) -> RunConfig:
    return RunConfig(algorithm="relaysgd", tree="double-binary", num_workers=n, dataset="digits", model="logreg",
                     alpha=1.0, steps=10**6, eval_every=10**6, backend="ray", lr=0.1, momentum=0.9, seed=0)


def time_simulator(experiment, steps: int, repeats: int) -> list[float]:
    plan = experiment.plan
    workers = [Worker(experiment.worker_spec(r), experiment.task_data) for r in range(plan.num_workers)]
    outboxes = None
    times = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        for _ in range(steps):
            inboxes = plan.route(outboxes) if outboxes is not None else [[] for _ in workers]
            outboxes = [w.step(*inbox) for w, inbox in zip(workers, inboxes)]
        if repeat:
            times.append((time.perf_counter() - start) / steps)
    return times


def time_engine(experiment, workers_per_actor, steps: int, repeats: int) -> tuple[list[dict], float, int]:
    started = time.perf_counter()
    engine = start_engine(experiment, workers_per_actor)
    startup = time.perf_counter() - started
    try:
        drive(engine, steps=5, warmup=2)
        return [drive(engine, steps=steps, warmup=2) for _ in range(repeats)], startup, engine.shape.num_actors
    finally:
        engine.shutdown()


def layouts_for(n: int, max_unpacked: int) -> dict[str, int | str]:
    """label: --workers-per-actor."""
    layouts: dict[str, int | str] = {"auto": "auto"}
    if n <= max_unpacked:
        layouts["K=1"] = 1
    if n > 16:
        layouts["K=16"] = 16
    return layouts


def plot(rows: list[dict], path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for layout in LAYOUTS:
        points = [(r["n"], r[layout]) for r in rows if layout in r]
        if not points:
            continue
        ns = [n for n, _ in points]
        label = f"{layout} (default)" if layout == "auto" else layout
        left.loglog(ns, [1e3 * m["driver_s"] / n for n, m in points], "o-", label=label)
        right.loglog(ns, [1e3 * m["step_s"] for n, m in points], "o-", label=label)
    right.loglog([r["n"] for r in rows], [1e3 * r["simulator"] for r in rows], "k--", label="simulator (1 process)")
    left.axhline(TARGET_MS, color="gray", linestyle=":", label=f"target {TARGET_MS} ms")
    ns = np.array([r["n"] for r in rows], dtype=float)
    for ax, title, ylabel in ((left, "driver time per worker-step", "ms"), (right, "step time (all n workers)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [f"{int(n)}" for n in ns])
        ax.set_xlabel("logical workers n")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9)
    fig.suptitle("RelaySGD (double binary trees), logreg on digits, 2-core CPU, median of repeats")
    save_figure(fig, path, command)


HEADER = ["| n | layout | actors | driver ms / worker-step | driver CPU ms / worker-step | step ms | "
          "ms / worker-step | simulator step ms | start-up s |",
          "|---|---|---|---|---|---|---|---|---|"]


def table(rows: list[dict]) -> str:
    lines = list(HEADER)
    for r in rows:
        for layout in LAYOUTS:
            if layout not in r:
                continue
            m, n = r[layout], r["n"]
            lines.append(f"| {n} | {layout} | {m['actors']} | {1e3 * m['driver_s'] / n:.3f} | "
                         f"{1e3 * m['driver_cpu_s'] / n:.3f} | {1e3 * m['step_s']:.1f} | {1e3 * m['step_s'] / n:.2f} | "
                         f"{1e3 * r['simulator']:.1f} | {m['startup_s']:.1f} |")
    return "\n".join(lines)


def target(rows: list[dict]) -> str:
    """The acceptance check: the default layout's driver ms per worker-step at every n measured."""
    per_n = [(r["n"], 1e3 * r["auto"]["driver_s"] / r["n"]) for r in rows if "auto" in r]
    if not per_n:
        return "(not checked: needs the auto layout)"
    worst = max(v for _, v in per_n)
    worst_cpu = max(1e3 * r["auto"]["driver_cpu_s"] / r["n"] for r in rows if "auto" in r)
    return (f"**Target: driver <= {TARGET_MS} ms per worker-step with the default layout (auto), n = "
            f"{per_n[0][0]}..{per_n[-1][0]}: {verdict(worst <= TARGET_MS)}** (at most {worst:.3f} ms; "
            + ", ".join(f"n={n}: {v:.3f}" for n, v in per_n)
            + f"; driver CPU at most {worst_cpu:.3f} ms per worker-step).")


def previous_table(rows: list[dict]) -> str:
    lines = list(HEADER)
    for n, (driver, cpu, step, per_worker, startup) in PREVIOUS.items():
        if any(r["n"] == n for r in rows):
            lines.append(f"| {n} | {PREVIOUS_LABEL} | {n} | {driver:.3f} | {cpu:.3f} | {step:.1f} | {per_worker:.2f} | "
                         f"– | {startup:.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="benchmarks", help="folder for scaling.png and RESULTS.md")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--max-unpacked", type=int, default=32, help="largest n run with one actor per worker")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; the table shows the median")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md and scaling.png")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = command_line("scaling.py", argv)
    started = time.perf_counter()
    digits = load_dataset("digits")
    loads = [load_average()]
    rows = []
    ray = start_ray(num_cpus=2)
    try:
        for n in args.workers:
            experiment = build_experiment(config_for(n), digits)
            row = {"n": n, "simulator": statistics.median(time_simulator(experiment, args.steps, args.repeats))}
            for layout, per_actor in layouts_for(n, args.max_unpacked).items():
                runs, startup, actors = time_engine(experiment, per_actor, args.steps, args.repeats)
                row[layout] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                row[layout].update(actors=actors, startup_s=startup)
                m = row[layout]
                print(f"n={n:4d} {layout:9s} driver {1e3 * m['driver_s'] / n:.3f} ms/worker-step, step "
                      f"{1e3 * m['step_s']:.1f} ms (simulator {1e3 * row['simulator']:.1f}), startup {startup:.0f}s, "
                      f"load {load_average()}", file=sys.stderr, flush=True)
            rows.append(row)
            loads.append(load_average())
    finally:
        ray.shutdown()
    elapsed = time.perf_counter() - started
    text = table(rows)
    check = target(rows)
    print(text + "\n\n" + check)
    if args.no_results:
        return 0
    out = Path(args.out)
    png = out / "scaling.png"
    plot(rows, png, command)
    previous = previous_table(rows)
    previous_part = (f" Reference, not measured in this run (previous engine, from RESULTS.md of commit "
                     f"{PREVIOUS_COMMIT}, its quiet-machine re-run):\n\n{previous}" if previous else "")
    section = f"""{SECTION}

Command: `{command}` ({elapsed:.0f} s; {machine()}; load average 1/5/15 min during the run:
{', '.join(loads)}; median of {args.repeats} repeats of {args.steps} steps, window 4, no evaluations).
Plot: `{png.name}`. Layouts: `relay_ray.engine.Engine` with `--workers-per-actor` auto (no flag, the
default: one actor per CPU core), 1 and 16, timed with `Engine.run_steps`.

{text}

{check}

{PREVIOUS_NOTE}{previous_part}
"""
    write_section(out / "RESULTS.md", SECTION, section)
    print(f"\nwrote {png} and {out / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
