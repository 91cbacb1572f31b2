"""Tests for relay_ray.data: loaders (offline), Dirichlet partition properties, batch transforms."""

from __future__ import annotations

import gzip
import io
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from relay_ray import data
from relay_ray.data import (
    CIFAR10_CLASSES,
    DATASETS,
    ArrayDataset,
    augment_batch,
    dirichlet_partition,
    paper_partition,
    label_histograms,
    load_dataset,
    normalize_batch,
    plot_partition,
)
from relay_ray.errors import DataError

SHARED_DATA = Path("/work/shared/data")


def test_pure_modules_do_not_import_ray():
    code = "import sys, relay_ray.data, relay_ray.models; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------------------
# digits / MNIST


def test_digits_offline_shapes_and_stats():
    ds = load_dataset("digits")
    assert isinstance(ds, ArrayDataset) and ds.name == "digits"
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10 and not ds.augment
    assert np.isclose(ds.mean[0], (ds.x_train / 255).mean()) and np.isclose(ds.std[0], (ds.x_train / 255).std())
    # stratified: every class in both splits in roughly the same proportion
    assert np.abs(np.bincount(ds.y_train) / len(ds.y_train) - np.bincount(ds.y_test) / len(ds.y_test)).max() < 0.01
    assert np.array_equal(load_dataset("digits").y_test, ds.y_test)  # fixed split


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="digits, mnist, cifar10"):
        load_dataset("imagenet")
    assert DATASETS == ("digits", "mnist", "cifar10")


def _write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def test_mnist_full_idx_set(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 50, True), ("t10k", 20, False)):  # gzipped and plain both accepted
        suffix = ".gz" if gz else ""
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz)
    ds = load_dataset("mnist", str(tmp_path))
    assert ds.x_train.shape == (50, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    assert np.array_equal(ds.y_test, np.arange(20) % 10)
    assert capsys.readouterr().err == ""


def test_mnist_shared_t10k_only_splits_with_warning(capsys):
    root = SHARED_DATA / "mnist"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    ds = load_dataset("mnist", str(root))
    assert ds.x_train.shape == (8000, 1, 28, 28) and ds.x_test.shape == (2000, 1, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert set(np.unique(ds.y_train)) == set(range(10)) and ds.input_shape == (1, 28, 28)
    assert 0.1 < ds.mean[0] < 0.15  # MNIST's well-known mean 0.1307
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t10k" in err and "80/20" in err


def test_mnist_missing_dir_says_which_files(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", str(tmp_path / "nowhere"))
    message = str(info.value)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte", "MNIST/raw", "nowhere"):
        assert name in message
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", str(tmp_path))  # exists but empty


def test_mnist_corrupt_file_is_named(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*magic"):
        load_dataset("mnist", str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", str(tmp_path))


# --------------------------------------------------------------------------------------
# CIFAR-10


def _class_color(label: int) -> tuple[int, int, int]:
    return (label * 25, 255 - label * 25, (label * 70) % 256)


def _jpeg(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _make_cifar_tar(path: Path, per_class: dict[str, int], top: str = "cifar-mini") -> None:
    """An ImageFolder tree under a top-level folder, one solid colour per class, in shuffled order."""
    entries = [(split, label, i) for split, n in per_class.items() for label in range(10) for i in range(n)]
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as archive:
        for k in rng.permutation(len(entries)):
            split, label, i = entries[k]
            payload = _jpeg(_class_color(label))
            info = tarfile.TarInfo(f"{top}/{split}/{CIFAR10_CLASSES[label]}/{i:04d}.jpg")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def _check_mini_cifar(ds: ArrayDataset, n_train: int, n_test: int) -> None:
    assert ds.x_train.shape == (10 * n_train, 3, 32, 32) and ds.x_test.shape == (10 * n_test, 3, 32, 32)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert ds.augment and ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert np.array_equal(np.bincount(y), np.full(10, len(y) // 10))
        centre = x[:, :, 16, 16].astype(int)  # label must match the class colour the image was made with
        expected = np.array([_class_color(int(label)) for label in y])
        assert np.abs(centre - expected).max() <= 6


def test_cifar_classes_are_sorted_standard_order():
    assert tuple(sorted(CIFAR10_CLASSES)) == CIFAR10_CLASSES


def test_cifar_tar_loads_and_second_load_hits_cache(tmp_path, monkeypatch):
    archive = tmp_path / "mini.tar.gz"
    _make_cifar_tar(archive, {"train": 3, "test": 2})
    cache = tmp_path / "cache"
    ds = load_dataset("cifar10", str(archive), str(cache))
    _check_mini_cifar(ds, 3, 2)
    assert len(list(cache.glob("cifar10-*.npz"))) == 1
    assert not list(tmp_path.glob("cifar-mini*"))  # streamed, nothing extracted

    def fail(*_):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data, "_decode_cifar_tar", fail)
    again = load_dataset("cifar10", str(archive), str(cache))
    assert np.array_equal(again.x_train, ds.x_train) and np.array_equal(again.y_test, ds.y_test)
    assert again.mean == pytest.approx(ds.mean) and again.std == pytest.approx(ds.std)

    os.utime(archive, ns=(0, 10**9))  # a changed source (new mtime) must not reuse the old cache
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("cifar10", str(archive), str(cache))


def test_cifar_image_folder_tree(tmp_path):
    archive = tmp_path / "mini.tar.gz"
    _make_cifar_tar(archive, {"train": 2, "test": 1}, top="tree")
    with tarfile.open(archive) as f:
        f.extractall(tmp_path / "src", filter="data")
    ds = load_dataset("cifar10", str(tmp_path / "src"), str(tmp_path / "cache"))  # tree one level down
    _check_mini_cifar(ds, 2, 1)
    ds2 = load_dataset("cifar10", str(tmp_path / "src" / "tree"), str(tmp_path / "cache"))
    assert np.array_equal(ds.x_train, ds2.x_train)


def test_cifar_wrong_class_folders(tmp_path):
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as f:
        for split in ("train", "test"):
            payload = _jpeg((0, 0, 0))
            info = tarfile.TarInfo(f"{split}/cats/0.jpg")
            info.size = len(payload)
            f.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match="class folders"):
        load_dataset("cifar10", str(archive), str(tmp_path / "cache"))


def test_cifar_missing_sources_explain_data_dir(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "missing"), str(tmp_path / "cache"))
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path), str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_try_torchvision_download", lambda kind, root: None)  # as if offline
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10", None, str(tmp_path / "cache"))


@pytest.mark.slow
def test_real_cifar10_jpg_archive(tmp_path):
    archive = SHARED_DATA / "cifar10-jpg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not present")
    start = time.perf_counter()
    ds = load_dataset("cifar10", str(archive), str(tmp_path))
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    cached = load_dataset("cifar10", str(archive), str(tmp_path))
    reload_s = time.perf_counter() - start
    print(f"\nCIFAR-10 JPEG archive: first decode {decode_s:.1f} s, cached reload {reload_s:.2f} s")
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 5000))
    assert np.array_equal(np.bincount(ds.y_test), np.full(10, 1000))
    assert ds.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.01)  # the well-known CIFAR-10 mean
    assert np.array_equal(cached.x_train, ds.x_train)
    assert reload_s < 2.0


# --------------------------------------------------------------------------------------
# partition


def _uneven_labels(n: int = 1003, num_classes: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(num_classes, size=n, p=np.arange(1, num_classes + 1) / 28)


PARTITIONS = {"dirichlet": dirichlet_partition, "paper": paper_partition}


@pytest.mark.parametrize("split", PARTITIONS)
@pytest.mark.parametrize("num_workers, alpha", [(2, 0.1), (5, 1.0), (16, 0.01), (7, 100.0), (7, math.inf),
                                                (16, math.inf), (1003, 0.5), (25, 0.01)])
def test_partition_disjoint_complete_equal_reproducible(split, num_workers, alpha):
    partition = PARTITIONS[split]
    # the paper's split needs each small-alpha group to be fillable: balanced classes, as CIFAR-10
    labels = _uneven_labels() if split == "dirichlet" else np.arange(1003) % 10
    shards = partition(labels, num_workers, alpha, seed=3)
    assert len(shards) == num_workers
    assert all(s.dtype == np.int64 and np.all(np.diff(s) > 0) for s in shards)  # sorted, no repeats
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(len(labels)))  # disjoint + complete
    sizes = np.array([len(s) for s in shards])
    expected = np.full(num_workers, len(labels) // num_workers)
    expected[: len(labels) % num_workers] += 1
    assert np.array_equal(sizes, expected)
    again = partition(labels, num_workers, alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    if num_workers < len(labels):
        other = partition(labels, num_workers, alpha, seed=4)
        assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


@pytest.mark.parametrize("seed", range(5))
def test_partition_small_alpha_concentrates_classes(seed):
    labels = np.repeat(np.arange(10), 5000)  # CIFAR-10-like
    hist = label_histograms(labels, dirichlet_partition(labels, 16, 0.01, seed), 10)
    classes_per_worker = (hist > 0).sum(axis=1)  # strict: any sample of the class counts
    assert (classes_per_worker <= 3).sum() > 8, classes_per_worker


def test_paper_partition_small_alpha_gives_one_to_three_classes():
    """CIFAR-10's training labels (5000 per class; the split shuffles first, so order is moot)."""
    labels = np.repeat(np.arange(10), 5000)
    counts = []
    for seed in range(10):
        hist = label_histograms(labels, paper_partition(labels, 16, 0.01, seed), 10)
        # the authors' cut (cumulative proportions truncated to ints) leaves slivers of a few samples
        # of other classes; a class counts when it holds >= 2 % of the worker's 3125 samples
        counts += (hist >= 0.02 * hist.sum(axis=1, keepdims=True)).sum(axis=1).tolist()
    counts = np.array(counts)
    # measured over 20 seeds: 1-3 classes for 97.8 % of the workers, 4 for the rest, never more
    assert counts.min() >= 1 and counts.max() <= 4, np.bincount(counts)
    assert np.mean(counts <= 3) >= 0.95, np.bincount(counts)


def test_paper_partition_follows_the_authors_recipe():
    """Groups of 10 workers get contiguous slices of one shuffle drawn with seed + 100: with iid-like
    alpha every shard is near uniform, and the split depends on the seed only through seed + 100."""
    labels = np.repeat(np.arange(10), 5000)
    uniform = label_histograms(labels, paper_partition(labels, 16, 1e4, 0), 10)
    assert np.abs(uniform / uniform.sum(axis=1, keepdims=True) - 0.1).max() < 0.05
    skewed = label_histograms(labels, paper_partition(labels, 16, 0.01, 0), 10)
    assert not np.array_equal(skewed, label_histograms(labels, paper_partition(labels, 16, 0.01, 1), 10))
    assert np.array_equal(paper_partition(labels, 16, math.inf, 0)[0], dirichlet_partition(labels, 16, math.inf, 100)[0])


def test_paper_partition_impossible_split_is_one_line():
    with pytest.raises(ValueError, match="--partition paper: no split .* use --partition dirichlet"):
        paper_partition(np.repeat(np.arange(2), [1, 99]), 2, 1e-6, 0)


def test_partition_iid_is_near_uniform():
    labels = np.repeat(np.arange(10), 5000)
    hist = label_histograms(labels, dirichlet_partition(labels, 16, math.inf, 0), 10)
    fractions = hist / hist.sum(axis=1, keepdims=True)
    assert np.abs(fractions - 0.1).max() < 0.03


@pytest.mark.parametrize("split", PARTITIONS)
def test_partition_skew_grows_as_alpha_shrinks(split):
    labels = np.repeat(np.arange(10), 5000)
    spread = [(label_histograms(labels, PARTITIONS[split](labels, 16, a, 0), 10) > 0).sum(1).mean()
              for a in (math.inf, 1.0, 0.1, 0.01)]
    assert spread == sorted(spread, reverse=True) and spread[0] == 10


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 0.0}, "alpha must be > 0"), ({"alpha": -1.0}, "alpha must be > 0"),
    ({"alpha": float("nan")}, "alpha must be > 0"),
    ({"num_workers": 1}, "at least 2 workers"), ({"num_workers": 11}, "cannot split 10 samples"),
])
@pytest.mark.parametrize("split", PARTITIONS)
def test_partition_rejects_bad_arguments(split, kwargs, message):
    args = {"labels": np.arange(10) % 2, "num_workers": 2, "alpha": 1.0, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        PARTITIONS[split](**args)


def test_label_histograms_and_plot(tmp_path):
    labels = _uneven_labels()
    shards = dirichlet_partition(labels, 6, 0.1, 0)
    hist = label_histograms(labels, shards, 7)
    assert hist.shape == (6, 7)
    assert np.array_equal(hist.sum(axis=1), [len(s) for s in shards])
    assert np.array_equal(hist.sum(axis=0), np.bincount(labels, minlength=7))
    out = tmp_path / "plots" / "partition.png"
    plot_partition(hist, str(out), title="alpha=0.1")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------
# batch transforms


def test_normalize_batch_values():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(1, 3, 1, 1).repeat(2, 1, 2, 2)
    out = normalize_batch(x, (0.0, 0.2, 0.5), (1.0, 0.5, 0.25))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([0.0, 0.0, 2.0]).expand(2, 3))


def _augment_reference(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per-sample loop with the same random draws, written the obvious way."""
    b, _, h, w = x.shape
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    padded = F.pad(x, (padding,) * 4)
    out = []
    for i in range(b):
        crop = padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_augment_batch_matches_reference_and_is_deterministic():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = augment_batch(x, torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, _augment_reference(x, torch.Generator().manual_seed(7)))
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, augment_batch(x, torch.Generator().manual_seed(8)))
    assert (out == 0).any()  # zero padding shows up in some crops
    unshifted = torch.stack([x, x.flip(-1)])  # some samples get offset (4, 4): the image itself or its mirror
    assert ((out[None] == unshifted).flatten(2).all(-1)).any()


def test_augment_batch_float_input():
    x = torch.rand(5, 1, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (5, 1, 8, 8)
