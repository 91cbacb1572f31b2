"""The real `relay-ray` CLI: bad input is one line and exit 2; runs write their files."""

import json
import subprocess
import sys

import pytest

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
    return root


BAD_INPUTS = [
    (["--algorithm", "sgdx"], "unknown algorithm 'sgdx'"),
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
    (["--dataset", "cifar10", "--data-dir", "{dir}/nowhere"], "put CIFAR-10 there"),
    (["--dataset", "mnist", "--data-dir", "{dir}"], "train-images-idx3-ubyte"),
    (["--tree", "double-binary", "--topology", "ring"], "needs edge"),
    (["--lr-correction", "fast"], "--lr-correction must be auto, none or a number"),
    (["--steps", "10", "--epochs", "1"], "not allowed with argument"),
    (["--topology", "social", "--workers", "16"], "'social' has 32 workers"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(bad_files, args, message, tmp_path):
    args = [a.replace("{dir}", str(bad_files)) for a in args]
    if "--steps" not in args:
        args = ["--steps", "1", *args]
    result = relay_ray("run", "--backend", "local", *args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("relay-ray: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_help_on_every_subcommand():
    for sub in ("run", "compare", "topology", "partition"):
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
