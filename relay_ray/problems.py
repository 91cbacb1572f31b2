"""What one worker optimises: its local loss and gradient at a flat parameter vector, and evaluation.

Two kinds: the quadratics task and classification with a torch model on a data shard.  Both take
the flat float32 parameters the algorithms hold, numpy or torch (``relay_ray.tensors``), and return
the gradient in the same kind: with torch state on a GPU the step never leaves the device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from relay_ray import tensors
from relay_ray.data import ArrayDataset, apply_augment, augment_draws, normalize_batch
from relay_ray.errors import UserError
from relay_ray.models import build_model
from relay_ray.quadratics import QuadraticsTask


class QuadraticsProblem:
    metric = "suboptimality"
    higher_is_better = False
    samples_per_step = 1

    def __init__(self, task: QuadraticsTask, rank: int):
        self.task = task
        self.rank = rank

    def initial_params(self) -> np.ndarray:
        return np.zeros(self.task.dimension, dtype=np.float32)

    def loss_and_grad(self, params):
        loss, grad = self.task.local_loss_and_grad(self.rank, tensors.to_host(params))
        return loss, tensors.like(grad.astype(np.float32), params)

    def evaluate(self, params) -> float:
        """F(x) - F* of the global objective at this model."""
        return self.task.suboptimality(tensors.to_host(params))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ClassificationProblem:
    """A torch model trained on one shard; its parameters are views into one flat buffer."""

    metric = "test_acc"
    higher_is_better = True

    def __init__(self, dataset: ArrayDataset, shard: np.ndarray, model_name: str, batch_size: int, seed: int,
                 rank: int, eval_samples: int | None = None, device: str = "cpu"):
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device cuda, but torch sees no GPU on worker {rank}'s machine; use --device cpu")
        self.device = torch.device(device)
        self.dataset = dataset
        self.shard = np.asarray(shard, dtype=np.int64)
        self.batch_size = min(batch_size, len(self.shard))
        self.samples_per_step = self.batch_size
        torch.manual_seed(seed)  # the same x0 on every worker
        self.model = build_model(model_name, dataset.input_shape, dataset.num_classes).to(self.device)
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        offset = 0
        for p in self.model.parameters():
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.generator = torch.Generator().manual_seed(seed * 100_003 + rank)
        # dropout draws from torch's global RNG, which the workers of one process share: reseed it
        # from this worker's own stream before each forward, so masks do not depend on call order
        self.stochastic = any(isinstance(m, torch.nn.Dropout) for m in self.model.modules())
        self.named_shapes = [(name, p.shape) for name, p in self.model.named_parameters()]
        self.train_on_device = _training_set_on(dataset, self.device)
        shape = (1, -1, 1, 1)  # the normalisation constants live on the device once, not copied per batch
        self.mean = torch.tensor(dataset.mean, dtype=torch.float32).reshape(shape).to(self.device)
        self.std = torch.tensor(dataset.std, dtype=torch.float32).reshape(shape).to(self.device)
        self.order = np.empty(0, dtype=np.int64)
        self.position = 0
        test_size = len(dataset.y_test)
        if eval_samples is not None and eval_samples < test_size:
            self.test_indices = np.random.default_rng(seed).permutation(test_size)[:eval_samples]
        else:
            self.test_indices = np.arange(test_size)

    def initial_params(self) -> np.ndarray:
        return self.flat.cpu().numpy().copy()

    def _next_batch(self) -> np.ndarray:
        if self.position + self.batch_size > len(self.order):
            permutation = torch.randperm(len(self.shard), generator=self.generator).numpy()
            self.order = self.shard[permutation]
            self.position = 0
        batch = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def _inputs(self, images: np.ndarray) -> torch.Tensor:
        """Test images, normalised, on the device."""
        return normalize_batch(torch.from_numpy(np.ascontiguousarray(images)).to(self.device), self.mean, self.std)

    def draw(self) -> tuple[np.ndarray, torch.Tensor | None, int | None]:
        """This step's random draws from this worker's CPU generator, in a fixed order: the batch's
        sample indices, the crops and flips (None without augmentation), the dropout seed (None
        without dropout).  Every device and batching mode takes the same draws."""
        batch = self._next_batch()
        crops = augment_draws(len(batch), self.generator) if self.dataset.augment else None
        seed = int(torch.randint(2 ** 62, (1,), generator=self.generator)) if self.stochastic else None
        return batch, crops, seed

    def gather(self, draws: list[tuple[np.ndarray, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (inputs, labels) of one or more workers' draws, concatenated, on the device.

        With the training set on the GPU, the indices and crops go there in one copy from pinned
        memory and the images are gathered, cropped and normalised there: no step waits for the GPU."""
        index = np.concatenate([batch for batch, _ in draws])
        crops = torch.cat([c for _, c in draws]) if self.dataset.augment else None
        if self.train_on_device is not None:
            images, labels = self.train_on_device
            host = torch.from_numpy(index)[:, None]
            if crops is not None:
                host = torch.cat([host, crops], dim=1)
            on_device = host.pin_memory().to(self.device, non_blocking=True)
            x, y = images[on_device[:, 0]], labels[on_device[:, 0]]
            if crops is not None:
                x = apply_augment(x, on_device[:, 1:])
        else:
            x = torch.from_numpy(np.ascontiguousarray(self.dataset.x_train[index]))
            y = torch.from_numpy(self.dataset.y_train[index])
            if crops is not None:
                x = apply_augment(x, crops)
            x, y = x.to(self.device), y.to(self.device)
        return normalize_batch(x, self.mean, self.std), y

    def train_batch(self) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """The next (inputs, labels) on the device, and the dropout seed of this step (None: no dropout)."""
        batch, crops, seed = self.draw()
        x, y = self.gather([(batch, crops)])
        return x, y, seed

    def _load(self, params) -> None:
        self.flat.copy_(params if tensors.is_torch(params) else torch.from_numpy(np.asarray(params)))

    def loss_and_grad(self, params):
        """(loss, flat gradient) at ``params``; torch state gets a tensor loss and gradient on the device
        (nothing waits for the GPU), numpy state a float and a numpy gradient."""
        self._load(params)
        x, y, seed = self.train_batch()
        self.model.train()
        if seed is not None:
            torch.manual_seed(seed)
        loss = F.cross_entropy(self.model(x), y)
        grads = torch.autograd.grad(loss, list(self.model.parameters()))
        grad = torch.cat([g.reshape(-1) for g in grads])
        if tensors.is_torch(params):
            return loss.detach(), grad
        return float(loss.detach()), grad.cpu().numpy()

    def split(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named ``(K, *shape)`` views of ``K`` stacked flat parameter vectors (for ``functional_call``)."""
        views, offset = {}, 0
        for name, shape in self.named_shapes:
            size = shape.numel()
            views[name] = stacked[:, offset:offset + size].unflatten(1, shape)
            offset += size
        return views

    @torch.no_grad()
    def evaluate(self, params, chunk: int = 1000) -> float:
        """Test accuracy of this model on the (subset of the) test set."""
        self._load(params)
        self.model.eval()
        correct = 0
        for start in range(0, len(self.test_indices), chunk):
            idx = self.test_indices[start:start + chunk]
            logits = self.model(self._inputs(self.dataset.x_test[idx]))
            correct += int((logits.argmax(dim=1).cpu() == torch.from_numpy(self.dataset.y_test[idx])).sum())
        return correct / len(self.test_indices)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.copy(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = np.array(state["order"], dtype=np.int64)
        self.position = int(state["position"])


# The training set on a device, once per process and shared by its workers: {(id, device): (dataset, x, y)}
# (the dataset itself is kept so its id is never reused by another).
_ON_DEVICE: dict[tuple[int, str], tuple[ArrayDataset, torch.Tensor, torch.Tensor] | None] = {}
DEVICE_DATA_SHARE = 0.25  # the training set moves to the GPU when it takes at most this share of free memory


def _training_set_on(dataset: ArrayDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) of the training set on ``device`` (uint8 as stored: CIFAR-10 is 150 MB), or
    None on the CPU or where it does not fit; batches are then gathered on the host, as before."""
    if device.type != "cuda":
        return None
    key = (id(dataset), str(device))
    if key not in _ON_DEVICE:
        free, _ = torch.cuda.mem_get_info(device)
        if dataset.x_train.nbytes + dataset.y_train.nbytes > DEVICE_DATA_SHARE * free:
            _ON_DEVICE[key] = None
        else:
            _ON_DEVICE[key] = (dataset, torch.from_numpy(np.ascontiguousarray(dataset.x_train)).to(device),
                               torch.from_numpy(np.ascontiguousarray(dataset.y_train)).to(device))
    entry = _ON_DEVICE[key]
    return None if entry is None else entry[1:]


def can_batch(problems: list) -> bool:
    """vmap needs classification problems of one model and one batch shape (equal batch sizes)."""
    return (len(problems) > 1 and all(isinstance(p, ClassificationProblem) for p in problems)
            and len({(id(p.dataset), p.batch_size, str(p.device), tuple(p.named_shapes)) for p in problems}) == 1)


def batched_loss_and_grad(problems: list[ClassificationProblem], params: list) -> list[tuple]:
    """Every problem's (loss, flat gradient) from one vmapped forward/backward over the stacked models.

    Each problem draws its own batch exactly as ``loss_and_grad`` does (same samples, crops, flips);
    with dropout the masks come from the first worker's seed of the step (one stream for the
    process, as vmap draws them), so they differ from the loop's per-worker masks.
    """
    first, k = problems[0], len(problems)
    draws = [p.draw() for p in problems]
    x, y = first.gather([(batch, crops) for batch, crops, _ in draws])  # one gather for all the workers
    inputs, labels = x.unflatten(0, (k, -1)), y.unflatten(0, (k, -1))
    stacked = torch.stack([p if tensors.is_torch(p) else torch.from_numpy(np.asarray(p)) for p in params])
    stacked = stacked.to(first.device)
    first.model.train()

    def loss_of(named, x, y):
        return F.cross_entropy(functional_call(first.model, named, (x,)), y)

    if first.stochastic:
        torch.manual_seed(draws[0][2])
    grads, losses = vmap(grad_and_value(loss_of), randomness="different" if first.stochastic else "error")(
        first.split(stacked), inputs, labels)
    flat = torch.cat([grads[name].flatten(1) for name, _ in first.named_shapes], dim=1)
    if tensors.is_torch(params[0]):
        return [(losses[k], flat[k]) for k in range(len(problems))]
    losses_host, flat_host = losses.cpu().numpy(), flat.cpu().numpy()
    return [(float(losses_host[k]), flat_host[k]) for k in range(len(problems))]
