"""A 16-worker run started on a head alone, three times, on Ray's fake multi-node autoscaler
(``cluster/fake-autoscale.yaml``: worker nodes are extra raylets on this machine): each run waits
for the nodes (``--placement-timeout``), succeeds, and the nodes are removed again afterwards.

Opt-in (``RELAY_RAY_FAKE_AUTOSCALER=1``): four extra raylets and three scale-up / scale-down
cycles take ~3 minutes on 2 cores, more than the default suite's budget allows; the result is
recorded in cluster/README.md.
"""

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("RELAY_RAY_FAKE_AUTOSCALER") != "1",
                                 reason="opt-in: RELAY_RAY_FAKE_AUTOSCALER=1 (about 3 minutes)")]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GCS = "127.0.0.1:6390"  # the provider's gcs_address in cluster/fake-autoscale.yaml


def _env(tmp: Path) -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp / "auth_token"),
            "PATH": f"{BIN}:{os.environ['PATH']}"}


def _worker_nodes(env: dict) -> int:
    status = subprocess.run([str(BIN / "ray"), "status", "--address", GCS], capture_output=True, text=True,
                            env=env, timeout=60).stdout
    active = status.split("Active:")[1].split("Pending:")[0] if "Active:" in status else ""
    return sum(int(n) for n in re.findall(r"(\d+) cpu_worker", active))


def _until(predicate, timeout_s: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "timed out"
        time.sleep(2)
    return time.monotonic() - started


@pytest.fixture
def fake_cluster(tmp_path):
    short = Path(f"/tmp/relay-ray-fake-{secrets.token_hex(3)}")  # raylet socket paths must stay short
    short.mkdir()
    (short / "auth_token").write_text(secrets.token_hex(32) + "\n")
    (short / "auth_token").chmod(0o600)
    env = _env(short)
    with open(tmp_path / "head.log", "w") as log:  # the child keeps its own copy of the descriptor
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", "6390",
             "--include-dashboard", "false", "--ray-client-server-port", "6391", "--num-cpus", "0",
             "--object-store-memory", "300000000", "--temp-dir", str(short / "ray"),
             "--autoscaling-config", str(ROOT / "cluster" / "fake-autoscale.yaml")],
            env={**env, "RAY_FAKE_CLUSTER": "1"}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _until(lambda: "Active:" in subprocess.run([str(BIN / "ray"), "status", "--address", GCS],
                                                   capture_output=True, text=True, env=env).stdout, 120)
        yield env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its children, fake nodes included
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(short)], check=False)
        shutil.rmtree(short, ignore_errors=True)


def test_sixteen_workers_from_a_head_alone_three_times(fake_cluster, tmp_path):
    for trial in range(3):
        _until(lambda: _worker_nodes(fake_cluster) == 0, 180)  # the previous trial's nodes are gone
        run = subprocess.run(
            [str(BIN / "relay-ray"), "run", "--address", GCS, "--workers", "16", "--workers-per-actor", "4",
             "--cpus-per-actor", "4", "--dataset", "digits", "--steps", "30", "--placement-timeout", "300",
             "--out", str(tmp_path / f"run{trial}")],
            capture_output=True, text=True, env=fake_cluster, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, f"trial {trial}: {run.stderr[-2000:]}"
        assert "16 workers on 4 actors (4 per actor), 4 CPU each" in run.stderr
        assert (tmp_path / f"run{trial}" / "summary.json").exists()
    _until(lambda: _worker_nodes(fake_cluster) == 0, 180)  # and scaled down after the last one
