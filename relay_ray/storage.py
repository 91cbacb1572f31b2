"""Where run files and checkpoints live: a local folder or a storage URI (pure; no Ray).

``--out`` / ``--resume`` accept ``s3://bucket/path``, ``gs://bucket/path``, ``hdfs://...`` — any
filesystem pyarrow opens with ``pyarrow.fs.FileSystem.from_uri`` — besides local paths.  Credentials
and endpoints are the filesystem's own settings (for S3: the AWS_* environment variables, e.g.
``AWS_ENDPOINT_URL`` for MinIO or another S3-compatible server, or ``?endpoint_override=`` in the URI),
and every Ray worker that writes checkpoints needs them too.

``Location`` is one such place.  Local writes are atomic (a temporary file renamed into place, fsync
where asked); an object store's upload is atomic by itself (the object appears whole when the upload
completes), so both give the "whole file or none" rule checkpoints rely on.
"""

from __future__ import annotations

import posixpath
import re
import shutil
from functools import cached_property
from pathlib import Path

from relay_ray.errors import UserError
from relay_ray.files import write_atomic

# how an object store says "these credentials may not do that" (S3 error codes, as pyarrow reports them)
_AUTH_ERRORS = ("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "AccessDenied", "Forbidden")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_uri(where: str | Path | None) -> bool:
    """A storage URI (``s3://``, ``gs://``, ...) rather than a local path (``file://`` counts as local)."""
    match = _SCHEME.match(str(where or ""))
    return bool(match) and match.group(1).lower() != "file"


def local_path(where: str | Path) -> Path:
    text = str(where)
    return Path(text[len("file://"):]) if text.lower().startswith("file://") else Path(text)


class Location:
    """A folder or file, local or in a pyarrow filesystem; picklable as its URI (the filesystem is
    opened again where it is used, e.g. in a Ray actor)."""

    def __init__(self, where: str | Path):
        text = str(where)
        self.remote = is_uri(text)
        base, _, query = text.partition("?") if self.remote else (text, "", "")
        self.base = base.rstrip("/") if self.remote else str(local_path(text))
        self.query = query

    def __str__(self) -> str:
        return f"{self.base}?{self.query}" if self.query else self.base

    def __repr__(self) -> str:
        return f"Location({self.base!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self):
        return Location, (str(self),)

    @property
    def shown(self) -> str:
        """For messages: the URI without its query (which may carry keys)."""
        return self.base

    @property
    def name(self) -> str:
        return posixpath.basename(self.base) if self.remote else Path(self.base).name

    def child(self, *names: str) -> "Location":
        if not self.remote:
            return Location(Path(self.base, *names))
        joined = posixpath.join(self.base, *names)
        return Location(f"{joined}?{self.query}" if self.query else joined)

    def __truediv__(self, name: str) -> "Location":
        return self.child(name)

    # ------------------------------------------------------------------ the filesystem behind a URI
    @cached_property
    def _fs_path(self):
        from pyarrow import fs as pafs

        try:
            return pafs.FileSystem.from_uri(str(self))
        except (ValueError, OSError) as exc:  # unknown scheme, malformed URI, missing filesystem support
            raise UserError(f"cannot open {self.shown}: {one_line(exc)}") from None

    @property
    def path(self) -> Path:
        """The local path (local locations only)."""
        assert not self.remote, self
        return Path(self.base)

    def _info(self):
        fs, path = self._fs_path
        return fs.get_file_info(path)

    # ------------------------------------------------------------------ operations
    def exists(self) -> bool:
        if not self.remote:
            return self.path.exists()
        from pyarrow import fs as pafs

        return self._checked(lambda: self._info().type != pafs.FileType.NotFound, "read")

    def is_dir(self) -> bool:
        if not self.remote:
            return self.path.is_dir()
        from pyarrow import fs as pafs

        return self._checked(lambda: self._info().type == pafs.FileType.Directory, "read")

    def size(self) -> int:
        return self.path.stat().st_size if not self.remote else self._checked(lambda: self._info().size, "read")

    def read_bytes(self) -> bytes:
        if not self.remote:
            return self.path.read_bytes()

        def read():
            fs, path = self._fs_path
            with fs.open_input_stream(path) as stream:
                return stream.read()

        return self._checked(read, "read")

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes | str, *, durable: bool = False) -> None:
        """The whole file or nothing (see the module docstring)."""
        if not self.remote:
            write_atomic(self.path, data, durable=durable)
            return

        def write():
            fs, path = self._fs_path
            with fs.open_output_stream(path) as stream:
                stream.write(data.encode() if isinstance(data, str) else data)

        self._checked(write, "write")

    def make_dirs(self) -> None:
        if not self.remote:
            self.path.mkdir(parents=True, exist_ok=True)
            return
        fs, path = self._fs_path
        self._checked(lambda: fs.create_dir(path, recursive=True), "write")

    def remove(self) -> None:
        """Delete this file or folder (and what it holds); nothing there is fine."""
        if not self.remote:
            if self.path.is_dir():
                shutil.rmtree(self.path, ignore_errors=True)
            else:
                self.path.unlink(missing_ok=True)
            return
        from pyarrow import fs as pafs

        def remove():
            fs, path = self._fs_path
            kind = fs.get_file_info(path).type
            if kind == pafs.FileType.Directory:
                fs.delete_dir(path)
            elif kind == pafs.FileType.File:
                fs.delete_file(path)

        self._checked(remove, "write")

    def list_dirs(self) -> list[str]:
        """The names of the folders directly in this one (none when it does not exist)."""
        if not self.remote:
            return [p.name for p in self.path.iterdir() if p.is_dir()] if self.path.is_dir() else []
        from pyarrow import fs as pafs

        def listing():
            fs, path = self._fs_path
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            return [posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory]

        return self._checked(listing, "read")

    def upload(self, source: Path) -> None:
        """Copy the local file ``source`` here (remote locations)."""
        self.write_bytes(source.read_bytes())

    def _checked(self, action, verb: str):
        """Storage errors (denied, wrong credentials, no such bucket, unreachable endpoint) in one line."""
        try:
            return action()
        except OSError as exc:
            if not self.remote:
                raise
            text = one_line(exc)
            hint = "; check the storage credentials (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) " \
                   "and the bucket's permissions" if any(code in text for code in _AUTH_ERRORS) else ""
            raise UserError(f"cannot {verb} {self.shown}: {text.rstrip('.') if hint else text}{hint}") from None


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:240] or type(exc).__name__


class Mirror:
    """A local folder standing in for a remote one: the run files (metrics, TensorBoard events,
    figures) are written there as on a local run and pushed to ``remote`` after each evaluation and at
    the end, each file whole, only those that changed since the last push."""

    def __init__(self, remote: Location, local: Path):
        self.remote, self.local = remote, local
        self._pushed: dict[Path, tuple[int, int]] = {}

    @classmethod
    def staging(cls, remote: Location) -> "Mirror":
        """The mirror of ``remote`` in relay_ray's cache folder, emptied."""
        import hashlib

        from relay_ray.data import default_cache_dir

        local = default_cache_dir() / "staging" / hashlib.sha256(remote.base.encode()).hexdigest()[:16]
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        return cls(remote, local)

    def pull(self, names: tuple[str, ...]) -> None:
        """Copy these files or folders of ``remote`` here (those that exist), e.g. to continue a run."""
        from pyarrow import fs as pafs

        for name in names:
            source = self.remote.child(name)
            if not source.exists():
                continue
            fs, path = source._fs_path
            target = self.local / name
            (target if source.is_dir() else target.parent).mkdir(parents=True, exist_ok=True)
            source._checked(lambda: pafs.copy_files(path, str(target), source_filesystem=fs,
                                                    destination_filesystem=pafs.LocalFileSystem()), "read")
        self._pushed = {p: self._stamp(p) for p in self._files()}  # what came from there is there

    def push(self) -> None:
        for path in self._files():
            stamp = self._stamp(path)
            if self._pushed.get(path) != stamp:
                self.remote.child(*path.relative_to(self.local).parts).upload(path)
                self._pushed[path] = stamp

    def _files(self) -> list[Path]:
        return sorted(p for p in self.local.rglob("*") if p.is_file() and not p.name.startswith("."))

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns
