"""Datasets as in-memory uint8 arrays, Dirichlet non-iid partitions, and batch transforms (pure; no Ray).

Everything a worker needs is a plain array: the driver loads a dataset once (decoding JPEGs only the
first time, then from an ``.npz`` cache), puts the arrays in the object store once, and hands each
worker a list of indices (DESIGN §3).  Images stay ``uint8`` until a batch is drawn, which keeps
CIFAR-10 at 180 MB instead of 720 MB and makes the object-store copy cheap; ``augment_batch`` and
``normalize_batch`` then run on the batch only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from relay_ray.errors import DataError, UserError
from relay_ray.files import write_atomic

from relay_ray.names import DATASETS  # noqa: E402, F401  (re-exported)

# Standard CIFAR-10 label order (torchvision / the original batches.meta).  It happens to be
# alphabetical, so an ImageFolder tree whose class folders are sorted gets the same indices.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test
_CACHE_VERSION = 1  # bump when the cached array layout changes, so stale caches are ignored


@dataclass
class ArrayDataset:
    """A classification dataset held as uint8 ``N x C x H x W`` images and int64 labels.

    ``mean``/``std`` are per-channel statistics of ``x_train / 255`` (used by ``normalize_batch``);
    ``augment`` says whether training batches should get random crop + flip (CIFAR-10 only).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(C, H, W)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# loading


def default_cache_dir() -> Path:
    """``$RELAY_RAY_CACHE`` or ``~/.cache/relay_ray``: decoded arrays and downloads live here."""
    return Path(os.environ.get("RELAY_RAY_CACHE") or Path.home() / ".cache" / "relay_ray")


def load_dataset(name: str, data_dir: str | None = None, cache_dir: str | None = None) -> ArrayDataset:
    """Load dataset ``name`` (one of ``DATASETS``) as uint8 arrays.

    ``data_dir`` is where the raw data lives (ignored for ``digits``, which ships with scikit-learn);
    when it is None, MNIST and CIFAR-10 are looked for in (and downloaded to, when online)
    ``<cache_dir>/data``.  ``cache_dir`` (default ``default_cache_dir()``) holds decoded arrays.
    Missing or unreadable data raises ``DataError`` saying where to put it.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if name == "digits":
        return _load_digits()
    if name == "mnist":
        return _load_mnist(data_dir, cache)
    if name == "cifar10":
        return _load_cifar10(data_dir, cache)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _make_dataset(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray, num_classes: int, augment: bool,
                  stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> ArrayDataset:
    x_train, x_test = np.ascontiguousarray(x_train, np.uint8), np.ascontiguousarray(x_test, np.uint8)
    assert x_train.ndim == 4 and x_train.shape[1:] == x_test.shape[1:], (x_train.shape, x_test.shape)
    mean, std = stats if stats is not None else channel_stats(x_train)
    return ArrayDataset(name=name, x_train=x_train, y_train=np.asarray(y_train, np.int64),
                        x_test=x_test, y_test=np.asarray(y_test, np.int64), num_classes=num_classes,
                        mean=tuple(mean), std=tuple(std), augment=augment)


def channel_stats(x_uint8: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of ``x / 255`` from a 256-bin histogram per channel.

    The histogram avoids materialising a float copy of the whole training set (1.2 GB for CIFAR-10).
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(x_uint8.shape[1]):
        hist = np.bincount(x_uint8[:, c].reshape(-1), minlength=256).astype(np.float64)
        hist /= hist.sum()
        mean = float(hist @ values)
        means.append(mean)
        stds.append(float(np.sqrt(max(hist @ (values - mean) ** 2, 0.0))))
    return tuple(means), tuple(stds)


def _stratified_split(x: np.ndarray, y: np.ndarray) -> _Arrays:
    """Fixed 80/20 stratified split (random_state=0), so every run sees the same test set."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return x_train, y_train, x_test, y_test


def _load_digits() -> ArrayDataset:
    """scikit-learn's 8x8 digits (1797 images, offline): values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    x_train, y_train, x_test, y_test = _stratified_split(images, digits.target.astype(np.int64))
    return _make_dataset("digits", x_train, y_train, x_test, y_test, num_classes=10, augment=False)


# ---- MNIST


def _mnist_missing_message(where: str) -> str:
    names = ", ".join(f"{f}.gz" for f in MNIST_FILES.values())
    return (f"MNIST not found in {where}: put the four idx files ({names}; gzipped or not) in that "
            f"directory and pass it as --data-dir; on a machine with internet, "
            f"torchvision.datasets.MNIST(root, download=True) writes them to <root>/MNIST/raw")


def _find_mnist_file(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for candidate in (d / f"{stem}.gz", d / stem):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse one (optionally gzipped) idx file of unsigned bytes; a bad file is a ``DataError``.

    Format: 2 zero bytes, type code 0x08 (ubyte), number of dims, big-endian int32 sizes, data.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read MNIST file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise DataError(f"corrupt MNIST file {path}: bad magic number "
                        f"(expected 0x0000080{expected_ndim} for a {expected_ndim}-d ubyte idx file)")
    header = 4 + 4 * expected_ndim
    if len(raw) < header:
        raise DataError(f"corrupt MNIST file {path}: truncated header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=expected_ndim, offset=4))
    if len(raw) - header != math.prod(shape):
        raise DataError(f"corrupt MNIST file {path}: header says {shape} = {math.prod(shape)} bytes, "
                        f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_mnist_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(images, 3)[:, None]
    y = read_idx(labels, 1).astype(np.int64)
    if len(x) != len(y):
        raise DataError(f"MNIST files disagree: {images} has {len(x)} images, {labels} has {len(y)} labels")
    return x, y


def _load_mnist(data_dir: str | None, cache: Path) -> ArrayDataset:
    """MNIST from idx files in ``data_dir`` (or its torchvision layout ``MNIST/raw``).

    When only the ``t10k-*`` files are present (e.g. a copy holding just the official test set), the
    10000 test images are split 80/20 stratified (random_state=0) into train/test and a warning is
    printed to stderr: numbers from such a run are not comparable to full-MNIST results.
    With ``data_dir=None``, ``<cache>/data`` is searched and, if empty, a torchvision download is tried.
    """
    root = Path(data_dir).expanduser() if data_dir else cache / "data"
    if data_dir and not root.is_dir():
        raise DataError(_mnist_missing_message(f"{root} (no such directory)"))
    dirs = [root, root / "MNIST" / "raw"]
    found = {key: _find_mnist_file(dirs, stem) for key, stem in MNIST_FILES.items()}
    if data_dir is None and not all(found.values()):
        _try_torchvision_download("MNIST", root)
        found = {key: _find_mnist_file(dirs, stem) for key, stem in MNIST_FILES.items()}
    if found["test_images"] is None or found["test_labels"] is None:
        raise DataError(_mnist_missing_message(str(root)))
    x_test, y_test = _read_mnist_pair(found["test_images"], found["test_labels"])
    if found["train_images"] is not None and found["train_labels"] is not None:
        x_train, y_train = _read_mnist_pair(found["train_images"], found["train_labels"])
    else:
        print(f"warning: MNIST train files not found in {root}; splitting the 10000 t10k images 80/20 "
              f"into train/test (results are not comparable to full MNIST)", file=sys.stderr)
        x_train, y_train, x_test, y_test = _stratified_split(x_test, y_test)
    return _make_dataset("mnist", x_train, y_train, x_test, y_test, num_classes=10, augment=False)


def _try_torchvision_download(kind: str, root: Path) -> None:
    """Best effort: fetch ``kind`` with torchvision (fails quietly offline; the caller then explains)."""
    import torchvision

    try:
        root.mkdir(parents=True, exist_ok=True)
        getattr(torchvision.datasets, kind)(str(root), train=True, download=True)
        getattr(torchvision.datasets, kind)(str(root), train=False, download=True)
    except Exception:  # noqa: BLE001 - any network/IO failure means "not available"; caller raises DataError
        pass


# ---- CIFAR-10


def _cifar_missing_message(detail: str) -> str:
    return (f"CIFAR-10 not available ({detail}). Pass --data-dir pointing at one of: a torchvision "
            f"CIFAR-10 root (containing cifar-10-batches-py/, made by torchvision.datasets.CIFAR10(root, "
            f"download=True) on a machine with internet); an ImageFolder tree with train/<class>/*.jpg and "
            f"test/<class>/*.jpg; or a .tar.gz of such a tree. Class folders must be the CIFAR-10 names "
            f"({', '.join(CIFAR10_CLASSES)})")


def _load_cifar10(data_dir: str | None, cache: Path) -> ArrayDataset:
    """CIFAR-10 from a torchvision root, an ImageFolder JPEG tree, or a .tar.gz of that tree.

    JPEG sources are decoded once and cached as ``<cache>/cifar10-<key>.npz``, keyed by the source's
    resolved path, size and mtime, so later loads only read the arrays.  ``data_dir=None`` uses (and,
    when online, downloads into) the torchvision root ``<cache>/data``.
    """
    if data_dir is None:
        root = cache / "data"
        if not (root / "cifar-10-batches-py").is_dir():
            _try_torchvision_download("CIFAR10", root)
        if not (root / "cifar-10-batches-py").is_dir():
            raise DataError(_cifar_missing_message(f"no --data-dir given and download into {root} failed"))
        return _load_cifar10_torchvision(root)
    source = Path(data_dir).expanduser()
    if not source.exists():
        raise DataError(_cifar_missing_message(f"{source} does not exist"))
    if source.is_file():
        if not tarfile.is_tarfile(source):
            raise DataError(_cifar_missing_message(f"{source} is not a tar archive"))
        return _load_cifar10_cached(source, cache, lambda: _decode_cifar_tar(source))
    if source.name == "cifar-10-batches-py":
        source = source.parent
    if (source / "cifar-10-batches-py").is_dir():
        return _load_cifar10_torchvision(source)
    tree = _find_image_tree(source)
    if tree is None:
        raise DataError(_cifar_missing_message(f"{source} has neither cifar-10-batches-py/ nor train/ and test/"))
    return _load_cifar10_cached(tree, cache, lambda: _decode_cifar_tree(tree))


def _load_cifar10_torchvision(root: Path) -> ArrayDataset:
    import torchvision

    try:
        train = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
        test = torchvision.datasets.CIFAR10(str(root), train=False, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataError(_cifar_missing_message(f"{root}/cifar-10-batches-py: {exc}")) from None
    return _make_dataset("cifar10", _hwc_to_chw(train.data), np.asarray(train.targets),
                         _hwc_to_chw(test.data), np.asarray(test.targets), num_classes=10, augment=True)


def _hwc_to_chw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(images, np.uint8).transpose(0, 3, 1, 2))


def _find_image_tree(source: Path) -> Path | None:
    """``source`` itself or its single sub-folder, whichever holds ``train/`` and ``test/``."""
    if (source / "train").is_dir() and (source / "test").is_dir():
        return source
    subdirs = [d for d in source.iterdir() if d.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir() and (subdirs[0] / "test").is_dir():
        return subdirs[0]
    return None


def _cache_key(source: Path) -> str:
    """Hash of resolved path + size + mtime (for a tree: file count, total size, newest mtime)."""
    resolved = source.resolve()
    if resolved.is_file():
        st = resolved.stat()
        fingerprint = (st.st_size, st.st_mtime_ns)
    else:
        count = size = newest = 0
        for dirpath, _, filenames in os.walk(resolved):
            for filename in filenames:
                st = os.stat(os.path.join(dirpath, filename))
                count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
        fingerprint = (count, size, newest)
    text = f"v{_CACHE_VERSION}|{resolved}|{fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_cifar10_cached(source: Path, cache: Path, decode: Callable[[], _Arrays]) -> ArrayDataset:
    path = cache / f"cifar10-{_cache_key(source)}.npz"
    if path.is_file():
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test", "mean", "std")}
            return _make_dataset("cifar10", arrays["x_train"], arrays["y_train"], arrays["x_test"],
                                 arrays["y_test"], num_classes=10, augment=True,
                                 stats=(tuple(arrays["mean"].tolist()), tuple(arrays["std"].tolist())))
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a truncated or foreign cache file: decode again and overwrite it
    x_train, y_train, x_test, y_test = decode()
    dataset = _make_dataset("cifar10", x_train, y_train, x_test, y_test, num_classes=10, augment=True)
    _write_cache(path, dataset)
    return dataset


def _write_cache(path: Path, dataset: ArrayDataset) -> None:
    """Write atomically (temp file + rename) so a killed run never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, x_train=dataset.x_train, y_train=dataset.y_train,
                                          x_test=dataset.x_test, y_test=dataset.y_test,
                                          mean=np.array(dataset.mean), std=np.array(dataset.std)))


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad image
        raise DataError(f"cannot decode image {where}: {exc}") from None
    if array.shape != (32, 32, 3):
        raise DataError(f"image {where} is {array.shape[1]}x{array.shape[0]}, CIFAR-10 images are 32x32")
    return array


def _split_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """``(split, class)`` for a path ``[prefix/]split/class/file`` with split in train/test."""
    if len(parts) >= 3 and parts[-3] in ("train", "test"):
        return parts[-3], parts[-2]
    return None


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _assemble(samples: dict[str, list[tuple[str, str, np.ndarray]]], where: str) -> _Arrays:
    """Turn ``{split: [(class, file name, HWC image)]}`` into NCHW arrays with CIFAR-10 label ids.

    Samples are sorted by (class, file name), so the arrays do not depend on archive order.
    """
    out = []
    for split in ("train", "test"):
        items = samples.get(split, [])
        if not items:
            raise DataError(_cifar_missing_message(f"no {split}/<class>/*.jpg images in {where}"))
        classes = sorted({c for c, _, _ in items})
        if tuple(classes) != CIFAR10_CLASSES:
            raise DataError(_cifar_missing_message(f"{where} {split}/ has class folders {classes}"))
        index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
        items.sort(key=lambda item: (index[item[0]], item[1]))
        x = np.stack([image for _, _, image in items]).transpose(0, 3, 1, 2)
        y = np.array([index[c] for c, _, _ in items], dtype=np.int64)
        out += [np.ascontiguousarray(x), y]
    return out[0], out[1], out[2], out[3]


def _decode_cifar_tar(path: Path) -> _Arrays:
    """Stream the archive (no extraction to disk; the source may be read-only) and decode each JPEG."""
    samples: dict[str, list[tuple[str, str, np.ndarray]]] = {}
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if not member.isfile() or not member.name.lower().endswith(_IMAGE_SUFFIXES):
                    continue
                split_class = _split_class(Path(member.name).parts)
                if split_class is None:
                    continue
                f = archive.extractfile(member)
                assert f is not None
                image = _decode_jpeg(f.read(), f"{path}:{member.name}")
                samples.setdefault(split_class[0], []).append((split_class[1], member.name, image))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read CIFAR-10 archive {path}: {exc}") from None
    return _assemble(samples, str(path))


def _decode_cifar_tree(root: Path) -> _Arrays:
    samples: dict[str, list[tuple[str, str, np.ndarray]]] = {}
    for split in ("train", "test"):
        for class_dir in sorted(d for d in (root / split).iterdir() if d.is_dir()):
            for file in sorted(class_dir.iterdir()):
                if file.suffix.lower() in _IMAGE_SUFFIXES:
                    image = _decode_jpeg(file.read_bytes(), str(file))
                    samples.setdefault(split, []).append((class_dir.name, file.name, image))
    return _assemble(samples, str(root))


# --------------------------------------------------------------------------------------
# partitioning


def _checked_split(labels, num_workers: int, alpha: float) -> np.ndarray:
    """The labels as an array, after refusing a split that cannot be made (one line each)."""
    labels = np.asarray(labels)
    if not alpha > 0:
        raise UserError(f"Dirichlet alpha must be > 0 (use inf for iid), got {alpha}")
    if num_workers < 2:
        raise UserError(f"need at least 2 workers to partition data, got {num_workers}")
    if num_workers > len(labels):
        raise UserError(f"cannot split {len(labels)} samples over {num_workers} workers (need at least one each)")
    return labels


def dirichlet_partition(labels: np.ndarray, num_workers: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Split sample indices into ``num_workers`` equal-size shards with Dirichlet(alpha) label skew.

    Every index lands in exactly one shard; shard sizes differ by at most one (the first
    ``N % num_workers`` workers get one extra), as in the paper.  Classes are visited in random
    order; for each, proportions over the workers that still have room are drawn from
    Dir(alpha * 1), the class's remaining samples are sampled multinomially with them, counts are
    clipped at each worker's remaining room, and the clipped excess gets a fresh draw among the
    workers still open.  Re-drawing (instead of spreading the excess evenly) keeps a class
    concentrated on few workers at small alpha.  ``alpha = math.inf`` is the iid split (shuffle,
    cut).  Deterministic given ``seed``; returns sorted int64 index arrays.
    """
    labels = _checked_split(labels, num_workers, alpha)
    n = len(labels)
    rng = np.random.default_rng(seed)
    room = np.full(num_workers, n // num_workers, dtype=np.int64)
    room[: n % num_workers] += 1

    if math.isinf(alpha):
        cuts = np.cumsum(room)[:-1]
        return [np.sort(shard).astype(np.int64) for shard in np.split(rng.permutation(n), cuts)]

    assigned: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    for cls in rng.permutation(np.unique(labels)):
        indices = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        while start < len(indices):
            open_workers = np.flatnonzero(room > 0)
            proportions = _dirichlet(rng, alpha, len(open_workers))
            counts = rng.multinomial(len(indices) - start, proportions)
            counts = np.minimum(counts, room[open_workers])
            taking = counts > 0
            for worker, count in zip(open_workers[taking], counts[taking]):
                assigned[worker].append(indices[start:start + count])
                start += count
            room[open_workers] -= counts
    assert not room.any(), room
    return [np.sort(np.concatenate(parts)).astype(np.int64) for parts in assigned]


PAPER_GROUP_SIZE = 10
PAPER_SEED_OFFSET = 100
_PAPER_MAX_DRAWS = 10_000


def paper_partition(labels: np.ndarray, num_workers: int, alpha: float, seed: int) -> list[np.ndarray]:
    """The split of the RelaySGD authors' code (DESIGN §3), for reproducing their tables.

    Shuffle the samples; workers are taken ten at a time and each group gets a contiguous slice
    of the shuffled data in proportion to its size (the last group takes the rest).  Within a
    group, each class is cut over the group's workers with proportions ~ Dir(alpha), where a worker
    already holding its share of the group gets weight 0; the whole group is redrawn until every
    worker holds at least half its share.  The groups' lists are concatenated and cut into
    ``num_workers`` equal shards (sizes differ by at most one).  ``seed``: the run seed (the
    authors draw with seed + 100).  ``alpha = inf`` is the iid split of ``dirichlet_partition``.
    """
    labels = _checked_split(labels, num_workers, alpha)
    n = len(labels)
    if math.isinf(alpha):
        return dirichlet_partition(labels, num_workers, alpha, seed + PAPER_SEED_OFFSET)
    rng = np.random.default_rng(seed + PAPER_SEED_OFFSET)
    order = rng.permutation(n)
    group_sizes = [min(PAPER_GROUP_SIZE, num_workers - start) for start in range(0, num_workers, PAPER_GROUP_SIZE)]
    lists: list[np.ndarray] = []
    begin = 0
    for g, size in enumerate(group_sizes):
        end = n if g == len(group_sizes) - 1 else begin + int(size / num_workers * n)
        lists += _paper_group(order[begin:end], labels, size, alpha, rng)
        begin = end
    return [np.sort(shard).astype(np.int64) for shard in np.array_split(np.concatenate(lists), num_workers)]


def _paper_group(indices: np.ndarray, labels: np.ndarray, num_workers: int, alpha: float,
                 rng: np.random.Generator) -> list[np.ndarray]:
    share = len(indices) / num_workers
    group_labels = labels[indices]
    for _ in range(_PAPER_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
        sizes = np.zeros(num_workers, dtype=np.int64)
        for cls in np.unique(group_labels):
            members = indices[group_labels == cls]
            weights = rng.dirichlet(np.full(num_workers, alpha)) * (sizes < share)
            if not weights.sum() > 0:  # every open worker drew an underflowing 0: this draw fails
                break
            cuts = (np.cumsum(weights / weights.sum()) * len(members)).astype(np.int64)[:-1]
            for worker, piece in enumerate(np.split(members, cuts)):
                parts[worker].append(piece)
                sizes[worker] += len(piece)
        else:
            if sizes.min() >= int(0.5 * share):
                return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]
    raise UserError(f"--partition paper: no split of {len(indices)} samples over {num_workers} workers gives "
                    f"each at least half its share after {_PAPER_MAX_DRAWS} draws (alpha {alpha}); use "
                    "--partition dirichlet")


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """Dir(alpha * 1_k), renormalised in float64 so ``multinomial`` never sees a sum above 1."""
    p = rng.dirichlet(np.full(k, alpha)) if k > 1 else np.ones(1)
    if not np.isfinite(p).all() or p.sum() <= 0:  # underflow guard for tiny alpha
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p / p.sum()


def label_histograms(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-worker class counts, shape ``(num_workers, num_classes)``."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[shard], minlength=num_classes)[:num_classes] for shard in shards])


def plot_partition(histograms: np.ndarray, path: str, title: str = "") -> None:
    """Save a stacked bar chart (one bar per worker, one colour per class) to ``path`` (PNG)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_workers, num_classes = histograms.shape
    fig = Figure(figsize=(max(4.0, 0.35 * num_workers + 2.0), 3.5))
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    ax = fig.add_subplot()
    colors = colormaps["tab10" if num_classes <= 10 else "tab20"]
    bottom = np.zeros(num_workers)
    workers = np.arange(num_workers)
    for c in range(num_classes):
        ax.bar(workers, histograms[:, c], bottom=bottom, color=colors(c % colors.N), label=str(c), width=0.85)
        bottom += histograms[:, c]
    ax.set_xlabel("worker")
    ax.set_ylabel("samples")
    ax.set_xticks(workers if num_workers <= 32 else workers[:: max(1, num_workers // 16)])
    if title:
        ax.set_title(title)
    if num_classes <= 20:
        ax.legend(title="class", fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------
# batch transforms


def normalize_batch(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """float32 ``(x / 255 - mean) / std`` per channel, for an ``N x C x H x W`` batch."""
    x = x_uint8.to(torch.float32).div_(255.0)
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(shape)
    return x.sub_(mean_t).div_(std_t)


def augment_draws(batch_size: int, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The random draws of ``augment_batch`` for ``batch_size`` samples, as a ``(b, 3)`` int64 CPU tensor:
    crop offset y, crop offset x, flip (0/1).  Drawn on the CPU, so every device sees the same crops."""
    offset_y = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator)
    offset_x = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator)
    flip = torch.rand(batch_size, generator=generator) < 0.5
    return torch.stack([offset_y, offset_x, flip.long()], dim=1)


def apply_augment(x: torch.Tensor, draws: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Crop and flip each sample of ``x`` as ``draws`` (from ``augment_draws``, on ``x``'s device) say,
    with one gather for the whole batch."""
    b, c, h, w = x.shape
    padded = x.new_zeros((b, c, h + 2 * padding, w + 2 * padding))
    padded[:, :, padding:padding + h, padding:padding + w] = x
    rows = draws[:, 0:1] + torch.arange(h, device=x.device)              # (b, h)
    cols = draws[:, 1:2] + torch.arange(w, device=x.device)              # (b, w)
    cols = torch.where(draws[:, 2:3].bool(), cols.flip(1), cols)
    batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


def augment_batch(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``padding``) + random horizontal flip, independently per sample.

    The standard CIFAR-10 augmentation (RandomCrop(32, padding=4) + RandomHorizontalFlip) done for
    the whole batch with one gather, deterministic given ``generator`` (a CPU generator).  Apply it
    to the uint8 batch before ``normalize_batch`` so padded pixels are black, as with torchvision.
    """
    return apply_augment(x, augment_draws(len(x), generator, padding).to(x.device), padding)
