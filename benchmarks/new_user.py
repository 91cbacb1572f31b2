"""What a new user gets with default flags: the README quickstart and a 16-worker x 1000-step run,
on both backends, through the real CLI (`python -m relay_ray run ...` in a fresh process).

  quickstart            relay-ray run --dataset digits --workers 16 --alpha 0.01 --algorithm relaysgd
  mlp 16x1000           relay-ray run --dataset digits --workers 16 --model mlp --alpha 0.1 --steps 1000
                        (the one-engine issue's run: evaluates every 10 steps, the digits default)
  mlp 16x1000, 1 eval   the same with --eval-every 1000: training steps only

Each is run with ``--backend local`` (the in-process simulator) and ``--backend ray`` (the engine
with its default flags). Reported: the process's total wall time (Python, torch and Ray start-up
included), the engine's start-up (Ray + actors, ``startup_s`` of summary.json where the code
records it, else total minus training) and training samples/s (``samples_per_s`` of the final
row). With ``--previous DIR`` (a checkout of an earlier commit, e.g. ``git worktree add
/tmp/prev e83e170``) the same commands run on that code too, in the same session, side by side.
Prints a Markdown table and writes the section "## New user" of RESULTS.md.

    .venv/bin/python benchmarks/new_user.py --previous /tmp/prev    # ~8 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, command_line, load_average, machine, write_section  # noqa: E402

SECTION = "## New user"
RUNS = {
    "quickstart": ["--dataset", "digits", "--workers", "16", "--alpha", "0.01", "--algorithm", "relaysgd"],
    "mlp 16x1000": ["--dataset", "digits", "--workers", "16", "--model", "mlp", "--alpha", "0.1", "--steps", "1000"],
    "mlp 16x1000, 1 eval": ["--dataset", "digits", "--workers", "16", "--model", "mlp", "--alpha", "0.1", "--steps",
                            "1000", "--eval-every", "1000"],
}


def run_cli(tree: Path, args: list[str], backend: str) -> dict:
    """One `relay-ray run` in a fresh process importing relay_ray from ``tree``; its timings."""
    with tempfile.TemporaryDirectory() as out:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = str(tree)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "relay_ray", "run", *args, "--backend", backend, "--out", out,
                               "--quiet"], cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
        total = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{tree}: {' '.join(args)} --backend {backend} failed: {done.stderr[-2000:]}")
        summary = json.loads(Path(out, "summary.json").read_text())
    final = summary["final"]
    engine = summary.get("engine") or {}
    return {"total_s": total, "train_s": final["wall_s"], "samples_per_s": final["samples_per_s"],
            "startup_s": summary.get("startup_s"), "actors": engine.get("num_actors", "1 per worker" if
                                                                         backend == "ray" else "-"),
            "acc_worst": final.get("test_acc_worst")}


def table(results: dict) -> str:
    lines = ["| code | run | backend | actors | total s | engine start-up s | training s | samples/s | "
             "ray / local | worst acc |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (code, run), by_backend in results.items():
        local = by_backend["local"]["samples_per_s"]
        for backend, r in by_backend.items():
            startup = "-" if r["startup_s"] is None else f"{r['startup_s']:.1f}"
            ratio = f"{r['samples_per_s'] / local:.2f}x" if backend == "ray" else "1"
            lines.append(f"| {code} | {run} | {backend} | {r['actors']} | {r['total_s']:.1f} | {startup} | "
                         f"{r['train_s']:.1f} | {r['samples_per_s']:.0f} | {ratio} | {r['acc_worst']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--previous", type=Path, default=None, help="a checkout of an earlier commit to run beside")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="where RESULTS.md is")
    parser.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args(argv)
    trees = {"this": ROOT}
    if args.previous is not None:
        revision = subprocess.run(["git", "-C", str(args.previous), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True).stdout.strip()
        trees[f"previous ({revision or args.previous})"] = args.previous.resolve()
    load_before = load_average()
    started = time.perf_counter()
    results: dict = {}
    for run in args.runs:
        for code, tree in trees.items():
            results[(code, run)] = {backend: run_cli(tree, RUNS[run], backend) for backend in ("local", "ray")}
            print(table({(code, run): results[(code, run)]}).splitlines()[-1], flush=True)
    text = table(results)
    print(text)
    command = command_line("new_user.py", argv)
    section = (f"{SECTION}\n\n`{command}` ({machine()}; load {load_before} before, {load_average()} after; "
               f"{time.perf_counter() - started:.0f} s in all)\n\n"
               "Default flags on both backends; total = the whole `relay-ray run` process. ray / local = "
               "training samples/s of the engine over the simulator's.\n\n" + text + "\n")
    if not args.no_results:
        write_section(args.out / "RESULTS.md", SECTION, section)


if __name__ == "__main__":
    main()
