"""The per-step RelaySGD exchange alone (no compute): relay_ray's Ray engine vs a numpy floor vs gloo.

Every variant runs the same relay_ray algorithm objects (``RelaySGD.outgoing`` / ``incoming``:
Alg. 1 steps 2-4, the model held fixed, no gradient) for 16 workers on a chain and on double binary
trees, with messages of 0.27 M and 11 M float32 (ResNet-20 / ResNet-18 sizes); they differ only in
how messages travel:

  floor      all workers in this process, one thread (and two: numpy releases the GIL)
  gloo       16 torch.distributed gloo processes, isend/irecv to each tree neighbour (localhost TCP)
  ray auto   the engine as ``relay-ray run`` starts it (``EngineOptions()``, no --workers-per-actor):
             one actor per CPU core (2 actors of 8 workers here); messages between workers of one
             actor stay in its memory, crossing messages are task returns (``ray.put`` when <= 100 KB)
  ray K=1    ``--workers-per-actor 1``: one actor per worker, one task per worker per step
  ray K=16   ``--workers-per-actor 16``: all 16 workers in one actor
  ray auto RDT  ray auto with ``--transport gloo``: crossing bundles as torch tensors through Ray Direct
             Transport (actor to actor over gloo, one small task per outgoing link and step)

The Ray variants are ``relay_ray.engine.Engine`` with ``group_cls`` = a ``WorkerGroup`` whose
``worker_class`` is the relay-only worker below, timed with ``Engine.run_steps``.  a = ray auto,
b = floor, c = gloo; the targets are a/b <= 1.5 at 11 M floats and a/c <= 1.0 at both sizes.

Prints a Markdown table (ms/step, ratios to the floor and to gloo), writes comm.png and the
section "## Communication" of RESULTS.md.

    .venv/bin/python benchmarks/comm.py          # budget 10 min: 10 min 27 s under load 3-14 (2 cores)
    .venv/bin/python benchmarks/comm.py --trees chain --repeats 2   # about a third of that
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (  # noqa: E402
    PREVIOUS_COMMIT, PREVIOUS_LABEL, PREVIOUS_NOTE, command_line, drive, load_average, machine, save_figure,
    start_engine, start_ray, verdict, write_section)

from relay_ray.algorithms import make_algorithm  # noqa: E402
from relay_ray.config import RunConfig  # noqa: E402
from relay_ray.experiment import Experiment, build_experiment  # noqa: E402
from relay_ray.group import WorkerGroup  # noqa: E402
from relay_ray.worker import Worker  # noqa: E402

SECTION = "## Communication"
TREES = {"chain": "chain", "double-binary": "double binary trees"}
RAY_VARIANTS = {"ray auto": "auto", "ray K=1": 1, "ray K=16": 16,  # label: --workers-per-actor
                "ray auto RDT": "auto"}
TRANSPORTS = {"ray auto RDT": "gloo"}  # label: --transport (the others: the object store)
AUTO = "ray auto"  # the headline: a in the targets
# The previous engine's `ray put` column (RayEngine: one actor per worker, messages ray.put), median
# ms/step and its ratios to that run's floor and gloo, from the quiet re-run in RESULTS.md of e83e170.
PREVIOUS = {("chain", 270000): (109.1, 15.33, 2.90), ("chain", 11000000): (1090.6, 1.65, 1.14),
            ("double-binary", 270000): (137.8, 12.42, 4.17), ("double-binary", 11000000): (1445.3, 2.52, 1.31)}


@dataclasses.dataclass
class CommTask:
    """The stand-in for a dataset: only the model size matters."""

    num_params: int


class RelayOnlyWorker(Worker):
    """A worker without model or gradient: x_i stays fixed and a step is only the relay exchange."""

    def __init__(self, spec, task_data: CommTask, num_threads: int | None = None):
        self.spec, self.config, self.rank = spec, spec.config, spec.rank
        x0 = np.random.default_rng(spec.rank).standard_normal(task_data.num_params, dtype=np.float32)
        self.algorithm = make_algorithm("relaysgd", spec.rank, spec.plan, x0, momentum=0.0, weight_decay=0.0)
        self.step_count = self.bytes_sent = self.samples_seen = 0
        self.losses: list[float] = []

    def step(self, *inbox):
        if inbox:
            # Alg. 1 step 4 (with the previous step's messages; RDT hands them in as CPU tensors: read in place)
            self.algorithm.incoming([np.asarray(m) for m in inbox])
        self.algorithm.half = self.algorithm.params  # no local update: relay the current model
        self.step_count += 1
        return self.algorithm.outgoing()  # Alg. 1 step 2


class RelayOnlyGroup(WorkerGroup):
    """The engine's worker group holding relay-only workers (the ``group_cls`` seam)."""

    worker_class = RelayOnlyWorker


def experiment_for(tree: str, num_params: int, workers: int) -> Experiment:
    config = RunConfig(algorithm="relaysgd", tree=tree, num_workers=workers, dataset="quadratics", backend="ray",
                       steps=1)
    return dataclasses.replace(build_experiment(config), task_data=CommTask(num_params))


def message_bytes_per_step(experiment: Experiment) -> int:
    plan, size = experiment.plan, experiment.task_data.num_params
    trees = len(plan.tree_neighbors)
    per_tree = [len(range(t, size, trees)) + 1 for t in range(trees)]
    return 4 * sum(per_tree[t] * len(tree[i]) for t, tree in enumerate(plan.tree_neighbors) for i in range(plan.num_workers))


# ------------------------------------------------------------------------------------------- floor
def run_floor(experiment: Experiment, steps: int, repeats: int, threads: int) -> list[float]:
    plan = experiment.plan
    workers = [RelayOnlyWorker(experiment.worker_spec(r), experiment.task_data) for r in range(plan.num_workers)]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    outboxes = None
    times = []
    for repeat in range(repeats + 1):  # the first repeat warms up (page faults of fresh buffers)
        start = time.perf_counter()
        for _ in range(steps):
            inboxes = plan.route(outboxes) if outboxes is not None else [[] for _ in workers]
            if pool is None:
                outboxes = [w.step(*inbox) for w, inbox in zip(workers, inboxes)]
            else:
                outboxes = list(pool.map(lambda wi: wi[0].step(*wi[1]), zip(workers, inboxes)))
        if repeat:
            times.append((time.perf_counter() - start) / steps)
    if pool is not None:
        pool.shutdown()
    return times


# -------------------------------------------------------------------------------------------- gloo
def _gloo_worker(rank: int, world: int, port: int, jobs: list, steps: int, repeats: int, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for tree, num_params in jobs:
            experiment = experiment_for(tree, num_params, world)
            plan = experiment.plan
            worker = RelayOnlyWorker(experiment.worker_spec(rank), experiment.task_data)
            trees = len(plan.tree_neighbors)
            per_tree = [len(range(t, num_params, trees)) + 1 for t in range(trees)]
            # j's message to us packs, for each tree where we are j's neighbour, that tree's part
            inbox_buffers = [torch.empty(sum(per_tree[t] for t, tn in enumerate(plan.tree_neighbors) if rank in tn[j]))
                             for j in plan.neighbors[rank]]
            inbox = []
            times = []
            for repeat in range(repeats + 1):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(steps):
                    messages = worker.step(*inbox)
                    # the channel is done with last step's inbox once step() returns: safe to overwrite
                    requests = [dist.irecv(buf, src=j) for j, buf in zip(plan.neighbors[rank], inbox_buffers)]
                    requests += [dist.isend(torch.from_numpy(m), dst=j) for j, m in zip(plan.neighbors[rank], messages)]
                    for request in requests:
                        request.wait()
                    inbox = [buf.numpy() for buf in inbox_buffers]
                dist.barrier()
                if repeat:
                    times.append((time.perf_counter() - start) / steps)
            if rank == 0:
                results.put((tree, num_params, times))
            del worker, inbox_buffers, inbox
    finally:
        dist.destroy_process_group()


def run_gloo(jobs: list, workers: int, steps_for, repeats: int) -> dict:
    """All jobs in one set of 16 processes (started once: each imports torch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    out = {}
    for job in jobs:  # one process set per step count keeps the loop simple
        procs = [context.Process(target=_gloo_worker, args=(r, workers, port, [job], steps_for(job[1]), repeats, results))
                 for r in range(workers)]
        for p in procs:
            p.start()
        try:
            tree, size, times = results.get(timeout=600)
            out[(tree, size)] = times
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
        port += 1
    return out


# --------------------------------------------------------------------------------------------- ray
def run_ray_variant(variant: str, experiment: Experiment, steps: int, repeats: int, window: int) -> tuple[list, str]:
    """Median-ready step times of one engine layout, and its shape in words (Ray is imported only
    here, through ``start_engine``, so the gloo processes never import it)."""
    engine = start_engine(experiment, RAY_VARIANTS[variant], window=window, group_cls=RelayOnlyGroup,
                          transport=TRANSPORTS.get(variant, "object-store"))
    try:
        drive(engine, steps=2, warmup=1)  # page faults, first object-store allocations
        return [drive(engine, steps=steps, warmup=1)["step_s"] for _ in range(repeats)], engine.shape.describe()
    finally:
        engine.shutdown()


# ------------------------------------------------------------------------------------------ report
def plot(rows: list[dict], path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{TREES[r['tree']]}\n{r['size'] / 1e6:g} M" for r in rows]
    variants = ["floor", "gloo", *RAY_VARIANTS]
    variants = [v for v in variants if any(v in r["ms"] for r in rows)]
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        values = [r["ms"].get(variant, np.nan) for r in rows]
        ax.bar(np.arange(len(rows)) + (k - (len(variants) - 1) / 2) * width, values, width,
               label=f"{variant} (default)" if variant == AUTO else variant)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(rows)), labels)
    ax.set_ylabel("ms per step (median)")
    ax.set_title("RelaySGD exchange alone, 16 workers, 2-core CPU")
    ax.legend(ncol=3, fontsize=9)
    ax.grid(alpha=0.3, axis="y", which="both")
    save_figure(fig, path, command)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "–"


def table(rows: list[dict]) -> str:
    lines = ["| tree | floats | MB/step | floor | gloo | " + " | ".join(RAY_VARIANTS) + " | "
             "a/b: auto / floor | a/c: auto / gloo | best ray / floor | best ray / gloo |",
             "|---|---|---|---|---|" + "---|" * len(RAY_VARIANTS) + "---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        cell = lambda v: f"{ms[v]:.1f}" if v in ms else "–"  # noqa: E731
        ray = {v: ms[v] for v in RAY_VARIANTS if v in ms}
        best = min(ray, key=ray.get) if ray else None
        lines.append(
            f"| {TREES[r['tree']]} | {r['size'] / 1e6:g} M | {r['mb']:.0f} | {cell('floor')} | {cell('gloo')} | "
            + " | ".join(cell(v) for v in RAY_VARIANTS) + " | "
            + f"{_ratio(ms.get(AUTO), ms.get('floor'))} | {_ratio(ms.get(AUTO), ms.get('gloo'))} | "
            + f"{_ratio(ray.get(best), ms.get('floor'))} ({best}) | {_ratio(ray.get(best), ms.get('gloo'))} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The acceptance checks for the default engine (a = ray auto, b = floor, c = gloo)."""
    out = []
    ab = [(r, r["ms"][AUTO] / r["ms"]["floor"]) for r in rows
          if r["size"] >= 2e6 and AUTO in r["ms"] and "floor" in r["ms"]]
    if ab:
        out.append(f"- **a/b <= 1.5 at the large size, 11 M floats by default (ray auto / floor): "
                   f"{verdict(all(v <= 1.5 for _, v in ab))}**: "
                   + ", ".join(f"{TREES[r['tree']]} {r['size'] / 1e6:g} M {v:.2f}" for r, v in ab))
    ac = [(r, r["ms"][AUTO] / r["ms"]["gloo"]) for r in rows if AUTO in r["ms"] and "gloo" in r["ms"]]
    if ac:
        out.append(f"- **a/c <= 1.0 at both sizes (ray auto / gloo): {verdict(all(v <= 1.0 for _, v in ac))}**: "
                   + ", ".join(f"{TREES[r['tree']]} {r['size'] / 1e6:g} M {v:.2f}" for r, v in ac))
    return out


def previous_table(rows: list[dict]) -> str:
    lines = [f"| tree | floats | {PREVIOUS_LABEL}: ms/step | / its floor | / its gloo |", "|---|---|---|---|---|"]
    for r in rows:
        if (r["tree"], r["size"]) in PREVIOUS:
            ms, to_floor, to_gloo = PREVIOUS[(r["tree"], r["size"])]
            lines.append(f"| {TREES[r['tree']]} | {r['size'] / 1e6:g} M | {ms:.1f} | {to_floor:.2f} | {to_gloo:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="benchmarks", help="folder for comm.png and RESULTS.md")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.27e6, 11e6], help="message sizes (float32s)")
    parser.add_argument("--trees", nargs="+", default=list(TREES), choices=list(TREES))
    parser.add_argument("--variants", nargs="+", default=["floor", "gloo", *RAY_VARIANTS],
                        choices=["floor", "gloo", *RAY_VARIANTS])
    parser.add_argument("--steps-small", type=int, default=20, help="timed steps per repeat, small messages")
    parser.add_argument("--steps-large", type=int, default=3, help="timed steps per repeat, 11 M messages")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; the table shows the median")
    parser.add_argument("--window", type=int, default=2, help="ray: steps in flight (EngineOptions.window)")
    parser.add_argument("--object-store-gb", type=float, default=8.0)
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md and comm.png")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = command_line("comm.py", argv)
    started = time.perf_counter()
    sizes = [int(s) for s in args.sizes]
    steps_for = lambda size: args.steps_small if size < 2e6 else args.steps_large  # noqa: E731
    jobs = [(tree, size) for tree in args.trees for size in sizes]
    times: dict = {job: {} for job in jobs}
    shapes: dict = {}  # ray variant: the engine's actors in words
    loads = [load_average()]

    def note(job, variant, values):
        times[job][variant] = values
        print(f"{job[0]:>13s} {job[1] / 1e6:5.2f}M {variant:9s} " + " ".join(f"{1e3 * v:8.1f}" for v in values)
              + f" ms/step  load {load_average()}", file=sys.stderr, flush=True)

    for job in jobs:
        experiment = experiment_for(job[0], job[1], args.workers)
        if "floor" in args.variants:
            one = run_floor(experiment, steps_for(job[1]), args.repeats, threads=1)
            two = run_floor(experiment, steps_for(job[1]), args.repeats, threads=2)
            note(job, "floor 1 thread", one)
            note(job, "floor 2 threads", two)
            note(job, "floor", one if statistics.median(one) < statistics.median(two) else two)
    loads.append(load_average())
    if "gloo" in args.variants:
        for job, values in run_gloo(jobs, args.workers, steps_for, args.repeats).items():
            note(job, "gloo", values)
    loads.append(load_average())
    ray_variants = [v for v in RAY_VARIANTS if v in args.variants]
    if ray_variants:
        ray = start_ray(num_cpus=2, object_store_gb=args.object_store_gb)
        try:
            for job in jobs:
                experiment = experiment_for(job[0], job[1], args.workers)
                for variant in ray_variants:
                    values, shapes[variant] = run_ray_variant(variant, experiment, steps_for(job[1]), args.repeats,
                                                              args.window)
                    note(job, variant, values)
                loads.append(load_average())
        finally:
            ray.shutdown()
    elapsed = time.perf_counter() - started

    rows = []
    for job in jobs:
        experiment = experiment_for(job[0], job[1], args.workers)
        ms = {v: 1e3 * statistics.median(t) for v, t in times[job].items()}
        ms_min = {v: 1e3 * min(t) for v, t in times[job].items()}
        rows.append(dict(tree=job[0], size=job[1], mb=message_bytes_per_step(experiment) / 1e6, ms=ms, ms_min=ms_min))
    text = table(rows)
    checks = "\n".join(targets(rows))
    layouts = "\n".join(f"- `{v}`: {shape}" for v, shape in shapes.items())
    print(text)
    print("\n" + (layouts + "\n" if layouts else "") + (checks or "(targets need ray auto with floor and gloo)"))
    details_variants = ["floor 1 thread", "floor 2 threads", "gloo", *RAY_VARIANTS]
    details = "\n".join(f"| {TREES[r['tree']]} | {r['size'] / 1e6:g} M | "
                        + " | ".join(f"{r['ms_min'].get(v, float('nan')):.1f}" for v in details_variants) + " |"
                        for r in rows)
    if args.no_results:
        return 0
    out = Path(args.out)
    png = out / "comm.png"
    plot(rows, png, command)
    previous = previous_table(rows)
    previous_part = (f"\n\nReference, not measured in this run: previous engine, from RESULTS.md of commit "
                     f"{PREVIOUS_COMMIT} (its quiet re-run, `ray put` column; ratios to that run's floor and gloo):"
                     f"\n\n{previous}" if previous else "")
    section = f"""{SECTION}

Command: `{command}` ({elapsed:.0f} s; {machine()}; load average 1/5/15 min during the run:
{', '.join(loads)}; median of {args.repeats} repeats, window {args.window}).
Plot: `{png.name}`. Ray variants: `relay_ray.engine.Engine` with the given `--workers-per-actor`
(`ray auto` = no flag, the default), timed with `Engine.run_steps`:
{layouts or '(none run)'}

{text}

Targets (a = ray auto, b = floor, c = gloo):
{checks or '(not checked: needs ray auto, floor and gloo)'}

Minimum over repeats (ms/step; floor with 1 and 2 threads):

| tree | floats | {' | '.join(details_variants)} |
|---|---|{'---|' * len(details_variants)}
{details}

{PREVIOUS_NOTE}{previous_part}
"""
    write_section(out / "RESULTS.md", SECTION, section)
    print(f"\nwrote {png} and {out / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
