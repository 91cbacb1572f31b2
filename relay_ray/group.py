"""A worker group: K workers in one process, the unit the Ray engine places (pure; no Ray).

The engine puts one group in each actor (``relay_ray.engine.actors``); K = 1 is one worker per
actor, K = n all workers in one.  Worker ranks are cut into contiguous, balanced groups
(``GroupLayout``): a chain's messages then stay almost all inside a group (2 crossing edges per
group).  Each step is one call per group: every worker finishes the previous averaging with its
inbox (crossing messages come as arguments, the others from this group's memory), takes its local
step, and the messages to other groups are returned bundled, one list per group they go to.  The workers run
the same algorithm objects in the same order as the simulator, so any K computes the same numbers.

Evaluation never gathers models in one place: a group returns the float64 sum of its models; the
mean of those partial sums is the averaged model, and each group returns the squared distance of
its models to that mean, whose total over groups / n is the consensus distance.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from relay_ray import tensors
from relay_ray.algorithms import CommPlan
from relay_ray.experiment import WorkerSpec
from relay_ray.worker import Worker, gradients

Edge = tuple[int, int]  # (sender, receiver)
Link = tuple[int, tuple[Edge, ...]]  # (the other group, the crossing edges between the two, in a fixed order)


@dataclass(frozen=True)
class GroupLayout:
    """Which ranks share a group, and the messages that cross groups, bundled per pair of groups.

    All messages from group g to group h in one step travel as one bundle (a list of arrays, in the
    order of the link's edges): one object and one ref per neighbouring group and step, however many
    tree edges cross (a double binary tree over 2 groups of 32 has 63 crossing edges each way).
    ``outgoing[g]`` are g's links to the groups it sends to (its step's return values, in this order)
    and ``incoming[g]`` the links from the groups it receives from (its step's arguments); driver and
    group use the same order.
    """

    groups: tuple[tuple[int, ...], ...]
    incoming: tuple[tuple[Link, ...], ...]
    outgoing: tuple[tuple[Link, ...], ...]

    @staticmethod
    def balanced(plan: CommPlan, num_groups: int) -> "GroupLayout":
        """``num_groups`` contiguous groups whose sizes differ by at most one (8 in 3: 3 + 3 + 2)."""
        n = plan.num_workers
        if not 1 <= num_groups <= n:
            raise ValueError(f"cannot cut {n} workers into {num_groups} groups")
        bounds = np.linspace(0, n, num_groups + 1).round().astype(int)
        sizes = sorted(np.diff(bounds).tolist(), reverse=True)  # larger groups first: 3 + 3 + 2
        starts = np.concatenate([[0], np.cumsum(sizes)])
        return GroupLayout.from_groups(plan, [range(starts[g], starts[g + 1]) for g in range(num_groups)])

    @staticmethod
    def from_groups(plan: CommPlan, groups) -> "GroupLayout":
        """The layout of these groups of ranks (after a failure: the surviving groups only)."""
        groups = tuple(tuple(int(rank) for rank in ranks) for ranks in groups)
        group_of = {rank: g for g, ranks in enumerate(groups) for rank in ranks}
        crossing: dict[tuple[int, int], list[Edge]] = {}
        for i in sorted(group_of):
            for j in plan.neighbors[i]:
                if group_of[i] != group_of[j]:
                    crossing.setdefault((group_of[i], group_of[j]), []).append((i, j))
        outgoing: list[list[Link]] = [[] for _ in groups]
        incoming: list[list[Link]] = [[] for _ in groups]
        for (f, h), edges in sorted(crossing.items()):
            outgoing[f].append((h, tuple(edges)))
            incoming[h].append((f, tuple(edges)))
        return GroupLayout(groups, tuple(map(tuple, incoming)), tuple(map(tuple, outgoing)))

    @property
    def workers_per_group(self) -> int:
        return max(len(ranks) for ranks in self.groups)

    def crossing_edges(self, group: int) -> list[Edge]:
        """The edges out of ``group`` whose messages leave its process."""
        return [edge for _, edges in self.outgoing[group] for edge in edges]

    def route(self, outboxes: list[list]) -> list[list]:
        """Per group, its incoming bundles from every group's outgoing ones (bundles or refs alike)."""
        sent = {(g, h): bundle for g, bundles in enumerate(outboxes) for (h, _), bundle in zip(self.outgoing[g], bundles)}
        return [[sent[(f, g)] for f, _ in links] for g, links in enumerate(self.incoming)]


class WorkerGroup:
    """K plain ``Worker`` objects; the engine wraps it (or a subclass given as ``group_cls``) in an actor.

    ``worker_class`` is the seam for other workers (the communication benchmark's relay-only worker).
    """

    worker_class = Worker

    def __init__(self, specs: list[WorkerSpec], task_data, num_threads: int | None, layout: GroupLayout,
                 group: int):
        self.workers = [self.worker_class(spec, task_data, num_threads) for spec in specs]
        self.ranks = [spec.rank for spec in specs]
        self.plan = specs[0].plan
        self.batched = specs[0].config.batches_workers
        self.host_bundles = True  # crossing messages leave as host numpy (False: as they are, on the device)
        self.incoming_links = layout.incoming[group]
        self.outgoing_links = layout.outgoing[group]
        self.local: dict[Edge, np.ndarray] = {}  # this step's messages between workers of this group
        self.failure: str | None = None
        self.settled = True  # every worker finished its averaging (no step's messages left to receive)

    @contextlib.contextmanager
    def _remember_failure(self, rank: int):
        """A failed step is remembered so the next evaluation names the worker."""
        try:
            yield
        except Exception as exc:
            self.failure = self.failure or f"worker {rank} at step {self.step_count}: {type(exc).__name__}: {exc}"
            raise

    @property
    def step_count(self) -> int:
        return self.workers[0].step_count

    def _inboxes(self, bundles) -> list[list[np.ndarray]]:
        messages = {edge: message for (_, edges), bundle in zip(self.incoming_links, bundles)
                    for edge, message in zip(edges, bundle)}
        messages.update(self.local)
        return [[messages[(j, w.rank)] for j in self.plan.neighbors[w.rank]] for w in self.workers]

    def step(self, has_inbox: bool, *bundles: list[np.ndarray]) -> list[list[np.ndarray]]:
        """One step of every worker; returns one bundle of messages per outgoing link, in ``outgoing`` order.

        Messages between this group's workers stay in its memory (on its device, with torch state);
        only the bundles to other groups become host numpy arrays."""
        inboxes = self._inboxes(bundles) if has_inbox else [[] for _ in self.workers]
        if self.batched:  # every averaging finished, then one vmap call for all gradients, then the local steps
            for worker, inbox in zip(self.workers, inboxes):
                with self._remember_failure(worker.rank):
                    if inbox:
                        worker.receive(*inbox)
            with self._remember_failure(self.ranks[0]):
                results = gradients(self.workers, batched=True)
            outboxes = []
            for worker, (loss, grad) in zip(self.workers, results):
                with self._remember_failure(worker.rank):
                    outboxes.append(worker.advance(loss, grad))
        else:  # ``Worker.step`` each: the seam other worker classes (the comm benchmark's) implement
            outboxes = []
            for worker, inbox in zip(self.workers, inboxes):
                with self._remember_failure(worker.rank):
                    outboxes.append(worker.step(*inbox))
        sent: dict[Edge, np.ndarray] = {}
        for worker, messages in zip(self.workers, outboxes):
            for j, message in zip(self.plan.neighbors[worker.rank], messages):
                sent[(worker.rank, j)] = message
        leave = tensors.to_host if self.host_bundles else (lambda message: message)
        bundles_out = [[leave(sent.pop(edge)) for edge in edges] for _, edges in self.outgoing_links]
        self.local = sent
        self.settled = False
        return bundles_out

    def receive(self, *bundles: list[np.ndarray]) -> None:
        """Every worker finishes its averaging with this step's messages: nothing stays in flight."""
        for worker, inbox in zip(self.workers, self._inboxes(bundles)):
            with self._remember_failure(worker.rank):
                worker.receive(*inbox)
        self.local = {}
        self.settled = True

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> list[dict]:
        """Each worker's small metrics dict (call after ``receive``)."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        return [worker.evaluate() for worker in self.workers]

    def params_sum(self) -> np.ndarray:
        """The float64 sum of this group's models: its part of the averaged model."""
        return np.sum([np.asarray(w.host_params(), dtype=np.float64) for w in self.workers], axis=0)

    def squared_deviation(self, mean: np.ndarray) -> float:
        """sum over this group's workers of ||x_i - mean||^2: its part of the consensus distance."""
        return float(sum(np.sum((np.asarray(w.host_params(), dtype=np.float64) - mean) ** 2) for w in self.workers))

    def evaluate_params(self, params: np.ndarray) -> float:
        """The task metric of another model (the averaged one) with the first worker's evaluator."""
        return self.workers[0].evaluate_params(np.asarray(params, dtype=np.float32))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str) -> list[dict]:
        return [worker.save_checkpoint(directory) for worker in self.workers]

    def load_checkpoint(self, directory: str) -> int:
        steps = {worker.load_checkpoint(directory) for worker in self.workers}
        self.local, self.failure, self.settled = {}, None, True
        return steps.pop()

    # ------------------------------------------------------------------ surviving a failure (--on-failure)
    def status(self) -> tuple[int, bool]:
        """(steps taken, whether the last step's messages were received)."""
        return self.step_count, self.settled

    def params_of(self, rank: int) -> np.ndarray:
        return next(w for w in self.workers if w.rank == rank).host_params()

    def set_fill(self, fill: str | None) -> None:
        """RelaySGD's fill rule from now on (``current`` once a worker has died); others have none."""
        for worker in self.workers:
            worker.set_fill(fill)

    def reconfigure(self, plan: CommPlan, layout: GroupLayout, group: int, lr_scale: float, fill: str | None) -> None:
        """Go on in a new plan (the survivors', ``relay_ray.respan``) from the current models."""
        for worker in self.workers:
            worker.reconfigure(plan, lr_scale, fill)
        self.plan = plan
        self.incoming_links, self.outgoing_links = layout.incoming[group], layout.outgoing[group]

    def adopt(self, step: int, fill: str | None, *models: np.ndarray) -> None:
        """A replacement group: its workers take these models (a neighbour's, one per worker) at ``step``."""
        for worker, model in zip(self.workers, models):
            worker.adopt(model, step)
            worker.set_fill(fill)
