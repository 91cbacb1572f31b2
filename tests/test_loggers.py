"""--logger mlflow / wandb: real local stores (MLflow's file store, W&B offline), read back."""

import json
import sys

import pytest

from relay_ray import cli, simulate

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

KEYS = ("train_loss", "test_acc_worst", "test_acc_mean", "test_acc_avg_model", "consensus_distance",
        "bytes_sent_per_worker")
RUN = ["run", "--backend", "local", "--dataset", "digits", "--workers", "4", "--steps", "20", "--eval-every", "5",
       "--quiet"]


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A real MLflow tracking store in a folder (the file store, which MLflow keeps for local use)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    client = MlflowClient()
    yield client


def _runs(client):
    experiment = client.get_experiment_by_name("tests")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mlflow_holds_every_metric_params_and_figure(mlflow_store, tmp_path):
    out = tmp_path / "run"
    assert cli.main([*RUN, "--logger", "mlflow", "--out", str(out)]) == 0
    (run,) = _runs(mlflow_store)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    rows = _rows(out)
    for key in KEYS:
        history = mlflow_store.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [r["step"] for r in rows]
        assert [m.value for m in history] == pytest.approx([r[key] for r in rows], rel=1e-12)
    assert run.data.params["algorithm"] == "relaysgd" and run.data.params["num_workers"] == "4"
    assert {a.path for a in mlflow_store.list_artifacts(run.info.run_id)} == {"curves.png", "summary.json"}
    assert json.loads((out / "loggers.json").read_text())["mlflow"] == {"run_id": run.info.run_id, "step": 20}


def test_resume_continues_the_same_mlflow_run_without_logging_a_step_twice(mlflow_store, tmp_path, monkeypatch):
    out = tmp_path / "run"
    evaluate = simulate.evaluate

    def interrupted_at_15(workers, metric, step, wall_s):
        if step == 15:
            raise KeyboardInterrupt
        return evaluate(workers, metric, step, wall_s)

    monkeypatch.setattr(simulate, "evaluate", interrupted_at_15)
    assert cli.main([*RUN, "--logger", "mlflow", "--checkpoint-every", "5", "--out", str(out)]) == 130
    (run,) = _runs(mlflow_store)
    assert run.info.status == "KILLED"
    assert [m.step for m in mlflow_store.get_metric_history(run.info.run_id, "train_loss")] == [5, 10]

    monkeypatch.setattr(simulate, "evaluate", evaluate)
    assert cli.main(["run", "--resume", str(out), "--quiet"]) == 0
    (resumed,) = _runs(mlflow_store)  # the same tracker run, finished
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    history = mlflow_store.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [5, 10, 15, 20]
    assert [m.value for m in history] == pytest.approx([r["train_loss"] for r in _rows(out)], rel=1e-12)


def test_wandb_offline_run_holds_the_summary_and_figure(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert cli.main([*RUN, "--logger", "wandb", "--out", str(out)]) == 0
    run_id = json.loads((out / "loggers.json").read_text())["wandb"]["run_id"]
    (offline,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0  # the run's records, for `wandb sync`
    assert json.loads((offline / "files" / "summary.json").read_text()) == json.loads((out / "summary.json").read_text())
    assert list((offline / "files" / "media" / "images").glob("curves_*.png"))


@pytest.mark.parametrize("argv, message", [
    (["--logger", "tensorboard"], "unknown --logger 'tensorboard'; choose from mlflow, wandb"),
    (["--logger", "mlflow"], "--logger mlflow needs the mlflow package, which is not installed: "
                             "pip install 'relay_ray[mlflow]'"),
])
def test_bad_or_missing_logger_is_one_line_before_anything_starts(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: importing it fails
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        cli.main([*RUN, *argv, "--out", str(out)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"relay-ray: error: {message}")
    assert not (out / "config.yaml").exists()


@pytest.mark.parametrize("uri", ["nosuchscheme://tracking", None])
def test_an_unusable_mlflow_store_is_one_line_before_the_run(uri, tmp_path, monkeypatch, capsys):
    """A store MLflow cannot use (an unknown scheme; or, unset, whatever this MLflow's default is, which
    must then work) is refused before anything starts, in one line naming what to set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    if uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    try:
        code = cli.main([*RUN, "--logger", "mlflow", "--out", str(out)])
    except SystemExit as exited:
        code = exited.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "--logger mlflow: its tracking store" in lines[0], lines
        assert "MLFLOW_TRACKING_URI" in lines[0] and not (out / "config.yaml").exists()
    else:
        assert uri is None and code == 0 and (out / "summary.json").exists()  # this MLflow's default store works

