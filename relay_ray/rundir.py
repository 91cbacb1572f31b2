"""One run per output directory: a lock held for the whole run, and no silent overwrite (pure; no Ray).

``OUT/.lock`` holds the owner's pid and host, created with O_EXCL.  A lock whose process is gone
(same host) is stale: the run that left it was killed, and a new run takes it over.  A directory
that holds a run (its ``config.yaml``) is only reused by ``--resume`` or ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path

from relay_ray.errors import UserError
from relay_ray.storage import Location, is_uri

LOCK = ".lock"
RUN_MARKER = "config.yaml"
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "checkpoints", "tensorboard",
             "loggers.json", "wandb")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(lock: Path | Location) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError, UserError):
        return None


def check_out(out: str | None, *, resume: bool = False, overwrite: bool = False, default: bool = False) -> None:
    """Refuse an unusable --out before anything starts (one line each)."""
    if out is None:
        return
    if not str(out).strip():
        raise UserError("--out is empty; give an output directory")
    if is_uri(out):
        _check_remote(Location(out), resume=resume, overwrite=overwrite)
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    missing = [p for p in [path, *path.parents] if not p.exists()]
    try:  # the only sure test of "can I create it": create it (and remove what the probe made)
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    finally:
        for created in missing:
            with contextlib.suppress(OSError):
                created.rmdir()
    _refuse_if_live(path)  # in use beats "holds a run": a live run has written its config.yaml
    if resume or overwrite or default or not (path / RUN_MARKER).exists():
        return
    raise UserError(f"--out {out} already holds a run; give --resume {out} to continue it, --overwrite to replace "
                    "it, or another --out")


def _check_remote(where: Location, *, resume: bool, overwrite: bool) -> None:
    """A storage URI: writable with these credentials (a probe object is written and removed), not in
    use by a live run, and not holding a run unless resumed or overwritten."""
    holds_run = where.child(RUN_MARKER).exists()
    if resume and not holds_run:
        return  # nothing to resume: the resume itself says so (and no probe object is left behind)
    probe = where.child(f".probe-{os.getpid()}")
    probe.write_bytes(b"")
    probe.remove()
    _refuse_if_live(where)
    if resume or overwrite or not holds_run:
        return
    raise UserError(f"--out {where.shown} already holds a run; give --resume {where.shown} to continue it, "
                    "--overwrite to replace it, or another --out")


def _refuse_if_live(path: Path | Location) -> None:
    """A one-line refusal when another process holds ``path``'s lock (a stale lock is not live)."""
    lock = path / LOCK
    if not lock.exists():
        return
    holder = _holder(lock)
    if holder and holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return
    who = f"pid {holder['pid']} on {holder['host']}" if holder else "another process"
    path, lock = getattr(path, "shown", path), getattr(lock, "shown", lock)
    raise UserError(f"--out {path} is in use by a running relay-ray ({who}); wait for it or pick another "
                    f"--out (a lock left by a killed run on another host: remove {lock})")


@contextlib.contextmanager
def claimed(out: str | None, *, overwrite: bool = False):
    """Hold ``OUT/.lock`` for the duration; a live holder is a one-line refusal naming its pid.
    ``overwrite``: the run files of an earlier run are removed once the lock is ours."""
    if out is None:
        yield
        return
    if is_uri(out):
        with _claimed_remote(Location(out), overwrite=overwrite):
            yield
        return
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            _refuse_if_live(path)
            lock.unlink(missing_ok=True)  # stale: its run was killed; take it over
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(me) + "\n")
        break
    else:
        raise UserError(f"--out {out}: could not take its lock {lock}; another relay-ray keeps taking it")
    try:
        if overwrite:
            for name in RUN_FILES:
                target = path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        yield
    finally:
        if (_holder(lock) or {}).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _claimed_remote(where: Location, *, overwrite: bool):
    """The lock of a storage URI: an object naming its holder.  An object store has no create-if-absent
    here, so two runs started within the same instant could both take it; any later one is refused."""
    _refuse_if_live(where)
    lock = where.child(LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    lock.write_bytes(json.dumps(me) + "\n")
    try:
        if overwrite:
            for name in RUN_FILES:
                where.child(name).remove()
        yield
    finally:
        if (_holder(lock) or {}) == me:
            lock.remove()
