"""The learning-rate cap of RelaySGD: stability, per-worker overshoot and accuracy vs base lr, per tree and variant.

Part 1, quadratics (exact, ~3 minutes on 2 cores): 16 workers, zeta^2 = 100, full gradients, the real
workers of the simulator stepped by hand so every worker's model change is seen at every step.  For
each tree (star, double binary trees, chain) and RelaySGD variant, over a doubling lr grid: the final
suboptimality relative to the start, the largest lr that still reaches 1e-6 of it, and the
**overshoot**: the largest model change of any single worker in one step, over the largest model change
of all-reduce at the same base lr (1: no worker ever steps further than exact averaging does).

Part 1b, noisy quadratics (~2 minutes): the same task with Gaussian noise (std --noise per coordinate,
seeded per worker) added to every gradient, for RelaySGD as published on each tree and all-reduce:
the suboptimality of the averaged model and of the worst worker, averaged over the second half of
the run.  Full gradients cannot show what stochastic ones do to single workers; this part can.

Part 2, CIFAR-10 (~28 minutes on 2 cores): `benchmarks/cifar10_table.py` with the variants' rows,
alpha 0.01, 1 epoch, the paper's schedule, every row at its own tuned lr (grid extended until the best
is inside), 3 seeds; or `--cifar-from DIR` reads an earlier run of exactly that (its tuning.csv and
table.csv).

Writes OUT/lr_cap_quadratics.csv, OUT/lr_cap_noisy.csv, OUT/lr_cap.md and OUT/lr_cap.png.

    .venv/bin/python benchmarks/lr_cap.py                       # every part, ~33 minutes
    .venv/bin/python benchmarks/lr_cap.py --cifar-from benchmarks/cifar10/lr_cap   # part 1 + plot
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _bench import command_line, save_figure  # noqa: E402

from relay_ray.config import RunConfig  # noqa: E402
from relay_ray.experiment import build_experiment  # noqa: E402
from relay_ray.worker import Worker, step_workers  # noqa: E402

TREES = {"star": dict(topology="star", tree="bfs"), "double-binary": dict(tree="double-binary"),
         "chain": dict(tree="chain")}
# label -> settings of a RelaySGD variant (run on every tree)
VARIANTS = {
    "RelaySGD (x0 fill, published)": dict(algorithm="relaysgd"),
    "RelaySGD, fill current": dict(algorithm="relaysgd", relay_fill="current"),
    "RelaySGD, fill last": dict(algorithm="relaysgd", relay_fill="last"),
    "RelaySGD + local momentum 0.9": dict(algorithm="relaysgd", momentum=0.9),
    "RelaySGD-QGM (momentum 0.9)": dict(algorithm="relaysgd-qgm", momentum=0.9),
    "RelaySum/Grad": dict(algorithm="relaysum-grad"),
}
ALLREDUCE = {"all-reduce": dict(algorithm="allreduce"), "all-reduce + momentum 0.9": dict(algorithm="allreduce", momentum=0.9)}
CIFAR_ROWS = ["all-reduce", "all-reduce + momentum", "RelaySGD double-binary", "RelaySGD double-binary + momentum",
              "RelaySGD double-binary, fill current", "RelaySGD binary", "RelaySGD-QGM double-binary"]
EXACT = 1e-6  # "reaches the optimum": final suboptimality below this fraction of the start


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="benchmarks/cifar10/lr_cap", help="output folder")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.4])
    parser.add_argument("--steps", type=int, default=1500, help="quadratics steps per run")
    parser.add_argument("--heterogeneity", type=float, default=100.0, help="quadratics zeta^2")
    parser.add_argument("--noise", type=float, default=1.0, help="gradient noise std of part 1b")
    parser.add_argument("--noise-lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--cifar-from", default=None, metavar="DIR",
                        help="an earlier cifar10_table.py run of the CIFAR rows (skips part 2)")
    parser.add_argument("--skip-cifar", action="store_true", help="part 1 only")
    parser.add_argument("--jobs", type=int, default=2, help="CIFAR-10 runs side by side")
    parser.add_argument("--data-dir", default=None, metavar="PATH",
                        help="CIFAR-10 for part 2 (default: cifar10_table.py's, the shared archive beside the clone)")
    return parser.parse_args(argv)


def quadratics_run(settings: dict, lr: float, args: argparse.Namespace) -> tuple[float, np.ndarray]:
    """(final suboptimality / initial, largest single-worker model change of each step)."""
    config = RunConfig(dataset="quadratics", heterogeneity=args.heterogeneity, num_workers=16, backend="local",
                       steps=args.steps, lr=lr, out=None, **settings)
    experiment = build_experiment(config)
    workers = [Worker(experiment.worker_spec(rank), experiment.task_data) for rank in range(16)]
    task = experiment.task_data
    initial = task.suboptimality(workers[0].host_params())
    steps = np.zeros(args.steps)
    outboxes = None
    with np.errstate(all="ignore"):
        for t in range(args.steps):
            before = np.stack([w.host_params() for w in workers]).astype(np.float64)
            inboxes = experiment.plan.route(outboxes) if outboxes is not None else [[] for _ in workers]
            outboxes = step_workers(workers, inboxes, False)
            if t:  # the averaging of step t - 1 finished inside this call
                after = np.stack([w.host_params() for w in workers]).astype(np.float64)
                steps[t - 1] = np.linalg.norm(after - before, axis=1).max()
                if not np.isfinite(after).all() or steps[t - 1] > 1e12:
                    return float("inf"), steps
        for w, inbox in zip(workers, experiment.plan.route(outboxes)):
            w.receive(*inbox)
    final = np.stack([w.host_params() for w in workers]).mean(axis=0)
    return task.suboptimality(final) / initial, steps


class NoisyGradients:
    """A worker problem whose gradients carry N(0, std^2) noise per coordinate (seeded per rank)."""

    def __init__(self, problem, std: float, seed: int):
        self.problem, self.std = problem, std
        self.rng = np.random.default_rng(seed)

    def __getattr__(self, name):
        return getattr(self.problem, name)

    def loss_and_grad(self, params):
        loss, grad = self.problem.loss_and_grad(params)
        return loss, grad + (self.std * self.rng.standard_normal(grad.shape)).astype(np.float32)


def noisy_run(settings: dict, lr: float, args: argparse.Namespace) -> tuple[float, float]:
    """(averaged model, worst worker): suboptimality over the start, mean of the run's second half."""
    config = RunConfig(dataset="quadratics", heterogeneity=args.heterogeneity, num_workers=16, backend="local",
                       steps=args.steps, lr=lr, out=None, **settings)
    experiment = build_experiment(config)
    workers = [Worker(experiment.worker_spec(rank), experiment.task_data) for rank in range(16)]
    for rank, worker in enumerate(workers):
        worker.problem = NoisyGradients(worker.problem, args.noise, seed=rank)
    task = experiment.task_data
    initial = task.suboptimality(workers[0].host_params())
    averaged, worst = [], []
    outboxes = None
    with np.errstate(all="ignore"):
        for t in range(args.steps):
            inboxes = experiment.plan.route(outboxes) if outboxes is not None else [[] for _ in workers]
            outboxes = step_workers(workers, inboxes, False)
            if t >= args.steps // 2:
                models = np.stack([w.host_params() for w in workers])
                if not np.isfinite(models).all():
                    return float("inf"), float("inf")
                averaged.append(task.suboptimality(models.mean(axis=0)))
                worst.append(max(task.suboptimality(m) for m in models))
    return float(np.mean(averaged)) / initial, float(np.mean(worst)) / initial


def noisy_study(args: argparse.Namespace) -> pd.DataFrame:
    runs = {"complete": dict(algorithm="allreduce"),
            **{tree: dict(algorithm="relaysgd", **layout) for tree, layout in TREES.items()}}
    rows = []
    for tree, settings in runs.items():
        for lr in args.noise_lrs:
            averaged, worst = noisy_run(settings, lr, args)
            rows.append({"tree": tree, "lr": lr, "averaged": averaged, "worst": worst})
            print(f"noisy {tree:14s} lr {lr:<6g} averaged {averaged:.2e} worst {worst:.2e}", flush=True)
    return pd.DataFrame(rows)


def noisy_table(frame: pd.DataFrame) -> str:
    lines = ["| run | lr | averaged model | worst worker | worst worker / all-reduce's |", "|---|---|---|---|---|"]
    reference = frame[frame["tree"] == "complete"].set_index("lr")["worst"]
    for row in frame.to_dict("records"):
        run = "all-reduce" if row["tree"] == "complete" else f"RelaySGD {row['tree']}"
        lines.append(f"| {run} | {row['lr']:g} | {row['averaged']:.2e} | {row['worst']:.2e} | "
                     f"{row['worst'] / reference[row['lr']]:.1f} |")
    return "\n".join(lines)


def quadratics_study(args: argparse.Namespace) -> pd.DataFrame:
    rows = []
    reference = {}
    for label, settings in ALLREDUCE.items():
        for lr in args.lrs:
            final, steps = quadratics_run(settings, lr, args)
            reference[(settings.get("momentum", 0.0), lr)] = steps.max()
            rows.append({"tree": "complete", "variant": label, "lr": lr, "final": final, "overshoot": 1.0})
    for tree, layout in TREES.items():
        for label, settings in VARIANTS.items():
            for lr in args.lrs:
                final, steps = quadratics_run({**layout, **settings}, lr, args)
                ar = reference[(settings.get("momentum", 0.0), lr)]
                rows.append({"tree": tree, "variant": label, "lr": lr, "final": final,
                             "overshoot": steps.max() / ar if np.isfinite(final) else float("inf")})
                print(f"{tree:14s} {label:32s} lr {lr:<6g} final {final:.2e} overshoot {rows[-1]['overshoot']:.2f}",
                      flush=True)
    return pd.DataFrame(rows)


def largest_exact_lr(rows: pd.DataFrame) -> float:
    """The largest lr of the grid below which every lr reaches EXACT (nan: none does)."""
    best = float("nan")
    for row in rows.sort_values("lr").to_dict("records"):
        if not row["final"] < EXACT:
            break
        best = row["lr"]
    return best


def quadratics_table(frame: pd.DataFrame, args: argparse.Namespace) -> str:
    lrs = sorted(frame["lr"].unique())
    lines = ["| tree | variant | largest lr reaching 1e-6 | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|---|---|" + "---|" * len(lrs)]
    for (tree, variant), rows in frame.groupby(["tree", "variant"], sort=False):
        cells = []
        for lr in lrs:
            row = rows[rows["lr"] == lr].iloc[0]
            if not np.isfinite(row["final"]):
                cells.append("diverges")
            else:
                over = "" if tree == "complete" else f" (×{row['overshoot']:.2f})"
                cells.append(f"{row['final']:.0e}{over}")
        best = largest_exact_lr(rows)
        lines.append(f"| {tree} | {variant} | {'none' if np.isnan(best) else f'{best:g}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cifar_part(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    folder = Path(args.cifar_from) if args.cifar_from else Path(args.out)
    if not args.cifar_from:
        import cifar10_table

        data = ["--data-dir", args.data_dir] if args.data_dir else []
        cifar10_table.main(["--alphas", "0.01", "--out", str(folder), "--jobs", str(args.jobs), *data,
                            "--variants", *CIFAR_ROWS])
    return pd.read_csv(folder / "tuning.csv"), pd.read_csv(folder / "table.csv"), folder


def cifar_table(tuning: pd.DataFrame, table: pd.DataFrame) -> str:
    lines = ["| row | worst worker vs lr (seed 0) | tuned lr | worst worker, 3 seeds | vs all-reduce |",
             "|---|---|---|---|---|"]
    allreduce = 100 * table[table["label"] == "all-reduce"]["test_acc_worst"].mean()
    for label in CIFAR_ROWS:
        sweep = tuning[tuning["label"] == label].sort_values("lr")
        runs = table[table["label"] == label]
        if sweep.empty or runs.empty:
            continue
        curve = ", ".join(f"{lr:g}: {100 * acc:.1f}" for lr, acc in zip(sweep["lr"], sweep["test_acc_worst"]))
        worst = 100 * runs["test_acc_worst"]
        lines.append(f"| {label} | {curve} | {runs['lr'].iloc[0]:g} | {worst.mean():.1f} ± {worst.std(ddof=0):.1f} | "
                     f"{worst.mean() - allreduce:+.1f} |")
    return "\n".join(lines)


def plot(frame: pd.DataFrame, tuning: pd.DataFrame | None, path: Path, command: str) -> None:
    from matplotlib.figure import Figure

    panels = list(TREES) + (["cifar"] if tuning is not None else [])
    fig = Figure(figsize=(4.6 * len(panels), 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, tree in zip(axes, TREES):
        for i, (label, rows) in enumerate(list(frame[frame["tree"] == tree].groupby("variant", sort=False))
                                          + list(frame[frame["tree"] == "complete"].groupby("variant", sort=False))):
            rows = rows.sort_values("lr")
            values = rows["final"].replace(np.inf, 1e6).clip(lower=1e-16, upper=1e6)
            ax.plot(rows["lr"], values, marker="o", ms=3, color=f"C{i}", label=label,
                    linestyle="--" if label.startswith("all-reduce") else "-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(EXACT, color="grey", lw=0.8, linestyle=":")
        ax.set_title(f"quadratics ζ² = 100, RelaySGD on {tree}", fontsize=9)
        ax.set_xlabel("base lr (RelaySGD: × its tree's correction)")
        ax.set_ylabel("final F − F* / start (diverged: 1e6)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    if tuning is not None:
        ax = axes[-1]
        for i, label in enumerate(CIFAR_ROWS):
            rows = tuning[tuning["label"] == label].sort_values("lr")
            ax.plot(rows["lr"], 100 * rows["test_acc_worst"], marker="o", ms=3, color=f"C{i}", label=label,
                    linestyle="--" if label.startswith("all-reduce") else "-")
        ax.set_xscale("log")
        lrs = sorted(tuning["lr"].unique())
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], fontsize=7)
        ax.minorticks_off()
        ax.set_title("CIFAR-10, α = 0.01, 1 epoch, seed 0", fontsize=9)
        ax.set_xlabel("base lr")
        ax.set_ylabel("worst-worker test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    save_figure(fig, path, command, bottom=0.1)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = quadratics_study(args)
    frame.to_csv(out / "lr_cap_quadratics.csv", index=False)
    noisy = noisy_study(args)
    noisy.to_csv(out / "lr_cap_noisy.csv", index=False)
    quad_s = time.perf_counter() - started
    tuning = table = None
    if not args.skip_cifar:
        tuning, table, folder = cifar_part(args)
    command = command_line("lr_cap.py", argv)
    parts = [f"`{command.strip()}` ({(time.perf_counter() - started) / 60:.1f} min; quadratics {quad_s / 60:.1f} min)",
             "", f"Quadratics, 16 workers, ζ² = {args.heterogeneity:g}, {args.steps} steps, full gradients: final "
             "F(x̄) − F* over the start, and in brackets the overshoot (largest one-step model change of any worker "
             "over all-reduce's at the same lr and momentum)", "", quadratics_table(frame, args), "",
             f"Noisy quadratics (gradient noise std {args.noise:g} per coordinate), F − F* over the start, mean of "
             "the second half of the run:", "", noisy_table(noisy)]
    if tuning is not None:
        parts += ["", f"CIFAR-10 (`{folder}`):", "", cifar_table(tuning, table)]
    (out / "lr_cap.md").write_text("\n".join(parts) + "\n")
    plot(frame, tuning, out / "lr_cap.png", command)
    print("\n".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
