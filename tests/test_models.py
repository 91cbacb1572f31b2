"""Tests for relay_ray.models: shapes, no buffers, deterministic init, sizes, and a training sanity check."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch.nn import functional as F

from relay_ray.data import load_dataset, normalize_batch
from relay_ray.models import MODELS, build_model

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dataset", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_no_buffers_all_params_trained(name, dataset):
    shape = SHAPES[dataset]
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=10)
    # Workers exchange parameters only: a buffer (e.g. BatchNorm running stats) would never be averaged.
    assert list(model.buffers()) == []
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_init_is_deterministic_given_seed(name):
    def params(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [p.detach() for p in build_model(name, (3, 32, 32), 10).parameters()]

    first, same, other = params(1), params(1), params(2)
    assert all(torch.equal(a, b) for a, b in zip(first, same))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_resnet20_is_the_classic_size():
    count = num_params(build_model("resnet20", (3, 32, 32), 10))
    assert abs(count - 270_000) / 270_000 < 0.10, count  # He et al. 2016: 0.27M


def test_vgg11_size():
    count = num_params(build_model("vgg11", (3, 32, 32), 10))
    print(f"\nvgg11 (3x32x32, 10 classes): {count:,} parameters")
    # 9,220,480 conv + the authors' head: 2 x (512*512+512) + 512*10+10
    assert count == 9_750_922


def test_bad_arguments():
    with pytest.raises(ValueError, match="logreg, mlp, cnn, resnet20, vgg11"):
        build_model("resnet50", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", (32, 32), 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", (1, 8, 8), 1)


def test_mlp_trains_on_digits():
    ds = load_dataset("digits")
    x_train = normalize_batch(torch.from_numpy(ds.x_train), ds.mean, ds.std)
    x_test = normalize_batch(torch.from_numpy(ds.x_test), ds.mean, ds.std)
    y_train, y_test = torch.from_numpy(ds.y_train), torch.from_numpy(ds.y_test)
    torch.manual_seed(0)
    model = build_model("mlp", ds.input_shape, ds.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for batch in torch.randperm(len(y_train), generator=generator).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.9, accuracy


def test_vgg11_has_the_authors_dropout_head():
    model = build_model("vgg11", (3, 32, 32), 10)
    head = [type(m).__name__ for m in model.classifier]
    assert head == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert [m.out_features for m in model.classifier if isinstance(m, torch.nn.Linear)] == [512, 512, 10]


def test_dropout_masks_do_not_depend_on_call_order():
    """Workers of one process share torch's global RNG; each draws its dropout masks from its own
    stream, so the simulator (all workers in turn) and a Ray actor (its K workers) compute the same."""
    from relay_ray.problems import ClassificationProblem

    data = load_dataset("digits")
    shards = [np.arange(0, 200), np.arange(200, 400)]

    def problems():
        return [ClassificationProblem(data, shards[r], "vgg11", 16, seed=0, rank=r) for r in range(2)]

    first, second = problems(), problems()
    params = first[0].initial_params()
    in_turn = [[p.loss_and_grad(params)[1] for p in first] for _ in range(2)]
    torch.manual_seed(123)  # someone else used the global RNG in between
    alone = [[second[r].loss_and_grad(params)[1] for _ in range(2)] for r in range(2)]
    for step in range(2):
        for rank in range(2):
            assert np.array_equal(in_turn[step][rank], alone[rank][step])
    assert not np.array_equal(in_turn[0][0], in_turn[1][0])  # masks (and batches) change between steps
