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

Error feedback needs a *contractive* compressor (E‖C(v) − v‖² ≤ (1 − δ)‖v‖², δ > 0).  ``contractive``
gives one for every spec: itself for topk and sign, and the unbiased ones scaled by 1/(1 + ω)
(Koloskova et al. 2019, arXiv:1902.00340, Remark 3.2; Stich et al. 2018): randk then sends v_i itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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

    def encode(self, v: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        v = np.asarray(v, dtype=np.float32)
        d = v.shape[0]
        if self.kind in ("topk", "randk"):
            k = self.count(d)
            if self.kind == "topk":
                index = np.sort(np.argpartition(np.abs(v), d - k)[d - k:]) if k < d else np.arange(d)
                values = v[index]
            else:
                index = np.sort(rng.choice(d, size=k, replace=False))
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

    def decode(self, message: np.ndarray, d: int) -> np.ndarray:
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

    def roundtrip(self, v: np.ndarray, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(encoded message, the dense vector the receiver decodes): the sender keeps the same copy."""
        message = self.encode(v, rng)
        return message, self.decode(message, v.shape[0])


def _padded(data: np.ndarray, multiple: int) -> np.ndarray:
    extra = (-data.shape[0]) % multiple
    return np.concatenate([data, np.zeros(extra, data.dtype)]) if extra else data


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

    def __init__(self, start: np.ndarray):
        self.copy = np.array(start, dtype=np.float32, copy=True)

    def send(self, v: np.ndarray, compressor: Compressor | None, rng, delivered: bool) -> np.ndarray:
        difference = np.asarray(v, dtype=np.float32) - self.copy
        if compressor is None:
            message, decoded = difference, difference
        else:
            message, decoded = compressor.roundtrip(difference, rng)
        if delivered:
            self.copy += decoded
        return message

    def receive(self, message: np.ndarray | None, compressor: Compressor | None) -> np.ndarray:
        if message is not None:
            self.copy += message if compressor is None else compressor.decode(message, self.copy.shape[0])
        return self.copy
