"""Real Ray Tune sweeps on a private 2-CPU Ray (what the CI machine has)."""

import re

import pandas as pd
import pytest
import yaml

import relay_ray
from relay_ray.errors import UserError
from relay_ray.tune import run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FOUR_TRIALS = {
    "name": "four",
    "base": {"dataset": "digits", "num_workers": 4, "alpha": 0.1, "steps": 60, "eval_every": 20},
    "search": {"algorithm": {"grid_search": ["relaysgd", "dsgd"]}, "lr": {"grid_search": [0.05, 0.1]}},
    "resources": {"cpus_per_trial": 0.8, "driver_cpus": 0.2},
}


@pytest.fixture(scope="module")
def ray_two_cpus():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def write(tmp_path, data, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_four_trial_sweep(ray_two_cpus, tmp_path, capfd, monkeypatch):
    out = tmp_path / "out"
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a real local store, read back below
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweeps")
    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    sweep_file = write(tmp_path, {**FOUR_TRIALS, "loggers": ["mlflow"]})
    swept = relay_ray.sweep(sweep_file, out)  # the Python API; relay-ray's line per trial
    table = swept.table
    assert len(swept.trials) == 4 and swept.path == out
    printed = capfd.readouterr()
    lines = [line for line in printed.err.splitlines() if line.startswith("relay-ray tune: [")]
    assert sorted(line.split("]")[0] for line in lines) == [f"relay-ray tune: [{k}/4" for k in range(1, 5)], lines
    assert all(re.search(r"algorithm=(relaysgd|dsgd), lr=0\.(05|1): test_acc_worst 0\.\d{4} \(\d+s\)$", line)
               for line in lines), lines
    for tune_output in ("Trial status", "Configuration for experiment", "View detailed results"):
        assert tune_output not in printed.out + printed.err  # none of Tune's own tables or banners

    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4
    assert sorted(zip(results["algorithm"], results["lr"])) == [
        ("dsgd", 0.05), ("dsgd", 0.1), ("relaysgd", 0.05), ("relaysgd", 0.1)]
    assert (results["reports"] >= 3).all(), "every trial reports each evaluation (60 steps / 20)"
    assert (results["step"] == 60).all()
    assert results["test_acc_worst"].between(0.5, 1.0).all()
    # each trial ran the real engine and wrote its run files into its own trial directory
    assert len(list((out / "four").glob("*/run/metrics.jsonl"))) == 4
    assert len(list((out / "four").glob("*/run/tensorboard/events.out.tfevents.*"))) >= 4  # TensorBoard too

    best = (out / "best.md").read_text()
    assert "| dsgd | ring | 0.1 |" in best and "| relaysgd | chain tree | 0.1 |" in best
    for algorithm in ("dsgd", "relaysgd"):
        top = results[results["algorithm"] == algorithm]["test_acc_worst"].max()
        assert f"{top:.4g}" in best
    assert table in best
    assert "best lr 0.1 is the grid's upper edge; extend the grid above it" in best  # a 2-point grid has no inside
    assert (out / "sweep.png").stat().st_size > 10_000

    # loggers: [mlflow] -> Tune's MLflow callback: one tracker run per trial with its reported metric
    client = mlflow.tracking.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    assert len(runs) == 4 and {r.data.tags.get("sweep") for r in runs} == {"four"}
    logged = sorted(round(r.data.metrics["test_acc_worst"], 6) for r in runs)
    assert logged == sorted(round(v, 6) for v in results["test_acc_worst"])


def test_sweep_needing_more_cpus_than_the_cluster_fails_fast(ray_two_cpus, tmp_path):
    big = {**FOUR_TRIALS, "base": {**FOUR_TRIALS["base"], "num_workers": 16},
           "resources": {"cpus_per_trial": 8, "driver_cpus": 0.5}}
    with pytest.raises(UserError) as info:
        run_sweep(write(tmp_path, big), tmp_path / "out", progress="none")
    message = str(info.value)
    assert "16 workers" in message and "8 actors x 1 CPU" in message and "8.5 CPUs" in message and "has 2 CPUs" in message and "6.5 short" in message
    assert not (tmp_path / "out" / "sweep.yaml").exists(), "nothing started"


def test_existing_sweep_needs_resume(ray_two_cpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.yaml").write_text("x: 1\n")
    with pytest.raises(UserError, match="already holds a sweep; pass --resume"):
        run_sweep(write(tmp_path, FOUR_TRIALS), out, progress="none")
