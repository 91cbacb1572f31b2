"""Chaos soak: a long run with a random worker actor killed every 1-2 minutes, under each --on-failure mode.

Digits, 16 workers, RelaySGD, Dirichlet alpha = 0.01, 2 workers per actor (8 actors), checkpoints every
`--checkpoint-every` steps, embedded Ray.  During each run a killer picks a random live actor and
`ray.kill`s it at random intervals of `--every` seconds (default 60-120 s; seeded, so reruns kill at
the same moments of wall time, not the same steps).  Rows: the undisturbed run, then `restart`
(which must end with exactly the undisturbed run's numbers: every metrics row is compared),
`continue` and `replace` (which must finish; their final accuracy is reported beside the
undisturbed one).

    .venv/bin/python benchmarks/soak.py                     # ~20 min on 2 cores

Writes the "Chaos soak" section of RESULTS.md and prints it; exits 1 when a run did not finish or
restart mode's numbers differ.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _bench import ROOT, command_line, load_average, machine, start_ray, write_section

MODES = ("restart", "continue", "replace")
SECTION = "## Chaos soak (`benchmarks/soak.py`)"
COMPARED = ("train_loss", "test_acc_mean", "test_acc_worst", "test_acc_avg_model", "consensus_distance")


class Killer:
    """An ``on_step`` hook: once the next moment has come, kill a random live actor of the engine."""

    def __init__(self, every: tuple[float, float], seed: int | str):
        self.every, self.random = every, random.Random(seed)
        self.kills: list[dict] = []
        self.next_at = time.monotonic() + self.random.uniform(*every)

    def __call__(self, engine, step: int) -> None:
        import ray

        if time.monotonic() < self.next_at:
            return
        g = self.random.randrange(len(engine.actors))
        ray.kill(engine.actors[g])
        self.kills.append({"step": step, "actor": g, "workers": list(engine.layout.groups[g])})
        print(f"  killed actor {g} (workers {engine.layout.groups[g]}) at step {step}", file=sys.stderr, flush=True)
        self.next_at = time.monotonic() + self.random.uniform(*self.every)


def one_run(args, mode: str | None, out: str) -> dict:
    from relay_ray.config import EngineOptions, RunConfig
    from relay_ray.engine import Engine
    from relay_ray.experiment import build_experiment

    config = RunConfig(algorithm="relaysgd", num_workers=16, dataset="digits", alpha=0.01, epochs=args.epochs,
                       seed=args.seed, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                       backend="ray", out=out)
    killer = Killer(tuple(args.every), f"{args.seed}-{mode}") if mode else None  # each mode its own victims
    options = EngineOptions(workers_per_actor=2, on_failure=mode or "restart", max_restarts=args.max_restarts)
    engine = Engine(config, build_experiment(config), options, on_step=killer)
    started = time.perf_counter()
    try:
        summary, error = engine.run(progress=False), None
    except Exception as exc:  # a soak reports what broke instead of stopping the other modes
        summary, error = None, f"{type(exc).__name__}: {exc}"
    finally:
        engine.shutdown()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"mode": mode or "undisturbed", "wall_s": time.perf_counter() - started, "error": error,
            "kills": killer.kills if killer else [], "summary": summary, "rows": rows}


def same_numbers(rows: list[dict], reference: list[dict]) -> bool:
    if [r["step"] for r in rows] != [r["step"] for r in reference]:
        return False
    return all(np.allclose([r[k] for r in rows], [r[k] for r in reference], rtol=1e-6, atol=1e-6) for k in COMPARED)


def table(results: list[dict], reference: list[dict]) -> str:
    lines = ["| mode | actors killed (at steps) | wall s | finished | restarts | workers at end | final worst acc | "
             "final mean acc | every row equal to undisturbed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        kills = ", ".join(str(k["step"]) for k in r["kills"]) or "–"
        final = s["final"] if s else {}
        equal = "yes" if s and same_numbers(r["rows"], reference) else "no"
        lines.append(f"| {r['mode']} | {len(r['kills'])} ({kills}) | {r['wall_s']:.0f} | "
                     f"{'yes' if s else 'no: ' + r['error']} | {s['restarts'] if s else '–'} | "
                     f"{s.get('workers_at_end', 16) if s else '–'} | {final.get('test_acc_worst', float('nan')):.3f} | "
                     f"{final.get('test_acc_mean', float('nan')):.3f} | {equal} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=2000, help="epochs over a worker's shard (2000 = 6000 steps)")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--every", type=float, nargs=2, default=[60, 120], metavar=("MIN_S", "MAX_S"),
                        help="seconds between kills, drawn uniformly")
    parser.add_argument("--max-restarts", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args(argv)
    import ray

    from relay_ray.engine import quiet

    start_ray(num_cpus=2)
    quiet.divert_ray_noise()
    results = []
    try:
        for mode in (None, *args.modes):
            print(f"{mode or 'undisturbed'}:", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as out:
                result = one_run(args, mode, out)
            results.append(result)
            final = result["summary"]["final"] if result["summary"] else {}
            print(f"  {result['wall_s']:.0f} s, {len(result['kills'])} kills, error {result['error']}, "
                  f"final worst {final.get('test_acc_worst')}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    reference = results[0]["rows"]
    command = command_line("soak.py", argv)
    section = "\n".join([
        SECTION,
        "",
        f"`{command}` — {machine()}, load {load_average()}.  Digits, 16 workers, RelaySGD, α = 0.01, "
        f"{args.epochs:g} epochs, seed {args.seed}, 2 workers per actor (8 actors), checkpoints every "
        f"{args.checkpoint_every} steps; a random live actor killed every {args.every[0]:g}-{args.every[1]:g} s of "
        "wall time.  `restart` must reproduce every metrics row of the undisturbed run (rtol 1e-6); `continue` "
        "loses the killed workers' shards; `replace` restarts them from a neighbour's model.",
        "",
        table(results, reference),
    ])
    write_section(ROOT / "benchmarks" / "RESULTS.md", SECTION, section)
    print(section)
    restart = next((r for r in results if r["mode"] == "restart"), None)
    failed = any(r["summary"] is None for r in results) or (
        restart is not None and not same_numbers(restart["rows"], reference))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
