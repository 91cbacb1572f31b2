"""The few array operations the algorithms need, for numpy arrays and torch tensors alike.

The algorithms keep their state (models, momentum, relay buffers) in whichever kind ``x0`` has:
numpy on the host (fastest on CPU), or torch tensors on the worker's device (``--tensors torch``,
the default with ``--device cuda``), where nothing leaves the GPU between steps.  Arithmetic
operators work on both; what differs (copy, concatenate, allocate, a count entry) is here, so the
algorithm code is written once.  Only messages that leave a process through Ray's object store
become numpy (``to_host``); with ``--transport gloo|nccl`` they travel as tensors.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np

Array = Any  # np.ndarray | torch.Tensor; torch is imported only where a tensor is at hand (`--help` stays light)


def is_torch(x) -> bool:
    torch = sys.modules.get("torch")  # no tensor can exist before torch is imported
    return torch is not None and isinstance(x, torch.Tensor)


def clone(x: Array) -> Array:
    return x.clone() if is_torch(x) else x.copy()


def concat(parts: list) -> Array:
    return sys.modules["torch"].cat(parts) if is_torch(parts[0]) else np.concatenate(parts)


def empty_like(x: Array) -> Array:
    return x.new_empty(x.shape) if is_torch(x) else np.empty_like(x)


def zeros_like(x: Array) -> Array:
    return x.new_zeros(x.shape) if is_torch(x) else np.zeros_like(x)


def float32(x: Array) -> Array:
    """``x`` as float32 (no copy when it already is)."""
    return x.float() if is_torch(x) else x.astype(np.float32, copy=False)


def float64(x: Array) -> Array:
    """``x`` widened to float64, as numpy widens a float32 array mixed with float64 weights."""
    return x.double() if is_torch(x) else x.astype(np.float64)


def like(value, reference: Array) -> Array:
    """``value`` (numpy, torch or a list) as a float32 array of ``reference``'s kind and device.

    Incoming messages from other processes and checkpoint state arrive as numpy; a read-only
    object-store buffer is shared, not copied (the algorithms never write into a received message).
    """
    if is_torch(reference):
        import torch

        if isinstance(value, np.ndarray):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "array is not writable": read, never written
                value = torch.from_numpy(value)
        return torch.as_tensor(value, dtype=torch.float32).to(reference.device, non_blocking=True)
    if is_torch(value):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def to_host(x):
    """A float32 numpy array of ``x`` (a message leaving the process, a checkpoint, an evaluation)."""
    if is_torch(x):
        return x.detach().to("cpu").numpy()
    return np.asarray(x)


_COUNT_ENTRIES: dict = {}  # (count, device) -> one-element tensor, never written (messages copy it in concat)


def count_entry(count, reference: Array) -> Array:
    """A one-element float32 array holding a relay count, to append to a message like ``reference``.

    On torch the count may itself be a one-element tensor (read from a message on the device):
    it stays there, so relaying never waits for the GPU."""
    if is_torch(reference):
        if is_torch(count):
            return count.reshape(1).float()
        key = (count, str(reference.device))
        if key not in _COUNT_ENTRIES:  # a leaf's count is a constant 1 every step: copy it to the device once
            _COUNT_ENTRIES[key] = reference.new_tensor([count])
        return _COUNT_ENTRIES[key]
    return np.array([count], dtype=np.float32)


def count_at(message: Array, index: int):
    """The relay count stored at ``message[index]``: an int on numpy, a one-element tensor on torch."""
    if is_torch(message):
        return message[index:index + 1]
    return int(message[index])


def all_finite(x: Array) -> bool:
    return bool(x.isfinite().all()) if is_torch(x) else bool(np.isfinite(x).all())


def as_state(x0: np.ndarray, kind: str, device: str = "cpu") -> Array:
    """The initial model as the state kind the run uses: ``numpy`` or ``torch`` (on ``device``)."""
    if kind == "torch":
        import torch

        return torch.as_tensor(np.asarray(x0, dtype=np.float32)).to(device).clone()
    return np.array(to_host(x0), dtype=np.float32)
