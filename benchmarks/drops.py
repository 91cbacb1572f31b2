"""Unreliable links (DESIGN §1, issue #7): final worst-worker accuracy with and without dropped messages.

Digits, 16 workers, Dirichlet alpha = 0.01, the `relay-ray run --dataset digits` defaults (MLP, batch
32, lr 0.05, Nesterov 0.9, wd 1e-4, 30 epochs = 90 steps) unless --epochs is given, in the in-process
simulator (the Ray engine drops the same messages: the drop is a function of (seed, step, edge)).
Each received message is lost with probability p; RelaySGD fills the missing mass with x0 and
does not forward it, gossip renormalises by the weight received.  Prints a Markdown table (mean
over seeds of the final worst-worker / mean test accuracy) and writes it to --out.

    .venv/bin/python benchmarks/drops.py                      # 3 seeds x 4 algorithms x 2 drop rates
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay_ray.config import RunConfig  # noqa: E402
from relay_ray.data import load_dataset  # noqa: E402
from relay_ray.experiment import build_experiment  # noqa: E402
from relay_ray.simulate import simulate  # noqa: E402

RUNS = {
    "RelaySGD (chain)": dict(algorithm="relaysgd", tree="chain"),
    "RelaySGD (double binary trees)": dict(algorithm="relaysgd", tree="double-binary"),
    "D-SGD (ring)": dict(algorithm="dsgd", topology="ring"),
    "D² (ring)": dict(algorithm="d2", topology="ring"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop-probs", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=None, help="default: the digits default (30)")
    parser.add_argument("--out", default="runs/drops.md")
    args = parser.parse_args()

    data = load_dataset("digits", None)
    results: dict[tuple[str, float], list[tuple[float, float]]] = {}
    started = time.perf_counter()
    for label, layout in RUNS.items():
        for p in args.drop_probs:
            for seed in args.seeds:
                config = RunConfig(dataset="digits", num_workers=16, alpha=0.01, seed=seed, drop_prob=p,
                                   epochs=args.epochs, backend="local", **layout)
                final = simulate(config, build_experiment(config, task_data=data), progress=False)["final"]
                results.setdefault((label, p), []).append((final["test_acc_worst"], final["test_acc_mean"]))
                print(f"{label:32s} p={p:<4g} seed={seed}: worst {final['test_acc_worst']:.4f} "
                      f"mean {final['test_acc_mean']:.4f}", file=sys.stderr, flush=True)
    steps = build_experiment(config, task_data=data).total_steps
    header = ["algorithm"] + [f"worst acc, p = {p:g}" for p in args.drop_probs] + \
        [f"mean acc, p = {p:g}" for p in args.drop_probs]
    lines = [f"Digits, 16 workers, alpha 0.01, {steps} steps, seeds {args.seeds} (mean ± std over seeds); "
             f"{time.perf_counter() - started:.0f} s in all.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in RUNS:
        worst = [np.array([r[0] for r in results[(label, p)]]) for p in args.drop_probs]
        mean = [np.array([r[1] for r in results[(label, p)]]) for p in args.drop_probs]
        cells = [f"{100 * v.mean():.1f} ± {100 * v.std():.1f}" for v in worst + mean]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
