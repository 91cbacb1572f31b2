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
seeded by (seed, step, rank) so every algorithm sees the same delays.

Delays never change a number, so the step at which an algorithm first reaches the target mean
worker accuracy is found once, in process (evaluating every step).  Each (straggle, window) row
then times exactly that many steps on the Ray engine with no evaluation in between (an evaluation
is a step boundary, a barrier that would hide what the window does): `Engine.run_steps`, the loop
of `Engine.run`.  An algorithm that never reaches the target is timed over the whole run.

    .venv/bin/python benchmarks/stragglers.py               # ~6 min on 2 cores

Writes the "Stragglers" section of RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

from _bench import ROOT, command_line, load_average, machine, start_ray, write_section

ALGORITHMS = ("relaysgd", "dsgd", "allreduce")
SECTION = "## Stragglers (`benchmarks/stragglers.py`)"


def _config(args, algorithm: str, backend: str, out: str):
    from relay_ray.config import RunConfig

    return RunConfig(algorithm=algorithm, num_workers=16, dataset="digits", alpha=args.alpha, epochs=args.epochs,
                     seed=args.seed, eval_every=1, backend=backend, out=out)


def target_step(args, algorithm: str) -> tuple[int | None, int, float]:
    """(first step whose mean worker accuracy reaches the target or None, the run's steps, final mean)."""
    from relay_ray.simulate import simulate

    with tempfile.TemporaryDirectory() as out:
        summary = simulate(_config(args, algorithm, "local", out), progress=False)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    reached = next((row["step"] for row in rows if row["test_acc_mean"] >= args.target), None)
    return reached, summary["steps"], summary["final"]["test_acc_mean"]


def timed_steps(args, algorithm: str, steps: int, straggle: str | None, window: int) -> float:
    """Wall seconds for ``steps`` steps on the engine (its start excluded)."""
    from relay_ray.config import EngineOptions
    from relay_ray.engine import Engine
    from relay_ray.experiment import build_experiment

    with tempfile.TemporaryDirectory() as out:
        config = _config(args, algorithm, "ray", out)
        engine = Engine(config, build_experiment(config),
                        EngineOptions(workers_per_actor=args.workers_per_actor, window=window, straggle=straggle))
        try:
            return engine.run_steps(steps)["wall_s"]
        finally:
            engine.shutdown()


def table(frame: pd.DataFrame, target: float) -> str:
    lines = [f"| algorithm | step mean acc ≥ {target} | straggle | window | s to target | ms per step |",
             "|---|---|---|---|---|---|"]
    for _, row in frame.iterrows():
        step = f"{int(row['target_step'])}" if pd.notna(row["target_step"]) else \
            f"never (final {row['final_mean']:.3f})"
        seconds = f"{row['wall_s']:.1f}" if pd.notna(row["target_step"]) else f"– ({row['wall_s']:.1f} s for {row['steps']})"
        lines.append(f"| {row['algorithm']} | {step} | `{row['straggle']}` | {row['window']} | {seconds} | "
                     f"{1000 * row['wall_s'] / row['steps']:.0f} |")
    return "\n".join(lines)


def reading(frame: pd.DataFrame) -> str:
    """The table's facts in one paragraph: per algorithm, ms per step without delays and with each
    straggle (and what the delays added), at the largest window; and how much the window moved any
    delayed row.  The interpretation goes in a hand-written "### Reading" below (kept on reruns)."""
    per_step = frame.assign(ms=1000 * frame["wall_s"] / frame["steps"]).set_index(["algorithm", "straggle", "window"])["ms"]
    wide = max(frame["window"])
    delayed = [s for s in frame["straggle"].unique() if s != "none"]
    parts = []
    for algorithm in [a for a in ALGORITHMS if a in set(frame["algorithm"])]:
        base = per_step.get((algorithm, "none", wide))
        steps = [f"`{s}` {per_step[algorithm, s, wide]:.0f}" + (f" (+{per_step[algorithm, s, wide] - base:.0f})"
                                                                 if base is not None else "") for s in delayed]
        parts.append(f"{algorithm} {base:.0f} → " + ", ".join(steps) if base is not None else
                     f"{algorithm} " + ", ".join(steps))
    spread = max((abs(per_step[a, s, w] / per_step[a, s, wide] - 1) for a, s, w in per_step.index if s != "none"),
                 default=0.0)
    return (f"Facts (window {wide}, ms per step without delays → with them, and what they added): "
            + "; ".join(parts) + f".  The window moves no delayed row by more than {100 * spread:.0f}% "
            f"(largest gap between any window and {wide}).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=20, help="epochs over a worker's shard (20 = 60 steps)")
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--target", type=float, default=0.9, help="mean worker test accuracy to reach")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--straggles", nargs="+", default=["none", "slow:5:0.2", "jitter:0.1"],
                        help="straggle specs to compare ('none' = no injected delay)")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--workers-per-actor", type=int, default=2, help="K workers per actor (16 / K actors)")
    args = parser.parse_args(argv)
    import ray

    from relay_ray.engine import quiet

    targets = {algorithm: target_step(args, algorithm) for algorithm in args.algorithms}
    start_ray(num_cpus=2)
    quiet.divert_ray_noise()
    results = []
    try:
        for algorithm in args.algorithms:
            reached, total, final = targets[algorithm]
            steps = reached or total
            for straggle in args.straggles:
                for window in args.windows:
                    wall = timed_steps(args, algorithm, steps, None if straggle == "none" else straggle, window)
                    results.append({"algorithm": algorithm, "target_step": reached, "final_mean": final,
                                    "straggle": straggle, "window": window, "steps": steps, "wall_s": wall})
                    print(f"{algorithm:<10} {straggle:<12} window {window}: {steps} steps in {wall:.1f} s "
                          f"(target {'at step ' + str(reached) if reached else 'never reached'})",
                          file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    frame = pd.DataFrame(results)
    command = command_line("stragglers.py", argv)
    actors = -(-16 // args.workers_per_actor)
    section_title = SECTION if args.workers_per_actor == 2 else f"{SECTION[:-1]}, {actors} actors)"
    section = "\n".join([
        section_title,
        "",
        f"`{command}` — {machine()}, load {load_average()}.  Digits, 16 workers, α = {args.alpha}, "
        f"{args.epochs:g} epochs, seed {args.seed}, {args.workers_per_actor} workers per actor ({actors} actors; a group "
        "sleeps for the sum of its "
        "workers' delays).  `slow:5:0.2`: worker 5 takes 200 ms more per step; `jitter:0.1`: every worker takes an "
        "exponential extra delay with mean 100 ms per step (the same draws for every algorithm).  The target step "
        "comes from an in-process run (delays never change a number); the seconds are that many steps on the Ray "
        "engine with no evaluation in between, its start excluded.",
        "",
        table(frame, args.target),
        "",
        reading(frame),
    ])
    write_section(ROOT / "benchmarks" / "RESULTS.md", section_title, section)
    print(section)


if __name__ == "__main__":
    main()
