"""Driver overhead and step time of the Ray engine from 4 to 256 logical workers, with and without packing.

A tiny model (logistic regression on scikit-learn digits, 650 parameters), RelaySGD on double
binary trees, no evaluations: what is measured is the engine, not the model.  For every number of
workers n and every layout, after warm-up steps, the driver loop of ``RayEngine.run`` runs
``--steps`` steps (window 4) and reports

  driver ms / worker-step   time the driver spends building and submitting a step's tasks
                            (``_submit_step``: routing refs, ``.remote`` calls), divided by n
  step ms                   wall time per step of the whole system (n worker-steps)

Layouts: one actor per worker (``K=1``, only up to ``--max-unpacked`` workers: each actor is a
process that imports torch, ~150 MB), and packing with ``--workers-per-actor`` = n/2 (2 actors,
one per core) and 16.  The in-process simulator's step time is shown for reference.

    .venv/bin/python benchmarks/scaling.py       # budget 10 min: 4 min 49 s on 2 idle cores (21 min under load 7-76)
    .venv/bin/python benchmarks/scaling.py --workers 4 16 64 256 --repeats 2   # about a third
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import command_line, drive, load_average, machine, save_figure, start_ray, write_section  # noqa: E402

from relay_ray.config import RunConfig  # noqa: E402
from relay_ray.data import load_dataset  # noqa: E402
from relay_ray.experiment import build_experiment  # noqa: E402
from relay_ray.worker import Worker  # noqa: E402

SECTION = "## Scaling"


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


def time_engine(experiment, per_actor: int, steps: int, repeats: int) -> tuple[list[dict], float]:
    from relay_ray.packing import make_engine

    started = time.perf_counter()
    engine = make_engine(experiment.config, experiment, workers_per_actor=per_actor)
    startup = time.perf_counter() - started
    try:
        drive(engine, steps=5, warmup=2)
        return [drive(engine, steps=steps, warmup=2) for _ in range(repeats)], startup
    finally:
        engine.shutdown()


def layouts_for(n: int, max_unpacked: int) -> dict[str, int]:
    layouts = {}
    if n <= max_unpacked:
        layouts["K=1"] = 1
    layouts["2 actors"] = n // 2
    if n > 16:
        layouts["K=16"] = 16
    return layouts


def plot(rows: list[dict], path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for layout in ("K=1", "2 actors", "K=16"):
        points = [(r["n"], r[layout]) for r in rows if layout in r]
        if not points:
            continue
        ns = [n for n, _ in points]
        left.loglog(ns, [1e3 * m["driver_s"] / n for n, m in points], "o-", label=layout)
        right.loglog(ns, [1e3 * m["step_s"] for n, m in points], "o-", label=layout)
    right.loglog([r["n"] for r in rows], [1e3 * r["simulator"] for r in rows], "k--", label="simulator (1 process)")
    left.axhline(0.5, color="gray", linestyle=":", label="target 0.5 ms")
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


def table(rows: list[dict]) -> str:
    lines = ["| n | layout | actors | driver ms / worker-step | driver CPU ms / worker-step | step ms | "
             "ms / worker-step | simulator step ms | start-up s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for layout in ("K=1", "2 actors", "K=16"):
            if layout not in r:
                continue
            m, n = r[layout], r["n"]
            lines.append(f"| {n} | {layout} | {m['actors']} | {1e3 * m['driver_s'] / n:.3f} | "
                         f"{1e3 * m['driver_cpu_s'] / n:.3f} | {1e3 * m['step_s']:.1f} | {1e3 * m['step_s'] / n:.2f} | "
                         f"{1e3 * r['simulator']:.1f} | {m['startup_s']:.1f} |")
    return "\n".join(lines)


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
                runs, startup = time_engine(experiment, per_actor, args.steps, args.repeats)
                row[layout] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                row[layout].update(actors=-(-n // per_actor), startup_s=startup)
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
    print(text)
    if args.no_results:
        return 0
    out = Path(args.out)
    png = out / "scaling.png"
    plot(rows, png, command)
    section = f"""{SECTION}

Command: `{command}` ({elapsed:.0f} s; {machine()}; load average 1/5/15 min during the run:
{', '.join(loads)}; median of {args.repeats} repeats of {args.steps} steps, window 4, no evaluations).
Plot: `{png.name}`.

{text}
"""
    write_section(out / "RESULTS.md", SECTION, section)
    print(f"\nwrote {png} and {out / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
