"""Keep relay-ray's own lines readable: Ray's reports of failures the engine handles go to a log file.

When a worker actor dies, every task that depended on it fails too, and Ray's driver logs each
failed result that nobody fetched as a ~10-line "Unhandled error" block on stderr (15 of them
buried the engine's one recovery line in 198 lines).  The engine names the dead workers and what
it does about it in one line, so those blocks move to ``<Ray session>/logs/relay_ray_driver.log``
(where Ray keeps its other logs); nothing is dropped.  The notice that an embedded local Ray uses
token authentication, printed at every start, goes there too, and so does the raylet's "A worker
died or was killed" notice, which Ray prints on *stdout*, among the results; its other notices are
moved to stderr.
"""

from __future__ import annotations

import logging
from pathlib import Path

LOG_NAME = "relay_ray_driver.log"
_DIVERTED = ("Unhandled error", "Token authentication is enabled for this Ray cluster", "A worker died or was killed")
_LOGGERS = ("ray._private.worker", "ray._private.authentication.authentication_token_setup")


class _ToFile(logging.Filter):
    """Writes Ray's records that relay-ray summarises to its own file instead of the console."""

    def __init__(self):
        super().__init__()
        self.handler: logging.Handler | None = None
        self.pending: list[logging.LogRecord] = []  # caught before the session's log folder exists

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(_DIVERTED):
            return True
        if self.handler is None:
            self.pending = [*self.pending[-99:], record]
        else:
            self.handler.handle(record)
        return False


_FILTER = _ToFile()


_WORKER_DIED = "A worker died or was killed"


def _raylet_notices_off_stdout(print_to_stdstream):
    """Ray's driver prints the raylet's error notices with ``print_to_stdstream(data, ...)``."""
    def printed(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if _WORKER_DIED not in line]
            for line in data.get("lines", []):
                if _WORKER_DIED in line:
                    _FILTER.filter(logging.makeLogRecord({"msg": line, "levelname": "ERROR", "name": "raylet"}))
            data = {**data, "lines": lines, "is_err": True}
            if not lines:
                return None
        return print_to_stdstream(data, *args, **kwargs)
    printed.relay_ray = True
    return printed


def divert_ray_noise() -> None:
    """Install the filter and the raylet-notice wrapper (idempotent); call before ``ray.init`` so
    its start-up notice is caught."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    try:
        from ray._private import worker
    except ImportError:
        return
    original = getattr(worker, "print_to_stdstream", None)
    if callable(original) and not getattr(original, "relay_ray", False):  # a private name: skipped if it moves
        worker.print_to_stdstream = _raylet_notices_off_stdout(original)


def log_to_session(logs_dir: str | None) -> Path | None:
    """Send the diverted records to ``logs_dir/relay_ray_driver.log`` (the Ray session's log folder)."""
    if logs_dir is None:
        return None
    path = Path(logs_dir) / LOG_NAME
    if _FILTER.handler is not None:
        _FILTER.handler.close()
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
    _FILTER.handler = handler
    for record in _FILTER.pending:
        handler.handle(record)
    _FILTER.pending = []
    return path


def session_logs_dir() -> str | None:
    """The connected Ray session's log folder (Ray has no public accessor; None when unknown)."""
    try:
        import ray

        return ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # an older or newer Ray without this private path: the records stay off the console
        return None
