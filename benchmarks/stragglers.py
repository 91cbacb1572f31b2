"""Stragglers: wall-clock time to a target accuracy for RelaySGD, D-SGD and all-reduce, with and
without injected delays (`--straggle`), at `--window` 1 and 4.

The dataflow has no barrier: a worker waits only for the messages it needs, and the driver runs up
to `--window` steps ahead of the slowest worker.  All-reduce needs every worker's model every step,
so it waits for the slowest each step; gossip and relays wait for their neighbours, which still
wait for theirs, so a permanently slow worker slows everyone in the long run (the steady-state rate
is the slowest worker's) — the window absorbs *transient* delays (jitter), not a slow set.

Digits, 16 workers, Dirichlet alpha (default 0.01), 2 workers per actor (8 actors), embedded Ray on
this machine.  Straggle specs (relay_ray/straggle.py): `slow:RANKS:S` adds S seconds to every step
of those workers; `jitter:S` adds an exponential delay with mean S to every worker's every step,
seeded by (seed, step, rank) so every algorithm sees the same delays.  Per row: seconds until the
mean worker accuracy first reaches the target (evaluated every `--eval-every` steps; the evaluation
time is included the same way for every row), total wall seconds and steps/s.

    .venv/bin/python benchmarks/stragglers.py               # ~8 min on 2 cores

Writes the "Stragglers" section of RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import pandas as pd

from _bench import ROOT, command_line, load_average, machine, start_ray, write_section

ALGORITHMS = ("relaysgd", "dsgd", "allreduce")
SECTION = "## Stragglers (`benchmarks/stragglers.py`)"


def one_run(args, algorithm: str, straggle: str | None, window: int) -> dict:
    from relay_ray.config import EngineOptions, RunConfig
    from relay_ray.engine import Engine
    from relay_ray.experiment import build_experiment

    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(algorithm=algorithm, num_workers=16, dataset="digits", alpha=args.alpha,
                           epochs=args.epochs, seed=args.seed, eval_every=args.eval_every, backend="ray", out=out)
        experiment = build_experiment(config)
        options = EngineOptions(workers_per_actor=2, window=window, straggle=straggle)
        engine = Engine(config, experiment, options)
        try:
            started = time.perf_counter()
            summary = engine.run(progress=False)
            wall = time.perf_counter() - started
        finally:
            engine.shutdown()
        rows = _rows(out)
    reached = next((row for row in rows if row["test_acc_mean"] >= args.target), None)
    return {"algorithm": algorithm, "straggle": straggle or "none", "window": window,
            "to_target_s": reached["wall_s"] if reached else None, "to_target_step": reached["step"] if reached else None,
            "wall_s": wall, "steps_per_s": summary["steps"] / wall, "final_mean": summary["final"]["test_acc_mean"],
            "final_worst": summary["final"]["test_acc_worst"]}


def _rows(out: str) -> list[dict]:
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def table(frame: pd.DataFrame, target: float) -> str:
    lines = [f"| algorithm | straggle | window | s to mean acc ≥ {target} | (step) | wall s | steps/s | "
             "final mean acc | final worst acc |", "|---|---|---|---|---|---|---|---|---|"]
    for _, row in frame.iterrows():
        reached = f"{row['to_target_s']:.1f}" if pd.notna(row["to_target_s"]) else "not reached"
        step = f"{int(row['to_target_step'])}" if pd.notna(row["to_target_step"]) else "–"
        lines.append(f"| {row['algorithm']} | `{row['straggle']}` | {row['window']} | {reached} | {step} | "
                     f"{row['wall_s']:.1f} | {row['steps_per_s']:.1f} | {row['final_mean']:.3f} | "
                     f"{row['final_worst']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=30, help="epochs over a worker's shard (30 = 90 steps)")
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.9, help="mean worker test accuracy to reach")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--straggles", nargs="+", default=["none", "slow:5:0.05", "jitter:0.02"],
                        help="straggle specs to compare ('none' = no injected delay)")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args(argv)
    import ray

    from relay_ray.engine import quiet

    start_ray(num_cpus=2)
    quiet.divert_ray_noise()
    results = []
    try:
        for straggle in args.straggles:
            for algorithm in args.algorithms:
                for window in args.windows:
                    row = one_run(args, algorithm, None if straggle == "none" else straggle, window)
                    results.append(row)
                    print(f"{algorithm:<10} {row['straggle']:<14} window {window}: to target {row['to_target_s']} s, "
                          f"wall {row['wall_s']:.1f} s, {row['steps_per_s']:.1f} steps/s, "
                          f"final mean {row['final_mean']:.3f}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    frame = pd.DataFrame(results)
    command = command_line("stragglers.py", argv)
    section = "\n".join([
        SECTION,
        "",
        f"`{command}` — {machine()}, load {load_average()}.  Digits, 16 workers, α = {args.alpha}, "
        f"{args.epochs:g} epochs, seed {args.seed}, 2 workers per actor (8 actors; a group sleeps for the sum of its "
        f"workers' delays), evaluation every {args.eval_every} steps.  `slow:5:0.05`: worker 5 takes 50 ms more per "
        "step; `jitter:0.02`: every worker takes an exponential extra delay with mean 20 ms per step (the same "
        "draws for every algorithm).  Seconds to target include evaluations and exclude the engine's start.",
        "",
        table(frame, args.target),
    ])
    write_section(ROOT / "benchmarks" / "RESULTS.md", SECTION, section)
    print(section)


if __name__ == "__main__":
    main()
