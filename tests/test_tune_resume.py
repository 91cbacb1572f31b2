"""An interrupted sweep (its driver SIGKILLed) resumes with --resume: finished trials are not re-run, the
trial that was running continues from its last checkpoint, and every result equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from relay_ray.config import RunConfig
from relay_ray.simulate import simulate

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SWEEP = {
    "name": "interrupted",
    # long enough (~5 s a trial) that the kill lands while the second trial runs, a few s after its checkpoint
    "base": {"dataset": "digits", "num_workers": 4, "alpha": 0.1, "steps": 2000, "eval_every": 250},
    "search": {"algorithm": {"grid_search": ["relaysgd", "dsgd"]}, "lr": {"grid_search": [0.05, 0.1]}},
    "resources": {"cpus_per_trial": 0.8, "driver_cpus": 0.2},
    "max_concurrent_trials": 1,
}


def tune_command(sweep_file: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "relay_ray", "tune", str(sweep_file), "--out", str(out), "--quiet", *extra]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an embedded Ray of its own
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(SWEEP))
    out = tmp_path / "out"
    # its own session, so the kill takes the driver and the Ray processes it started
    first = subprocess.Popen(tune_command(sweep_file, out), env=clean_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finished = []
    try:
        deadline = time.monotonic() + 400
        # kill once the first trial has finished and the second has reported a checkpoint
        while time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
            finished = sorted(out.glob("interrupted/*/run/summary.json"))
            if finished and list(out.glob("interrupted/*_00001_*/checkpoint_*")):
                time.sleep(3)  # Tune records the checkpoint in its experiment state within a second
                break
        assert first.poll() is None and finished, (
            f"the sweep did not reach its second trial's first checkpoint: "
            f"{first.stderr.read().decode()[-2000:] if first.poll() is not None else 'deadline passed'}")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = {p.parent.parent.name: p.read_bytes() for p in out.glob("interrupted/*/run/summary.json")}
    assert 1 <= len(before) < 4, "the kill came while trials were still to run"

    resumed = subprocess.run(tune_command(sweep_file, out, "--resume"), env=clean_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    restored = [json.loads(p.read_text())["from_step"] for p in out.glob("interrupted/*/run/restored.json")]
    assert restored and all(step >= 250 for step in restored), \
        f"the interrupted trial did not continue from its checkpoint: {restored}; {resumed.stderr[-2000:]}"

    after = {p.parent.parent.name: p.read_bytes() for p in out.glob("interrupted/*/run/summary.json")}
    assert len(after) == 4
    for trial, summary in before.items():
        assert after[trial] == summary, f"{trial} finished before the kill and was run again"
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 and (results["step"] == 2000).all()
    for trial in before:
        assert json.loads(after[trial])["final"]["step"] == 2000
    # restored or not, every trial ends where an uninterrupted run of its settings ends
    for row in results.to_dict("records"):
        reference = simulate(RunConfig.from_dict({**SWEEP["base"], "algorithm": row["algorithm"], "lr": row["lr"],
                                                  "backend": "local"}), progress=False)["final"]
        for metric in ("test_acc_worst", "test_acc_avg_model", "consensus_distance"):
            assert abs(row[metric] - reference[metric]) < 1e-5, (row["trial_id"], metric)
