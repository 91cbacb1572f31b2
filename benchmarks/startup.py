"""Where a new user's seconds go: the README quickstart split into phases, and the whole `relay-ray run`
and `relay-ray compare` commands against their training time (the first-hour issue's targets).

Phases (one fresh process, the quickstart's config, embedded Ray): interpreter start, `import torch`,
`import ray`, the rest of relay_ray, `ray.init`, building the experiment (topology, data, shards),
the engine's start (placement group, `ray.put` of the data, actors up), training (with its
evaluations), and stopping the actors and Ray.  Then the real commands in fresh processes:

  run        relay-ray run --dataset digits --workers 16 --alpha 0.01 --algorithm relaysgd
  compare    relay-ray compare --dataset digits --workers 16 --alpha 0.01 --algorithms relaysgd,dsgd,allreduce

"training" is each run's own time (`wall_s` of summary.json: steps and evaluations, the engine's
start excluded).  Targets: run <= 2 x training + 10 s; compare <= 1.5 x the sum of its runs' training + 15 s.

    .venv/bin/python benchmarks/startup.py --repeats 3        # ~2 min on 2 cores

Writes the "Start-up" section of RESULTS.md and prints it.
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

SECTION = "## Start-up (`benchmarks/startup.py`)"
QUICKSTART = ["--dataset", "digits", "--workers", "16", "--alpha", "0.01"]

PHASES_SCRIPT = r"""
import json, sys, time
marks = [("start", time.perf_counter())]
def mark(name): marks.append((name, time.perf_counter()))
import torch; mark("import torch")
import ray; mark("import ray")
from relay_ray.config import EngineOptions, RunConfig
from relay_ray.engine import Engine, driver
from relay_ray.experiment import build_experiment
from relay_ray import cli  # what the CLI imports besides
mark("import relay_ray")
driver.connect(None); mark("ray.init")
config = RunConfig(algorithm="relaysgd", num_workers=16, dataset="digits", alpha=0.01, backend="ray", out=sys.argv[1])
experiment = build_experiment(config); mark("build experiment (topology, data, shards)")
engine = Engine(config, experiment, EngineOptions()); mark("engine start (placement, data put, actors)")
summary = engine.run(progress=False); mark("training (steps + evaluations)")
engine.shutdown(); ray.shutdown(); mark("stop actors and Ray")
print(json.dumps({"marks": marks, "train_s": summary["wall_s"], "actors": engine.shape.num_actors}))
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def phases() -> dict:
    """Seconds per phase of the quickstart in a fresh process; 'interpreter start' is the time
    before its first line runs."""
    with tempfile.TemporaryDirectory() as out:
        started = time.time()
        done = subprocess.run([sys.executable, "-c", f"import time; T0 = time.time()\n{PHASES_SCRIPT}", out],
                              env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
        total = time.time() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    marks = result["marks"]
    spent = {name: t - previous for (_, previous), (name, t) in zip(marks, marks[1:])}
    return {"interpreter start": total - (marks[-1][1] - marks[0][1]), **spent, "total": total}


def command(args: list[str]) -> dict:
    """A real `relay-ray` command in a fresh process: total seconds and each run's training seconds."""
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "relay_ray", *args, "--out", out, "--quiet"], env=_env(),
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        total = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{args}: {done.stderr[-2000:]}")
        summaries = [json.loads(p.read_text()) for p in sorted(Path(out).glob("**/summary.json"))]
    return {"total_s": total, "train_s": [s["wall_s"] for s in summaries],
            "startup_s": [s.get("startup_s") for s in summaries]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    runs = {"phases": [], "run": [], "compare": []}
    for _ in range(args.repeats):
        runs["phases"].append(phases())
        runs["run"].append(command(["run", *QUICKSTART, "--algorithm", "relaysgd"]))
        runs["compare"].append(command(["compare", *QUICKSTART, "--algorithms", "relaysgd,dsgd,allreduce"]))
        print(f"run {runs['run'][-1]['total_s']:.1f} s, compare {runs['compare'][-1]['total_s']:.1f} s",
              file=sys.stderr, flush=True)

    def median(values):
        return sorted(values)[len(values) // 2]

    lines = ["| phase of the quickstart (one process) | s (median) |", "|---|---|"]
    for name in runs["phases"][0]:
        lines.append(f"| {name} | {median([p[name] for p in runs['phases']]):.2f} |")
    lines += ["", "| command | total s (median) | training s | target s | met |", "|---|---|---|---|---|"]
    for name, factor, slack in (("run", 2.0, 10.0), ("compare", 1.5, 15.0)):
        picked = sorted(runs[name], key=lambda r: r["total_s"])[len(runs[name]) // 2]
        train = sum(picked["train_s"])
        target = factor * train + slack
        detail = " + ".join(f"{t:.1f}" for t in picked["train_s"])
        lines.append(f"| `relay-ray {name}` | {picked['total_s']:.1f} | {detail} | {factor:g} x {train:.1f} + "
                     f"{slack:g} = {target:.1f} | {'yes' if picked['total_s'] <= target else 'NO'} |")
    section = "\n".join([
        SECTION, "",
        f"`{command_line('startup.py', argv)}` — {machine()}, load {load_average()}; medians of {args.repeats}.  "
        f"The quickstart is `relay-ray run {' '.join(QUICKSTART)} --algorithm relaysgd`; compare runs relaysgd, "
        "dsgd and allreduce on the same flags in one Ray instance.",
        "", *lines])
    write_section(ROOT / "benchmarks" / "RESULTS.md", SECTION, section)
    print(section)


if __name__ == "__main__":
    main()
