"""Worker packing: several logical workers in one Ray actor (``relay-ray run --workers-per-actor K``).

One actor per worker costs a process (torch import, ~150 MB) and one Ray task per worker per step.
With K workers per actor, worker ranks are cut into contiguous groups of K; each group is one
actor holding K plain ``Worker`` objects, and each step is one task per *group*.  Messages between
two workers of the same group stay in the actor's memory; only messages that cross groups become
objects in the store, routed by the driver as refs exactly as in ``RayEngine`` (DESIGN §4).  The
workers run the same algorithm objects in the same order, so a packed run computes the same numbers
as one actor per worker and as the in-process simulator (tests/test_packing.py).

Contiguous groups keep a chain's messages almost all in process (2 crossing edges per group).

Crossing messages (and models sent for evaluation) go back as task return values, which Ray writes
once into the shared-memory store and the receiving task reads in place.  Ray returns values of
100 KB or less inline to the caller, the driver, instead; those are ``ray.put`` first, so the
driver only ever holds refs, whatever the model size (DESIGN §4).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from relay_ray.algorithms import CommPlan
from relay_ray.engine import RayEngine, _bundles_that_fit, _fetch_metrics, _node_cpus
from relay_ray.errors import UserError
from relay_ray.experiment import WorkerSpec
from relay_ray.metrics import consensus_distance, eval_row
from relay_ray.worker import Worker

Edge = tuple[int, int]  # (sender, receiver)
# Ray's max_direct_call_object_size (100 KiB): returns up to this size are inlined to the caller
INLINE_RETURN_BYTES = 100 * 1024


def _off_driver(value: np.ndarray):
    """``value`` as a task return that never lands in the driver's memory: itself when Ray will
    store it in the object store anyway, else the ref of a ``ray.put``."""
    return value if value.nbytes > INLINE_RETURN_BYTES else ray.put(value)


def _resolved(values) -> list:
    """Task arguments with the refs made by ``_off_driver`` fetched (one ``ray.get`` for all)."""
    values = list(values)
    at = [i for i, v in enumerate(values) if isinstance(v, ray.ObjectRef)]
    for i, fetched in zip(at, ray.get([values[i] for i in at])):
        values[i] = fetched
    return values


@dataclass(frozen=True)
class GroupLayout:
    """Which ranks share an actor, and the directed edges that cross actors, in a fixed order.

    ``incoming[g]`` are the crossing edges into group g (the arguments of its step task) and
    ``outgoing[g]`` those out of it (the task's return values); driver and actor use the same order.
    """

    groups: tuple[tuple[int, ...], ...]
    incoming: tuple[tuple[Edge, ...], ...]
    outgoing: tuple[tuple[Edge, ...], ...]

    @staticmethod
    def contiguous(plan: CommPlan, workers_per_actor: int) -> "GroupLayout":
        n = plan.num_workers
        groups = tuple(tuple(range(start, min(start + workers_per_actor, n))) for start in range(0, n, workers_per_actor))
        group_of = {rank: g for g, ranks in enumerate(groups) for rank in ranks}
        incoming = tuple(tuple((j, i) for i in ranks for j in plan.neighbors[i] if group_of[j] != g)
                         for g, ranks in enumerate(groups))
        outgoing = tuple(tuple((i, j) for i in ranks for j in plan.neighbors[i] if group_of[j] != g)
                         for g, ranks in enumerate(groups))
        return GroupLayout(groups, incoming, outgoing)

    def num_returns(self, group: int) -> int:
        return max(1, len(self.outgoing[group]))  # a group with no crossing edge returns one None


class WorkerGroup:
    """K plain ``Worker`` objects in one process; wrapped by ``ray.remote`` once, below.

    ``step(has_inbox, *crossing_messages)``: each worker finishes the previous averaging with its
    inbox (crossing messages from the arguments, the others from this actor's memory), takes its
    local step, and the messages to other groups are returned in ``layout.outgoing`` order.
    """

    worker_class = Worker
    failure: str | None = None

    def __init__(self, specs: list[WorkerSpec], task_data, num_threads: int | None, layout: GroupLayout,
                 group: int):
        self.workers = [self.worker_class(spec, task_data, num_threads) for spec in specs]
        self.ranks = [spec.rank for spec in specs]
        self.plan = specs[0].plan
        self.incoming_edges = layout.incoming[group]
        self.outgoing_edges = layout.outgoing[group]
        self.local: dict[Edge, np.ndarray] = {}  # this step's messages between co-located workers

    @contextlib.contextmanager
    def _remember_failure(self, rank: int):
        try:
            yield
        except Exception as exc:
            self.failure = self.failure or f"worker {rank}: {type(exc).__name__}: {exc}"
            raise

    def _inboxes(self, crossing: tuple) -> list[list[np.ndarray]]:
        messages = dict(zip(self.incoming_edges, _resolved(crossing)))
        messages.update(self.local)
        return [[messages[(j, w.rank)] for j in self.plan.neighbors[w.rank]] for w in self.workers]

    def step(self, has_inbox: bool, *crossing: np.ndarray):
        inboxes = self._inboxes(crossing) if has_inbox else [[] for _ in self.workers]
        sent: dict[Edge, np.ndarray] = {}
        for worker, inbox in zip(self.workers, inboxes):
            with self._remember_failure(worker.rank):
                for j, message in zip(self.plan.neighbors[worker.rank], worker.step(*inbox)):
                    sent[(worker.rank, j)] = message
        crossing_out = [_off_driver(sent.pop(edge)) for edge in self.outgoing_edges]
        self.local = sent
        if len(crossing_out) > 1:
            return tuple(crossing_out)
        return crossing_out[0] if crossing_out else None

    def receive(self, *crossing: np.ndarray) -> None:
        for worker, inbox in zip(self.workers, self._inboxes(crossing)):
            with self._remember_failure(worker.rank):
                worker.receive(*inbox)
        self.local = {}

    def evaluate(self) -> list[dict]:
        if self.failure is not None:
            raise RuntimeError(f"{self.failure}")
        return [worker.evaluate() for worker in self.workers]

    def params(self):
        params = [_off_driver(worker.params()) for worker in self.workers]
        return tuple(params) if len(params) > 1 else params[0]

    def evaluate_average(self, *params: np.ndarray) -> dict:
        """Average the models (here, not on the driver), evaluate it, and the consensus distance."""
        params = _resolved(params)
        average = np.mean(np.asarray(params, dtype=np.float64), axis=0).astype(np.float32)
        return {"avg_metric": self.workers[0].evaluate_params(average), "consensus": consensus_distance(list(params))}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def ping(self) -> int:
        return self.ranks[0]


RemoteWorkerGroup = ray.remote(WorkerGroup)


class PackedRayEngine(RayEngine):
    """``RayEngine`` with ``workers_per_actor`` logical workers per actor (contiguous ranks).

    ``cpus_per_worker`` is then the reservation per *actor* (default: the cluster's CPUs shared by
    the actors, at most one each); ``run``, windows and evaluation rows are those of ``RayEngine``.
    """

    actor_class = RemoteWorkerGroup

    def __init__(self, config, experiment=None, workers_per_actor: int = 1, **options):
        if workers_per_actor < 1:
            raise UserError(f"--workers-per-actor must be >= 1, got {workers_per_actor}")
        self.workers_per_actor = workers_per_actor
        self.num_actors = math.ceil(config.num_workers / workers_per_actor)
        if options.get("cpus_per_worker") is None and ray.is_initialized():
            options["cpus_per_worker"] = self._default_cpus()
        super().__init__(config, experiment, **options)

    def _default_cpus(self) -> float:
        node_cpus = _node_cpus()
        share = math.floor(min(1.0, sum(node_cpus) / self.num_actors) * 100)
        while share > 1 and _bundles_that_fit(share / 100, node_cpus) < self.num_actors:
            share -= 1
        return max(share, 1) / 100

    def _check_resources(self) -> None:
        fits = _bundles_that_fit(self.cpus, _node_cpus())
        if fits < self.num_actors:
            raise UserError(f"{self.num_actors} actors ({self.config.num_workers} workers, {self.workers_per_actor} per "
                            f"actor) x {self.cpus} CPU do not fit the cluster (fits {fits}); lower "
                            "--cpus-per-worker, raise --workers-per-actor or add nodes")
        if self.gpus and self.gpus * self.num_actors > ray.cluster_resources().get("GPU", 0) + 1e-9:
            raise UserError(f"{self.num_actors} actors x {self.gpus} GPU exceed the cluster's GPUs")

    def _bundles(self) -> tuple[int, str]:
        return self.num_actors, f"actors ({self.workers_per_actor} workers each)"

    def _spawn_actors(self, data_ref, threads: int) -> list:
        self.layout = GroupLayout.contiguous(self.experiment.plan, self.workers_per_actor)
        return [
            self.actor_class.options(
                num_cpus=self.cpus, num_gpus=self.gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=self.first_bundle + group),
            ).remote([self.experiment.worker_spec(rank) for rank in ranks], data_ref, threads, self.layout, group)
            for group, ranks in enumerate(self.layout.groups)
        ]

    # ---------------------------------------------------------------- dataflow
    def _crossing_inboxes(self, outboxes: list[list]) -> list[list]:
        sent = {edge: ref for g, refs in enumerate(outboxes) for edge, ref in zip(self.layout.outgoing[g], refs)}
        return [[sent[edge] for edge in self.layout.incoming[g]] for g in range(len(self.actors))]

    def _submit_step(self, outboxes: list[list] | None) -> list[list]:
        """One task per group; returns, per group, the refs of its crossing messages."""
        has_inbox = outboxes is not None
        inboxes = self._crossing_inboxes(outboxes) if has_inbox else [[] for _ in self.actors]
        new = []
        for g, (actor, inbox) in enumerate(zip(self.actors, inboxes)):
            returns = self.layout.num_returns(g)
            refs = actor.step.options(num_returns=returns).remote(has_inbox, *inbox)
            new.append(list(refs) if returns > 1 else [refs])
        return new

    def _deliver(self, outboxes: list[list] | None) -> None:
        """Every worker finishes its averaging with this step's messages: nothing stays in flight."""
        if outboxes is not None:
            for actor, inbox in zip(self.actors, self._crossing_inboxes(outboxes)):
                actor.receive.remote(*inbox)

    def _evaluate(self, outboxes: list[list] | None, step: int, wall_start: float) -> dict:
        self._deliver(outboxes)
        metric_refs = [actor.evaluate.remote() for actor in self.actors]
        param_refs = []
        for actor, ranks in zip(self.actors, self.layout.groups):
            refs = actor.params.options(num_returns=len(ranks)).remote()
            param_refs += list(refs) if len(ranks) > 1 else [refs]
        average_ref = self.actors[0].evaluate_average.remote(*param_refs)
        per_worker = [row for rows in self._guarded(lambda: _fetch_metrics(metric_refs), step) for row in rows]
        average = self._guarded(lambda: _fetch_metrics(average_ref), step)
        metric = "test_acc" if self.config.dataset != "quadratics" else "suboptimality"
        return eval_row(step, per_worker, average["avg_metric"], average["consensus"],
                        time.perf_counter() - wall_start, metric)


def make_engine(config, experiment=None, workers_per_actor: int = 1, **options) -> RayEngine:
    """``RayEngine`` for one worker per actor (the default), ``PackedRayEngine`` otherwise."""
    if workers_per_actor == 1:
        return RayEngine(config, experiment, **options)
    return PackedRayEngine(config, experiment, workers_per_actor=workers_per_actor, **options)
