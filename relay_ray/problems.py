"""What one worker optimises: its local loss and gradient at a flat parameter vector, and evaluation.

Two kinds: the quadratics task and classification with a torch model on a data shard.  Both
expose flat float32 numpy parameters, which is what the algorithms and messages use.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from relay_ray.data import ArrayDataset, augment_batch, normalize_batch
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

    def loss_and_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        loss, grad = self.task.local_loss_and_grad(self.rank, params)
        return loss, grad.astype(np.float32)

    def evaluate(self, params: np.ndarray) -> float:
        """F(x) - F* of the global objective at this model."""
        return self.task.suboptimality(params)

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

    def _inputs(self, images: np.ndarray, train: bool) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images))
        if train and self.dataset.augment:
            x = augment_batch(x, self.generator)  # on the CPU, so CPU and GPU runs draw the same crops
        return normalize_batch(x.to(self.device), self.dataset.mean, self.dataset.std)

    def loss_and_grad(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        self.flat.copy_(torch.from_numpy(params))
        batch = self._next_batch()
        x = self._inputs(self.dataset.x_train[batch], train=True)
        y = torch.from_numpy(self.dataset.y_train[batch]).to(self.device)
        self.model.train()
        if self.stochastic:
            torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=self.generator)))
        loss = F.cross_entropy(self.model(x), y)
        grads = torch.autograd.grad(loss, list(self.model.parameters()))
        return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads]).cpu().numpy()

    @torch.no_grad()
    def evaluate(self, params: np.ndarray, chunk: int = 1000) -> float:
        """Test accuracy of this model on the (subset of the) test set."""
        self.flat.copy_(torch.from_numpy(params))
        self.model.eval()
        correct = 0
        for start in range(0, len(self.test_indices), chunk):
            idx = self.test_indices[start:start + chunk]
            logits = self.model(self._inputs(self.dataset.x_test[idx], train=False))
            correct += int((logits.argmax(dim=1).cpu() == torch.from_numpy(self.dataset.y_test[idx])).sum())
        return correct / len(self.test_indices)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.copy(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = np.array(state["order"], dtype=np.int64)
        self.position = int(state["position"])
