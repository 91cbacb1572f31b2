"""The paper's Table 2 (Vogels et al. 2021) on one machine, with its protocol: worst-worker test accuracy on CIFAR-10.

16 workers, alpha in {1, 0.1, 0.01}; RelaySGD (chain and double binary trees, with and without local
momentum), RelaySGD-QGM on double binary trees (the best variant of benchmarks/lr_cap.py; not in the
paper), D-SGD, D-SGD + QGM and D² on the ring, all-reduce with and without momentum.  The recipe
of the authors' code (epfml/relaysgd), scaled to the epochs the machine allows:
- data: `--partition paper` (the authors' split);
- schedule: lr warmed up linearly over the first 5/200 of the run, x0.1 at 75 % and 90 %;
- tuning: the lr of every variant at every alpha, on the same schedule as the table's runs, scored
  by the mean worker; a best lr on the edge of its grid extends the grid (up to --extend times) and
  is flagged in the table if it still sits there;
- metric: each worker's accuracy averaged over the last 2 evaluations (the paper: epochs 196 and
  200), the worst worker; mean ± std over --seeds at the --seed-alphas (seed 0 is the tuning run).
Runs in-process (the simulator, which the Ray engine is tested to match), several side by side.

Writes OUT/tuning.csv (every run of the lr search), OUT/table.csv (the table's runs), OUT/table.md
(beside the paper's numbers) and OUT/cifar10_table.png.  The defaults (small CNN, 1 epoch, 2000
test images per evaluation) fit 2 CPU cores and 90 minutes:

    .venv/bin/python benchmarks/cifar10_table.py

The full-scale setting on a GPU machine (VGG-11, 200 epochs, whole test set):

    python benchmarks/cifar10_table.py --device cuda --jobs 8 --model vgg11 --epochs 200 --eval-samples 10000 \
        --out benchmarks/cifar10/gpu
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import multiprocessing
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))
from _bench import command_line, save_figure  # noqa: E402

from relay_ray.config import RunConfig  # noqa: E402
from relay_ray.sweep_file import grid_edge  # noqa: E402

ALPHAS = (1.0, 0.1, 0.01)
# label -> run settings of the variant
VARIANTS = {
    "all-reduce": dict(algorithm="allreduce", momentum=0.0),
    "all-reduce + momentum": dict(algorithm="allreduce", momentum=0.9),
    "RelaySGD chain": dict(algorithm="relaysgd", tree="chain", momentum=0.0),
    "RelaySGD chain + momentum": dict(algorithm="relaysgd", tree="chain", momentum=0.9),
    "RelaySGD double-binary": dict(algorithm="relaysgd", tree="double-binary", momentum=0.0),
    "RelaySGD double-binary + momentum": dict(algorithm="relaysgd", tree="double-binary", momentum=0.9),
    "D-SGD ring": dict(algorithm="dsgd", topology="ring", momentum=0.0),
    "D-SGD + QGM ring": dict(algorithm="dsgd-qgm", topology="ring", momentum=0.9),
    "D² ring": dict(algorithm="d2", topology="ring", momentum=0.0),
    # not in the paper: the 1-step-delay tree (a hub), the control for the relay delay (relay_delay.py)
    "RelaySGD star": dict(algorithm="relaysgd", topology="star", tree="bfs", momentum=0.0),
    # not in the paper: the lr-cap variants (benchmarks/lr_cap.py)
    "RelaySGD double-binary, fill current": dict(algorithm="relaysgd", tree="double-binary", relay_fill="current",
                                                 momentum=0.0),
    "RelaySGD binary": dict(algorithm="relaysgd", tree="binary", momentum=0.0),
    "RelaySGD-QGM double-binary": dict(algorithm="relaysgd-qgm", tree="double-binary", momentum=0.9),
    # the newer competitors (issue 15), momentum as their authors run them
    "SGP exponential-one-peer": dict(algorithm="sgp", topology="exponential-one-peer", momentum=0.9),
    "D-SGD exponential-one-peer": dict(algorithm="dsgd", topology="exponential-one-peer", momentum=0.0),
    "momentum tracking ring": dict(algorithm="momentum-tracking", topology="ring", momentum=0.9),
    "QG-GUTm ring": dict(algorithm="qg-gutm", topology="ring", momentum=0.9),
    "BTPP binary": dict(algorithm="btpp", branching=2, momentum=0.0),
}
# RelaySGD-QGM, the best lr-cap variant, is a default row (beside RelaySGD as published); the rest are opt-in
COMPETITOR_ROWS = ("SGP exponential-one-peer", "D-SGD exponential-one-peer", "momentum tracking ring", "QG-GUTm ring",
                   "BTPP binary")
EXTRA_ROWS = ("RelaySGD star", "RelaySGD double-binary, fill current", "RelaySGD binary") + COMPETITOR_ROWS
PAPER_ROWS = [label for label in VARIANTS if label not in EXTRA_ROWS]
# The centre of each variant's first lr grid (centre / 2, centre, 2 x centre): the earlier CPU
# table's picks.  RelaySGD's lr is multiplied by its tree's correction (--lr-correction auto).
START_LR = {"all-reduce": 0.2, "all-reduce + momentum": 0.1, "RelaySGD chain": 0.05,
            "RelaySGD chain + momentum": 0.05, "RelaySGD double-binary": 0.1,
            "RelaySGD double-binary + momentum": 0.05, "D-SGD ring": 0.05, "D-SGD + QGM ring": 0.2,
            "D² ring": 0.1, "RelaySGD star": 0.2, "RelaySGD double-binary, fill current": 0.1,
            "RelaySGD binary": 0.1, "RelaySGD-QGM double-binary": 0.05, "SGP exponential-one-peer": 0.1,
            "D-SGD exponential-one-peer": 0.05, "momentum tracking ring": 0.05, "QG-GUTm ring": 0.1,
            "BTPP binary": 0.2}
WARMUP_FRACTION = 5 / 200  # the paper: 5 of 200 epochs
DECAY_AT = [0.75, 0.9]  # the paper: epochs 150 and 180 of 200
# DESIGN §7: VGG-11 / 200 epochs, worst worker, 3 seeds; alpha = 1 / 0.1 / 0.01 (all-reduce is iid-independent)
PAPER = {
    "all-reduce": (87.0, 87.0, 87.0),
    "all-reduce + momentum": (90.2, 90.2, 90.2),
    "RelaySGD chain": (87.3, 87.2, 86.5),
    "RelaySGD double-binary + momentum": (90.2, 89.5, 89.1),  # the paper's "RelaySGD + local momentum, trees"
    "D-SGD ring": (87.4, 79.9, 53.9),
    "D-SGD + QGM ring": (89.5, 84.8, 63.3),
    "D² ring": (87.2, 84.0, 38.2),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_arguments(parser, out="benchmarks/cifar10/cpu")
    parser.add_argument("--model", default="cnn", help="model (cnn: 22k parameters; vgg11: the paper's)")
    parser.add_argument("--epochs", type=float, default=1, help="epochs of every run (tuning and table)")
    parser.add_argument("--eval-samples", type=int, default=2000,
                        help="test images per evaluation (10000: all, as the paper)")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--variants", nargs="+", default=PAPER_ROWS, metavar="LABEL", help="which rows to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the table's runs at --seed-alphas (the first is the tuning seed)")
    parser.add_argument("--seed-alphas", type=float, nargs="+", default=[0.01],
                        help="alphas run with every seed (the others: the tuning seed only)")
    parser.add_argument("--extend", type=int, default=2, help="grid extensions when a best lr is on the edge")
    parser.add_argument("--lrs-from", default=None, metavar="CSV",
                        help="tuning.csv of an earlier run of this script: skip the lr search")
    parser.add_argument("--lr", type=float, default=None, help="one lr for every variant (skips the lr search)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (processes)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    return parser.parse_args(argv)


def _run(settings: dict, threads: int) -> dict:
    """One run in a worker process; returns its final metrics."""
    import torch

    torch.set_num_threads(threads)
    from relay_ray.simulate import simulate

    from relay_ray.errors import Diverged

    started = time.perf_counter()
    try:
        summary = simulate(RunConfig.from_dict({**settings, "backend": "local"}), progress=False)
    except Diverged:  # a result of the lr search (too large an lr), not the end of the table
        return {"test_acc_worst": float("nan"), "test_acc_mean": float("nan"), "test_acc_avg_model": float("nan"),
                "consensus_distance": float("nan"), "bytes_sent_per_worker": None, "steps": None,
                "wall_s": time.perf_counter() - started, "diverged": True}
    final, averaged = summary["final"], summary["final_evals"]  # averaged: the paper's metric (--final-evals)
    return {"test_acc_worst": averaged["test_acc_worst"], "test_acc_mean": averaged["test_acc_mean"],
            "test_acc_avg_model": final["test_acc_avg_model"], "consensus_distance": final["consensus_distance"],
            "bytes_sent_per_worker": final.get("bytes_sent_per_worker"), "steps": summary["steps"],
            "wall_s": time.perf_counter() - started, "diverged": False}


def add_data_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """--data-dir (default: the shared CIFAR-10 archive beside the clone) and --out."""
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"),
                        help="CIFAR-10: torchvision root, ImageFolder tree or its .tar.gz")
    parser.add_argument("--out", default=out, help="output folder")


def prepare(args: argparse.Namespace, script: str) -> Path:
    """Check --data-dir, create --out, and decode + cache CIFAR-10 once, before the run processes start."""
    if not Path(args.data_dir).exists():
        raise SystemExit(f"{script}: error: --data-dir {args.data_dir} does not exist")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from relay_ray.data import load_dataset

    load_dataset("cifar10", args.data_dir)
    return out


def run_all(jobs: list[dict], args: argparse.Namespace, phase: str) -> pd.DataFrame:
    """Run every job (``settings`` + ``labels``), ``args.jobs`` side by side; one row per run."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    rows = []
    # spawn: a forked child must not inherit a parent's CUDA or torch thread-pool state
    with futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(_run, job["settings"], threads): job for job in jobs}
        for done in futures.as_completed(pending):
            job = pending[done]
            result = done.result()
            rows.append({**job["labels"], **result})
            print(f"[{phase} {len(rows)}/{len(jobs)}] " + ", ".join(f"{k}={v}" for k, v in job["labels"].items())
                  + f": worst {result['test_acc_worst']:.4f} ({result['wall_s']:.0f}s)", flush=True)
    return pd.DataFrame(rows)


def run_settings(args: argparse.Namespace, label: str, alpha: float, lr: float, seed: int) -> dict:
    """One run of the table or the lr search: the paper's schedule and metric, scaled to --epochs."""
    return dict(dataset="cifar10", data_dir=args.data_dir, model=args.model, num_workers=16, epochs=args.epochs,
                batch_size=32, weight_decay=1e-4, warmup_epochs=WARMUP_FRACTION * args.epochs, decay_at=DECAY_AT,
                final_evals=2, eval_every=10 ** 9, eval_samples=args.eval_samples, device=args.device,
                partition="paper", seed=seed, alpha=alpha, lr=lr, **VARIANTS[label])


def _job(args, label: str, alpha: float, lr: float, seed: int) -> dict:
    return {"settings": run_settings(args, label, alpha, lr, seed),
            "labels": {"label": label, "alpha": alpha, "lr": lr, "seed": seed}}


def best_lrs(tuning: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, alpha): the lr with the best mean-worker accuracy, and whether it lies on the
    edge of the lrs tried."""
    rows = []
    for (label, alpha), group in tuning.groupby(["label", "alpha"], sort=False):
        best = group.loc[group["test_acc_mean"].fillna(-1.0).idxmax()]  # a diverged run (NaN) is never the best
        rows.append({"label": label, "alpha": alpha, "lr": best["lr"],
                     "edge": grid_edge(best["lr"], sorted(group["lr"].unique()))})
    return pd.DataFrame(rows)


def tune_lrs(args: argparse.Namespace) -> pd.DataFrame:
    """The lr search: a 3-point grid per variant and alpha, extended while the best is on an edge."""
    seed = args.seeds[0]
    jobs = [_job(args, label, alpha, lr, seed) for label in args.variants for alpha in args.alphas
            for lr in (START_LR[label] / 2, START_LR[label], START_LR[label] * 2)]
    tuning = run_all(jobs, args, "lr")
    for round_ in range(args.extend):
        best = best_lrs(tuning)
        jobs = []
        for row in best[best["edge"] != ""].to_dict("records"):
            lr = row["lr"] * 2 if row["edge"] == "upper" else row["lr"] / 2
            jobs.append(_job(args, row["label"], row["alpha"], lr, seed))
        if not jobs:
            break
        print(f"extending {len(jobs)} lr grid(s) (round {round_ + 1})", flush=True)
        tuning = pd.concat([tuning, run_all(jobs, args, f"lr+{round_ + 1}")], ignore_index=True)
    return tuning


def lr_phase(args: argparse.Namespace, out: Path) -> pd.DataFrame:
    """The table's seed-0 runs (the tuning runs at the best lr) and the lr picked per variant and alpha."""
    if args.lr is not None:
        jobs = [_job(args, label, alpha, args.lr, args.seeds[0]) for label in args.variants for alpha in args.alphas]
        tuning = run_all(jobs, args, "fixed lr")
    elif args.lrs_from:
        tuning = pd.read_csv(args.lrs_from)
    else:
        tuning = tune_lrs(args)
    tuning.to_csv(out / "tuning.csv", index=False)
    return tuning


def table_runs(args: argparse.Namespace, tuning: pd.DataFrame) -> pd.DataFrame:
    """Every variant x alpha at its lr: the tuning run (first seed), plus the other seeds at --seed-alphas."""
    best = best_lrs(tuning)
    picked = tuning.merge(best[["label", "alpha", "lr"]], on=["label", "alpha", "lr"])
    picked = picked[picked["seed"] == args.seeds[0]].drop_duplicates(["label", "alpha"])
    jobs = [_job(args, row["label"], row["alpha"], row["lr"], seed) for row in best.to_dict("records")
            if row["alpha"] in args.seed_alphas for seed in args.seeds[1:]]
    more = run_all(jobs, args, "seeds") if jobs else picked.iloc[0:0]
    table = pd.concat([picked, more], ignore_index=True)
    return table.merge(best[["label", "alpha", "edge"]], on=["label", "alpha"])


def _cell(values: np.ndarray) -> str:
    values = 100 * values
    return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def table_markdown(table: pd.DataFrame, alphas: list[float]) -> str:
    head = ("| variant | " + " | ".join(f"α={a:g}: worst (lr)" for a in alphas) + " | paper (VGG-11, 200 ep) "
            + " / ".join(f"α={a:g}" for a in ALPHAS) + " |")
    lines = [head, "|" + "---|" * (2 + len(alphas))]
    for label in VARIANTS:
        rows = table[table["label"] == label]
        if rows.empty:
            continue
        cells = []
        for alpha in alphas:
            runs = rows[rows["alpha"] == alpha]
            if runs.empty:
                cells.append("–")
                continue
            edge = runs["edge"].iloc[0]
            flag = f", {edge} edge" if edge else ""
            cells.append(f"{_cell(runs['test_acc_worst'].to_numpy())} ({runs['lr'].iloc[0]:g}{flag})")
        paper = " / ".join(f"{v:.1f}" for v in PAPER[label]) if label in PAPER else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper} |")
    return "\n".join(lines)


def plot(table: pd.DataFrame, alphas: list[float], path: Path, title: str, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in VARIANTS if label in set(table["label"])]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(alphas)
    for j, alpha in enumerate(alphas):
        runs = [table[(table["label"] == lb) & (table["alpha"] == alpha)]["test_acc_worst"].to_numpy() for lb in labels]
        x = [i + (j - (len(alphas) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(x, [100 * r.mean() if len(r) else np.nan for r in runs], width, label=f"α={alpha:g}",
               yerr=[100 * r.std() if len(r) > 1 else 0 for r in runs], capsize=2)
    ax.set_xticks(range(len(labels)), [lb.replace(" + ", "\n+ ").replace("RelaySGD ", "RelaySGD\n") for lb in labels],
                  fontsize=8)
    ax.set_ylabel("worst-worker test accuracy (%)")
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    save_figure(fig, path, command)


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"cifar10_table.py: error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    started = time.perf_counter()
    out = prepare(args, "cifar10_table.py")
    tuning = lr_phase(args, out)
    lr_s = time.perf_counter() - started
    best = best_lrs(tuning)
    print("lr per variant and alpha:", json.dumps({f"{r['label']} @ {r['alpha']:g}": r["lr"]
                                                   for r in best.to_dict("records")}), flush=True)
    table = table_runs(args, tuning)
    table.to_csv(out / "table.csv", index=False)
    total_s = time.perf_counter() - started
    markdown = table_markdown(table, args.alphas)
    setting = (f"{args.model}, 16 workers, batch 32, {args.epochs:g} epochs, lr warm-up over the first "
               f"{100 * WARMUP_FRACTION:g}% and x0.1 at 75% and 90%, wd 1e-4, crop+flip; lr tuned per variant and "
               f"alpha by the mean worker; worst worker averaged over the last 2 evaluations on "
               f"{args.eval_samples or 'all 10k'} test images; seeds {args.seeds} at alpha "
               f"{', '.join(f'{a:g}' for a in args.seed_alphas)} (mean ± std), seed {args.seeds[0]} elsewhere; "
               f"device {args.device}, {args.jobs} runs side by side")
    edges = best[best["edge"] != ""]
    edge_line = ("every tuned lr lies inside its grid" if edges.empty else
                 f"{len(edges)} tuned lr(s) still on the edge of their grid after {args.extend} extension(s)")
    (out / "table.md").write_text(f"{setting}\n\n{markdown}\n\n{edge_line}; lr search "
                                  f"{len(tuning)} runs in {lr_s / 60:.1f} min, total {total_s / 60:.1f} min\n")
    plot(table, args.alphas, out / "cifar10_table.png", f"CIFAR-10 worst-worker accuracy: {setting}",
         command_line("cifar10_table.py", argv))
    print(markdown)
    print(f"{edge_line}; lr search {lr_s / 60:.1f} min, total {total_s / 60:.1f} min; wrote {out}/table.md, "
          "table.csv, tuning.csv, cifar10_table.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
