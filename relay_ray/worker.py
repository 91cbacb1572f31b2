"""One decentralized worker: its problem (model + data shard), local optimizer and algorithm state.

A plain class: the simulator calls it directly and the Ray engine wraps it with ``ray.remote``
in one place, so tests can build it in-process.  No Ray import here.
"""

from __future__ import annotations

import numpy as np
import torch

from relay_ray.algorithms import make_algorithm
from relay_ray.data import ArrayDataset
from relay_ray.experiment import WorkerSpec
from relay_ray.optim import learning_rate
from relay_ray.problems import ClassificationProblem, QuadraticsProblem
from relay_ray.quadratics import QuadraticsTask


def make_problem(spec: WorkerSpec, task_data: ArrayDataset | QuadraticsTask):
    config = spec.config
    if isinstance(task_data, QuadraticsTask):
        return QuadraticsProblem(task_data, spec.rank)
    return ClassificationProblem(task_data, spec.shard, config.model, config.batch_size, config.seed, spec.rank,
                                 config.eval_samples)


class Worker:
    def __init__(self, spec: WorkerSpec, task_data: ArrayDataset | QuadraticsTask, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.spec = spec
        self.config = spec.config
        self.rank = spec.rank
        self.problem = make_problem(spec, task_data)
        self.algorithm = make_algorithm(self.config.algorithm, spec.rank, spec.plan, self.problem.initial_params(),
                                        self.config.momentum, self.config.weight_decay)
        self.step_count = 0
        self.bytes_sent = 0
        self.samples_seen = 0
        self.losses: list[float] = []

    @property
    def degree(self) -> int:
        return len(self.algorithm.neighbors)

    def receive(self, *inbox: np.ndarray | None) -> None:
        """Finish the previous step's averaging with the neighbours' messages."""
        self.algorithm.incoming(list(inbox))

    def step(self, *inbox: np.ndarray | None) -> list[np.ndarray]:
        """Finish the previous averaging (if messages are given), take a local step, return messages.

        The messages are in ``neighbors`` order, one per neighbour.
        """
        if inbox:
            self.algorithm.incoming(list(inbox))
        config = self.config
        lr = self.spec.lr_scale * learning_rate(self.step_count, config.lr, self.spec.total_steps,
                                                config.warmup_steps, tuple(config.decay_at))
        loss, grad = self.problem.loss_and_grad(self.algorithm.params)
        self.algorithm.local_step(grad, lr)
        messages = self.algorithm.outgoing()
        self.losses.append(loss)
        self.step_count += 1
        self.samples_seen += self.problem.samples_per_step
        self.bytes_sent += sum(m.nbytes for m in messages)
        return messages

    def params(self) -> np.ndarray:
        return self.algorithm.params

    def evaluate(self) -> dict:
        """Small metrics dict of this worker's current model (call after ``receive``)."""
        train_loss = float(np.mean(self.losses)) if self.losses else float("nan")
        self.losses = []
        return {
            "rank": self.rank,
            "step": self.step_count,
            "metric": self.problem.evaluate(self.algorithm.params),
            "train_loss": train_loss,
            "bytes_sent": self.bytes_sent,
            "samples": self.samples_seen,
        }

    def evaluate_params(self, params: np.ndarray) -> float:
        """The task metric of another model (the averaged one) with this worker's evaluator."""
        return self.problem.evaluate(params)
