"""Files written whole or not at all: the one atomic-write helper of the package (pure; no Ray)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomic(path: str | Path, data: bytes | str | Callable[[BinaryIO], None], *, durable: bool = False) -> None:
    """Write ``data`` (bytes, text, or a function that writes into the open file) to a temporary file
    beside ``path`` and rename it into place, so a reader — or a run killed mid-write — never sees
    half a file.  ``durable``: fsync before the rename (checkpoints must survive a power cut)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers never share it
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
