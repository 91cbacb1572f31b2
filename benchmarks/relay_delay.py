"""Why RelaySGD trails all-reduce on the scaled CIFAR-10 table: the largest usable lr vs the tree's relay delay.

RelaySGD averages exactly, but worker k's model reaches worker i d(i,k) - 1 steps late, and the lr
correction makes every local step ~5x larger on a 16-chain so the delayed average still moves at the
lr.  Delayed feedback with large steps is unstable above some lr, and the longer the delays the
lower that lr.  This script measures it: RelaySGD on spanning trees of growing diameter (star 2,
double binary trees 6, chain 15) and all-reduce (no delay) over the same lr grid, CIFAR-10, the
small CNN, 16 workers, in-process simulator (several runs side by side, as benchmarks/cifar10_table.py).

Writes OUT/relay_delay.csv, OUT/relay_delay.md and OUT/relay_delay.png.

    .venv/bin/python benchmarks/relay_delay.py            # ~15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _bench import command_line, save_figure  # noqa: E402
from cifar10_table import add_data_arguments, prepare, run_all  # noqa: E402

from relay_ray.config import RunConfig  # noqa: E402
from relay_ray.experiment import build_topology  # noqa: E402
from relay_ray.topology import lr_correction, max_delay  # noqa: E402

# label -> run settings; ordered by relay delay
TREES = {
    "all-reduce (no delay)": dict(algorithm="allreduce"),
    "RelaySGD star": dict(algorithm="relaysgd", topology="star", tree="bfs"),
    "RelaySGD double-binary": dict(algorithm="relaysgd", tree="double-binary"),
    "RelaySGD chain": dict(algorithm="relaysgd", tree="chain"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_arguments(parser, out="benchmarks/cifar10")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--eval-samples", type=int, default=2000, help="test images per final evaluation")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (processes)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def delay_of(settings: dict) -> tuple[int, float]:
    """(longest relay delay in steps, lr correction) of a run's trees; (0, 1) for all-reduce."""
    if settings["algorithm"] != "relaysgd":
        return 0, 1.0
    _, trees = build_topology(RunConfig.from_dict({**settings, "num_workers": 16}))
    return max_delay(trees) - 1, lr_correction(trees)


def plot(frame, delays: dict, path: Path, command: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, cd_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for color, label in enumerate(TREES):
        rows = frame[frame["label"] == label].sort_values("lr")
        name = f"{label} (delay ≤ {delays[label][0]})" if delays[label][0] else label
        acc_ax.plot(rows["lr"], 100 * rows["test_acc_worst"], marker="o", color=f"C{color}", label=name)
        if delays[label][0]:  # all-reduce's consensus distance is exactly 0: nothing to draw on a log axis
            cd_ax.plot(rows["lr"], rows["consensus_distance"], marker="o", color=f"C{color}", label=name)
    lrs = sorted(frame["lr"].unique())
    for ax in (acc_ax, cd_ax):
        ax.set_xscale("log")
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
        ax.set_xlabel("lr (before the RelaySGD correction)")
        ax.grid(alpha=0.3)
    acc_ax.set_ylabel("worst-worker test accuracy (%)")
    cd_ax.set_ylabel("consensus distance (final; all-reduce: 0)")
    cd_ax.set_yscale("log")
    acc_ax.legend(fontsize=8)
    cd_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, command, bottom=0.06)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = prepare(args, "relay_delay.py")
    base = dict(dataset="cifar10", data_dir=args.data_dir, model="cnn", num_workers=16, epochs=args.epochs,
                batch_size=32, weight_decay=1e-4, momentum=0.0, alpha=args.alpha, seed=args.seed,
                device=args.device, eval_samples=args.eval_samples, eval_every=10 ** 9)
    jobs = [{"settings": {**base, **settings, "lr": lr}, "labels": {"label": label, "lr": lr}}
            for label, settings in TREES.items() for lr in args.lrs]
    frame = run_all(jobs, args, "delay")
    delays = {label: delay_of({**base, **settings}) for label, settings in TREES.items()}
    frame["max_delay"] = [delays[label][0] for label in frame["label"]]
    frame["lr_correction"] = [round(delays[label][1], 3) for label in frame["label"]]
    frame = frame.sort_values(["max_delay", "lr"])
    frame.to_csv(out / "relay_delay.csv", index=False)

    command = command_line("relay_delay.py", argv)
    lines = [f"CIFAR-10, small CNN, 16 workers, alpha {args.alpha:g}, {args.epochs:g} epochs, no momentum, "
             f"final test accuracy on {args.eval_samples} images; `{command.strip()}` "
             f"({(time.perf_counter() - started) / 60:.1f} min)", "",
             "| run | max delay (steps) | lr correction | lr | worst worker | averaged model | consensus distance |",
             "|---|---|---|---|---|---|---|"]
    for row in frame.to_dict("records"):
        lines.append(f"| {row['label']} | {row['max_delay']} | {row['lr_correction']:g} | {row['lr']:g} | "
                     f"{100 * row['test_acc_worst']:.1f} | {100 * row['test_acc_avg_model']:.1f} | "
                     f"{row['consensus_distance']:.3g} |")
    (out / "relay_delay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)

    plot(frame, delays, out / "relay_delay.png", command.strip(),
         f"RelaySGD's usable lr vs relay delay: CIFAR-10, small CNN, 16 workers, α={args.alpha:g}, {args.epochs:g} epochs")
    print(f"wrote {out}/relay_delay.md, relay_delay.csv, relay_delay.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
