"""Checkpoints on the local backend: a driver killed with SIGKILL resumes bit-identically, a bad
newest checkpoint falls back to the previous one, and foreign or corrupt files are clear errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from relay_ray import checkpoint
from relay_ray.checkpoint import CheckpointStore, find_latest, load_worker, save_worker, worker_header
from relay_ray.config import RunConfig
from relay_ray.errors import UserError
from relay_ray.experiment import build_experiment
from relay_ray.simulate import simulate

RUN = ["--backend", "local", "--workers", "4", "--dataset", "digits", "--alpha", "0.1", "--model", "logreg",
       "--steps", "100", "--eval-every", "10", "--checkpoint-every", "20", "--seed", "5", "--lr", "0.1",
       "--momentum", "0.9", "--drop-prob", "0.1", "--quiet"]
TIMING = ("wall_s", "samples_per_s")

# The driver process kills itself with SIGKILL in the middle of step 75: metrics rows up to 70 and
# checkpoints up to 60 exist, nothing is flushed or cleaned up.
KILLED_AT_75 = """
import os, signal, sys
from relay_ray import cli
from relay_ray.worker import Worker
advance = Worker.advance  # every worker's local step, whichever way its gradient was computed
def dying_advance(self, loss, grad):
    if self.rank == 2 and self.step_count == 75:
        os.kill(os.getpid(), signal.SIGKILL)
    return advance(self, loss, grad)
Worker.advance = dying_advance
sys.exit(cli.main(sys.argv[1:]))
"""


def _config(out, **overrides):
    settings = dict(algorithm="relaysgd", tree="chain", num_workers=4, dataset="digits", alpha=0.1, model="logreg",
                    steps=100, eval_every=10, checkpoint_every=20, seed=5, lr=0.1, momentum=0.9, drop_prob=0.1,
                    backend="local", out=str(out))
    settings.update(overrides)
    return RunConfig(**settings)


def _rows(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _params(config, out, step=100):
    header = worker_header(config, build_experiment(config).plan)
    directory = out / "checkpoints" / checkpoint.step_dirname(step)
    return [load_worker(directory, rank, header)["algorithm"]["params"] for rank in range(config.num_workers)]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,layout", [("relaysgd", ["--tree", "chain"]), ("dsgd", ["--topology", "ring"])])
def test_sigkilled_driver_resumes_bit_identically(algorithm, layout, tmp_path):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_75, "run", *RUN, "--algorithm", algorithm, *layout,
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert [r["step"] for r in _rows(out)] == [10, 20, 30, 40, 50, 60, 70]
    assert not (out / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "relay_ray", "run", "--resume", str(out), "--quiet"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"relay-ray: resuming {out} from step 60" in resumed.stderr

    reference = _config(tmp_path / "ref", algorithm=algorithm,
                        **(dict(tree="chain") if algorithm == "relaysgd" else dict(topology="ring", tree="auto")))
    simulate(reference, progress=False)
    assert _rows(out) == _rows(tmp_path / "ref")  # bit-identical, row 70 once
    for params, ref in zip(_params(reference, out), _params(reference, tmp_path / "ref")):
        assert np.array_equal(params, ref)
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in summary["final"].items() if k not in TIMING} == _rows(tmp_path / "ref")[-1]


def test_checkpointing_does_not_change_the_numbers(tmp_path):
    with_checkpoints = _config(tmp_path / "a", checkpoint_every=7, keep=1)
    without = _config(tmp_path / "b", checkpoint_every=None)
    simulate(with_checkpoints, progress=False)
    simulate(without, progress=False)
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-00000098"]  # --keep 1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 100-step run with checkpoints at 60, 80 and 100 (--keep 3); tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    config = _config(out)
    simulate(config, progress=False)
    return config, out


def _copy(finished_run, tmp_path):
    config, out = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    config = RunConfig(**{**config.to_dict(), "alpha": config.alpha, "out": str(copy)})
    return config, copy


def test_keep_prunes_to_the_newest_three(finished_run):
    _, out = finished_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000060", "step-00000080", "step-00000100"]


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "worker-00001.pt is truncated or altered"),
    ("flip", "worker-00001.pt is corrupt (checksum mismatch)"),
    ("remove", "worker-00001.pt is missing"),
    ("no-manifest", "incomplete (no manifest.json)"),
    ("bad-manifest", "unreadable manifest.json"),
])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(finished_run, tmp_path, damage, reason):
    config, out = _copy(finished_run, tmp_path)
    newest = out / "checkpoints" / "step-00000100"
    target = newest / "worker-00001.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "remove":
        target.unlink()
    elif damage == "no-manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "manifest.json").write_text('{"format": "relay_ray.checkpoint/1", "st')
    found, skipped = find_latest(out, config, build_experiment(config).plan)
    assert found.step == 80
    assert len(skipped) == 1 and skipped[0].startswith("step 100: ") and reason in skipped[0]


def test_cli_resume_from_truncated_newest_says_so_and_ends_like_the_original(finished_run, tmp_path):
    config, out = _copy(finished_run, tmp_path)
    target = out / "checkpoints" / "step-00000100" / "worker-00003.pt"
    target.write_bytes(target.read_bytes()[:1000])
    original = _rows(out)
    result = subprocess.run([sys.executable, "-m", "relay_ray", "run", "--resume", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("relay-ray:")]
    assert notes == ["relay-ray: newest checkpoint(s) unusable (step 100: worker-00003.pt is truncated or altered "
                     f"(1000 of {json.loads((out / 'checkpoints/step-00000100/manifest.json').read_text())['workers'][3]['bytes']} "
                     "bytes)); resuming from the previous one, step 80",
                     "relay-ray: --drop-prob 0.1: RelaySGD fills what a lost message carried with the last message "
                     "received on that edge (--relay-fill auto: the better of current and last in "
                     "benchmarks/drops.py)"], notes
    assert _rows(out) == original
    assert np.array_equal(np.stack(_params(config, out)), np.stack(_params(*finished_run)))


def test_all_checkpoints_unusable_is_a_clear_error(finished_run, tmp_path):
    config, out = _copy(finished_run, tmp_path)
    for directory in (out / "checkpoints").iterdir():
        (directory / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"no usable checkpoint in .*step 100: incomplete.*step 60: incomplete"):
        find_latest(out, config, build_experiment(config).plan)


@pytest.mark.parametrize("change,message", [
    (dict(algorithm="dsgd", tree="auto", topology="chain"), "algorithm 'relaysgd' there, 'dsgd' here"),
    (dict(num_workers=6), "num_workers 4 there, 6 here"),
    (dict(tree="double-binary"), "tree 'chain' there, 'double-binary' here"),
    (dict(lr=0.2), "lr 0.1 there, 0.2 here"),
])
def test_checkpoint_of_another_run_is_a_clear_error(finished_run, change, message):
    config, out = finished_run
    other = RunConfig(**{**config.to_dict(), "alpha": config.alpha, **change})
    with pytest.raises(UserError, match="belongs to another run: .*" + message.replace("(", r"\(")):
        find_latest(out, other, build_experiment(other).plan)


def test_backend_and_checkpoint_cadence_may_change_on_resume(finished_run):
    config, out = finished_run
    other = RunConfig(**{**config.to_dict(), "alpha": config.alpha, "backend": "ray", "checkpoint_every": 5,
                         "keep": 1})
    assert find_latest(out, other, build_experiment(other).plan)[0].step == 100


def test_worker_file_is_checked_and_loaded_weights_only(tmp_path):
    state = {"params": np.arange(5, dtype=np.float32), "nested": [(np.zeros(2, np.int64), 3)],
             "generator": torch.Generator().manual_seed(1).get_state(), "scalar": np.float64(0.5), "none": None}
    header = {"algorithm": "relaysgd", "num_workers": 4, "plan": "abc"}
    record = save_worker(tmp_path, 2, header, state)
    assert record["file"] == "worker-00002.pt" and record["bytes"] == (tmp_path / "worker-00002.pt").stat().st_size
    loaded = load_worker(tmp_path, 2, header)
    assert np.array_equal(loaded["params"], state["params"]) and loaded["params"].dtype == np.float32
    assert isinstance(loaded["nested"][0], tuple) and loaded["nested"][0][0].dtype == np.int64
    assert torch.equal(loaded["generator"], state["generator"]) and loaded["scalar"] == 0.5
    with pytest.raises(UserError, match="written by another run: algorithm 'relaysgd' there, 'dsgd' here"):
        load_worker(tmp_path, 2, {**header, "algorithm": "dsgd"})
    (tmp_path / "worker-00003.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load checkpoint file .*worker-00003.pt"):
        load_worker(tmp_path, 3, header)
    torch.save({"format": checkpoint.WORKER_FORMAT, "rank": 1, "state": np.ones(3)}, tmp_path / "worker-00001.pt")
    with pytest.raises(UserError, match="cannot load checkpoint file"):  # a pickled numpy object: refused
        load_worker(tmp_path, 1, header)


def test_commit_writes_the_manifest_last_and_prunes(tmp_path):
    config = _config(tmp_path, keep=2)
    plan = build_experiment(config).plan
    store = CheckpointStore.for_run(config, plan)
    for step in (10, 20, 30):
        directory = store.begin(step)
        records = [save_worker(directory, r, worker_header(config, plan), {"x": np.zeros(1)}) for r in range(4)]
        assert not (directory / "manifest.json").exists()
        store.commit(step, records, wall_s=1.0)
    store.begin(40)  # a checkpoint the driver died writing: never complete
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000020", "step-00000030", "step-00000040"]
    assert find_latest(tmp_path, config, plan)[0].step == 30
