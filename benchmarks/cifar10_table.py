"""The paper's Table 2 grid (Vogels et al. 2021) scaled to one machine: worst-worker test accuracy on CIFAR-10.

16 workers, alpha in {1, 0.1, 0.01}; RelaySGD (chain and double binary trees, with and without local
momentum), D-SGD ring, D-SGD + QGM ring, D² ring and all-reduce.  Two phases, both in-process
(the simulator, which the Ray engine is tested to match), several runs side by side:

1. lr: the sweep tune_configs/cifar10_lr.yaml (every variant x lr grid, alpha 0.01, a short budget),
   expanded with the same code ``relay-ray tune`` uses; or ``--lrs-from results.csv`` of that sweep
   run with ``relay-ray tune`` on a Ray cluster.
2. table: every variant x alpha at its best lr, the full epoch budget.

Writes OUT/lr_sweep.csv, OUT/table.csv, OUT/table.md (beside the paper's numbers) and OUT/cifar10_table.png.

The defaults fit the whole grid (30 lr runs of 1 epoch, 30 table runs of 4 epochs, final evaluation
on 2000 test images) in 90 minutes on 2 CPU cores:

    .venv/bin/python benchmarks/cifar10_table.py

The longer setting of benchmarks/cifar10/table.md (GPU machine, 10 epochs, all 10k test images):

    python benchmarks/cifar10_table.py --device cuda --jobs 12 --epochs 10 --lr-epochs 3 \
        --eval-samples 10000 --out benchmarks/cifar10
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

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))
from _bench import command_line, save_figure  # noqa: E402

from relay_ray.config import RunConfig  # noqa: E402
from relay_ray.sweep import load_sweep  # noqa: E402

LR_SWEEP = ROOT / "tune_configs" / "cifar10_lr.yaml"
ALPHAS = (1.0, 0.1, 0.01)
# label -> run settings of the variant (the sweep's variants carry the same settings)
VARIANTS = {
    "all-reduce": dict(algorithm="allreduce", momentum=0.0),
    "all-reduce + momentum": dict(algorithm="allreduce", momentum=0.9),
    "RelaySGD chain": dict(algorithm="relaysgd", tree="chain", momentum=0.0),
    "RelaySGD chain + momentum": dict(algorithm="relaysgd", tree="chain", momentum=0.9),
    "RelaySGD double-binary": dict(algorithm="relaysgd", tree="double-binary", momentum=0.0),
    "RelaySGD double-binary + momentum": dict(algorithm="relaysgd", tree="double-binary", momentum=0.9),
    # not in the paper: the 1-step-delay tree (a hub), the control for the relay delay (relay_delay.py)
    "RelaySGD star": dict(algorithm="relaysgd", topology="star", tree="bfs", momentum=0.0),
    "D-SGD ring": dict(algorithm="dsgd", topology="ring", momentum=0.0),
    "D-SGD + QGM ring": dict(algorithm="dsgd-qgm", topology="ring", momentum=0.9),
    "D² ring": dict(algorithm="d2", topology="ring", momentum=0.0),
}
# DESIGN §7: VGG-11 / 200 epochs, worst worker, alpha = 1 / 0.1 / 0.01 (all-reduce is iid-independent)
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
    parser.add_argument("--epochs", type=float, default=4, help="epochs of the table runs")
    parser.add_argument("--eval-samples", type=int, default=2000,
                        help="test images per final evaluation (10000: all)")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="LABEL",
                        help="which rows to run")
    parser.add_argument("--lrs-from", default=None, metavar="CSV",
                        help="results.csv of `relay-ray tune tune_configs/cifar10_lr.yaml` instead of phase 1")
    parser.add_argument("--lr", type=float, default=None, help="one lr for every variant (skips phase 1)")
    parser.add_argument("--lr-epochs", type=float, default=1, help="epochs of the lr sweep (the sweep file says 3)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (processes)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _run(settings: dict, threads: int) -> dict:
    """One run in a worker process; returns its final metrics."""
    import torch

    torch.set_num_threads(threads)
    from relay_ray.simulate import simulate

    started = time.perf_counter()
    summary = simulate(RunConfig.from_dict({**settings, "backend": "local"}), progress=False)
    final = summary["final"]
    return {"test_acc_worst": final["test_acc_worst"], "test_acc_mean": final["test_acc_mean"],
            "test_acc_avg_model": final["test_acc_avg_model"], "consensus_distance": final["consensus_distance"],
            "steps": summary["steps"], "wall_s": time.perf_counter() - started}


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


def label_of(settings: dict) -> str:
    for label, variant in VARIANTS.items():
        if all(settings.get(k, v if k != "tree" else None) == v for k, v in variant.items()):
            return label
    raise ValueError(f"no variant matches {settings}")


def lr_phase(args: argparse.Namespace) -> dict[str, float]:
    if args.lr is not None:
        return {label: args.lr for label in args.variants}
    if args.lrs_from:
        frame = pd.read_csv(args.lrs_from)  # this script's lr_sweep.csv, or results.csv of `relay-ray tune`
        if "label" not in frame.columns:
            frame["label"] = [label_of(r) for r in frame.to_dict("records")]
    else:
        overrides = {"data_dir": args.data_dir, "device": args.device, "model": args.model,
                     "eval_samples": args.eval_samples, "eval_every": 10 ** 9, "seed": args.seed}
        if args.lr_epochs is not None:
            overrides["epochs"] = args.lr_epochs
        sweep = load_sweep(LR_SWEEP, overrides)
        jobs = []
        for combo in sweep._discrete_combinations():
            settings = sweep.fixed_settings(combo)
            label = label_of(settings)
            if label in args.variants:
                jobs.append({"settings": settings, "labels": {"label": label, "lr": settings["lr"]}})
        frame = run_all(jobs, args, "lr")
        frame.to_csv(Path(args.out) / "lr_sweep.csv", index=False)
    best = frame.loc[frame.groupby("label")["test_acc_worst"].idxmax()]
    return dict(zip(best["label"], best["lr"]))


def table_markdown(table: pd.DataFrame, alphas: list[float]) -> str:
    head = "| variant | lr | " + " | ".join(f"α={a:g}" for a in alphas) + " | paper (VGG-11, 200 ep) " + \
        " / ".join(f"α={a:g}" for a in ALPHAS) + " |"
    lines = [head, "|" + "---|" * (3 + len(alphas))]
    for label in VARIANTS:
        rows = table[table["label"] == label]
        if rows.empty:
            continue
        cells = []
        for alpha in alphas:
            row = rows[rows["alpha"] == alpha]
            cells.append(f"{100 * row['test_acc_worst'].iloc[0]:.1f}" if len(row) else "–")
        paper = " / ".join(f"{v:.1f}" for v in PAPER[label]) if label in PAPER else "–"
        lines.append(f"| {label} | {rows['lr'].iloc[0]:g} | " + " | ".join(cells) + f" | {paper} |")
    return "\n".join(lines)


def plot(table: pd.DataFrame, alphas: list[float], path: Path, title: str, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in VARIANTS if label in set(table["label"])]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(alphas)
    for j, alpha in enumerate(alphas):
        values = [100 * table[(table["label"] == lb) & (table["alpha"] == alpha)]["test_acc_worst"].max()
                  for lb in labels]
        ax.bar([i + (j - (len(alphas) - 1) / 2) * width for i in range(len(labels))], values, width,
               label=f"α={alpha:g}")
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
    lrs = lr_phase(args)
    lr_s = time.perf_counter() - started
    print("lr per variant:", json.dumps(lrs), flush=True)

    base = dict(dataset="cifar10", data_dir=args.data_dir, model=args.model, num_workers=16, epochs=args.epochs,
                batch_size=32, weight_decay=1e-4, decay_at=[0.75], seed=args.seed, device=args.device,
                eval_samples=args.eval_samples)
    jobs = []
    for label in args.variants:
        for alpha in args.alphas:
            # evaluated once, at the end: that is the table's number
            settings = {**base, **VARIANTS[label], "alpha": alpha, "lr": lrs[label], "eval_every": 10 ** 9}
            jobs.append({"settings": settings, "labels": {"label": label, "alpha": alpha, "lr": lrs[label]}})
    table = run_all(jobs, args, "table")
    table.to_csv(out / "table.csv", index=False)
    total_s = time.perf_counter() - started
    markdown = table_markdown(table, args.alphas)
    setting = (f"{args.model}, 16 workers, batch 32, {args.epochs:g} epochs, lr x0.1 at 75%, wd 1e-4, "
               f"crop+flip, seed {args.seed}, final worst worker on {args.eval_samples or 'all 10k'} test images; "
               f"device {args.device}, "
               f"{args.jobs} runs side by side")
    (out / "table.md").write_text(f"{setting}\n\n{markdown}\n\nlr phase {lr_s / 60:.1f} min, total "
                                  f"{total_s / 60:.1f} min\n")
    plot(table, args.alphas, out / "cifar10_table.png", f"CIFAR-10 worst-worker accuracy: {setting}",
         command_line("cifar10_table.py", argv))
    print(markdown)
    print(f"lr phase {lr_s / 60:.1f} min, total {total_s / 60:.1f} min; wrote {out}/table.md, table.csv, "
          "cifar10_table.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
