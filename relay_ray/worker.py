"""One decentralized worker: its problem (model + data shard), local optimizer and algorithm state.

A plain class: the simulator calls it directly and the Ray engine wraps it with ``ray.remote``
in one place, so tests can build it in-process.  No Ray import here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from relay_ray import checkpoint, tensors
from relay_ray.algorithms import make_algorithm
from relay_ray.algorithms.base import silent
from relay_ray.data import ArrayDataset
from relay_ray.experiment import WorkerSpec
from relay_ray.links import Links, message_dropped
from relay_ray.optim import learning_rate
from relay_ray.problems import ClassificationProblem, QuadraticsProblem, batched_loss_and_grad, can_batch
from relay_ray.quadratics import QuadraticsTask


def make_problem(spec: WorkerSpec, task_data: ArrayDataset | QuadraticsTask):
    config = spec.config
    if isinstance(task_data, QuadraticsTask):
        return QuadraticsProblem(task_data, spec.rank)
    return ClassificationProblem(task_data, spec.shard, config.model, config.batch_size, config.seed, spec.rank,
                                 config.eval_samples, config.device)


class Worker:
    def __init__(self, spec: WorkerSpec, task_data: ArrayDataset | QuadraticsTask, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.spec = spec
        self.config = spec.config
        self.rank = spec.rank
        self.problem = make_problem(spec, task_data)
        x0 = tensors.as_state(self.problem.initial_params(), self.config.tensor_kind, self.config.device)
        self.algorithm = make_algorithm(self.config.algorithm, spec.rank, spec.plan, x0,
                                        self.config.momentum, self.config.weight_decay, self.config.fill_rule,
                                        compression=self.config.compression,
                                        links=Links(self.config.seed, self.config.drop_prob),
                                        consensus_lr=self.config.consensus_lr)
        self.step_count = 0
        self.bytes_sent = 0
        self.samples_seen = 0
        self.losses: list[float] = []

    @property
    def degree(self) -> int:
        return len(self.algorithm.neighbors)

    def _unreliable(self, inbox: tuple) -> list:
        """The inbox as an unreliable link delivers it: a dropped message is ``None`` (DESIGN §1).

        A message from another process arrives as numpy; it joins the state's kind and device here."""
        p, sent_at = self.config.drop_prob, self.step_count - 1  # the messages of the step just taken
        params = self.algorithm.params
        return [None if message is None or message_dropped(self.config.seed, sent_at, j, self.rank, p)
                else tensors.like(message, params) for j, message in zip(self.algorithm.neighbors, inbox)]

    def receive(self, *inbox) -> None:
        """Finish the previous step's averaging with the neighbours' messages (after a step that did
        not communicate, --local-steps, there is nothing to finish)."""
        if self.config.communicates_at(self.step_count - 1):
            self.algorithm.incoming(self._unreliable(inbox))

    def step(self, *inbox) -> list:
        """Finish the previous averaging (if messages are given), take a local step, return messages.

        The messages are in ``neighbors`` order, one per neighbour, in the state's kind.
        """
        if inbox:
            self.receive(*inbox)
        loss, grad = self.problem.loss_and_grad(self.algorithm.params)
        return self.advance(loss, grad)

    def advance(self, loss, grad) -> list:
        """The local step with this gradient (computed by ``step`` or batched with other workers'),
        then this step's messages."""
        config = self.config
        lr = self.spec.lr_scale * learning_rate(self.step_count, config.lr, self.spec.total_steps,
                                                self.spec.warmup_steps, tuple(config.decay_at))
        self.algorithm.step = self.step_count  # the step these messages belong to (per-edge streams, drops)
        self.algorithm.local_step(grad, lr)
        if config.communicates_at(self.step_count):
            messages = self.algorithm.outgoing()
        else:  # a plain local step (--local-steps): empty messages keep the routing, 0 bytes
            self.algorithm.local_only()
            messages = [silent(self.algorithm.params)] * self.degree
        self.losses.append(loss)  # a tensor on the device with torch state: read at the next evaluation
        self.step_count += 1
        self.samples_seen += self.problem.samples_per_step
        self.bytes_sent += sum(m.nbytes for m in messages)
        return messages

    def params(self):
        """The model in the state's kind (numpy, or torch on the device)."""
        return self.algorithm.params

    def host_params(self) -> np.ndarray:
        return tensors.to_host(self.algorithm.params)

    def _train_losses(self) -> list[float]:
        return [float(v) for v in self.losses]

    def evaluate(self) -> dict:
        """Small metrics dict of this worker's current model (call after ``receive``)."""
        losses = self._train_losses()
        train_loss = float(np.mean(losses)) if losses else float("nan")
        self.losses = []
        return {
            "rank": self.rank,
            "step": self.step_count,
            "metric": self.problem.evaluate(self.algorithm.params),
            "train_loss": train_loss,
            "bytes_sent": self.bytes_sent,
            "samples": self.samples_seen,
        }

    def evaluate_params(self, params) -> float:
        """The task metric of another model (the averaged one) with this worker's evaluator."""
        return self.problem.evaluate(params)

    # ------------------------------------------------------------------ after a failure (--on-failure)
    def set_fill(self, fill: str | None) -> None:
        if fill is not None and hasattr(self.algorithm, "fill"):
            self.algorithm.fill = fill

    def reconfigure(self, plan, lr_scale: float, fill: str | None) -> None:
        """Go on in ``plan`` from the current model and optimizer state.  The communication state (relay
        buffers, gossip corrections) belongs to the old plan and starts afresh, as at step 0."""
        params, optimizer = self.algorithm.params, self.algorithm.optimizer.state_dict()
        self.spec = dataclasses.replace(self.spec, plan=plan, lr_scale=lr_scale)
        relay_fill = fill if hasattr(self.algorithm, "fill") else None
        self.algorithm = make_algorithm(self.config.algorithm, self.rank, plan, params, self.config.momentum,
                                        self.config.weight_decay, relay_fill, consensus_lr=self.config.consensus_lr)
        self.algorithm.optimizer.load_state_dict(optimizer)

    def adopt(self, params: np.ndarray, step: int) -> None:
        """A replacement worker: start from ``params`` (a neighbour's model) at ``step``; its momentum starts at 0."""
        self.algorithm.params = tensors.clone(tensors.like(params, self.algorithm.params))
        self.algorithm.half = self.algorithm.params
        self.step_count = step

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything this worker carries from one step to the next (at a step boundary, after ``receive``)."""
        return {
            "algorithm": self.algorithm.state_dict(),  # model, momentum, relay buffers / corrections
            "problem": self.problem.state_dict(),  # batch RNG and data-iterator position
            "step_count": self.step_count,
            "bytes_sent": self.bytes_sent,
            "samples_seen": self.samples_seen,
            "losses": self._train_losses(),  # train losses since the last evaluation
        }

    def load_state_dict(self, state: dict) -> None:
        self.algorithm.load_state_dict(state["algorithm"])
        self.problem.load_state_dict(state["problem"])
        self.step_count = int(state["step_count"])
        self.bytes_sent = int(state["bytes_sent"])
        self.samples_seen = int(state["samples_seen"])
        self.losses = [float(v) for v in state["losses"]]

    def save_checkpoint(self, directory: str) -> dict:
        """Write this worker's state into ``directory`` (itself: the driver never sees the model)."""
        header = checkpoint.worker_header(self.config, self.spec.plan)
        record = checkpoint.save_worker(directory, self.rank, {**header, "step": self.step_count}, self.state_dict())
        # the driver commits no checkpoint of a diverged model: the newest one stays a good one
        finite = tensors.all_finite(self.algorithm.params) and all(np.isfinite(self._train_losses()))
        return {**record, "finite": finite}

    def load_checkpoint(self, directory: str) -> int:
        """Restore this worker from ``directory``; returns the step it resumes at."""
        state = checkpoint.load_worker(directory, self.rank, checkpoint.worker_header(self.config, self.spec.plan))
        self.load_state_dict(state)
        return self.step_count


def step_workers(workers: list[Worker], inboxes: list[list], batched: bool) -> list[list]:
    """One step of these workers (one process's): finish the averaging with each inbox (if any), compute
    every gradient (one after another, or in one vmap call when ``batched`` and the problems allow),
    take the local steps; returns each worker's messages.  The same numbers as ``Worker.step`` each,
    the vmap path within float tolerance."""
    if not (batched and can_batch([w.problem for w in workers])):
        return [worker.step(*inbox) for worker, inbox in zip(workers, inboxes)]
    for worker, inbox in zip(workers, inboxes):
        if inbox:
            worker.receive(*inbox)
    results = gradients(workers, batched)
    return [worker.advance(loss, grad) for worker, (loss, grad) in zip(workers, results)]


def gradients(workers: list[Worker], batched: bool) -> list[tuple]:
    problems = [w.problem for w in workers]
    if batched and can_batch(problems):
        return batched_loss_and_grad(problems, [w.algorithm.params for w in workers])
    return [w.problem.loss_and_grad(w.algorithm.params) for w in workers]
