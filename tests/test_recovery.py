"""The Ray engine survives: an interrupted driver resumes exactly, a killed worker actor is
restarted from the last checkpoint (or step 0) and the run ends with the undisturbed numbers;
with the default (auto) workers per actor and with all workers in one actor (K = n).

Faults come in through the engine's public seams: an ``on_step`` hook (kill an actor, interrupt or
SIGKILL the driver at a given step) and ``group_cls`` (a worker group whose process dies itself)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import ray

from relay_ray.checkpoint import find_latest, load_worker, worker_header
from relay_ray.config import EngineOptions, RunConfig
from relay_ray.engine import Engine, WorkerFailure
from relay_ray.experiment import build_experiment
from relay_ray.runner import fill_note
from relay_ray.group import WorkerGroup
from relay_ray.simulate import simulate
from tests.test_engine import _at_step, _kill_at

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


def _raise_interrupt(engine):
    raise _Interrupt()


# workers per actor: the default and one actor for all 4 workers (4 CPUs in ray_local: auto = 1 per actor)
KS = {"auto": "auto", "K=n": 4}

# A driver process on the test's Ray instance: the engine the CLI would build, SIGKILLed at step 75.
KILLED_AT_75 = """
import os, signal, sys
from relay_ray.config import EngineOptions, RunConfig
from relay_ray.engine import Engine, connect
connect(sys.argv[1])
config = RunConfig.load(sys.argv[2])
config.out = sys.argv[3]
engine = Engine(config, options=EngineOptions(cpus_per_actor=0.5),
                on_step=lambda engine, step: step == 75 and os.kill(os.getpid(), signal.SIGKILL))
engine.run(progress=False)
"""


def test_sigkilled_ray_driver_resumes_like_an_uninterrupted_run(ray_local, reference, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    out = tmp_path / "run"
    _config("relaysgd", out).dump(tmp_path / "settings.yaml")
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_75, address, str(tmp_path / "settings.yaml"), str(out)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert [r["step"] for r in _rows(out)] == [10, 20, 30, 40, 50, 60, 70]
    resumed = subprocess.run([sys.executable, "-m", "relay_ray", "run", "--resume", str(out), "--address", address,
                              "--quiet"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"relay-ray: resuming {out} from step 60" in resumed.stderr
    ref_rows, ref_params = reference["relaysgd"]
    _assert_close_rows(_rows(out), ref_rows, 1e-6)
    for params, ref in zip(_final_params(_config("relaysgd", out), out), ref_params):
        np.testing.assert_allclose(params, ref, rtol=1e-6, atol=1e-6)


# The CLI driver gets SIGTERM (how Slurm and Kubernetes stop a job) in the middle of step 75.
SIGTERM_AT_75 = """
import os, signal, sys
from relay_ray import cli
from relay_ray.engine import driver
init = driver.Engine.__init__
def with_hook(self, *args, **kwargs):
    kwargs["on_step"] = lambda engine, step: step == 75 and os.kill(os.getpid(), signal.SIGTERM)
    init(self, *args, **kwargs)
driver.Engine.__init__ = with_hook
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_exits_143_with_one_line_and_resumes_like_an_uninterrupted_run(ray_local, reference, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    out = tmp_path / "run"
    _config("relaysgd", out).dump(tmp_path / "settings.yaml")
    runner_fill_note = f"relay-ray: {fill_note(_config('relaysgd', out))}"  # the run's first line (drops)
    stopped = subprocess.run([sys.executable, "-c", SIGTERM_AT_75, "run", "--config", str(tmp_path / "settings.yaml"),
                              "--out", str(out), "--address", address, "--quiet"],
                             capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 143, stopped.stderr
    ours = [line for line in stopped.stderr.splitlines() if line.startswith("relay-ray")]
    assert ours == [runner_fill_note, "relay-ray: terminated (SIGTERM); the newest complete checkpoint is kept "
                    "(continue with --resume)"], stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert [r["step"] for r in _rows(out)] == [10, 20, 30, 40, 50, 60, 70]
    resumed = subprocess.run([sys.executable, "-m", "relay_ray", "run", "--resume", str(out), "--address", address,
                              "--quiet"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"relay-ray: resuming {out} from step 60" in resumed.stderr
    _assert_close_rows(_rows(out), reference["relaysgd"][0], 1e-6)


@pytest.mark.parametrize("k", list(KS))
@pytest.mark.parametrize("algorithm", ["relaysgd", "dsgd"])
def test_interrupted_at_75_resumes_from_60_like_an_uninterrupted_run(ray_local, reference, algorithm, k, tmp_path):
    config = _config(algorithm, tmp_path)
    options = EngineOptions(workers_per_actor=KS[k])
    # step 75: rows up to 70 written, checkpoint 60 the newest
    engine = Engine(config, build_experiment(config), options, on_step=_at_step(75, _raise_interrupt))
    try:
        with pytest.raises(_Interrupt):
            engine.run(progress=False)
    finally:
        engine.shutdown()
    assert [r["step"] for r in _rows(tmp_path)] == [10, 20, 30, 40, 50, 60, 70]

    experiment = build_experiment(config)
    checkpoint, skipped = find_latest(tmp_path, config, experiment.plan)
    assert checkpoint.step == 60 and skipped == []
    engine = Engine(config, experiment, options)
    try:
        summary = engine.run(progress=False, resume=checkpoint)
    finally:
        engine.shutdown()
    ref_rows, ref_params = reference[algorithm]
    _assert_close_rows(_rows(tmp_path), ref_rows, 1e-6)  # row 70 recomputed once, not duplicated
    for params, ref in zip(_final_params(config, tmp_path), ref_params):
        np.testing.assert_allclose(params, ref, rtol=1e-6, atol=1e-6)
    assert summary["final"]["step"] == 100 and summary["restarts"] == 0


def _run_killing_actor(config, options, at_step: int, group: int):
    """Run ``config`` on the engine, killing actor ``group`` once step ``at_step`` is submitted;
    returns the summary and the number of step submissions (replays included)."""
    submitted = []

    def on_step(engine, step):
        submitted.append(step)
        if len(submitted) == at_step:
            ray.kill(engine.actors[group])

    engine = Engine(config, build_experiment(config), options, on_step=on_step)
    try:
        return engine.run(progress=False), len(submitted)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("k", list(KS))
def test_killed_actor_restarts_from_checkpoint_with_the_same_numbers(ray_local, reference, k, tmp_path, capsys):
    config = _config("relaysgd", tmp_path)
    group = 2 if k == "auto" else 0
    summary, submitted = _run_killing_actor(config, EngineOptions(workers_per_actor=KS[k]), at_step=47, group=group)
    notes = [line for line in capsys.readouterr().err.splitlines() if "restarting" in line]
    who = "worker 2 died" if k == "auto" else "workers [0, 1, 2, 3] died"
    assert len(notes) == 1 and who in notes[0] and "from checkpoint step 40" in notes[0], notes
    assert summary["restarts"] == 1
    # found dead within the window of step 47 (at the latest at the evaluation at 50), replayed 40..99
    assert 47 + 60 <= submitted <= 50 + 60, submitted
    _assert_close_rows(_rows(tmp_path), reference["relaysgd"][0], 1e-6)


def _dying_group(rank: int, at_step: int, marker: str):
    """A worker group whose process exits when worker ``rank`` is about to take step ``at_step`` — once:
    the marker file keeps the restarted actor alive (a crash, not a bug that a replay would repeat)."""
    class DyingGroup(WorkerGroup):
        def step(self, has_inbox, *crossing):
            if rank in self.ranks and self.step_count == at_step and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return super().step(has_inbox, *crossing)
    return DyingGroup


def test_crashed_actor_process_without_checkpoints_restarts_from_step_0(ray_local, reference, tmp_path, capsys):
    config = _config("dsgd", tmp_path, checkpoint_every=None)
    group_cls = _dying_group(rank=0, at_step=24, marker=str(tmp_path / "died"))
    engine = Engine(config, build_experiment(config), group_cls=group_cls)
    try:
        summary = engine.run(progress=False)
    finally:
        engine.shutdown()
    notes = [line for line in capsys.readouterr().err.splitlines() if "restarting" in line]
    assert (tmp_path / "died").exists()
    assert len(notes) == 1 and "worker 0 died" in notes[0] and "from step 0 (no checkpoint yet)" in notes[0], notes
    assert summary["restarts"] == 1
    _assert_close_rows(_rows(tmp_path), reference["dsgd"][0], 1e-6)


def test_gives_up_after_max_restarts(ray_local, tmp_path):
    config = _config("relaysgd", tmp_path, checkpoint_every=None, steps=40)
    # the first step of every attempt: this worker never survives
    engine = Engine(config, build_experiment(config), EngineOptions(max_restarts=1),
                    on_step=_kill_at(1, 1))
    try:
        with pytest.raises(WorkerFailure, match=r"worker 1 died .*gave up after 1 restart\(s\) \(--max-restarts 1\)"):
            engine.run(progress=False)
    finally:
        engine.shutdown()
    assert engine.restarts == 1


def _actor_pids_of(ray_tmp) -> list[int]:
    """The worker-group actor processes of the Ray session under ``ray_tmp`` (not of other sessions)."""
    pids = []
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{proc}/cmdline", "rb").read()
            environ = open(f"/proc/{proc}/environ", "rb").read()
        except OSError:
            continue
        if cmdline.startswith(b"ray::GroupActor") and f"RAY_TMPDIR={ray_tmp}".encode() in environ.split(b"\0"):
            pids.append(int(proc))
    return pids


def test_killed_actor_in_a_real_process_leaves_relay_rays_lines_readable(tmp_path):
    """A default-flags CLI run whose worker actor is SIGKILLed after the first evaluation: stdout is
    the summary alone, and the recovery line stands among at most 5 lines that are not relay-ray's
    (Ray's "Unhandled error" blocks go to its session's log folder)."""
    import signal
    import tempfile
    import time
    from pathlib import Path

    ray_tmp = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "relay_ray", "run", "--dataset", "digits", "--epochs", "200",
                                "--eval-every", "100", "--checkpoint-every", "50", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "RAY_TMPDIR": str(ray_tmp),
                                    "PYTHONPATH": str(Path(__file__).parent.parent)})
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        victims = _actor_pids_of(ray_tmp)
        assert victims, "no worker actor of this run found"
        os.kill(victims[0], signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        import shutil
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert process.returncode == 0, stderr
    assert "test_acc_worst" in json.loads(stdout)  # stdout holds the final metrics and nothing else
    assert json.loads((out / "summary.json").read_text())["restarts"] == 1
    lines = stderr.strip().splitlines()
    assert any(line.startswith("relay-ray: ") and "restarting all workers" in line for line in lines), stderr
    others = [line for line in lines if not line.startswith(("relay-ray", "step ", "wrote "))]
    assert len(others) <= 5, stderr
