"""The Ray engine's driver: the dataflow loop and the restart controller.

Dataflow (DESIGN §4).  Every step the driver submits, for every group g, one task
``actor_g.step(has_inbox, *[refs of the bundles that cross into g])``: the group finishes the
previous averaging, takes its workers' local steps, routes messages between its own workers in
place and returns one bundle per group it sends to (all its messages to that group: one object
per pair of neighbouring actors and step, however many tree edges cross).  The driver only moves refs; it reads
nothing but small metric dicts (``_fetch``).  A bounded window of steps may be in flight; older
steps are awaited (not fetched).  There is no global barrier except at evaluations and checkpoints.

Reliability (DESIGN §6): every ``checkpoint_every`` steps each actor writes its workers' files and
the driver commits the manifest.  When an actor or its node dies, the engine kills the survivors,
reserves a new placement group on the nodes still alive, starts fresh actors, loads the newest
checkpoint of this run (or starts at step 0: a run is deterministic) and replays, at most
``max_restarts`` times.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import time
from typing import Callable

import ray
from ray.exceptions import ActorHandleNotFoundError, RayError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from relay_ray.checkpoint import Checkpoint, CheckpointStore
from relay_ray.config import EngineOptions, RunConfig
from relay_ray.engine import placement, quiet
from relay_ray.engine.actors import RemoteGroupActor
from relay_ray.errors import Diverged, UserError, WorkerFailure
from relay_ray.experiment import Experiment, build_experiment
from relay_ray.group import GroupLayout, WorkerGroup
from relay_ray.metrics import Progress, RunRecorder, check_divergence, eval_row, summarize

OnStep = Callable[["Engine", int], None]
OnProgress = Callable[["Engine", int, "dict | None", "Checkpoint | None"], None]


def _fetch(refs, timeout: float | None = None):
    """The only place the driver reads values: small metric dicts and counts."""
    return ray.get(refs, timeout=timeout)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class Engine:
    """One run on Ray: actors holding groups of workers, driven as a dataflow of refs.

    ``options``: where and how to run (``EngineOptions``: workers per actor, resources, placement,
    window, restarts).  ``group_cls``: the worker-group class each actor holds (a seam for tests
    and benchmarks).  ``placement_group`` / ``first_bundle``: reserve nothing and put actor g in
    bundle ``first_bundle + g`` of this existing group (a Tune trial's).  ``on_step(engine, step)``
    runs after each submitted step, ``on_progress(engine, step, row, checkpoint)`` after each
    evaluation and/or committed checkpoint (Tune reports there).
    """

    def __init__(self, config: RunConfig, experiment: Experiment | None = None,
                 options: EngineOptions | None = None, *, group_cls: type[WorkerGroup] = WorkerGroup,
                 placement_group=None, first_bundle: int = 0, on_step: OnStep | None = None,
                 on_progress: OnProgress | None = None):
        self.config = config
        self.experiment = experiment or build_experiment(config)
        self.options = options or EngineOptions()
        self.group_cls = group_cls
        self.on_step, self.on_progress = on_step, on_progress
        self.owns_pg, self.pg, self.first_bundle = placement_group is None, placement_group, first_bundle
        self.actors: list = []
        self.restarts = 0
        self.outboxes: list[list] | None = None  # per group, the refs of the last submitted step's bundles
        self.in_flight: collections.deque[list] = collections.deque()  # refs of the steps not yet awaited
        self.data_ref = ray.put(self.experiment.task_data)  # once; actors read it zero-copy
        started = time.perf_counter()
        self._place()
        try:
            self._start_actors()
        except WorkerFailure:
            self.shutdown()
            raise
        self.startup_s = time.perf_counter() - started

    # ---------------------------------------------------------------- actors
    def _place(self) -> None:
        """Decide the actors' shape and reserve their bundles (a Tune trial brings its own group)."""
        n = self.config.num_workers
        if self.owns_pg:
            nodes = placement.alive_nodes()
            self.shape = placement.actor_shape(n, self.options, self.config.device, nodes)
            placement.check_fits(self.shape, nodes)
            self.pg = placement.reserve(self.shape, self.options.placement)
        else:
            self.shape = placement.shape_of_group(self.pg, self.first_bundle, n)
        self.layout = GroupLayout.balanced(self.experiment.plan, self.shape.num_actors)

    def _start_actors(self) -> None:
        """Spawn the actors and wait until each is up, so start-up is not billed to training time
        and a worker that cannot start fails here."""
        exp, shape = self.experiment, self.shape
        self.actors = [
            RemoteGroupActor.options(
                num_cpus=shape.cpus, num_gpus=shape.gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=self.first_bundle + g),
            ).remote(self.group_cls, [exp.worker_spec(rank) for rank in ranks], self.data_ref, shape.threads,
                     self.layout, g)
            for g, ranks in enumerate(self.layout.groups)
        ]
        try:
            _fetch([actor.ping.remote() for actor in self.actors])
        except RayError as exc:
            raise WorkerFailure(f"a worker failed to start: {_first_line(exc)}") from None

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except ActorHandleNotFoundError:  # its process is already gone (a SIGKILLed actor)
                pass
        self.actors = []
        if self.owns_pg and self.pg is not None:
            placement.remove_and_wait(self.pg)
            self.pg = None

    def _restart_actors(self) -> None:
        """New actors for all workers, in a new placement group sized for the nodes still alive."""
        self.shutdown()
        if self.owns_pg:
            try:
                self._place()
            except UserError as exc:
                raise WorkerFailure(f"cannot place the workers again: {exc}") from None
        self._start_actors()

    def node_ids(self) -> list[str]:
        """The node of each worker (rank order)."""
        nodes = _fetch([actor.node_id.remote() for actor in self.actors])
        return [node for node, ranks in zip(nodes, self.layout.groups) for _ in ranks]

    # ---------------------------------------------------------------- dataflow
    def _submit_step(self, outboxes: list[list] | None) -> list[list]:
        """One task per group; returns, per group, the refs of its bundles of crossing messages."""
        inboxes = self.layout.route(outboxes) if outboxes is not None else [[] for _ in self.actors]
        new = []
        for g, (actor, inbox) in enumerate(zip(self.actors, inboxes)):
            returns = max(1, len(self.layout.outgoing[g]))
            refs = actor.step.options(num_returns=returns).remote(outboxes is not None, *inbox)
            new.append(list(refs) if returns > 1 else [refs])
        return new

    def _advance(self) -> float:
        """Submit the next step; when more than ``window`` steps are in flight, wait (without
        fetching) for the oldest: back-pressure, so workers wait only for their neighbours.
        Returns the seconds spent submitting (the driver's own work, not the waiting)."""
        started = time.perf_counter()
        self.outboxes = self._submit_step(self.outboxes)
        self.in_flight.append([ref for refs in self.outboxes for ref in refs])
        submitted = time.perf_counter() - started
        if len(self.in_flight) > self.options.window:
            oldest = self.in_flight.popleft()
            ray.wait(oldest, num_returns=len(oldest), fetch_local=False)
        return submitted

    def _settle(self) -> None:
        """A step boundary: every worker finishes its averaging; nothing stays in flight."""
        if self.outboxes is not None:
            for actor, inbox in zip(self.actors, self.layout.route(self.outboxes)):
                actor.receive.remote(*inbox)
        self.outboxes = None
        self.in_flight.clear()

    def run_steps(self, count: int) -> dict:
        """Take ``count`` training steps and nothing else (no evaluation, checkpoint or metrics file),
        through the same dataflow as ``run``, and wait until they are done; the benchmarks time this.
        Returns the wall seconds and the driver's own seconds spent submitting."""
        started = time.perf_counter()
        submit_s = sum(self._advance() for _ in range(count))
        for refs in self.in_flight:
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
        return {"wall_s": time.perf_counter() - started, "submit_s": submit_s}

    def _evaluate(self, step: int, wall_start: float) -> dict:
        """Per-worker metrics, and the averaged model and consensus distance from per-group partial
        sums: no actor receives n models (DESIGN §4)."""
        n = self.config.num_workers
        metric_refs = [actor.evaluate.remote() for actor in self.actors]
        mean = self.actors[0].mean_model.remote(n, *[actor.params_sum.remote() for actor in self.actors])
        deviation_refs = [actor.squared_deviation.remote(mean) for actor in self.actors]
        average_ref = self.actors[0].evaluate_params.remote(mean)
        per_worker = [row for rows in self._guarded(_fetch, metric_refs, step) for row in rows]
        consensus = sum(self._guarded(_fetch, deviation_refs, step)) / n
        return eval_row(step, per_worker, self._guarded(_fetch, average_ref, step), consensus,
                        time.perf_counter() - wall_start, self._metric())

    def _metric(self) -> str:
        return "test_acc" if self.config.dataset != "quadratics" else "suboptimality"

    def _guarded(self, fn, refs, step: int):
        try:
            return fn(refs)
        except RayError as exc:
            raise self._failure(exc, step) from None

    def _failure(self, exc: Exception, step: int) -> WorkerFailure:
        """Name the dead worker(s): a ping to a dead actor is ready at once with an error."""
        pings, dead_groups = {}, []
        for g, actor in enumerate(self.actors):
            try:
                pings[actor.ping.remote()] = g
            except Exception:  # Ray refuses to submit to an actor it already knows is gone
                dead_groups.append(g)
        ready, unresponsive = ray.wait(list(pings), num_returns=len(pings), timeout=30)
        dead_groups += [pings[ref] for ref in unresponsive]
        for ref in ready:
            try:
                _fetch(ref)
            except RayError:
                dead_groups.append(pings[ref])
        cause = _first_line(exc)
        if not dead_groups:  # every actor answers: a worker's step raised (a bug, not a death); a replay would too
            return WorkerFailure(f"a worker failed before step {step} ({type(exc).__name__}: {cause[:300]})")
        dead = sorted(rank for g in dead_groups for rank in self.layout.groups[g])
        who = f"worker {dead[0]}" if len(dead) == 1 else f"workers {dead}"
        return WorkerFailure(f"{who} died before step {step} ({type(exc).__name__}: {cause[:200]})", dead)

    def _save_checkpoint(self, checkpoints: CheckpointStore, step: int, wall_s: float) -> Checkpoint:
        """Each actor writes its workers' files itself; the driver gets small records, commits last."""
        directory = checkpoints.begin(step)
        refs = [actor.save_checkpoint.remote(str(directory)) for actor in self.actors]
        records = [record for group in self._guarded(_fetch, refs, step) for record in group]
        return checkpoints.commit(step, records, wall_s)

    def _load_checkpoint(self, checkpoint: Checkpoint) -> None:
        try:
            _fetch([actor.load_checkpoint.remote(str(checkpoint.directory)) for actor in self.actors])
        except RayTaskError as exc:
            if isinstance(exc.cause, UserError):  # a bad file: the user's, not a dead worker
                raise UserError(str(exc.cause)) from None
            raise self._failure(exc, checkpoint.step) from None
        except RayError as exc:
            raise self._failure(exc, checkpoint.step) from None

    def _train(self, first: int, recorder: RunRecorder, checkpoints: CheckpointStore | None, bar: Progress,
               start: float) -> None:
        """Steps ``first`` .. total-1: submit, evaluate and checkpoint at step boundaries."""
        config, total = self.config, self.experiment.total_steps
        self.outboxes, self.in_flight = None, collections.deque()
        for step in range(first + 1, total + 1):
            try:
                self._advance()
            except Exception as exc:  # Ray refuses to submit to an actor it knows is dead
                failure = self._failure(exc, step)
                if not failure.dead:
                    raise
                raise failure from None
            bar.advance()
            if self.on_step is not None:
                self.on_step(self, step)
            evaluate_now = config.evaluates_at(step, total)
            checkpoint_now = checkpoints is not None and config.checkpoints_at(step)
            if not (evaluate_now or checkpoint_now):
                continue
            self._settle()
            row = self._evaluate(step, start) if evaluate_now else None
            if row is not None:
                recorder.record(row)
                bar.report(row)
                check_divergence(row)  # before a checkpoint: the newest one stays a good one
            checkpoint = (self._save_checkpoint(checkpoints, step, time.perf_counter() - start)
                          if checkpoint_now else None)
            if self.on_progress is not None:
                self.on_progress(self, step, row, checkpoint)

    def run(self, progress: bool = True, resume: Checkpoint | None = None) -> dict:
        """Drive the run to its last step; ``resume``: continue from that checkpoint.

        A dead worker or node (``WorkerFailure`` naming it) restarts every worker from the newest
        checkpoint of this run, at most ``max_restarts`` times, with one line on stderr each time.
        """
        config, experiment, limit = self.config, self.experiment, self.options.max_restarts
        start = time.perf_counter() - (resume.wall_s if resume else 0.0)
        recorder = RunRecorder(config.out, config, resume_step=resume.step if resume else None,
                               engine=self.describe())
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
                    if not failure.dead:
                        raise  # no actor died: restarting would replay the same error
                    if self.restarts >= limit:
                        raise WorkerFailure(f"{failure}; gave up after {self.restarts} restart(s) "
                                            f"(--max-restarts {limit})") from None
                    self.restarts += 1
                    restore = checkpoints.latest if checkpoints is not None else resume
                    where = f"checkpoint step {restore.step}" if restore else "step 0 (no checkpoint yet)"
                    bar.note(f"relay-ray: {failure}; restarting all workers from {where} "
                             f"(restart {self.restarts} of {limit})")
                    self._restart_actors()
        except Diverged as exc:
            exc.summary = summarize(experiment, recorder.rows, time.perf_counter() - start, "ray",
                                    startup_s=self.startup_s, restarts=self.restarts, engine=self.describe(),
                                    diverged=str(exc))
            recorder.finish(exc.summary)
            raise
        finally:
            bar.close()
        summary = summarize(experiment, recorder.rows, time.perf_counter() - start, "ray", startup_s=self.startup_s,
                            restarts=self.restarts, engine=self.describe())
        recorder.finish(summary)
        return summary

    def describe(self) -> dict:
        """How this run executes (saved in config.yaml and summary.json)."""
        return {**self.shape.to_dict(), "placement": self.options.placement, "window": self.options.window,
                "max_restarts": self.options.max_restarts}


def connect(address: str | None = None) -> bool:
    """Attach to ``address`` / RAY_ADDRESS, or start an embedded local Ray. True if we started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # log_to_driver=False: the actors' output and the raylet's worker-death notices stay in Ray's log files
    # (they landed on stdout, among the results); the engine reports every failure in one line
    kwargs = dict(logging_level="WARNING", configure_logging=True, log_to_driver=False)
    on_sigterm = signal.getsignal(signal.SIGTERM)
    quiet.divert_ray_noise()
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", include_dashboard=False, **kwargs)  # never a `ray start` cluster by accident
    except ConnectionError as exc:
        raise UserError(f"cannot connect to Ray at {address}: {exc}") from None
    quiet.log_to_session(quiet.session_logs_dir())
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init installs sys.exit(15); keep the caller's handler
    return True


def run_on_ray(config: RunConfig, options: EngineOptions | None = None, address: str | None = None,
               progress: bool = True, experiment: Experiment | None = None, resume: Checkpoint | None = None) -> dict:
    """Run ``config`` on Ray (embedded unless ``address``/RAY_ADDRESS); returns the summary."""
    experiment = experiment or build_experiment(config)  # user errors before Ray starts
    started = connect(address)
    engine = None
    try:
        engine = Engine(config, experiment, options)
        if progress:
            print(f"relay-ray: {engine.shape.describe()}; started in {engine.startup_s:.1f}s", file=sys.stderr)
        return engine.run(progress=progress, resume=resume)
    finally:
        if engine is not None:
            engine.shutdown()
        if started:
            ray.shutdown()
