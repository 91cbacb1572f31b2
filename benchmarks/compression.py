"""Compressed communication (--compression): accuracy and suboptimality per byte actually sent.

Two parts, both in-process (the simulator; the Ray engine compresses identically and is tested to match):

1. Quadratics (exact, seconds): 16 workers, full gradients, lr 0.1.
   - zeta^2 in {0, 100}: RelaySGD uncompressed vs per-edge differential compression with error
     feedback (topk:0.1, sign, qsgd:4), and all-reduce uncompressed vs EF-SGD (topk:0.1, sign) and
     unbiased QSGD (qsgd:4): the bytes each worker sent until the averaged model's suboptimality first
     fell below 1e-6 x its start, and where each run ends.
   - zeta^2 = 100: D-SGD on the ring (its floor: the suboptimality it stalls at) vs CHOCO-SGD on the same ring with
     topk:0.1 / sign / qsgd:4 over a grid of consensus step sizes gamma: bytes to come within 10 % of
     D-SGD's floor.
2. Digits (real training; the `relay-ray run --dataset digits` defaults, 90 steps), 16 workers,
   alpha 0.01, seeds 0-2: worst-worker accuracy (the paper's metric: each worker averaged over the
   last 2 evaluations) against the MB each worker sent, for RelaySGD, all-reduce (EF-SGD with topk
   and sign; unbiased QSGD and randk without memory at the same bytes as topk, 4x and 32x fewer)
   and D-SGD / CHOCO on the ring.

Writes OUT/compression.png, OUT/compression_digits.csv and the section "## Compressed communication" of OUT/RESULTS.md.

    .venv/bin/python benchmarks/compression.py            # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _bench import command_line, machine, save_figure, write_section  # noqa: E402
from cifar10_table import run_all  # noqa: E402

from relay_ray.config import RunConfig  # noqa: E402
from relay_ray.errors import Diverged  # noqa: E402
from relay_ray.quadratics import make_quadratics  # noqa: E402
from relay_ray.simulate import simulate  # noqa: E402

SECTION = "## Compressed communication (`benchmarks/compression.py`)"
QUAD_COMPRESSIONS = ["topk:0.1", "sign", "qsgd:4"]
TARGET = 1e-6  # RelaySGD: suboptimality relative to the start
FLOOR_SLACK = 1.1  # CHOCO: within 10 % of D-SGD's floor

# label -> settings of the digits rows
DIGITS = {
    "RelaySGD": dict(algorithm="relaysgd"),
    "RelaySGD topk:0.1 (EF)": dict(algorithm="relaysgd", compression="topk:0.1"),
    "RelaySGD topk:0.05 (EF)": dict(algorithm="relaysgd", compression="topk:0.05"),
    "RelaySGD sign (EF)": dict(algorithm="relaysgd", compression="sign"),
    "all-reduce": dict(algorithm="allreduce"),
    "all-reduce EF-SGD topk:0.125": dict(algorithm="allreduce", compression="topk:0.125"),
    "all-reduce randk:0.125 (unbiased)": dict(algorithm="allreduce", compression="randk:0.125"),
    "all-reduce QSGD qsgd:8 (unbiased)": dict(algorithm="allreduce", compression="qsgd:8"),
    "all-reduce EF-SGD sign": dict(algorithm="allreduce", compression="sign"),
    "all-reduce EF-SGD topk:1/64": dict(algorithm="allreduce", compression="topk:0.015625"),
    "all-reduce randk:1/64 (unbiased)": dict(algorithm="allreduce", compression="randk:0.015625"),
    "D-SGD (ring)": dict(algorithm="dsgd", topology="ring"),
}
# CHOCO-SGD on digits: (compression, gamma), around the best gamma of a first probe for each
DIGITS_CHOCO = [("topk:0.1", 0.2), ("topk:0.1", 0.5), ("topk:0.25", 1.0), ("sign", 0.5), ("sign", 1.0)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="benchmarks", help="folder for compression.png and RESULTS.md")
    parser.add_argument("--steps", type=int, default=3000, help="quadratics: RelaySGD and all-reduce steps")
    parser.add_argument("--heterogeneity", type=float, nargs="+", default=[0.0, 100.0],
                        help="quadratics: zeta^2 values for RelaySGD and all-reduce")
    parser.add_argument("--choco-steps", type=int, default=2000, help="quadratics: D-SGD / CHOCO steps")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9, 1.0],
                        help="CHOCO consensus step sizes tried on quadratics")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="digits seeds")
    parser.add_argument("--jobs", type=int, default=2, help="digits runs side by side (processes)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------- quadratics
def quadratics_run(settings: dict, steps: int, heterogeneity: float = 100.0) -> list[dict]:
    """The run's evaluations; one that diverges (the run stops with ``Diverged``) ends with a row of
    infinite suboptimality."""
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(dataset="quadratics", heterogeneity=heterogeneity, num_workers=16, backend="local",
                           steps=steps, eval_every=5, seed=0, out=tmp, **settings)
        try:
            simulate(config, progress=False)
            diverged = None
        except Diverged as error:
            diverged = error
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if line]
    if diverged:
        rows.append({**rows[-1], "suboptimality": math.inf})
    return rows


def bytes_to(rows: list[dict], level: float, initial: float) -> float | None:
    """Bytes each worker sent until the relative suboptimality first fell to ``level`` (None: never)."""
    for row in rows:
        if row["suboptimality"] / initial <= level:
            return row["bytes_sent_per_worker"]
    return None


def exact_methods(args) -> tuple[list[str], dict]:
    """RelaySGD and all-reduce, uncompressed and compressed, for every zeta^2: where each ends and
    the bytes it sent to reach TARGET (relative to its uncompressed run)."""
    runs = {"RelaySGD": dict(algorithm="relaysgd")}
    runs.update({f"RelaySGD {c} (EF)": dict(algorithm="relaysgd", compression=c) for c in QUAD_COMPRESSIONS})
    runs["all-reduce"] = dict(algorithm="allreduce")
    runs.update({f"all-reduce {c} ({'unbiased' if c.startswith('qsgd') else 'EF'})": dict(algorithm="allreduce", compression=c)
                 for c in QUAD_COMPRESSIONS})
    header = "| run | " + " | ".join(f"ζ² = {z:g}: final | bytes to {TARGET:g} | × uncompressed"
                                     for z in args.heterogeneity) + " |"
    lines = [header, "|---|" + "---|---|---|" * len(args.heterogeneity)]
    cells: dict = {label: [] for label in runs}
    curves: dict = {}
    for zeta in args.heterogeneity:
        initial = make_quadratics(16, zeta, 0).suboptimality(np.zeros(10))
        baseline: dict = {}
        for label, settings in runs.items():
            rows = quadratics_run(settings, args.steps, zeta)
            if zeta == 100.0:
                curves[label] = rows
            final = rows[-1]["suboptimality"] / initial
            spent = bytes_to(rows, TARGET, initial)
            baseline.setdefault(settings["algorithm"], spent)
            reference = baseline[settings["algorithm"]]
            cells[label] += [f"{final:.1e}" if final < 1 else "diverged", f"{spent:,.0f}" if spent else "not reached",
                             f"{spent / reference:.2f}" if spent and reference else "—"]
            print(f"quadratics zeta^2={zeta:g} {label}: final {final:.2e}, {spent} bytes to {TARGET:g}",
                  file=sys.stderr, flush=True)
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in cells.items()]
    return lines, curves


def quadratics(args) -> tuple[list[str], dict]:
    lines, relay_curves = exact_methods(args)
    initial = make_quadratics(16, 100.0, 0).suboptimality(np.zeros(10))
    curves = {"relay": relay_curves, "gossip": {}}
    dsgd = quadratics_run(dict(algorithm="dsgd", topology="ring"), args.choco_steps)
    floor = dsgd[-1]["suboptimality"] / initial
    level = FLOOR_SLACK * floor
    dsgd_bytes = bytes_to(dsgd, level, initial)
    curves["gossip"]["D-SGD (ring)"] = dsgd
    gossip = [f"D-SGD on the ring stalls at (F − F*)/(F⁰ − F*) = {floor:.2e} after {args.choco_steps} steps and "
              f"first comes within 10 % of it after {dsgd_bytes:,.0f} bytes per worker.", "",
              "| CHOCO-SGD (ring) | γ | final (F − F*)/(F⁰ − F*) | bytes / worker to D-SGD's floor +10 % | × D-SGD |",
              "|---|---|---|---|---|"]
    best: dict = {}
    for compression in QUAD_COMPRESSIONS:
        for gamma in args.gammas:
            rows = quadratics_run(dict(algorithm="choco", topology="ring", compression=compression,
                                       consensus_lr=gamma), args.choco_steps)
            final = rows[-1]["suboptimality"] / initial
            spent = bytes_to(rows, level, initial) if final < 1 else None
            gossip.append(f"| {compression} | {gamma:g} | {f'{final:.2e}' if final < 1 else 'diverged'} | {f'{spent:,.0f}' if spent else 'not reached'} | "
                          f"{f'{spent / dsgd_bytes:.2f}' if spent else '—'} |")
            if spent and (compression not in best or spent < best[compression][0]):
                best[compression] = (spent, gamma, rows)
            print(f"quadratics choco {compression} gamma {gamma:g}: final {final:.3e}, {spent} bytes",
                  file=sys.stderr, flush=True)
    for compression, (_, gamma, rows) in best.items():
        curves["gossip"][f"CHOCO {compression}, γ {gamma:g}"] = rows
    return lines + [""] + gossip, {"curves": curves, "initial": initial, "floor_level": level}


# ------------------------------------------------------------------------------------ digits
def digits(args) -> tuple[pd.DataFrame, dict]:
    rows = dict(DIGITS)
    for compression, gamma in DIGITS_CHOCO:
        rows[f"CHOCO {compression} (ring), γ {gamma:g}"] = dict(algorithm="choco", topology="ring",
                                                                compression=compression, consensus_lr=gamma)
    base = dict(dataset="digits", num_workers=16, alpha=0.01, eval_every=10 ** 9, final_evals=2)
    jobs = [{"settings": {**base, **settings, "seed": seed}, "labels": {"label": label, "seed": seed}}
            for label, settings in rows.items() for seed in args.seeds]
    args.device = "cpu"
    return run_all(jobs, args, "digits"), rows


def digits_table(frame: pd.DataFrame, rows: dict) -> list[str]:
    reference = {"relaysgd": "RelaySGD", "allreduce": "all-reduce", "dsgd": "D-SGD (ring)", "choco": "D-SGD (ring)"}
    mb = frame.groupby("label")["bytes_sent_per_worker"].mean() / 1e6
    lines = ["| run | worst worker (%) | mean worker (%) | MB sent / worker | × fewer bytes than uncompressed |",
             "|---|---|---|---|---|"]
    for label, settings in rows.items():
        group = frame[frame["label"] == label]
        worst, mean = 100 * group["test_acc_worst"], 100 * group["test_acc_mean"]
        fewer = mb[reference[settings["algorithm"]]] / mb[label]
        lines.append(f"| {label} | {worst.mean():.1f} ± {worst.std(ddof=0):.1f} | {mean.mean():.1f} ± "
                     f"{mean.std(ddof=0):.1f} | {mb[label]:.2f} | {fewer:.1f} |")
    return lines


# -------------------------------------------------------------------------------------- plot
def plot(quad: dict, frame: pd.DataFrame, rows: dict, path: Path, command: str) -> None:
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 10))
    grid = fig.add_gridspec(2, 2)
    relay_ax, gossip_ax, digits_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    for ax, curves in zip((relay_ax, gossip_ax), quad["curves"].values()):
        for label, curve in curves.items():
            x = [row["bytes_sent_per_worker"] / 1e3 for row in curve]
            y = [max(row["suboptimality"] / quad["initial"], 1e-16) for row in curve if math.isfinite(row["suboptimality"])]
            ax.loglog(x[:len(y)], y, label=label)
        ax.set_xlabel("kB sent per worker")
        ax.set_ylabel("(F(x̄) − F*) / (F(x⁰) − F*)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    relay_ax.axhline(TARGET, color="grey", linestyle=":", linewidth=1)
    relay_ax.set_title("Quadratics ζ² = 100: RelaySGD and all-reduce, compressed")
    gossip_ax.axhline(quad["floor_level"], color="grey", linestyle=":", linewidth=1)
    gossip_ax.set_title("Quadratics ζ² = 100, ring: D-SGD vs CHOCO (γ reaching the floor)")
    colors = iter(matplotlib.colormaps["tab20"].colors)
    markers = {"relaysgd": "o", "allreduce": "s", "dsgd": "^", "choco": "^"}
    for label, settings in rows.items():
        group = frame[frame["label"] == label]
        digits_ax.errorbar(group["bytes_sent_per_worker"].mean() / 1e6, 100 * group["test_acc_worst"].mean(),
                           yerr=100 * group["test_acc_worst"].std(ddof=0), color=next(colors),
                           marker=markers[settings["algorithm"]], markersize=8, linestyle="none", label=label, capsize=3)
    digits_ax.set_xscale("log")
    digits_ax.set_xlabel("MB sent per worker (log)")
    digits_ax.set_ylabel("worst-worker test accuracy (%)")
    digits_ax.set_title(f"Digits, 16 workers, α = 0.01, 90 steps: worst worker vs bytes (mean ± std over "
                        f"{frame['seed'].nunique()} seeds)")
    digits_ax.grid(alpha=0.3, which="both")
    digits_ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Compressed communication: progress per byte actually sent (encoded messages)")
    save_figure(fig, path, command)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    quad_lines, quad = quadratics(args)
    quad_s = time.perf_counter() - started
    frame, rows = digits(args)
    elapsed = time.perf_counter() - started
    command = command_line("compression.py", argv)
    png = out / "compression.png"
    plot(quad, frame, rows, png, command)
    frame.to_csv(out / "compression_digits.csv", index=False)
    section = "\n".join([
        SECTION, "",
        f"Command: `{command}` (in-process simulator; {elapsed / 60:.1f} min on {machine()}, no GPU; "
        f"quadratics {quad_s:.0f} s). Plot: `{png.name}`. Bytes are the encoded messages each worker "
        "sent (values + uint32 indices for topk/randk, 1 bit per coordinate + a scale for sign, one int8 "
        "per coordinate + a norm for qsgd).", "",
        "### Quadratics, 16 workers, full gradients, lr 0.1 (RelaySGD × its lr correction), d = 10 "
        "(topk:0.1 sends 1 coordinate); CHOCO and D-SGD at ζ² = 100", "",
        *quad_lines, "",
        f"### Digits, 16 workers, α = 0.01, 90 steps, seeds {args.seeds} (RelaySGD on its default chain; "
        "CHOCO and D-SGD on the ring)", "",
        *digits_table(frame, rows), ""])
    print(section)
    write_section(out / "RESULTS.md", SECTION, section)
    print(f"\nwrote {png}, {out / 'compression_digits.csv'} and {out / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
