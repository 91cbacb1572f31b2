"""The job path for real: a head node started with `ray start --head` on 127.0.0.1 with token
authentication, a `relay-ray run` submitted with the `ray job submit` CLI, its metrics checked.

The head gets a fresh temp dir and free ports and every command names its address explicitly, so
the test never talks to another Ray cluster on the machine; teardown stops exactly the processes
it started, by PID (never `ray stop`).
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
HEAD_CPUS = 3


def _free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _processes():
    """{pid: (ppid, state, cmdline)} from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        table[int(entry)] = (int(ppid), state, cmd)
    return table


def _head_processes(root_pid, temp_dir, gcs_port):
    """The live processes of our head: `ray start`'s descendants, anything naming our temp dir,
    and the client server (it names the head's port, not the temp dir)."""
    table = _processes()
    me = {os.getpid(), os.getppid()}
    ours = {root_pid} if root_pid in table else set()
    ours |= {pid for pid, (_, _, cmd) in table.items()
             if temp_dir in cmd or ("ray.util.client.server" in cmd and f":{gcs_port} " in cmd + " ")}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in ours} - ours
        ours |= children
        grew = bool(children)
    return {pid for pid in ours - me if table.get(pid, (0, "Z", ""))[1] != "Z"}


def _stop(pids, grace_s=10.0):
    """SIGTERM, then SIGKILL what is still there (gcs_server and raylet can outlive SIGTERM)."""
    for pid in pids:
        with _suppress():
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            with _suppress():
                os.kill(pid, signal.SIGKILL)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, ProcessLookupError)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Head:
    def __init__(self, dashboard_url, env, temp_dir):
        self.dashboard_url, self.env, self.temp_dir = dashboard_url, env, temp_dir

    def ray(self, *args, env=None, timeout=120):
        return subprocess.run([RAY, *args], env=env or self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def token_head():
    # A short temp dir (it holds unix sockets, whose paths are length-limited), not the default /tmp/ray.
    temp_dir = tempfile.mkdtemp(prefix="rr-job-", dir="/tmp")
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    gcs, dashboard, client, agent = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS from outside
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # the job's `relay-ray` is this venv's
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--num-cpus", str(HEAD_CPUS), "--temp-dir", temp_dir],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    started = Head(f"http://127.0.0.1:{dashboard}", env, temp_dir)
    started.gcs_port = gcs
    try:
        # ready = the job API answers (right after start it may say "No available agent")
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start exited: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}"
            if started.ray("job", "list", "--address", started.dashboard_url, timeout=60).returncode == 0:
                break
            assert time.monotonic() < deadline, "the head's job API did not come up within 120 s"
            time.sleep(1)
        yield started
    finally:
        # Rounds, not one snapshot: a worker the raylet forks while we stop it is not in the first
        # list, and a SIGKILLed process can take a moment to leave /proc.
        left = _head_processes(head.pid, temp_dir, gcs)
        deadline = time.monotonic() + 60
        while left and time.monotonic() < deadline:
            _stop(left)
            time.sleep(0.5)
            left = _head_processes(head.pid, temp_dir, gcs)
        head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's head survived SIGKILL for 60 s: {sorted(left)}"


def _submit(head, *entrypoint, submission_id):
    """`ray job submit --no-wait`, retried while the job agent is still starting."""
    for _ in range(30):
        result = head.ray("job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
                          "--no-wait", "--working-dir", str(REPO), "--", *entrypoint)
        if result.returncode == 0:
            return result
        if "No available agent" not in result.stdout + result.stderr:
            break
        time.sleep(2)
    raise AssertionError(f"ray job submit failed:\n{result.stdout}\n{result.stderr}")


def _wait_for_status(head, submission_id, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = head.ray("job", "status", "--address", head.dashboard_url, submission_id)
        # terminal states print "Job 'ID' succeeded" / "failed" / "was stopped"; else "Status ...: RUNNING"
        for status, words in (("SUCCEEDED", "succeeded"), ("FAILED", "failed"), ("STOPPED", "was stopped")):
            if f"Job '{submission_id}' {words}" in result.stdout + result.stderr:
                return status
        time.sleep(2)
    raise AssertionError(f"job {submission_id} not finished after {timeout_s}s")


def test_job_submit_runs_relay_ray_on_a_token_auth_head(token_head, tmp_path):
    out = tmp_path / "run"   # absolute: the job runs in a copy of the working dir, not here
    _submit(token_head, "relay-ray", "run", "--dataset", "digits", "--workers", "4", "--steps", "30",
            "--out", str(out), "--quiet", submission_id="relay-ray-test-run")
    status = _wait_for_status(token_head, "relay-ray-test-run")
    logs = token_head.ray("job", "logs", "--address", token_head.dashboard_url, "relay-ray-test-run").stdout
    assert status == "SUCCEEDED", logs[-3000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert 0.5 < rows[-1]["test_acc_avg_model"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["num_workers"] == 4 and summary["final"]["step"] == 30
    # auto placed the 4 workers in one actor per CPU of the 3-CPU head: the run attached to this head
    # (an embedded Ray on this 2-core machine would have made 2 actors)
    assert (summary["engine"]["num_actors"], summary["engine"]["cpus_per_actor"]) == (HEAD_CPUS, 1.0)
    assert (out / "config.yaml").is_file()
    assert '"step": 30' in logs      # the final metrics line printed by the entrypoint


def test_clients_without_the_token_are_refused(token_head):
    wrong = dict(token_head.env, RAY_AUTH_TOKEN="not-the-token")
    refused = token_head.ray("job", "list", "--address", token_head.dashboard_url, env=wrong, timeout=60)
    assert "Invalid authentication token" in refused.stdout + refused.stderr
    anonymous = {k: v for k, v in token_head.env.items() if not k.startswith("RAY_AUTH")}
    anonymous.update(RAY_AUTH_MODE="disabled")
    refused = token_head.ray("job", "list", "--address", token_head.dashboard_url, env=anonymous, timeout=60)
    assert "Missing authentication token" in refused.stdout + refused.stderr


def test_dashboard_listens_on_loopback_only(token_head):
    import ray._private.services

    port = int(token_head.dashboard_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    node_ip = ray._private.services.get_node_ip_address()
    if node_ip.startswith("127."):
        pytest.skip("this machine has no non-loopback address to probe")
    with pytest.raises(OSError):
        socket.create_connection((node_ip, port), timeout=5).close()
