"""A worker actor dies mid-run: what each --on-failure mode costs in time and in accuracy.

The README's digits run made longer (16 workers, RelaySGD, Dirichlet alpha = 0.01, --epochs E;
checkpoints every C steps, needed by `restart`) on an embedded Ray with 2 workers per actor.  Actor 1
(workers 2 and 3) is SIGKILLed-equivalent (`ray.kill`) when step `--kill-at` x steps has been
submitted.  Rows: undisturbed, then each mode: `restart` (every worker back to the last checkpoint;
the exact undisturbed numbers), `continue` (the 14 survivors re-span the chain and go on; workers
2-3's shards are lost) and `replace` (fresh workers 2-3 start from a neighbour's model).  Per mode:
wall seconds of the run (engine start excluded), the seconds lost against the undisturbed run,
steps computed again (restart's replay), the final worst-worker and mean accuracy, mean ± std over seeds.

    .venv/bin/python benchmarks/failures.py                   # ~6 min on 2 cores

Writes the "Surviving a dead worker" section of RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import pandas as pd

from _bench import ROOT, command_line, load_average, machine, start_ray, write_section

MODES = ("restart", "continue", "replace")


def _once(step, action):
    done = []

    def hook(engine, submitted):
        if submitted == step and not done:
            done.append(step)
            action(engine)
    return hook


def one_run(args, seed: int, mode: str | None, out: str) -> dict:
    import ray

    from relay_ray.config import EngineOptions, RunConfig
    from relay_ray.engine import Engine
    from relay_ray.experiment import build_experiment

    config = RunConfig(algorithm="relaysgd", num_workers=16, dataset="digits", alpha=0.01, epochs=args.epochs,
                       seed=seed, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, backend="ray",
                       out=out)
    experiment = build_experiment(config)
    kill_step = round(args.kill_at * experiment.total_steps)
    hook = _once(kill_step, lambda engine: ray.kill(engine.actors[1])) if mode else None
    engine = Engine(config, experiment, EngineOptions(workers_per_actor=2, on_failure=mode or "restart"), on_step=hook)
    try:
        started = time.perf_counter()
        summary = engine.run(progress=False)
        wall = time.perf_counter() - started
    finally:
        engine.shutdown()
    failures = summary.get("failures", [])
    replayed = 0
    if summary["restarts"]:  # restart mode: the steps between the checkpoint and the death were computed twice
        replayed = kill_step - (kill_step // args.checkpoint_every) * args.checkpoint_every
    return {"mode": mode or "undisturbed", "seed": seed, "wall_s": wall, "steps": summary["steps"],
            "killed_at": kill_step if mode else None, "resumed_at": failures[0]["step"] if failures else None,
            "replayed_steps": replayed, "workers_at_end": summary.get("workers_at_end", 16),
            "worst": summary["final"]["test_acc_worst"], "mean": summary["final"]["test_acc_mean"]}


def _pm(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std():.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(rows: pd.DataFrame) -> str:
    base = rows[rows["mode"] == "undisturbed"].set_index("seed")
    lines = ["| mode | wall s | s lost vs undisturbed | steps replayed | workers at end | worst-worker acc | "
             "mean acc | worst-worker vs undisturbed |", "|---|---|---|---|---|---|---|---|"]
    for mode in ("undisturbed", *MODES):
        part = rows[rows["mode"] == mode].set_index("seed")
        if part.empty:
            continue
        lost = part["wall_s"] - base["wall_s"].reindex(part.index)
        gap = part["worst"] - base["worst"].reindex(part.index)
        lines.append(f"| {mode} | {part['wall_s'].mean():.1f} | {lost.mean():+.1f} | {part['replayed_steps'].mean():.0f} "
                     f"| {part['workers_at_end'].iloc[0]} | {_pm(part['worst'])} | {_pm(part['mean'])} | "
                     f"{gap.mean():+.3f} (min {gap.min():+.3f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=100, help="epochs over a worker's shard (100 = 300 steps)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--kill-at", type=float, default=0.8, help="fraction of the run when the actor is killed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args(argv)
    import ray

    from relay_ray.engine import quiet

    start_ray(num_cpus=2)
    quiet.divert_ray_noise()
    rows = []
    try:
        for seed in args.seeds:
            for mode in (None, *args.modes):
                with tempfile.TemporaryDirectory() as out:
                    row = one_run(args, seed, mode, out)
                rows.append(row)
                print(f"seed {seed} {row['mode']:<11} {row['wall_s']:6.1f}s worst {row['worst']:.3f} "
                      f"mean {row['mean']:.3f} resumed at {row['resumed_at']}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    frame = pd.DataFrame(rows)
    command = command_line("failures.py", argv)
    steps = int(frame["steps"].iloc[0])
    section = "\n".join([
        "## Surviving a dead worker (`benchmarks/failures.py`)",
        "",
        f"`{command}` — {machine()}, load {load_average()}.  Digits, 16 workers, RelaySGD (chain), α = 0.01, "
        f"{steps} steps, 2 workers per actor (8 actors), checkpoints every {args.checkpoint_every} steps; actor 1 "
        f"(workers 2-3) killed when step {round(args.kill_at * steps)} is submitted; seeds {args.seeds}.  "
        "Wall seconds exclude the engine's start; `restart` replays from the last checkpoint and ends with the "
        "undisturbed numbers, `continue`/`replace` compute no step twice (tests/test_failures.py).",
        "",
        table(frame),
    ])
    write_section(ROOT / "benchmarks" / "RESULTS.md", "## Surviving a dead worker (`benchmarks/failures.py`)", section)
    print(section)


if __name__ == "__main__":
    main()
