"""The Ray engine: workers as actors, relay messages as object refs along the communication edges.

Dataflow (DESIGN §4).  Every step the driver submits, for every worker i, one task
``actor_i.step(*[ref of j's message to i, for j in neighbours(i)])`` which finishes the previous
averaging, takes the local step and returns one message per neighbour.  Messages are flat float32
numpy buffers that the *worker* puts in the object store; the driver only holds refs to them and
routes those refs into the neighbours' next step.  It never ``ray.get``s a model or a message:
only the small metric dicts of evaluations (``_fetch_metrics`` is the one place it reads values).
A bounded window of steps may be in flight; older steps are awaited (not fetched) so the object
store holds at most ``window`` steps of messages.  There is no global barrier per step except at
evaluations.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import time

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from relay_ray.config import RunConfig
from relay_ray.errors import UserError, WorkerFailure
from relay_ray.experiment import Experiment, build_experiment
from relay_ray.metrics import Progress, RunRecorder, consensus_distance, eval_row, summarize
from relay_ray.worker import Worker

DEFAULT_WINDOW = 4
PLACEMENT_TIMEOUT_S = 60.0


class RayWorker(Worker):
    """``Worker`` with object-store plumbing: messages in and out are refs, so bulk data moves
    worker-to-worker through the object store and the driver only ever sees refs."""

    failure: str | None = None

    @contextlib.contextmanager
    def _remember_failure(self):
        """A failed step is remembered so the next evaluation names this worker."""
        try:
            yield
        except Exception as exc:
            self.failure = self.failure or f"step {self.step_count}: {type(exc).__name__}: {exc}"
            raise

    def step(self, *inbox_refs):  # type: ignore[override]
        with self._remember_failure():
            inbox = ray.get(list(inbox_refs)) if inbox_refs else []
            refs = tuple(ray.put(m) for m in super().step(*inbox))
        return refs if len(refs) > 1 else refs[0]

    def receive(self, *inbox_refs) -> None:  # type: ignore[override]
        with self._remember_failure():
            super().receive(*ray.get(list(inbox_refs)))

    def evaluate(self) -> dict:
        if self.failure is not None:
            raise RuntimeError(f"worker {self.rank} failed at {self.failure}")
        return super().evaluate()

    def params_ref(self):
        return ray.put(self.params())

    def evaluate_average(self, *param_refs) -> dict:
        """Average the models (here, not on the driver), evaluate it, and the consensus distance."""
        params = ray.get(list(param_refs))
        average = np.mean(np.asarray(params, dtype=np.float64), axis=0).astype(np.float32)
        return {"avg_metric": self.evaluate_params(average), "consensus": consensus_distance(params)}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def ping(self) -> int:
        return self.rank


RemoteWorker = ray.remote(RayWorker)


def _fetch_metrics(refs, timeout: float | None = None):
    """The only place the driver reads values: small metric dicts (tests instrument this)."""
    return ray.get(refs, timeout=timeout)


def connect(address: str | None = None) -> bool:
    """Attach to ``address`` / RAY_ADDRESS, or start an embedded local Ray. True if we started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level="WARNING", configure_logging=True)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", include_dashboard=False, **kwargs)  # never a `ray start` cluster by accident
    except ConnectionError as exc:
        raise UserError(f"cannot connect to Ray at {address}: {exc}") from None
    return True


def _node_cpus() -> list[float]:
    return [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]


def _bundles_that_fit(cpus: float, node_cpus: list[float]) -> int:
    """How many worker bundles of ``cpus`` CPUs the nodes can hold (a bundle sits on one node)."""
    return sum(int(math.floor(c / cpus + 1e-9)) for c in node_cpus)


def _cpus_per_worker(config: RunConfig, requested: float | None) -> float:
    if requested is not None:
        if requested <= 0:
            raise UserError(f"--cpus-per-worker must be > 0, got {requested}")
        return requested
    # Default: the largest share (at most one CPU, in 1/100 steps) at which every worker fits.
    node_cpus = _node_cpus()
    share = math.floor(min(1.0, sum(node_cpus) / config.num_workers) * 100)
    while share > 1 and _bundles_that_fit(share / 100, node_cpus) < config.num_workers:
        share -= 1
    return max(share, 1) / 100


class RayEngine:
    """Builds the actors for one run and drives the dataflow."""

    def __init__(self, config: RunConfig, experiment: Experiment | None = None, window: int = DEFAULT_WINDOW,
                 cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0, placement: str = "spread",
                 placement_group=None, first_bundle: int = 0):
        """``placement_group``: reserve nothing and put worker ``rank`` in bundle ``first_bundle + rank`` of
        this existing group instead (a Tune trial's, whose bundle 0 holds the trial's driver)."""
        if window < 1:
            raise UserError(f"--window must be >= 1, got {window}")
        if placement not in ("spread", "pack"):
            raise UserError(f"--placement must be spread or pack, got {placement!r}")
        self.config = config
        self.experiment = experiment or build_experiment(config)
        self.window = window
        self.cpus = _cpus_per_worker(config, cpus_per_worker)
        self.gpus = gpus_per_worker
        self.owns_pg = placement_group is None
        if self.owns_pg:
            self.pg, self.first_bundle = self._reserve(placement), 0
        else:
            self.pg, self.first_bundle = placement_group, first_bundle
        data_ref = ray.put(self.experiment.task_data)  # once; actors read it zero-copy
        threads = max(1, int(self.cpus))
        self.actors = self._spawn_actors(data_ref, threads)
        self.plan = self.experiment.plan
        self.degrees = [len(n) for n in self.plan.neighbors]
        # Wait for every actor to be up, so startup (process spawn, torch import, model build) is
        # not billed to training time, and a worker that cannot start fails here.
        started = time.perf_counter()
        try:
            _fetch_metrics([actor.ping.remote() for actor in self.actors])
        except RayError as exc:
            self.shutdown()
            raise WorkerFailure(f"a worker failed to start: {str(exc).strip().splitlines()[0]}") from None
        self.startup_s = time.perf_counter() - started

    def _spawn_actors(self, data_ref, threads: int) -> list:
        """One actor per worker, worker ``rank`` in bundle ``first_bundle + rank`` (packing overrides this)."""
        return [
            RemoteWorker.options(
                num_cpus=self.cpus, num_gpus=self.gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=self.first_bundle + rank),
            ).remote(self.experiment.worker_spec(rank), data_ref, threads)
            for rank in range(self.config.num_workers)
        ]

    def _reserve(self, placement: str):
        self._check_resources()
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        pg = placement_group([bundle] * self.config.num_workers, strategy=placement.upper())
        try:
            _fetch_metrics(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            remove_placement_group(pg)
            raise UserError(f"the cluster could not place {self.config.num_workers} workers x {bundle} within "
                            f"{PLACEMENT_TIMEOUT_S:.0f}s; available: {ray.available_resources()}") from None
        return pg

    def _check_resources(self) -> None:
        need_cpu = self.cpus * self.config.num_workers
        have = ray.cluster_resources()
        node_cpus = _node_cpus()
        if _bundles_that_fit(self.cpus, node_cpus) < self.config.num_workers:
            raise UserError(f"{self.config.num_workers} workers x {self.cpus} CPU = {need_cpu:g} CPUs, but the cluster "
                            f"has {have.get('CPU', 0):g} (nodes: {', '.join(f'{c:g}' for c in node_cpus)}) and fits only "
                            f"{_bundles_that_fit(self.cpus, node_cpus)}; lower --cpus-per-worker or add nodes")
        if self.gpus and self.gpus * self.config.num_workers > have.get("GPU", 0) + 1e-9:
            raise UserError(f"{self.config.num_workers} workers x {self.gpus} GPU exceed the cluster's "
                            f"{have.get('GPU', 0):g} GPUs")

    def shutdown(self) -> None:
        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        if self.owns_pg:
            remove_placement_group(self.pg)

    # ---------------------------------------------------------------- dataflow
    def _submit_step(self, outboxes: list[list] | None) -> list[list]:
        inboxes = self.plan.route(outboxes) if outboxes is not None else [[] for _ in self.actors]
        new = []
        for actor, inbox, degree in zip(self.actors, inboxes, self.degrees):
            refs = actor.step.options(num_returns=degree).remote(*inbox)
            new.append(list(refs) if degree > 1 else [refs])
        return new

    def _evaluate(self, outboxes: list[list], step: int, wall_start: float) -> dict:
        for actor, inbox in zip(self.actors, self.plan.route(outboxes)):
            actor.receive.remote(*inbox)
        metric_refs = [actor.evaluate.remote() for actor in self.actors]
        param_refs = [actor.params_ref.remote() for actor in self.actors]
        average_ref = self.actors[0].evaluate_average.remote(*param_refs)
        per_worker = self._guarded(lambda: _fetch_metrics(metric_refs), step)
        average = self._guarded(lambda: _fetch_metrics(average_ref), step)
        metric = "test_acc" if self.config.dataset != "quadratics" else "suboptimality"
        return eval_row(step, per_worker, average["avg_metric"], average["consensus"],
                        time.perf_counter() - wall_start, metric)

    def _guarded(self, fn, step: int):
        try:
            return fn()
        except RayError as exc:
            raise self._failure(exc, step) from None

    def _failure(self, exc: Exception, step: int) -> WorkerFailure:
        """Name the dead worker(s): a ping to a dead actor is ready at once with an error."""
        dead = []
        pings = {actor.ping.remote(): rank for rank, actor in enumerate(self.actors)}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=30)
        for ref in ready:
            try:
                _fetch_metrics(ref)
            except RayError:
                dead.append(pings[ref])
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        who = f"worker {dead[0]}" if len(dead) == 1 else (f"workers {dead}" if dead else "a worker")
        return WorkerFailure(f"{who} died before step {step} ({type(exc).__name__}: {cause[:200]})")

    def run(self, progress: bool = True) -> dict:
        config, experiment = self.config, self.experiment
        start = time.perf_counter()
        recorder = RunRecorder(config.out, config)
        total = experiment.total_steps
        bar = Progress(total, f"{config.algorithm} (ray)", enabled=progress)
        in_flight: collections.deque[list] = collections.deque()
        outboxes = None
        try:
            for step in range(total):
                outboxes = self._submit_step(outboxes)
                in_flight.append([ref for refs in outboxes for ref in refs])
                if len(in_flight) > self.window:
                    # back-pressure: wait (without fetching) for the oldest step to finish
                    oldest = in_flight.popleft()
                    ray.wait(oldest, num_returns=len(oldest), fetch_local=False)
                bar.advance()
                if (step + 1) % config.eval_every == 0 or step + 1 == total:
                    row = self._evaluate(outboxes, step + 1, start)
                    outboxes = None
                    in_flight.clear()
                    recorder.record(row)
                    bar.report(row)
        finally:
            bar.close()
        summary = summarize(experiment, recorder.rows, time.perf_counter() - start, "ray", cpus_per_worker=self.cpus,
                            startup_s=self.startup_s, window=self.window)
        recorder.finish(summary)
        return summary

    def node_ids(self) -> list[str]:
        return _fetch_metrics([actor.node_id.remote() for actor in self.actors])


def run_on_ray(config: RunConfig, address: str | None = None, progress: bool = True,
               experiment: Experiment | None = None, **engine_options) -> dict:
    """Run ``config`` on Ray (embedded unless ``address``/RAY_ADDRESS); returns the summary."""
    experiment = experiment or build_experiment(config)  # user errors before Ray starts
    started = connect(address)
    engine = None
    try:
        from relay_ray.packing import make_engine  # packing subclasses RayEngine: imported late

        engine = make_engine(config, experiment, **engine_options)
        return engine.run(progress=progress)
    finally:
        if engine is not None:
            engine.shutdown()
        if started:
            ray.shutdown()
