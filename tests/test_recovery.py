"""The Ray engine survives: an interrupted driver resumes exactly, a killed worker actor is
restarted from the last checkpoint (or step 0) and the run ends with the undisturbed numbers."""

import json
import subprocess
import sys

import numpy as np
import pytest

from relay_ray.checkpoint import find_latest, load_worker, worker_header
from relay_ray.config import RunConfig
from relay_ray.engine import RayEngine, WorkerFailure
from relay_ray.experiment import build_experiment
from relay_ray.simulate import simulate

pytestmark = [pytest.mark.ray, pytest.mark.slow]

COMPARED = ("step", "train_loss", "test_acc_mean", "test_acc_worst", "test_acc_avg_model", "consensus_distance",
            "bytes_sent_per_worker", "samples")


def _config(algorithm, out, **overrides):
    layout = dict(tree="chain") if algorithm == "relaysgd" else dict(topology="ring")
    settings = dict(algorithm=algorithm, num_workers=4, dataset="digits", alpha=0.1, model="logreg", steps=100,
                    eval_every=10, checkpoint_every=20, seed=5, lr=0.1, momentum=0.9, drop_prob=0.1, backend="ray",
                    out=str(out), **layout)
    settings.update(overrides)
    return RunConfig(**settings)


def _rows(out):
    return [{k: row.get(k) for k in COMPARED} for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _final_params(config, out):
    experiment = build_experiment(config)
    directory = out / "checkpoints" / "step-00000100"
    return [load_worker(directory, rank, worker_header(config, experiment.plan))["algorithm"]["params"]
            for rank in range(config.num_workers)]


def _assert_close_rows(rows, reference, tol):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for row, ref in zip(rows, reference):
        for key in COMPARED:
            assert row[key] == pytest.approx(ref[key], rel=tol, abs=tol), (row["step"], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 100-step runs on the local backend (the oracle), per algorithm."""
    runs = {}
    for algorithm in ("relaysgd", "dsgd"):
        out = tmp_path_factory.mktemp(f"ref-{algorithm}")
        config = _config(algorithm, out, backend="local")
        simulate(config, progress=False)
        runs[algorithm] = (_rows(out), _final_params(config, out))
    return runs


class _Interrupt(BaseException):
    """Stands in for the driver dying (a real SIGKILL of a driver process: the test below)."""


# A driver process on the test's Ray instance that SIGKILLs itself when it submits step 75.
KILLED_AT_75 = """
import os, signal, sys
from relay_ray import cli
from relay_ray.engine import RayEngine
submit, calls = RayEngine._submit_step, [0]
def dying_submit(self, outboxes):
    calls[0] += 1
    if calls[0] == 76:
        os.kill(os.getpid(), signal.SIGKILL)
    return submit(self, outboxes)
RayEngine._submit_step = dying_submit
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkilled_ray_driver_resumes_like_an_uninterrupted_run(ray_local, reference, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    out = tmp_path / "run"
    flags = ["--algorithm", "relaysgd", "--tree", "chain", "--workers", "4", "--dataset", "digits", "--alpha", "0.1",
             "--model", "logreg", "--steps", "100", "--eval-every", "10", "--checkpoint-every", "20", "--seed", "5",
             "--lr", "0.1", "--momentum", "0.9", "--drop-prob", "0.1", "--cpus-per-worker", "0.5", "--quiet",
             "--address", address]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_75, "run", *flags, "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert [r["step"] for r in _rows(out)] == [10, 20, 30, 40, 50, 60, 70]
    resumed = subprocess.run([sys.executable, "-m", "relay_ray", "run", "--resume", str(out), "--address", address,
                              "--cpus-per-worker", "0.5", "--quiet"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"relay-ray: resuming {out} from step 60" in resumed.stderr
    ref_rows, ref_params = reference["relaysgd"]
    _assert_close_rows(_rows(out), ref_rows, 1e-6)
    for params, ref in zip(_final_params(_config("relaysgd", out), out), ref_params):
        np.testing.assert_allclose(params, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["relaysgd", "dsgd"])
def test_interrupted_at_75_resumes_from_60_like_an_uninterrupted_run(ray_local, reference, algorithm, tmp_path,
                                                                     monkeypatch):
    config = _config(algorithm, tmp_path)
    submit = RayEngine._submit_step
    calls = {"n": 0}

    def dying_submit(self, outboxes):
        calls["n"] += 1
        if calls["n"] == 76:  # step 75: rows up to 70 written, checkpoint 60 the newest
            raise _Interrupt()
        return submit(self, outboxes)

    monkeypatch.setattr(RayEngine, "_submit_step", dying_submit)
    engine = RayEngine(config, build_experiment(config))
    try:
        with pytest.raises(_Interrupt):
            engine.run(progress=False)
    finally:
        engine.shutdown()
    assert [r["step"] for r in _rows(tmp_path)] == [10, 20, 30, 40, 50, 60, 70]
    monkeypatch.setattr(RayEngine, "_submit_step", submit)

    experiment = build_experiment(config)
    checkpoint, skipped = find_latest(tmp_path, config, experiment.plan)
    assert checkpoint.step == 60 and skipped == []
    engine = RayEngine(config, experiment)
    try:
        summary = engine.run(progress=False, resume=checkpoint)
    finally:
        engine.shutdown()
    ref_rows, ref_params = reference[algorithm]
    _assert_close_rows(_rows(tmp_path), ref_rows, 1e-6)  # row 70 recomputed once, not duplicated
    for params, ref in zip(_final_params(config, tmp_path), ref_params):
        np.testing.assert_allclose(params, ref, rtol=1e-6, atol=1e-6)
    assert summary["final"]["step"] == 100 and summary["restarts"] == 0


def _run_killing_actor(ray_local, monkeypatch, config, at_submit: int, actor: int):
    """Run ``config`` on the engine, killing actor ``actor`` at the ``at_submit``-th step submission."""
    submit = RayEngine._submit_step
    calls = {"n": 0}

    def killing_submit(self, outboxes):
        calls["n"] += 1
        if calls["n"] == at_submit:
            ray_local.kill(self.actors[actor])
        return submit(self, outboxes)

    monkeypatch.setattr(RayEngine, "_submit_step", killing_submit)
    engine = RayEngine(config, build_experiment(config))
    try:
        return engine.run(progress=False), calls
    finally:
        engine.shutdown()


def test_killed_actor_restarts_from_checkpoint_with_the_same_numbers(ray_local, reference, tmp_path, monkeypatch,
                                                                     capsys):
    config = _config("relaysgd", tmp_path)
    summary, calls = _run_killing_actor(ray_local, monkeypatch, config, at_submit=47, actor=2)
    notes = [line for line in capsys.readouterr().err.splitlines() if "restarting" in line]
    assert len(notes) == 1 and "worker 2 died" in notes[0] and "from checkpoint step 40" in notes[0], notes
    assert summary["restarts"] == 1
    assert calls["n"] == 50 + 60, calls  # found dead at the evaluation at 50, replayed steps 40..99
    _assert_close_rows(_rows(tmp_path), reference["relaysgd"][0], 1e-6)


def test_killed_actor_without_checkpoints_restarts_from_step_0(ray_local, reference, tmp_path, monkeypatch, capsys):
    config = _config("dsgd", tmp_path, checkpoint_every=None)
    summary, calls = _run_killing_actor(ray_local, monkeypatch, config, at_submit=25, actor=0)
    notes = [line for line in capsys.readouterr().err.splitlines() if "restarting" in line]
    assert len(notes) == 1 and "from step 0 (no checkpoint yet)" in notes[0], notes
    assert summary["restarts"] == 1
    _assert_close_rows(_rows(tmp_path), reference["dsgd"][0], 1e-6)


def test_gives_up_after_max_restarts(ray_local, tmp_path, monkeypatch):
    config = _config("relaysgd", tmp_path, checkpoint_every=None, steps=40)
    submit = RayEngine._submit_step

    def killing_submit(self, outboxes):
        if outboxes is None:  # the first step of every attempt: this worker never survives
            ray_local.kill(self.actors[1])
        return submit(self, outboxes)

    monkeypatch.setattr(RayEngine, "_submit_step", killing_submit)
    engine = RayEngine(config, build_experiment(config), max_restarts=1)
    try:
        with pytest.raises(WorkerFailure, match=r"worker 1 died .*gave up after 1 restart\(s\) \(--max-restarts 1\)"):
            engine.run(progress=False)
    finally:
        engine.shutdown()
    assert engine.restarts == 1
