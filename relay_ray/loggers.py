"""Experiment trackers beside TensorBoard: ``--logger mlflow`` and ``--logger wandb`` (pure; no Ray).

A tracker gets the run's settings once and every evaluation row as scalars (the same numbers as
``metrics.jsonl``), then ``curves.png`` and the summary at the end.  Each tracker run's id is kept in
``OUT/loggers.json`` with the last step it holds, so ``--resume`` continues the *same* tracker run,
and the steps a restart or resume computes again (with the same numbers: restarts and resumes are
exact) are not logged twice.  Where the tracker stores things is the tracker's own setting:
``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME``, ``WANDB_PROJECT`` / ``WANDB_MODE`` (default
project and experiment: ``relay_ray``).

Sweeps use Ray Tune's own MLflow and W&B callbacks instead (``loggers:`` in the sweep file).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

from relay_ray.errors import UserError
from relay_ray.files import write_atomic

LOGGERS = ("mlflow", "wandb")
STATE_FILE = "loggers.json"
DEFAULT_PROJECT = "relay_ray"


def parse_loggers(text: str | list | tuple | None) -> tuple[str, ...]:
    """``"mlflow,wandb"`` (or a list of names) -> ("mlflow", "wandb"); unknown names are one line."""
    if not text:
        return ()
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise UserError(f"unknown --logger {unknown[0]!r}; choose from {', '.join(LOGGERS)} (comma-separated); "
                        "TensorBoard files are always written")
    return tuple(dict.fromkeys(names))


def check_installed(names: tuple[str, ...]) -> None:
    """A tracker whose package is missing is refused before anything starts."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"--logger {name} needs the {name} package, which is not installed: "
                            f"pip install 'relay_ray[{name}]'")


def check_stores(names: tuple[str, ...]) -> None:
    """A tracker that cannot use its store is refused before anything starts (it would fail at the
    first evaluation, leaving half a run): MLflow 3's default store, for one, needs sqlalchemy."""
    if "mlflow" not in names:
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure of the store is the same user-facing problem
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"--logger mlflow: its tracking store {mlflow.get_tracking_uri()} does not work ({why}); set "
                        "MLFLOW_TRACKING_URI to a tracking server (http://HOST:5000), or to file:./mlruns with "
                        "MLFLOW_ALLOW_FILE_STORE=true") from None


def scalars(row: dict) -> dict[str, float]:
    """The numbers of an evaluation row a tracker can plot (everything but the step and the lists)."""
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class MlflowLog:
    """One MLflow run per relay-ray run, through ``MlflowClient`` (no global active run is touched,
    so a notebook's own ``mlflow.start_run`` is left alone)."""

    name = "mlflow"

    def __init__(self, run_name: str, params: dict, run_id: str | None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            from mlflow.entities import Param

            self.client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def record(self, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, row["step"]) for k, v in scalars(row).items()
                                                    if math.isfinite(v)])

    def close(self, status: str, files: list[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "failed": "FAILED"}.get(
            status, "KILLED"))


class WandbLog:
    """One W&B run per relay-ray run; resumed by id."""

    name = "wandb"

    def __init__(self, run_name: str, params: dict, run_id: str | None, directory: Path):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=run_name,
                              config=params, id=run_id, resume="allow" if run_id else None, dir=str(directory),
                              reinit="create_new")
        self.run_id = self.run.id

    def record(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self, status: str, files: list[Path]) -> None:
        import wandb

        for path in files:
            if path.suffix == ".png":
                self.run.log({path.stem: wandb.Image(str(path))})
            else:
                self.run.save(str(path), base_path=str(path.parent), policy="now")
        self.run.finish(exit_code=0 if status == "finished" else 1)


class Trackers:
    """The run's trackers: opened on the first row, each fed only steps it does not hold yet."""

    def __init__(self, names: tuple[str, ...], out_dir: Path, run_name: str, params: dict):
        self.names, self.out_dir, self.run_name, self.params = names, out_dir, run_name, params
        self.state = self._read_state()
        self.open: dict[str, MlflowLog | WandbLog] = {}

    def _read_state(self) -> dict:
        try:
            return json.loads((self.out_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self) -> None:
        write_atomic(self.out_dir / STATE_FILE, json.dumps(self.state, indent=1) + "\n")

    def _tracker(self, name: str):
        if name not in self.open:
            run_id = (self.state.get(name) or {}).get("run_id")
            if name == "mlflow":
                tracker = MlflowLog(self.run_name, self.params, run_id)
            else:
                tracker = WandbLog(self.run_name, self.params, run_id, self.out_dir)
            self.open[name] = tracker
            self.state.setdefault(name, {"run_id": tracker.run_id, "step": -1})["run_id"] = tracker.run_id
            self._write_state()
        return self.open[name]

    def record(self, row: dict) -> None:
        for name in self.names:
            held = (self.state.get(name) or {}).get("step", -1)
            if row["step"] <= held:
                continue  # recomputed after a restart or resume: the tracker has these numbers already
            self._tracker(name).record(row)
            self.state[name]["step"] = row["step"]
            self._write_state()

    def close(self, status: str, files: list[Path] = ()) -> None:
        """``status``: finished, failed (diverged) or killed (interrupted, or a worker failure gave up)."""
        for name in self.names:
            if status != "killed" or name in self.open:
                self._tracker(name).close(status, [f for f in files if f.exists()])
        self.open.clear()
