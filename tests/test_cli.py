"""The real `relay-ray` CLI: bad input is one line and exit 2; runs write their files."""

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from relay_ray import cli
from relay_ray.config import RunConfig
from relay_ray.errors import Diverged
from relay_ray.simulate import simulate

SHARED_MNIST = "../shared/data/mnist"


def relay_ray(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "relay_ray", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("topologies")
    (root / "disconnected.txt").write_text("0 1\n2 3\n")
    (root / "malformed.txt").write_text("# a comment\n0 1\n1 two\n")
    (root / "out_of_range.txt").write_text("0 1\n1 7\n")
    (root / "duplicate.txt").write_text("0 1\n1 2\n2 3\n# ring closes\n1 0\n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00 1\n")
    (root / "broken.yaml").write_text("steps: [1, 2\n")
    (root / "list.yaml").write_text("- relaysgd\n- dsgd\n")
    (root / "unknown_key.yaml").write_text("algorithm: relaysgd\nstepz: 10\n")
    (root / "wrong_type.yaml").write_text("algorithm: relaysgd\nsteps: abc\n")
    (root / "bad_value.yaml").write_text("algorithm: relaysgd\ndrop_prob: 2.0\n")
    (root / "garbage.tar.gz").write_bytes(b"not a tar archive")
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a directory\n")
    # run directories for --resume: one with checkpoints, one whose every checkpoint lost its manifest,
    # one without checkpoints, one with an unreadable config.yaml
    good = RunConfig(algorithm="relaysgd", dataset="quadratics", num_workers=4, steps=4, eval_every=2,
                     checkpoint_every=2, seed=3, backend="local", out=str(root / "run"))
    simulate(good, progress=False)
    shutil.copytree(root / "run", root / "run_corrupt")
    for manifest in (root / "run_corrupt" / "checkpoints").glob("*/manifest.json"):
        manifest.unlink()
    shutil.copytree(root / "run", root / "run_no_checkpoints")
    shutil.rmtree(root / "run_no_checkpoints" / "checkpoints")
    shutil.copytree(root / "run", root / "run_bad_config")
    (root / "run_bad_config" / "config.yaml").write_text("algorithm: [relaysgd\n")
    return root


BAD_INPUTS = [
    (["--algorithm", "sgdx"], "unknown algorithm 'sgdx'"),
    (["--algorithm", "relaysgd", "--topology", "exponential-one-peer"], "changes with the step; relaysgd needs"),
    (["--algorithm", "d2", "--local-steps", "4"], "--local-steps > 1 is for"),
    (["--algorithm", "btpp", "--topology", "ring"], "btpp's 2-ary tree needs edge 0-2"),
    (["--topology", "hypercube"], "unknown topology 'hypercube'"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--workers", "1"], "at least 2"),
    (["--alpha", "0"], "--alpha must be > 0"),
    (["--alpha", "-1"], "--alpha must be > 0"),
    (["--alpha", "abc"], "invalid alpha 'abc'"),
    (["--topology-file", "{dir}/disconnected.txt"], "disconnected"),
    (["--topology-file", "{dir}/malformed.txt"], "malformed.txt:3: malformed edge line '1 two'"),
    (["--topology-file", "{dir}/out_of_range.txt", "--workers", "4"], "node id 7 out of range"),
    (["--topology-file", "{dir}/missing.txt"], "does not exist"),
    (["--topology-file", "{dir}/duplicate.txt"], "duplicate.txt:5: edge 1 0 repeats line 1 (edges are undirected)"),
    (["--topology-file", "/dev/zero"], "topology file /dev/zero is not a regular file"),
    (["--topology-file", "{dir}/empty"], "is a directory"),
    (["--topology-file", "{dir}/binary.txt"], "is not a text file"),
    (["--dataset", "cifar10", "--data-dir", "{dir}/nowhere"], "put CIFAR-10 there"),
    (["--dataset", "mnist", "--data-dir", "{dir}"], "train-images-idx3-ubyte"),
    (["--tree", "double-binary", "--topology", "ring"], "needs edge"),
    (["--lr-correction", "fast"], "--lr-correction must be auto, none or a number"),
    (["--steps", "10", "--epochs", "1"], "not allowed with argument"),
    (["--topology", "social", "--workers", "16"], "'social' has 32 workers"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    # reliability flags (issue #7)
    (["--drop-prob", "1.5"], "--drop-prob must be in [0, 1), got 1.5"),
    (["--drop-prob", "-0.1"], "--drop-prob must be in [0, 1), got -0.1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be > 0, got 0"),
    (["--keep", "0"], "--keep must be at least 1, got 0"),
    (["--max-restarts", "-1"], "--max-restarts must be >= 0, got -1"),
    (["--max-restarts", "two"], "argument --max-restarts: invalid int value: 'two'"),
    # engine flags are checked before Ray starts
    (["--window", "0"], "--window must be >= 1, got 0"),
    (["--cpus-per-actor", "0"], "--cpus-per-actor must be > 0, got 0.0"),
    (["--cpus-per-worker", "1"], "unrecognized arguments: --cpus-per-worker"),
    (["--workers-per-actor", "two"], "--workers-per-actor must be auto or an integer, got 'two'"),
    (["--workers-per-actor", "0"], "--workers-per-actor must be >= 1, got 0"),
    (["--eval-every", "0"], "--eval-every must be > 0, got 0"),
    (["--transport", "gloo", "--on-failure", "replace"], "--transport gloo works with --on-failure restart only"),
    (["--transport", "mpi"], "argument --transport: invalid choice: 'mpi'"),
    (["--tensors", "jax"], "argument --tensors: invalid choice: 'jax'"),
    (["--worker-batching", "threads"], "argument --worker-batching: invalid choice: 'threads'"),
    # non-finite numbers (issue #13)
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--momentum", "nan"], "--momentum must be a finite number, got nan"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["--decay-at", "0.5", "nan"], "--decay-at must be a finite number, got nan"),
    (["--lr-correction", "inf"], "--lr-correction must be auto, none or a finite number, got inf"),
    (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
    # run directories (issue #13)
    (["--out", ""], "--out is empty; give an output directory"),
    (["--out", "{dir}/a_file"], "--out {dir}/a_file is a file, not a directory"),
    (["--out", "{dir}/run"], "--out {dir}/run already holds a run; give --resume {dir}/run to continue it, "
                             "--overwrite to replace it, or another --out"),
    (["--out", "/proc/relay-ray-run"], "--out /proc/relay-ray-run: cannot write there"),
    (["--seed", "-1"], "--seed must be in [0, 2^31), got -1"),
    (["--resume", "{dir}/run", "--overwrite"], "give --resume (continue the run) or --overwrite (replace it), not both"),
    # the paper's protocol (issue #18)
    (["--relay-fill", "zero"], "argument --relay-fill: invalid choice: 'zero'"),
    (["--algorithm", "dsgd", "--relay-fill", "last"], "--relay-fill is RelaySGD's fill rule; dsgd has none"),
    (["--partition", "groups"], "argument --partition: invalid choice: 'groups'"),
    (["--final-evals", "0"], "--final-evals must be >= 1, got 0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0, got -1.0"),
    (["--warmup-epochs", "1", "--warmup-steps", "5"], "not allowed with argument"),
    # data directories
    (["--dataset", "cifar10", "--data-dir", "{dir}/garbage.tar.gz"], "garbage.tar.gz is not a tar archive"),
    (["--dataset", "cifar10", "--data-dir", "{dir}/empty"], "empty has neither cifar-10-batches-py/"),
    # run YAML (--config)
    (["--config", "{dir}/broken.yaml"], "cannot read run config {dir}/broken.yaml"),
    (["--config", "{dir}/list.yaml"], "run config {dir}/list.yaml must be a mapping of settings, got list"),
    (["--config", "{dir}/unknown_key.yaml"], "unknown run setting(s): stepz"),
    (["--config", "{dir}/wrong_type.yaml"], "setting steps must be an integer, got 'abc'"),
    (["--config", "{dir}/bad_value.yaml"], "--drop-prob must be in [0, 1), got 2.0"),
    (["--config", "{dir}/missing.yaml"], "--config {dir}/missing.yaml does not exist"),
    # --resume directories
    (["--resume", "{dir}/nowhere"], "--resume {dir}/nowhere does not exist"),
    (["--resume", "{dir}/empty"], "--resume {dir}/empty has no config.yaml"),
    (["--resume", "{dir}/run_no_checkpoints"], "no checkpoint in {dir}/run_no_checkpoints/checkpoints"),
    (["--resume", "{dir}/run_corrupt"], "no usable checkpoint in {dir}/run_corrupt/checkpoints: step 4: incomplete"),
    (["--resume", "{dir}/run_bad_config"], "cannot read run config {dir}/run_bad_config/config.yaml"),
    (["--resume", "{dir}/run", "--algorithm", "dsgd"], "belongs to another run: algorithm 'relaysgd' there, 'dsgd'"),
    (["--resume", "{dir}/run", "--workers", "8"], "belongs to another run: num_workers 4 there, 8 here"),
    (["--resume", "{dir}/run", "--seed", "0"], "seed 3 there, 0 here"),  # a flag given is an override, even = default
    (["--resume", "{dir}/run", "--out", "{dir}/elsewhere"], "drop --out {dir}/elsewhere"),
    (["--resume", "{dir}/run", "--config", "{dir}/run/config.yaml"], "give --config or --resume, not both"),
    # plan before start (issue #13): refused before the topology is built, the data loaded or Ray started
    (["--workers", "100000"], "--workers 100000: at most 4096 workers; the topology statistics use dense"),
    (["--workers", "20000"], "--workers 20000: at most 4096 workers"),
    (["--workers", "2000", "--workers-per-actor", "1"], "2000 workers on 2000 actors (1 per actor) need ~"),
    (["--dataset", "cifar10", "--model", "vgg11", "--workers", "4096"], "per worker for vgg11 with 9,750,922 parameters"),
    pytest.param(["--device", "cuda"], "--device cuda, but torch sees no GPU on this machine", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="--device cuda is refused only where torch sees no GPU")),
    # TEST-NET-1 (RFC 5737): nobody answers; the message (not a timer) shows it came from the 2 s TCP check
    (["--address", "192.0.2.1:6379"], "cannot reach Ray at 192.0.2.1:6379: "),
]


def _row_args(row) -> list[str]:
    return row.values[0] if isinstance(row, type(pytest.param())) else row[0]


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if anything starts or attaches to Ray."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.setattr(ray, "init", refuse)
    yield
    assert not ray.is_initialized()


def test_compare_runs_an_algorithm_on_its_own_topologies(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--algorithms", "dsgd@ring,dsgd@exponential-one-peer,btpp", "--dataset",
                     "quadratics", "--steps", "8", "--backend", "local", "--quiet", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| dsgd@ring | ring |" in table and "| dsgd@exponential-one-peer | exponential-one-peer |" in table
    assert "| btpp | 2-ary tree |" in table
    for label in ("dsgd@ring", "dsgd@exponential-one-peer", "btpp"):
        assert json.loads((out / label / "summary.json").read_text())["steps"] == 8
    # a named --out holding a comparison is refused; --overwrite replaces it, stale run files included
    again = ["compare", "--algorithms", "btpp", "--dataset", "quadratics", "--steps", "6", "--backend", "local",
             "--quiet", "--out", str(out)]
    with pytest.raises(SystemExit) as refused:
        cli.main(again)
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and err.splitlines() == [f"relay-ray: error: --out {out} already holds a "
                                                            "comparison; give --overwrite to replace it, or another --out"]
    (out / "btpp" / "checkpoints" / "step_99").mkdir(parents=True)
    assert cli.main([*again, "--overwrite"]) == 0
    assert json.loads((out / "btpp" / "summary.json").read_text())["steps"] == 6
    assert not (out / "btpp" / "checkpoints").exists()


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(_row_args(row)) for row in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(bad_files, args, message, tmp_path, capsys, no_ray):
    """Through the real CLI entry point (``main``) on the Ray backend: exit 2, one line naming the
    bad value, no traceback, Ray never started (the no_ray fixture)."""
    args = [a.replace("{dir}", str(bad_files)) for a in args]
    message = message.replace("{dir}", str(bad_files))
    if "--resume" not in args:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "run")]
        if "--steps" not in args and "--config" not in args:
            args = ["--steps", "1", *args]
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", *args])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("relay-ray: error: ")
    assert message in lines[0]
    assert "Traceback" not in err


def _address_space_limit(limit_bytes: int):
    """For a subprocess: past ``limit_bytes`` an allocation fails (MemoryError), so a check that went
    missing fails the test instead of swapping or OOM-killing the machine."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def test_bad_input_in_a_real_process_starts_no_ray(bad_files):
    """A few of the table's rows as real processes: still one line, and no Ray session directory
    appears under the private RAY_TMPDIR."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    # a previous run in the default --out: a bad input must neither replace it nor say it will
    shutil.copytree(bad_files / "run", ray_tmp.parent / f"{ray_tmp.name}-cwd" / "runs" / "latest")
    cwd = ray_tmp.parent / f"{ray_tmp.name}-cwd"
    try:
        for args in (["run", "--window", "0"], ["run", "--drop-prob", "1.5"],
                     ["run", "--resume", f"{bad_files}/run", "--workers", "8"],
                     # unchecked, these grew to 24 GB (OOM-killed) and printed 16 lines of Ray's retries
                     ["run", "--workers", "100000"], ["run", "--address", "192.0.2.1:6379"],
                     ["topology", "--workers", "100000"]):
            result = subprocess.run([sys.executable, "-m", "relay_ray", *args], capture_output=True, text=True,
                                    timeout=600, cwd=cwd, env={**__import__("os").environ, "RAY_TMPDIR": str(ray_tmp),
                                                               "PYTHONPATH": str(Path(__file__).parent.parent)},
                                    preexec_fn=_address_space_limit(8 * 2 ** 30))
            assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert list(ray_tmp.iterdir()) == [], list(ray_tmp.iterdir())
            assert (cwd / "runs" / "latest" / "summary.json").exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(cwd, ignore_errors=True)


def test_help_on_every_subcommand():
    for sub in ("run", "compare", "topology", "partition"):  # tune: tests/test_tune.py
        result = relay_ray(sub, "--help")
        assert result.returncode == 0 and "usage: relay-ray " + sub in result.stdout


def test_run_local_writes_metrics(tmp_path):
    out = tmp_path / "run"
    result = relay_ray("run", "--backend", "local", "--dataset", "digits", "--workers", "4", "--steps", "20",
                       "--eval-every", "10", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    for key in ("step", "train_loss", "test_acc_mean", "test_acc_worst", "test_acc_avg_model", "consensus_distance",
                "bytes_sent_per_worker", "wall_s"):
        assert key in rows[-1]
    assert 0 < rows[-1]["test_acc_worst"] <= rows[-1]["test_acc_mean"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["step"] == 20 and summary["steps"] == 20
    assert (out / "config.yaml").exists() and (out / "curves.png").stat().st_size > 0
    assert "step 20/20" in result.stderr  # plain progress lines when not on a terminal


def test_run_quadratics_reports_suboptimality(tmp_path):
    result = relay_ray("run", "--backend", "local", "--dataset", "quadratics", "--steps", "200", "--quiet",
                       "--out", str(tmp_path / "q"))
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout)
    assert final["suboptimality"] >= 0 and final["test_acc_mean"] is None


def test_topology_json():
    result = relay_ray("topology", "--tree", "chain", "--workers", "16", "--json")
    stats = json.loads(result.stdout)
    assert {"num_workers", "diameter", "max_degree", "spectral_gap", "lr_correction", "tree_edges"} <= set(stats)
    assert stats["diameter"] == 15 and abs(stats["lr_correction"] - 5.375) < 1e-9


@pytest.mark.parametrize("topology,period,rate", [("exponential-one-peer", 4, "0.0000"),
                                                   ("exponential-directed", 1, "0.6000")])
def test_topology_reports_the_changing_and_directed_graphs(topology, period, rate, capsys):
    """The graphs only gossip algorithms take: their period and consensus rate (in process: the CLI entry)."""
    assert cli.main(["topology", "--topology", topology, "--workers", "16"]) == 0
    out = capsys.readouterr().out
    assert f"period         {period}  " in out and f"consensus_rate {rate}  " in out
    assert "lr_correction" not in out  # the relays refuse these graphs


@pytest.mark.parametrize("args", [["--workers", "100000"], ["--workers", "4097", "--topology", "ring"]])
def test_topology_refuses_more_workers_than_its_statistics_handle(args, capsys):
    """Refused before any graph exists (n x n matrices, O(n^3)); 4096 itself is computed (~50 s here)."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["topology", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"relay-ray: error: --workers {args[1]}: at most 4096 workers")


def test_topology_and_partition_plots(tmp_path):
    result = relay_ray("topology", "--topology", "social", "--tree", "bfs", "--plot", str(tmp_path / "t.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t.png").stat().st_size > 0
    result = relay_ray("partition", "--dataset", "digits", "--workers", "16", "--alpha", "0.01", "--plot",
                       str(tmp_path / "p.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p.png").stat().st_size > 0
    table = result.stdout.strip().splitlines()[1:]
    assert len(table) == 16
    classes_per_worker = [int(line.split()[2]) for line in table]
    assert sum(c <= 3 for c in classes_per_worker) > 8
    paper = relay_ray("partition", "--dataset", "digits", "--workers", "16", "--alpha", "0.01", "--partition",
                      "paper", "--plot", str(tmp_path / "paper.png"))
    assert paper.returncode == 0, paper.stderr
    assert paper.stdout != result.stdout and len(paper.stdout.strip().splitlines()) == 17
    assert (tmp_path / "paper.png").stat().st_size > 0


def test_paper_protocol_flags_reach_the_run(tmp_path):
    """--warmup-epochs, --final-evals, --partition paper and --relay-fill through the real CLI."""
    out = tmp_path / "run"
    result = relay_ray("run", "--backend", "local", "--dataset", "digits", "--workers", "4", "--epochs", "4",
                       "--eval-every", "1000", "--warmup-epochs", "1", "--final-evals", "2", "--partition", "paper",
                       "--drop-prob", "0.1", "--tree", "double-binary", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == (
        "relay-ray: --drop-prob 0.1: RelaySGD fills what a lost message carried with the last message received on "
        "that edge (--relay-fill auto: the better of current and last in benchmarks/drops.py)")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    total = rows[-1]["step"]
    assert [r["step"] for r in rows] == [total - round(0.02 * total), total]  # the last 2, 1/50 of the run apart
    final = json.loads(result.stdout)
    per_worker = np.mean([r["metric_per_worker"] for r in rows], axis=0)
    assert final["final_evals"]["test_acc_worst"] == pytest.approx(per_worker.min())
    assert final["final_evals"]["test_acc_mean"] == pytest.approx(per_worker.mean())
    assert "metric_per_worker" not in final  # 16+ numbers per row stay in metrics.jsonl
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["partition"] == "paper" and saved["warmup_epochs"] == 1.0 and saved["relay_fill"] == "auto"


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_divergence_stops_the_run_with_exit_3_and_keeps_the_good_checkpoint(backend, tmp_path):
    """--lr 1e9 used to print `loss nan` to the end and exit 0 (issue #13)."""
    out = tmp_path / "run"
    result = relay_ray("run", "--backend", backend, "--dataset", "digits", "--workers", "4", "--steps", "40",
                       "--eval-every", "10", "--checkpoint-every", "10", "--lr", "1e9", "--quiet", "--out", str(out))
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("relay-ray: error")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(r"relay-ray: error: diverged at step 10 on worker \d: loss nan; lower --lr", errors[0]), errors
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10] and rows[0]["diverged"]["what"] == "loss"
    assert json.loads((out / "summary.json").read_text())["diverged"] == errors[0].removeprefix("relay-ray: error: ")
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # no NaN checkpoint


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")  # the divergence itself
def test_a_diverged_checkpoint_is_never_committed(tmp_path):
    """Between evaluations, a checkpoint of a non-finite model is refused: the previous one stays newest."""
    config = RunConfig(algorithm="relaysgd", num_workers=4, dataset="quadratics", steps=60, eval_every=60,
                       checkpoint_every=10, lr=100.0, backend="local", out=str(tmp_path / "run"))
    with pytest.raises(Diverged, match=r"diverged by step \d+ on worker \d: model or loss not finite; lower --lr"):
        simulate(config, progress=False)
    from relay_ray.checkpoint import find_latest, load_worker, worker_header
    from relay_ray.experiment import build_experiment

    plan = build_experiment(config).plan
    latest, skipped = find_latest(tmp_path / "run", config, plan)
    assert latest.step >= 10 and not skipped
    for rank in range(4):
        assert np.isfinite(load_worker(latest.directory, rank, worker_header(config, plan))["algorithm"]["params"]).all()


def test_two_runs_into_one_out_the_second_is_refused(tmp_path):
    """The first run holds OUT/.lock for its whole length; its files stay intact (issue #13)."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "relay_ray", "run", "--backend", "local", "--dataset", "digits",
                              "--workers", "4", "--steps", "3000", "--eval-every", "100", "--quiet", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # wait until the first run holds the lock and has written a row
            if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text():
                break
            time.sleep(0.1)
        second = relay_ray("run", "--backend", "local", "--dataset", "digits", "--workers", "4", "--steps", "20",
                           "--quiet", "--out", str(out))
        assert second.returncode == 2
        assert second.stderr.strip() == (f"relay-ray: error: --out {out} is in use by a running relay-ray (pid "
                                         f"{first.pid} on {socket.gethostname()}); wait for it or pick another --out "
                                         f"(a lock left by a killed run on another host: remove {out}/.lock)")
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err
    finally:
        first.kill()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(100, 3001, 100))  # one run's rows, in order
    assert json.loads((out / "summary.json").read_text())["steps"] == 3000
    assert not (out / ".lock").exists()


def test_a_stale_lock_is_taken_over_and_the_default_out_is_replaced(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    result = relay_ray("run", "--backend", "local", "--dataset", "quadratics", "--steps", "20", "--quiet",
                       "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert not (out / ".lock").exists() and (out / "summary.json").exists()
    # --overwrite replaces a finished run; the default --out is replaced with a note
    again = relay_ray("run", "--backend", "local", "--dataset", "quadratics", "--steps", "10", "--quiet",
                      "--eval-every", "5", "--out", str(out), "--overwrite")
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [5, 10]
    for _ in range(2):
        default = subprocess.run([sys.executable, "-m", "relay_ray", "run", "--backend", "local", "--dataset",
                                  "quadratics", "--steps", "10", "--quiet"], capture_output=True, text=True,
                                 cwd=tmp_path, timeout=600)
        assert default.returncode == 0, default.stderr
    assert default.stderr.splitlines()[0] == "relay-ray: replacing the previous run in runs/latest (the default --out)"


def test_out_in_a_config_file_is_honoured(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset: quadratics\nsteps: 10\nout: {tmp_path / 'from_yaml'}\n")
    result = subprocess.run([sys.executable, "-m", "relay_ray", "run", "--backend", "local", "--config", str(config),
                             "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from_yaml" / "summary.json").exists() and not (tmp_path / "runs").exists()
    moved = relay_ray("run", "--backend", "local", "--config", str(config), "--quiet", "--out", str(tmp_path / "flag"))
    assert moved.returncode == 0, moved.stderr
    assert (tmp_path / "flag" / "summary.json").exists()


def test_flags_the_run_does_not_use_are_named_once_and_the_run_goes_on(tmp_path, capsys):
    assert cli.main(["run", "--backend", "local", "--dataset", "digits", "--data-dir", str(tmp_path),
                     "--algorithm", "dsgd", "--tree", "chain", "--window", "2", "--heterogeneity", "3",
                     "--consensus-lr", "0.3", "--placement-timeout", "30",
                     "--workers", "4", "--steps", "4", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("relay-ray: note:")]
    assert notes == [
        "relay-ray: note: --data-dir is not used by --dataset digits (it needs no files) (ignored)",
        "relay-ray: note: --heterogeneity applies to --dataset quadratics only; use --alpha for a data split (ignored)",
        "relay-ray: note: --tree applies to relay algorithms only, not --algorithm dsgd (ignored)",
        "relay-ray: note: --consensus-lr applies to --algorithm choco only, not --algorithm dsgd (ignored)",
        "relay-ray: note: --window applies to --backend ray only (ignored)",
        "relay-ray: note: --placement-timeout applies to --backend ray only (ignored)",
    ]
    assert cli.main(["run", "--backend", "local", "--dataset", "quadratics", "--algorithm", "relaysgd", "--tree",
                     "chain", "--workers", "4", "--steps", "4", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert "note:" not in capsys.readouterr().err  # every flag given is used
