"""The Ray engine: workers as actors, relay messages as object refs along the communication edges.

Dataflow (DESIGN §4).  Every step the driver submits, for every worker i, one task
``actor_i.step(*[ref of j's message to i, for j in neighbours(i)])`` which finishes the previous
averaging, takes the local step and returns one message per neighbour.  Messages are flat float32
numpy buffers that the *worker* puts in the object store; the driver only holds refs to them and
routes those refs into the neighbours' next step.  It never ``ray.get``s a model or a message:
only the small metric dicts of evaluations (``_fetch_metrics`` is the one place it reads values).
A bounded window of steps may be in flight; older steps are awaited (not fetched) so the object
store holds at most ``window`` steps of messages.  There is no global barrier per step except at
evaluations and checkpoints.

Reliability (DESIGN §6): every ``--checkpoint-every`` steps each actor writes its own worker file
and the driver commits the manifest (``relay_ray.checkpoint``).  When an actor or its node dies,
the next fetch fails; the engine then kills the survivors, reserves a new placement group on the
nodes still alive, starts fresh actors, loads the newest checkpoint of this run (or starts again
at step 0: a run is deterministic) and replays, at most ``max_restarts`` times.
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
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from relay_ray.checkpoint import Checkpoint, CheckpointStore
from relay_ray.config import RunConfig
from relay_ray.errors import UserError, WorkerFailure
from relay_ray.experiment import Experiment, build_experiment
from relay_ray.metrics import Progress, RunRecorder, consensus_distance, eval_row, summarize
from relay_ray.worker import Worker

DEFAULT_WINDOW = 4
DEFAULT_MAX_RESTARTS = 3
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

    def load_checkpoint(self, directory: str) -> int:  # type: ignore[override]
        step = super().load_checkpoint(directory)
        self.failure = None
        return step

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


def check_engine_options(window: int = DEFAULT_WINDOW, cpus_per_worker: float | None = None,
                         gpus_per_worker: float = 0.0, placement: str = "spread",
                         max_restarts: int = DEFAULT_MAX_RESTARTS, workers_per_actor: int = 1, **_) -> None:
    """The engine flags' values, checked before Ray starts (a bad flag never starts a cluster)."""
    if window < 1:
        raise UserError(f"--window must be >= 1, got {window}")
    if cpus_per_worker is not None and not cpus_per_worker > 0:
        raise UserError(f"--cpus-per-worker must be > 0, got {cpus_per_worker}")
    if not gpus_per_worker >= 0:
        raise UserError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    if placement not in ("spread", "pack"):
        raise UserError(f"--placement must be spread or pack, got {placement!r}")
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")
    if workers_per_actor < 1:
        raise UserError(f"--workers-per-actor must be >= 1, got {workers_per_actor}")


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
                 placement_group=None, first_bundle: int = 0, max_restarts: int = DEFAULT_MAX_RESTARTS):
        """``placement_group``: reserve nothing and put worker ``rank`` in bundle ``first_bundle + rank`` of
        this existing group instead (a Tune trial's, whose bundle 0 holds the trial's driver).
        ``max_restarts``: how often a run restarts its workers after a worker or node died."""
        check_engine_options(window=window, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                             placement=placement, max_restarts=max_restarts)
        self.config = config
        self.experiment = experiment or build_experiment(config)
        self.window = window
        self.max_restarts = max_restarts
        self.placement = placement
        self.cpus_requested = cpus_per_worker
        self.cpus = _cpus_per_worker(config, cpus_per_worker)
        self.gpus = gpus_per_worker
        self.owns_pg = placement_group is None
        if self.owns_pg:
            self.pg, self.first_bundle = self._reserve(placement), 0
        else:
            self.pg, self.first_bundle = placement_group, first_bundle
        self.data_ref = ray.put(self.experiment.task_data)  # once; actors read it zero-copy
        self.plan = self.experiment.plan
        self.degrees = [len(n) for n in self.plan.neighbors]
        self.restarts = 0
        started = time.perf_counter()
        try:
            self._start_actors()
        except WorkerFailure:
            self.shutdown()
            raise
        self.startup_s = time.perf_counter() - started
        if config.checkpoint_every is not None and not hasattr(self.actors[0], "save_checkpoint"):
            self.shutdown()
            raise UserError("--checkpoint-every is not supported by this engine's actors "
                            f"({type(self).__name__}); drop it or use one worker per actor")

    def _start_actors(self) -> None:
        """Spawn the actors and wait for every one to be up, so startup (process spawn, torch import,
        model build) is not billed to training time, and a worker that cannot start fails here."""
        self.actors = self._spawn_actors(self.data_ref, max(1, int(self.cpus)))
        try:
            _fetch_metrics([actor.ping.remote() for actor in self.actors])
        except RayError as exc:
            raise WorkerFailure(f"a worker failed to start: {str(exc).strip().splitlines()[0]}") from None

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

    def _bundles(self) -> tuple[int, str]:
        """How many bundles (one per actor) the run reserves, and what they hold (for messages)."""
        return self.config.num_workers, "workers"

    def _reserve(self, placement: str):
        self._check_resources()
        count, what = self._bundles()
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        pg = placement_group([bundle] * count, strategy=placement.upper())
        try:
            _fetch_metrics(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            remove_placement_group(pg)
            raise UserError(f"the cluster could not place {count} {what} x {bundle} within "
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
        self.actors = []
        if self.owns_pg and self.pg is not None:
            _remove_and_wait(self.pg)
            self.pg = None

    def _restart_actors(self) -> None:
        """New actors for all workers, in a new placement group sized for the nodes still alive."""
        self.shutdown()
        if self.owns_pg:
            try:
                self.cpus = _cpus_per_worker(self.config, self.cpus_requested)
                self.pg = self._reserve(self.placement)
            except UserError as exc:
                raise WorkerFailure(f"cannot place the workers again: {exc}") from None
        self._start_actors()

    # ---------------------------------------------------------------- dataflow
    def _submit_step(self, outboxes: list[list] | None) -> list[list]:
        inboxes = self.plan.route(outboxes) if outboxes is not None else [[] for _ in self.actors]
        new = []
        for actor, inbox, degree in zip(self.actors, inboxes, self.degrees):
            refs = actor.step.options(num_returns=degree).remote(*inbox)
            new.append(list(refs) if degree > 1 else [refs])
        return new

    def _deliver(self, outboxes: list[list] | None) -> None:
        """Every worker finishes its averaging with this step's messages: nothing stays in flight."""
        if outboxes is not None:
            for actor, inbox in zip(self.actors, self.plan.route(outboxes)):
                actor.receive.remote(*inbox)

    def _evaluate(self, outboxes: list[list] | None, step: int, wall_start: float) -> dict:
        self._deliver(outboxes)
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
        ready, unresponsive = ray.wait(list(pings), num_returns=len(pings), timeout=30)
        for ref in ready:
            try:
                _fetch_metrics(ref)
            except RayError:
                dead.append(pings[ref])
        dead = sorted(dead + [pings[ref] for ref in unresponsive])
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not dead:  # every actor answers: a worker's step raised (a bug, not a death); a replay would too
            return WorkerFailure(f"a worker failed before step {step} ({type(exc).__name__}: {cause[:300]})")
        who = f"worker {dead[0]}" if len(dead) == 1 else f"workers {dead}"
        failure = WorkerFailure(f"{who} died before step {step} ({type(exc).__name__}: {cause[:200]})")
        failure.dead = dead
        return failure

    def _save_checkpoint(self, directory, step: int) -> list[dict]:
        """Each actor writes its workers' files itself; the driver gets back small records."""
        refs = [actor.save_checkpoint.remote(str(directory)) for actor in self.actors]
        return self._guarded(lambda: _fetch_metrics(refs), step)

    def _load_checkpoint(self, checkpoint: Checkpoint) -> None:
        refs = [actor.load_checkpoint.remote(str(checkpoint.directory)) for actor in self.actors]
        try:
            _fetch_metrics(refs)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):  # a bad file: the user's, not a dead worker
                raise UserError(str(exc.cause)) from None
            raise self._failure(exc, checkpoint.step) from None
        except RayError as exc:
            raise self._failure(exc, checkpoint.step) from None

    def _train(self, first: int, recorder: RunRecorder, checkpoints: CheckpointStore | None, bar: Progress,
               start: float) -> None:
        """Steps ``first`` .. total-1 of the dataflow, with evaluations and checkpoints."""
        config, total = self.config, self.experiment.total_steps
        in_flight: collections.deque[list] = collections.deque()
        outboxes = None
        for step in range(first, total):
            outboxes = self._submit_step(outboxes)
            in_flight.append([ref for refs in outboxes for ref in refs])
            if len(in_flight) > self.window:
                # back-pressure: wait (without fetching) for the oldest step to finish
                oldest = in_flight.popleft()
                ray.wait(oldest, num_returns=len(oldest), fetch_local=False)
            bar.advance()
            done = step + 1
            evaluate_now, checkpoint_now = config.evaluates_at(done, total), checkpoints is not None and \
                config.checkpoints_at(done)
            row = checkpoint = None
            if evaluate_now:
                row = self._evaluate(outboxes, done, start)
                recorder.record(row)
                bar.report(row)
            elif checkpoint_now:
                self._deliver(outboxes)
            if evaluate_now or checkpoint_now:
                outboxes = None  # delivered: a step boundary with nothing in flight
                in_flight.clear()
            if checkpoint_now:
                directory = checkpoints.begin(done)
                records = self._save_checkpoint(directory, done)
                checkpoint = checkpoints.commit(done, records, time.perf_counter() - start)
            if row is not None or checkpoint is not None:
                self._on_progress(done, row, checkpoint)

    def _on_progress(self, step: int, row: dict | None, checkpoint: Checkpoint | None) -> None:
        """After an evaluation and/or a committed checkpoint (a hook: Tune trials report here)."""

    def run(self, progress: bool = True, resume: Checkpoint | None = None) -> dict:
        """Drive the run to its last step; ``resume``: continue from that checkpoint.

        A dead worker or node (``WorkerFailure``) restarts every worker from the newest checkpoint
        of this run, at most ``max_restarts`` times, with one line on stderr each time.
        """
        config, experiment = self.config, self.experiment
        start = time.perf_counter() - (resume.wall_s if resume else 0.0)
        recorder = RunRecorder(config.out, config, resume_step=resume.step if resume else None)
        checkpoints = CheckpointStore.for_run(config, experiment.plan, latest=resume)
        bar = Progress(experiment.total_steps, f"{config.algorithm} (ray)", enabled=progress)
        restore = resume
        try:
            while True:
                try:
                    if restore is not None:
                        self._load_checkpoint(restore)
                    first = restore.step if restore else 0
                    recorder.truncate(first)  # a replay records its rows again
                    bar.rewind(first)
                    self._train(first, recorder, checkpoints, bar, start)
                    break
                except WorkerFailure as failure:
                    if not getattr(failure, "dead", None):
                        raise  # no actor died: restarting would replay the same error
                    if self.restarts >= self.max_restarts:
                        raise WorkerFailure(f"{failure}; gave up after {self.restarts} restart(s) "
                                            f"(--max-restarts {self.max_restarts})") from None
                    self.restarts += 1
                    restore = checkpoints.latest if checkpoints is not None else resume
                    where = f"checkpoint step {restore.step}" if restore else "step 0 (no checkpoint yet)"
                    bar.note(f"relay-ray: {failure}; restarting all workers from {where} "
                             f"(restart {self.restarts} of {self.max_restarts})")
                    self._restart_actors()
        finally:
            bar.close()
        summary = summarize(experiment, recorder.rows, time.perf_counter() - start, "ray", cpus_per_worker=self.cpus,
                            startup_s=self.startup_s, window=self.window, restarts=self.restarts)
        recorder.finish(summary)
        return summary

    def node_ids(self) -> list[str]:
        return _fetch_metrics([actor.node_id.remote() for actor in self.actors])


def run_on_ray(config: RunConfig, address: str | None = None, progress: bool = True,
               experiment: Experiment | None = None, resume: Checkpoint | None = None, **engine_options) -> dict:
    """Run ``config`` on Ray (embedded unless ``address``/RAY_ADDRESS); returns the summary.

    ``resume``: continue from that checkpoint (``checkpoint.find_latest``)."""
    experiment = experiment or build_experiment(config)  # user errors before Ray starts
    check_engine_options(**engine_options)
    started = connect(address)
    engine = None
    try:
        from relay_ray.packing import make_engine  # packing subclasses RayEngine: imported late

        engine = make_engine(config, experiment, **engine_options)
        return engine.run(progress=progress, resume=resume)
    finally:
        if engine is not None:
            engine.shutdown()
        if started:
            ray.shutdown()


def _remove_and_wait(pg, timeout_s: float = 5.0) -> None:
    """Remove ``pg`` and wait until the cluster's free resources show its bundles back. Removal is
    asynchronous: a group reserved right after (a restart, the next run in the same process) would
    otherwise see the old bundles as taken, and a SPREAD group would leave those nodes out."""
    bundles = placement_group_table(pg).get("bundles", {}).values()
    released = collections.Counter()
    for bundle in bundles:
        released.update({k: v for k, v in bundle.items() if k in ("CPU", "GPU")})
    free_before = ray.available_resources()
    remove_placement_group(pg)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0) >= free_before.get(k, 0) + v - 1e-6 for k, v in released.items()):
            return
        time.sleep(0.05)
