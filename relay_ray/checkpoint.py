"""Checkpoints of a run: one file per worker, written by the worker itself, and a manifest written
last by the driver (pure; no Ray).

Layout (DESIGN §6)::

    OUT/checkpoints/step-00000060/worker-00000.pt ... worker-000NN.pt   torch.save, one per worker
    OUT/checkpoints/step-00000060/manifest.json                         the driver's, written last

A checkpoint is *complete* when its manifest exists and every worker file has the size and
SHA-256 the manifest records; anything else (a driver killed mid-checkpoint, a truncated or
corrupt file) is skipped on resume in favour of the previous complete one.

Where in a step a checkpoint is taken: at a step boundary where the driver has delivered every
message (the worker has run ``receive``, exactly as before an evaluation).  Nothing is in flight
then: the messages of step t were consumed and the ones a relay must forward live in the
algorithm's own buffers (``RelaySumChannel.received``), so a worker's state_dict *is* the whole
state of the run, and a resumed run takes the same next step as an uninterrupted one.  Splitting
``step(inbox)`` into ``receive(inbox)`` + ``step()`` performs the same arithmetic in the same
order, so checkpointing itself does not change the numbers.

``OUT`` may be a storage URI (``s3://...``; see ``relay_ray.storage``): each worker then uploads its
own file there, and the manifest is uploaded last, as on a local disk.

Worker files hold only tensors and plain Python values (numpy arrays are stored as tensors and
marked), so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from relay_ray.config import RESUMABLE_CHANGES, RunConfig
from relay_ray.errors import Diverged, UserError
from relay_ray.storage import Location

WORKER_FORMAT = "relay_ray.worker-checkpoint/1"
MANIFEST_FORMAT = "relay_ray.checkpoint/1"
MANIFEST = "manifest.json"
_NDARRAY = "__ndarray__"


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def worker_filename(rank: int) -> str:
    return f"worker-{rank:05d}.pt"


def plan_digest(plan) -> str:
    """A short fingerprint of who talks to whom (neighbours, trees, gossip weights)."""
    h = hashlib.sha256()
    h.update(repr((plan.num_workers, plan.neighbors, plan.tree_neighbors)).encode())
    if plan.gossip_weights is not None:
        h.update(np.ascontiguousarray(plan.gossip_weights, dtype=np.float64).tobytes())
    for weights in plan.schedule:
        h.update(np.ascontiguousarray(weights, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- encoding (weights_only-safe)
def _encode(value):
    if isinstance(value, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.array(value, copy=True))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_encode(v) for v in value)
    return value


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {_NDARRAY}:
            return value[_NDARRAY].numpy()
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(v) for v in value)
    return value


def _fsync_dir(directory: Location) -> None:
    if directory.remote:
        return  # an object store has no directory entries to make durable
    fd = os.open(directory.path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- worker side
def save_worker(directory: str | Path, rank: int, header: dict, state: dict) -> dict:
    """Called by a worker: write its state into ``directory``; returns a small record for the manifest."""
    buffer = io.BytesIO()
    torch.save({"format": WORKER_FORMAT, "rank": rank, **header, "state": _encode(state)}, buffer)
    data = buffer.getvalue()
    Location(directory).child(worker_filename(rank)).write_bytes(data, durable=True)
    return {"file": worker_filename(rank), "rank": rank, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_worker(directory: str | Path, rank: int, header: dict) -> dict:
    """Called by a worker: its state from ``directory``, after checking the file was written for it."""
    location = Location(directory).child(worker_filename(rank))
    path = location.shown
    try:
        payload = torch.load(io.BytesIO(location.read_bytes()), map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as exc:  # truncated / corrupt / not a torch file: never unpickle anything else
        raise UserError(f"cannot load checkpoint file {path}: {type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
    if not isinstance(payload, dict) or payload.get("format") != WORKER_FORMAT or payload.get("rank") != rank:
        raise UserError(f"{path} is not a relay_ray checkpoint of worker {rank}")
    for key, expected in header.items():
        if payload.get(key) != expected:
            raise UserError(f"{path} was written by another run: {key} {payload.get(key)!r} there, {expected!r} here")
    return _decode(payload["state"])


# ---------------------------------------------------------------------- driver side
@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its directory, step and the run's wall time when it was written."""

    directory: Path | str  # a local folder, or a storage URI
    step: int
    wall_s: float


def _config_mismatch(saved: dict, config: RunConfig) -> str | None:
    current = config.to_dict()
    diffs = [f"{key} {saved.get(key)!r} there, {current[key]!r} here" for key in current
             if key not in RESUMABLE_CHANGES and saved.get(key) != current[key]]
    return "; ".join(diffs) if diffs else None


def inspect_checkpoint(directory: Path | str | Location, config: RunConfig, plan) -> Checkpoint:
    """The checkpoint in ``directory`` if it is complete and belongs to this run.

    Raises ``_Unusable`` (skip it, an older one may do) for an incomplete / truncated / corrupt
    one, and ``UserError`` for a checkpoint of another run (another algorithm, topology, worker
    count, ...), which no older checkpoint in the same place would fix.
    """
    location = directory if isinstance(directory, Location) else Location(directory)
    directory = location.shown
    manifest_path = location.child(MANIFEST)
    if not manifest_path.exists():
        raise _Unusable("incomplete (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        step, workers = int(manifest["step"]), manifest["workers"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(workers, list):
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _Unusable(f"unreadable manifest.json ({type(exc).__name__})") from None
    mismatch = _config_mismatch(manifest.get("config", {}), config)
    if mismatch is None and manifest.get("plan") != plan_digest(plan):
        mismatch = "the communication plan (topology / trees) differs"
    if mismatch:
        raise UserError(f"checkpoint {directory} belongs to another run: {mismatch}")
    if len(workers) != config.num_workers:
        raise UserError(f"checkpoint {directory} has {len(workers)} workers, this run has {config.num_workers}")
    for record in workers:
        path = location.child(record["file"])
        if not path.exists():
            raise _Unusable(f"{record['file']} is missing")
        size = path.size()
        if size != record["bytes"]:
            raise _Unusable(f"{record['file']} is truncated or altered ({size} of {record['bytes']} bytes)")
        if _sha256(path) != record["sha256"]:
            raise _Unusable(f"{record['file']} is corrupt (checksum mismatch)")
    return Checkpoint(str(location) if location.remote else location.path, step, float(manifest.get("wall_s", 0.0)))


class _Unusable(Exception):
    """A checkpoint that cannot be used (the reason is the message); an older one may still be."""


def _sha256(path: Location) -> str:
    if path.remote:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    with open(path.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step_dirs(root: Location) -> list[tuple[int, Location]]:
    found = [(int(name[5:]), root.child(name)) for name in root.list_dirs()
             if name.startswith("step-") and name[5:].isdigit()]
    return sorted(found, key=lambda item: item[0])


def find_latest(run_dir: str | Path, config: RunConfig, plan) -> tuple[Checkpoint, list[str]]:
    """The newest complete checkpoint of the run in ``run_dir``, and why newer ones were skipped."""
    root = Location(run_dir).child("checkpoints")
    candidates = _step_dirs(root)
    if not candidates:
        raise UserError(f"no checkpoint in {root.shown}; the run was not started with --checkpoint-every, "
                        "or was stopped before its first checkpoint")
    skipped = []
    for step, directory in reversed(candidates):
        try:
            return inspect_checkpoint(directory, config, plan), skipped
        except _Unusable as why:
            skipped.append(f"step {step}: {why}")
    raise UserError(f"no usable checkpoint in {root.shown}: " + "; ".join(skipped))


class CheckpointStore:
    """The driver's side of writing checkpoints: a fresh directory per step, the manifest last,
    then old checkpoints pruned so that ``keep`` complete ones remain."""

    def __init__(self, run_dir: str | Path, config: RunConfig, plan, latest: Checkpoint | None = None):
        self.root = Location(run_dir).child("checkpoints")
        self.config = config
        self.plan = plan
        self.latest = latest  # the newest complete checkpoint of this run (where a restart resumes)

    @classmethod
    def for_run(cls, config: RunConfig, plan, latest: Checkpoint | None = None) -> "CheckpointStore | None":
        if config.checkpoint_every is None:
            return None
        if config.out is None:
            raise UserError("--checkpoint-every needs an output directory (--out)")
        return cls(config.out, config, plan, latest)

    def worker_header(self) -> dict:
        """What every worker file records and is checked against on load."""
        return worker_header(self.config, self.plan)

    def begin(self, step: int) -> Location:
        """An empty directory for the workers' files (a leftover of an abandoned attempt is removed)."""
        directory = self.root.child(step_dirname(step))
        directory.remove()
        directory.make_dirs()
        return directory

    def commit(self, step: int, records: list[dict], wall_s: float) -> Checkpoint:
        """Write the manifest (atomic rename): from now on the checkpoint exists.  Then prune."""
        directory = self.root.child(step_dirname(step))
        records = sorted(records, key=lambda r: r["rank"])
        if [r["rank"] for r in records] != list(range(self.config.num_workers)):
            raise RuntimeError(f"checkpoint {step}: got files of workers {[r['rank'] for r in records]}")
        diverged = [r["rank"] for r in records if not r.get("finite", True)]
        if diverged:  # never the newest checkpoint: a resume or restart would start from NaN
            directory.remove()
            raise Diverged(f"diverged by step {step} on worker {diverged[0]}: model or loss not finite; lower --lr")
        manifest = {"format": MANIFEST_FORMAT, "step": step, "wall_s": wall_s, "num_workers": self.config.num_workers,
                    "algorithm": self.config.algorithm, "plan": plan_digest(self.plan),
                    "config": self.config.to_dict(), "workers": records}
        directory.child(MANIFEST).write_bytes((json.dumps(manifest, indent=1) + "\n").encode(), durable=True)
        _fsync_dir(directory)
        self.latest = Checkpoint(str(directory) if directory.remote else directory.path, step, wall_s)
        self._prune(step)
        return self.latest

    def _prune(self, current: int) -> None:
        """Keep the newest ``keep`` complete checkpoints up to ``current``; remove the rest
        (older ones, incomplete ones, and any left from an abandoned future of a resumed run)."""
        complete = [(s, d) for s, d in _step_dirs(self.root) if s <= current and d.child(MANIFEST).exists()]
        keep = {d for _, d in complete[-self.config.keep:]}
        for _, directory in _step_dirs(self.root):
            if directory not in keep:
                directory.remove()


def worker_header(config: RunConfig, plan) -> dict:
    return {"algorithm": config.algorithm, "num_workers": config.num_workers, "plan": plan_digest(plan)}
