"""End-to-end training throughput: the Ray engine vs the in-process simulator, 16 workers, CIFAR-10.

RelaySGD on a chain, the small CNN (``--model cnn``), batch 32 per worker, CIFAR-10 decoded once
and cached by ``relay_ray.data`` (the first run decodes the JPEG archive, ~15 s).  Both backends
run the same ``Worker`` objects; only training steps are timed (no evaluations, no start-up):

  simulator   all 16 workers in this process (``--backend local``), torch with its default threads
              (2 here) and with 1; the faster is the baseline
  ray auto    the engine as ``relay-ray run`` starts it (``EngineOptions()``, no --workers-per-actor):
              one actor per CPU core (2 actors of 8 workers here), window 4
  ray K=1     ``--workers-per-actor 1``: one actor per worker

The Ray variants are ``relay_ray.engine.Engine``, timed with ``Engine.run_steps``; the target is
ray auto >= 0.9x the faster simulator.  samples/s = 16 workers x 32 samples x steps / wall time.
Also peak RSS per worker (VmHWM of each actor process, divided by its workers; for the simulator,
this process / 16; the driver reads the actors' /proc/<pid>/status, the pids left by the
``group_cls`` below) and the peak bytes in Ray's object store (sampled every 0.5 s).  Prints a
Markdown table, writes throughput.png and the section "## Throughput" of RESULTS.md.

    .venv/bin/python benchmarks/throughput.py    # budget 10 min: 1 min 45 s under load 7-16 (2 cores)
    .venv/bin/python benchmarks/throughput.py --steps 5 --repeats 1 --no-results   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (  # noqa: E402
    PREVIOUS_COMMIT, PREVIOUS_LABEL, PREVIOUS_NOTE, ROOT, command_line, drive, load_average, machine, save_figure,
    start_engine, start_ray, verdict, write_section)

from relay_ray.config import RunConfig  # noqa: E402
from relay_ray.data import load_dataset  # noqa: E402
from relay_ray.experiment import build_experiment  # noqa: E402
from relay_ray.group import WorkerGroup  # noqa: E402
from relay_ray.worker import Worker  # noqa: E402

SECTION = "## Throughput"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
LAYOUTS = {"ray auto": "auto", "ray K=1": 1}  # label: --workers-per-actor
AUTO = "ray auto"  # the headline
# The previous engine's `ray K=1` row (RayEngine: one actor per worker, messages ray.put), from the
# last re-run in RESULTS.md of e83e170 (idle machine; its faster simulator made 2122 samples/s).
PREVIOUS_ROW = "| 16 | 295, 286 | 1733 | 0.82x | 747 | 360 | 189 | 17 |"


def _status_kb(pid: int | str, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


class PidGroup(WorkerGroup):
    """The engine's worker group, leaving its process id in ``pid_dir`` (a file named by the pid,
    holding its ranks) so the driver can read the actor process's memory from /proc.  Set
    ``pid_dir`` on a subclass (``with_pid_dir``); the class travels to the actor by value."""

    pid_dir: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        Path(self.pid_dir, str(os.getpid())).write_text(" ".join(map(str, self.ranks)))


def with_pid_dir(pid_dir: str) -> type[PidGroup]:
    return type("PidGroup", (PidGroup,), {"pid_dir": pid_dir})


def actor_memory(pid_dir: str) -> list[dict]:
    """Peak (VmHWM) and private (RssAnon) resident MB of each actor process, and its workers."""
    out = []
    for path in Path(pid_dir).iterdir():
        out.append({"workers": len(path.read_text().split()), "peak_rss_mb": _status_kb(path.name, "VmHWM") / 1024,
                    "anon_rss_mb": _status_kb(path.name, "RssAnon") / 1024})
    return out


def time_simulator(experiment, steps: int, repeats: int, threads: int) -> tuple[list[float], float]:
    import torch

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    plan = experiment.plan
    workers = [Worker(experiment.worker_spec(r), experiment.task_data) for r in range(plan.num_workers)]
    outboxes = None
    times = []
    for repeat in range(repeats + 1):  # the first repeat warms up
        start = time.perf_counter()
        for _ in range(steps):
            inboxes = plan.route(outboxes) if outboxes is not None else [[] for _ in workers]
            outboxes = [w.step(*inbox) for w, inbox in zip(workers, inboxes)]
        if repeat:
            times.append((time.perf_counter() - start) / steps)
    torch.set_num_threads(default_threads)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return times, peak_mb


class StoreSampler(threading.Thread):
    """Peak plasma usage across the run, from Ray's memory summary."""

    def __init__(self, period_s: float = 0.5):
        super().__init__(daemon=True)
        self.period_s, self.peak_mib, self.done = period_s, 0, threading.Event()

    def run(self) -> None:
        from ray._private.internal_api import memory_summary

        import ray

        address = ray.get_runtime_context().gcs_address
        while not self.done.is_set():
            match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address, stats_only=True))
            if match:
                self.peak_mib = max(self.peak_mib, int(match.group(1)))
            self.done.wait(self.period_s)


def time_engine(experiment, workers_per_actor, steps: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="relay_ray_pids_") as pid_dir:
        started = time.perf_counter()
        engine = start_engine(experiment, workers_per_actor, group_cls=with_pid_dir(pid_dir))
        startup = time.perf_counter() - started
        sampler = StoreSampler()
        sampler.start()
        try:
            runs = [drive(engine, steps=steps, warmup=3) for _ in range(repeats)]
            memory = actor_memory(pid_dir)  # while the actors live
        finally:
            sampler.done.set()
            sampler.join()
            engine.shutdown()
    return {"step_s": [r["step_s"] for r in runs], "startup_s": startup, "actors": engine.shape.num_actors,
            "shape": engine.shape.describe(),
            "peak_rss_mb": max(m["peak_rss_mb"] / m["workers"] for m in memory),
            "anon_rss_mb": max(m["anon_rss_mb"] / m["workers"] for m in memory),
            "store_peak_mib": sampler.peak_mib, "driver_s": statistics.median(r["driver_s"] for r in runs)}


def plot(results: dict, path: Path, command: str, samples_per_step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    values = [samples_per_step / statistics.median(results[k]["step_s"]) for k in labels]
    base = max(v for k, v in zip(labels, values) if k.startswith("sim"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [f"{k} (default)" if k == AUTO else k for k in labels]
    bars = ax.bar(labels, values, color=["gray" if k.startswith("sim") else "C0" for k in labels])
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.0f}\n({value / base:.2f}x)", (bar.get_x() + bar.get_width() / 2, value),
                    ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("training samples / s (median)")
    ax.set_ylim(0, max(values) * 1.25)
    ax.axhline(0.9 * base, color="gray", linestyle=":", label="target: 0.9x the faster simulator")
    ax.legend(fontsize=9, loc="upper left")
    ax.set_title(f"{samples_per_step // 32} workers, small CNN on CIFAR-10, RelaySGD chain, 2-core CPU")
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path, command, bottom=0.05)


HEADER = ["| backend | actors | ms / step (median, min) | samples/s | vs faster simulator | peak RSS / worker MB | "
          "private RSS / worker MB | peak object store MiB | start-up s |",
          "|---|---|---|---|---|---|---|---|---|"]


def simulator_rate(results: dict, samples_per_step: int) -> float:
    """samples/s of the faster simulator configuration: the baseline."""
    return samples_per_step / min(statistics.median(r["step_s"]) for k, r in results.items() if k.startswith("sim"))


def target(results: dict, samples_per_step: int) -> str:
    if AUTO not in results or not any(k.startswith("sim") for k in results):
        return "(not checked: needs ray auto and the simulator)"
    ratio = samples_per_step / statistics.median(results[AUTO]["step_s"]) / simulator_rate(results, samples_per_step)
    return (f"**Target: ray auto (the default, {results[AUTO]['shape']}) >= 0.9x the faster simulator: "
            f"{verdict(ratio >= 0.9)}** ({ratio:.2f}x).")


def table(results: dict, samples_per_step: int) -> str:
    base = simulator_rate(results, samples_per_step)
    lines = list(HEADER)
    for label, r in results.items():
        median, best = statistics.median(r["step_s"]), min(r["step_s"])
        rate = samples_per_step / median
        store = f"{r['store_peak_mib']}" if "store_peak_mib" in r else "–"
        anon = f"{r['anon_rss_mb']:.0f}" if "anon_rss_mb" in r else "–"
        lines.append(f"| {label} | {r.get('actors', '–')} | {1e3 * median:.0f}, {1e3 * best:.0f} | {rate:.0f} | "
                     f"{rate / base:.2f}x | {r['peak_rss_mb']:.0f} | {anon} | {store} | "
                     f"{r.get('startup_s', 0):.0f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="benchmarks", help="folder for throughput.png and RESULTS.md")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA), help="CIFAR-10 (see `relay-ray run --help`)")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; the table shows the median")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS),
                        help="Ray variants (ray auto: no --workers-per-actor, the default)")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md and throughput.png")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = command_line("throughput.py", argv)
    started = time.perf_counter()
    data = load_dataset("cifar10", args.data_dir)
    config = RunConfig(algorithm="relaysgd", tree="chain", num_workers=args.workers, dataset="cifar10",
                       data_dir=args.data_dir, model=args.model, alpha=1.0, batch_size=32, steps=10**6,
                       eval_every=10**6, backend="ray", seed=0)
    experiment = build_experiment(config, data)
    samples_per_step = sum(min(config.batch_size, len(s)) for s in experiment.shards)
    loads = [load_average()]
    results = {}
    # the simulator with torch's default threads (what `--backend local` does) and with one; the
    # faster of the two is the baseline
    import torch

    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        times, peak_mb = time_simulator(experiment, args.steps, args.repeats, threads)
        results[f"simulator, {threads} thread{'s' if threads > 1 else ''}"] = {
            "step_s": times, "peak_rss_mb": peak_mb / args.workers}
        loads.append(load_average())
        print(f"simulator {threads} threads {[round(1e3 * t) for t in times]} ms/step, load {load_average()}",
              file=sys.stderr, flush=True)
    ray = start_ray(num_cpus=2)
    try:
        for label in args.layouts:
            results[label] = time_engine(experiment, LAYOUTS[label], args.steps, args.repeats)
            loads.append(load_average())
            print(f"{label} ({results[label]['shape']}) {[round(1e3 * t) for t in results[label]['step_s']]} "
                  f"ms/step, load {load_average()}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    elapsed = time.perf_counter() - started
    text = table(results, samples_per_step)
    check = target(results, samples_per_step)
    print(text + "\n\n" + check)
    if args.no_results:
        return 0
    out = Path(args.out)
    png = out / "throughput.png"
    plot(results, png, command, samples_per_step)
    layouts = "\n".join(f"- `{k}`: {r['shape']}" for k, r in results.items() if "shape" in r)
    previous = "\n".join([*HEADER, f"| {PREVIOUS_LABEL} {PREVIOUS_ROW}"])
    section = f"""{SECTION}

Command: `{command}` ({elapsed:.0f} s; {machine()}; load average 1/5/15 min during the run:
{', '.join(loads)}; {args.repeats} repeats of {args.steps} training steps after warm-up, no evaluations).
Plot: `{png.name}`. Model `{args.model}` ({experiment.task_data.x_train.shape[1:]} inputs), {args.workers}
workers x batch 32 = {samples_per_step} samples per step. Ray variants: `relay_ray.engine.Engine` with
the given `--workers-per-actor` (`ray auto` = no flag, the default), timed with `Engine.run_steps`:
{layouts or '(none run)'}

Peak RSS is VmHWM, which counts pages of the shared-memory object store a worker maps (the training
set is read zero-copy from it); private RSS is RssAnon at the end of the run.

{text}

{check}

{PREVIOUS_NOTE} Reference, not measured in this run (previous engine, from RESULTS.md of commit
{PREVIOUS_COMMIT}, its last idle-machine re-run; the ratio is to that run's faster simulator, 2122 samples/s):

{previous}
"""
    write_section(out / "RESULTS.md", SECTION, section)
    print(f"\nwrote {png} and {out / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
