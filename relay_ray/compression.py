"""Message compressors (pure numpy; no Ray): what crosses a link is the *encoded* form.

``--compression SPEC``:

- ``topk:F``  the fraction F of coordinates largest in magnitude; wire: k uint32 indices + k float32
  values (8k bytes).  Biased, contractive: ‖Q(v) − v‖² ≤ (1 − k/d)‖v‖².
- ``randk:F`` k = F·d coordinates drawn at random, scaled by d/k; wire as topk.  Unbiased
  (E Q(v) = v), variance ω = d/k − 1.
- ``sign``    scaled sign ‖v‖₁/d · sign(v); wire: one float32 scale + one bit per coordinate.
  Biased, contractive with δ = ‖v‖₁² / (d‖v‖²).
- ``qsgd:S``  unbiased stochastic quantisation to S levels (Alistarh et al. 2017): ‖v‖₂ · sign(v_i)
  · ξ_i/S with ξ_i ∈ {⌊S|v_i|/‖v‖⌋, ⌈…⌉} drawn so E = S|v_i|/‖v‖; wire: one float32 norm + one int8
  level per coordinate (S ≤ 127).  Variance ω = min(d/S², √d/S).

An encoded message is one flat float32 array (its bytes are the wire format, padded to 4 bytes), so
it travels, is counted (``bytes_sent``) and dropped like any other message.  Randomness is drawn from
(seed, step, sender, receiver): every backend, and a resumed run, compresses identically.

Vectors may be numpy arrays or torch tensors (``--tensors torch``): a tensor is encoded and decoded
where it lives, into the same bytes numpy gives.  The random draws (randk's indices, qsgd's
rounding) still come from the numpy generator on the host and are copied to the device, so both
kinds draw the same numbers; topk breaks ties at its threshold by the lower index on both.

Error feedback needs a *contractive* compressor (E‖C(v) − v‖² ≤ (1 − δ)‖v‖², δ > 0).  ``contractive``
gives one for every spec: itself for topk and sign, and the unbiased ones scaled by 1/(1 + ω)
(Koloskova et al. 2019, arXiv:1902.00340, Remark 3.2; Stich et al. 2018): randk then sends v_i itself.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from relay_ray import tensors
from relay_ray.errors import UserError

KINDS = ("topk", "randk", "sign", "qsgd")
_SALT = 0x636F6D70  # "comp": keeps this stream apart from drops, data and init
_MAX_QSGD_LEVELS = 127  # one int8 per coordinate


@dataclass(frozen=True)
class Compressor:
    kind: str
    fraction: float = 1.0  # topk / randk
    levels: int = 0  # qsgd
    scale: float = 1.0  # the contractive view of an unbiased compressor multiplies by this

    # ------------------------------------------------------------------ spec
    @staticmethod
    def parse(spec: str) -> "Compressor":
        """``topk:0.1``, ``randk:0.1``, ``sign``, ``qsgd:16``; anything else is a one-line error."""
        name, _, arg = str(spec).partition(":")
        if name not in KINDS:
            raise UserError(f"unknown --compression {spec!r}; choose topk:F, randk:F (0 < F < 1), sign or qsgd:S")
        if name == "sign":
            if arg:
                raise UserError(f"--compression sign takes no argument, got {spec!r}")
            return Compressor("sign")
        if name in ("topk", "randk"):
            try:
                fraction = float(arg)
            except ValueError:
                raise UserError(f"--compression {name}:F needs a fraction 0 < F < 1, got {spec!r}") from None
            if not 0 < fraction < 1:
                raise UserError(f"--compression {name}:F needs a fraction 0 < F < 1, got {spec!r}")
            return Compressor(name, fraction=fraction)
        try:
            levels = int(arg)
        except ValueError:
            raise UserError(f"--compression qsgd:S needs an integer 1 <= S <= {_MAX_QSGD_LEVELS}, got {spec!r}") from None
        if not 1 <= levels <= _MAX_QSGD_LEVELS:
            raise UserError(f"--compression qsgd:S needs an integer 1 <= S <= {_MAX_QSGD_LEVELS}, got {spec!r}")
        return Compressor("qsgd", levels=levels)

    @property
    def unbiased(self) -> bool:
        return self.kind in ("randk", "qsgd") and self.scale == 1.0

    def variance(self, d: int) -> float:
        """ω of an unbiased compressor: E‖Q(v) − v‖² ≤ ω‖v‖² (0 for the biased ones)."""
        if self.kind == "randk":
            return d / self.count(d) - 1.0
        if self.kind == "qsgd":
            return min(d / self.levels ** 2, math.sqrt(d) / self.levels)
        return 0.0

    def contractive(self, d: int) -> "Compressor":
        """The compressor error feedback uses for vectors of size ``d`` (see the module docstring)."""
        if self.kind in ("topk", "sign"):
            return self
        return Compressor(self.kind, self.fraction, self.levels, scale=1.0 / (1.0 + self.variance(d)))

    # ------------------------------------------------------------------ wire format
    def count(self, d: int) -> int:
        return min(d, max(1, round(self.fraction * d)))

    def encoded_floats(self, d: int) -> int:
        """The length of an encoded message of a size-``d`` vector, in float32 slots."""
        if self.kind in ("topk", "randk"):
            return 2 * self.count(d)
        if self.kind == "sign":
            return 1 + (d + 31) // 32
        return 1 + (d + 3) // 4  # qsgd

    def encode(self, v, rng: np.random.Generator | None = None):
        if tensors.is_torch(v):
            return self._encode_torch(v.float(), rng)
        v = np.asarray(v, dtype=np.float32)
        d = v.shape[0]
        if self.kind in ("topk", "randk"):
            k = self.count(d)
            if self.kind == "topk":
                index = _top_indices(np.abs(v), k)
                values = v[index]
            else:
                index = _random_indices(d, k, rng)
                values = v[index] * np.float32(self.scale * d / k)
            return np.concatenate([index.astype(np.uint32).view(np.float32), values.astype(np.float32)])
        if self.kind == "sign":
            scale = np.float32(np.abs(v).sum(dtype=np.float64) / d)
            bits = np.packbits(v >= 0)
            return np.concatenate([np.array([scale], np.float32), _padded(bits, 4).view(np.float32)])
        norm = np.float32(np.linalg.norm(v.astype(np.float64)))
        if norm == 0:
            levels = np.zeros(d, np.int8)
        else:
            ratio = np.abs(v).astype(np.float64) / float(norm) * self.levels
            lower = np.floor(ratio)
            levels = (lower + (rng.random(d) < ratio - lower)).astype(np.int8) * np.where(v < 0, -1, 1).astype(np.int8)
        return np.concatenate([np.array([norm], np.float32), _padded(levels.view(np.uint8), 4).view(np.float32)])

    def _encode_torch(self, v, rng):
        """``encode`` where ``v`` lives (the same bytes); only the random draws cross from the host."""
        import torch

        d = v.shape[0]
        if self.kind in ("topk", "randk"):
            k = self.count(d)
            if self.kind == "topk":
                index = _top_indices(v.abs(), k)
                values = v[index]
            else:
                index = torch.from_numpy(_random_indices(d, k, rng)).to(v.device, non_blocking=True)
                values = v[index] * _scalar32(self.scale * d / k, v)
            # indices < 2**31: int32 has the bits of numpy's uint32
            return torch.cat([index.to(torch.int32).view(torch.float32), values])
        if self.kind == "sign":
            scale = (v.abs().double().sum() / d).float().reshape(1)
            return torch.cat([scale, _packbits(v >= 0).view(torch.float32)])
        norm = torch.linalg.vector_norm(v.double()).float()
        positive = norm > 0  # no branch on it: reading it on the host would wait for the GPU
        ratio = v.abs().double() / torch.where(positive, norm, 1).double() * self.levels
        lower = ratio.floor()
        draw = torch.from_numpy(rng.random(d)).to(v.device, non_blocking=True)
        sign = torch.where(v < 0, -1, 1).to(torch.int8)
        levels = torch.where(positive, (lower + (draw < ratio - lower)).to(torch.int8) * sign, 0).to(torch.int8)
        return torch.cat([norm.reshape(1), _padded(levels.view(torch.uint8), 4).view(torch.float32)])

    def decode(self, message, d: int):
        if tensors.is_torch(message):
            return self._decode_torch(message, d)
        message = np.asarray(message, dtype=np.float32)
        dense = np.zeros(d, np.float32)
        if self.kind in ("topk", "randk"):
            k = self.count(d)
            dense[message[:k].view(np.uint32)] = message[k:2 * k]
            return dense
        if self.kind == "sign":
            signs = np.unpackbits(message[1:].view(np.uint8))[:d].astype(np.float32) * 2 - 1
            return message[0] * signs
        levels = message[1:].view(np.int8)[:d].astype(np.float32)
        return (message[0] * np.float32(self.scale / self.levels)) * levels

    def _decode_torch(self, message, d: int):
        import torch

        if self.kind in ("topk", "randk"):
            k = self.count(d)
            dense = message.new_zeros(d)
            dense[message[:k].view(torch.int32).long()] = message[k:2 * k]
            return dense
        if self.kind == "sign":
            shifts = torch.arange(7, -1, -1, device=message.device, dtype=torch.uint8)
            bits = (message[1:].view(torch.uint8).unsqueeze(1) >> shifts) & 1  # np.unpackbits: high bit first
            return message[0] * (bits.reshape(-1)[:d].float() * 2 - 1)
        levels = message[1:].view(torch.int8)[:d].float()
        return (message[0] * _scalar32(self.scale / self.levels, message)) * levels

    def roundtrip(self, v, rng: np.random.Generator | None = None) -> tuple:
        """(encoded message, the dense vector the receiver decodes): the sender keeps the same copy."""
        message = self.encode(v, rng)
        return message, self.decode(message, v.shape[0])


def _padded(data, multiple: int):
    """``data`` (numpy or torch) with zeros appended up to a multiple of ``multiple`` elements."""
    extra = (-data.shape[0]) % multiple
    if not extra:
        return data
    if tensors.is_torch(data):
        return sys.modules["torch"].cat([data, data.new_zeros(extra)])
    return np.concatenate([data, np.zeros(extra, data.dtype)])


def _packbits(bits):
    """``np.packbits`` of a bool tensor (high bit first, zero-padded), padded to whole float32 slots."""
    import torch

    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    octets = _padded(bits, 8).view(-1, 8).to(torch.uint8)
    return _padded((octets * weights).sum(dim=1, dtype=torch.uint8), 4)


def _scalar32(value: float, like):
    """``np.float32(value)`` as a 0-d tensor, so torch multiplies in float32 exactly as numpy does."""
    import torch

    return torch.tensor(float(np.float32(value)), dtype=torch.float32, device=like.device)


def _top_indices(magnitudes, k: int):
    """The sorted indices of the ``k`` largest magnitudes, ties at the threshold going to the lower
    indices, so numpy and torch pick the same set (``argpartition`` alone leaves ties unspecified)."""
    d = magnitudes.shape[0]
    if isinstance(magnitudes, np.ndarray):
        if k >= d:
            return np.arange(d)
        threshold = np.partition(magnitudes, d - k)[d - k]
        chosen = magnitudes >= threshold
        if np.count_nonzero(chosen) > k:  # a tie at the threshold: its lower indices only
            above, tied = magnitudes > threshold, magnitudes == threshold
            chosen = above | (tied & (np.cumsum(tied) <= k - np.count_nonzero(above)))
        return np.flatnonzero(chosen)
    import torch

    if k >= d:
        return torch.arange(d, device=magnitudes.device)
    threshold = torch.topk(magnitudes, k, sorted=False).values.min()
    chosen = magnitudes >= threshold
    if int(chosen.sum()) > k:  # the host waits here, as it does for nonzero's size below
        above, tied = magnitudes > threshold, magnitudes == threshold
        chosen = above | (tied & (tied.cumsum(0) <= k - above.sum()))
    return torch.nonzero(chosen).flatten()


def _random_indices(d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(d, size=k, replace=False))


def edge_rng(seed: int, step: int, sender: int, receiver: int, part: int = 0) -> np.random.Generator:
    """The randomness of one compressed message: a function of (seed, step, edge, part) only."""
    return np.random.default_rng((_SALT, seed, step, sender, receiver, part))


def parse_compression(spec: str | None) -> Compressor | None:
    return None if spec in (None, "", "none") else Compressor.parse(spec)


class Differential:
    """One directed edge's error-feedback copy ĥ (CHOCO's public copy x̂, a relay's m̂), kept by both
    ends: the sender sends Q(v − ĥ) and both ends add what it decodes to, so ĥ is the same number on
    both.  A lost message changes neither end (the sender knows the seeded drop, see ``relay_ray.links``).
    ``compressor`` None: the difference travels dense (exact; what CHOCO with Q = identity does)."""

    def __init__(self, start):
        self.copy = tensors.clone(tensors.float32(start))

    def send(self, v, compressor: Compressor | None, rng, delivered: bool):
        difference = tensors.float32(v) - self.copy
        if compressor is None:
            message, decoded = difference, difference
        else:
            message, decoded = compressor.roundtrip(difference, rng)
        if delivered:
            self.copy += decoded
        return message

    def receive(self, message, compressor: Compressor | None):
        if message is not None:
            self.copy += message if compressor is None else compressor.decode(message, self.copy.shape[0])
        return self.copy
