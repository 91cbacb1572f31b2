"""TensorBoard event files beside metrics.jsonl, read back with TensorBoard's own reader."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from relay_ray import cli
from relay_ray.config import RunConfig
from relay_ray.metrics import RunRecorder


def _events(directory):
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_and_compare_write_every_metric(tmp_path):
    assert cli.main(["run", "--backend", "local", "--dataset", "digits", "--workers", "4", "--steps", "20",
                     "--eval-every", "5", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    events = _events(tmp_path / "run" / "tensorboard")
    rows = _rows(tmp_path / "run")
    for key in ("train_loss", "test_acc_worst", "test_acc_mean", "test_acc_avg_model", "consensus_distance",
                "bytes_sent_per_worker"):
        scalars = events.Scalars(f"relay_ray/{key}")
        assert [e.step for e in scalars] == [5, 10, 15, 20]
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6)
    histograms = events.Histograms("relay_ray/metric_per_worker")
    assert [h.step for h in histograms] == [5, 10, 15, 20]
    assert histograms[-1].histogram_value.num == 4  # one value per worker
    assert histograms[-1].histogram_value.min == pytest.approx(rows[-1]["test_acc_worst"])

    assert cli.main(["compare", "--backend", "local", "--dataset", "digits", "--workers", "4", "--steps", "10",
                     "--algorithms", "relaysgd,dsgd", "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    for algorithm in ("relaysgd", "dsgd"):
        assert _events(tmp_path / "cmp" / algorithm / "tensorboard").Scalars("relay_ray/train_loss")


def test_a_run_that_goes_back_to_a_checkpoint_shows_each_step_once(tmp_path):
    config = RunConfig(dataset="quadratics", num_workers=4, steps=6, backend="local", out=str(tmp_path))
    row = {"step": 0, "train_loss": 0.0, "test_acc_mean": None, "metric_per_worker": [1.0, 2.0, 3.0, 4.0]}
    recorder = RunRecorder(tmp_path, config)
    for step in (2, 4, 6):
        recorder.record({**row, "step": step, "train_loss": float(step)})
    recorder.truncate(2)  # a restart from the checkpoint at step 2: steps 4 and 6 are recorded again
    for step in (4, 6):
        recorder.record({**row, "step": step, "train_loss": 10.0 * step})
    recorder.events.close()
    scalars = _events(tmp_path / "tensorboard").Scalars("relay_ray/train_loss")
    assert [(e.step, e.value) for e in scalars] == [(2, 2.0), (4, 40.0), (6, 60.0)]


def test_a_diverging_run_keeps_its_scalars_where_tensorboard_cannot_bin_them(tmp_path):
    # a diverging quadratics run reaches per-worker suboptimality ~1e32: TensorBoard's histogram
    # raises on such values; the run must go on and keep them as scalars
    config = RunConfig(dataset="quadratics", num_workers=2, steps=2, backend="local", out=str(tmp_path))
    recorder = RunRecorder(tmp_path, config)
    recorder.record({"step": 1, "train_loss": 3e30, "metric_per_worker": [1e31, 5e32]})
    recorder.record({"step": 2, "train_loss": 1.0, "metric_per_worker": [1.0, 2.0]})
    recorder.events.close()
    events = _events(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("relay_ray/train_loss")] == [(1, pytest.approx(3e30)), (2, 1.0)]
    assert [h.step for h in events.Histograms("relay_ray/metric_per_worker")] == [2]
