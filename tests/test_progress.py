"""Progress on a non-terminal: evaluation lines, and a heartbeat line between them when they are far apart."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from relay_ray import cli
from relay_ray.metrics import Progress

HEARTBEAT = re.compile(r"^step (\d+)/(\d+) \| \d+\.\d\d steps/s \| ETA (\d+s|\?)$")


def test_heartbeat_lines_come_only_when_nothing_was_printed_for_a_while(capsys):
    quiet = Progress(100, "x", heartbeat_s=3600)
    for _ in range(50):
        quiet.advance()
    assert capsys.readouterr().err == ""
    chatty = Progress(100, "x", heartbeat_s=0)
    chatty.rewind(40)
    for _ in range(3):
        chatty.advance()
    lines = capsys.readouterr().err.splitlines()
    assert [HEARTBEAT.match(line).group(1, 2) for line in lines] == [("41", "100"), ("42", "100"), ("43", "100")]
    disabled = Progress(100, "x", enabled=False, heartbeat_s=0)
    disabled.advance()
    assert capsys.readouterr().err == ""


def test_a_run_in_a_log_file_shows_heartbeats_between_its_evaluations(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(Progress, "HEARTBEAT_S", 0.0)
    assert cli.main(["run", "--backend", "local", "--dataset", "digits", "--workers", "4", "--steps", "12",
                     "--eval-every", "6", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err.splitlines()
    beats = [int(m.group(1)) for m in map(HEARTBEAT.match, err) if m]
    assert beats == list(range(1, 13)), err
    assert sum(line.startswith("step 6/12 | loss") or line.startswith("step 12/12 | loss") for line in err) == 2


def test_the_readme_quickstart_prints_only_relay_rays_own_lines(tmp_path):
    """The README's first command through the real CLI: stdout is the final metrics as JSON and
    nothing else; stderr holds relay-ray's lines (placement, evaluations, what it wrote) and at most
    a few others (Ray's own start-up notices go to its log files)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # a private Ray session, removed below
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        done = subprocess.run([sys.executable, "-m", "relay_ray", "run", "--dataset", "digits", "--workers", "16",
                               "--alpha", "0.01", "--algorithm", "relaysgd", "--out", str(tmp_path / "run")],
                              env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test_acc_worst" in json.loads(done.stdout)
    lines = done.stderr.splitlines()
    ours = [line for line in lines if line.startswith(("relay-ray: ", "step ", "wrote "))]
    assert ours[0].startswith("relay-ray: 16 workers on ") and ours[-1].startswith("wrote ")
    assert sum(line.startswith("step ") and "| loss " in line for line in ours) == 9  # 90 steps, every 10
    assert len(lines) - len(ours) <= 3, [line for line in lines if line not in ours]
