"""Progress on a non-terminal: evaluation lines, and a heartbeat line between them when they are far apart."""

import re

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
