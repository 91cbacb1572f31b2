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
import contextlib
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
from relay_ray.engine import placement, quiet, telemetry
from relay_ray.engine.actors import RemoteGroupActor
from relay_ray.errors import Diverged, UserError, WorkerFailure
from relay_ray.experiment import Experiment, build_experiment
from relay_ray.group import GroupLayout, WorkerGroup
from relay_ray.metrics import Progress, RunRecorder, check_divergence, eval_row, summarize
from relay_ray.straggle import Straggle

SURVIVE_TIMEOUT_S = 120  # for the survivors' last steps and a replacement actor's start


class _CannotSurvive(Exception):
    """--on-failure continue/replace cannot go on in place; the engine restarts instead (one line says why)."""


def _nearest_alive(plan, rank: int, dead: set[int]) -> int:
    """The closest rank to ``rank`` in the plan's graph that is not in ``dead`` (breadth-first)."""
    seen, frontier = {rank}, [rank]
    while frontier:
        frontier = [j for i in frontier for j in plan.neighbors[i] if j not in seen and not seen.add(j)]
        alive = sorted(j for j in frontier if j not in dead)
        if alive:
            return alive[0]
    raise _CannotSurvive(f"worker {rank} has no surviving neighbour")


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
        self.in_flight: collections.deque[list] = collections.deque()  # per step, its tasks' step counts (small refs)
        self.history: collections.deque[tuple[int, list[list]]] = collections.deque()  # (step, outboxes), recent
        self.submitted = 0  # the last step submitted
        self.failures: list[dict] = []  # the failures survived without a restart
        self.straggle = Straggle.parse(self.options.straggle, config.seed, config.num_workers)
        self.run_name = telemetry.run_name(config.out)
        self.gauges = telemetry.RunGauges(self.run_name)
        self.generation: dict[int, int] = {}  # per group, how many actors have held it (names stay unique)
        self.data_ref = ray.put(self.experiment.task_data)  # once; actors read it zero-copy
        self.communicator = None  # the actors' collective group, with --transport gloo|nccl
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
            self.shape, timeout = placement.plan(n, self.options, self.config.device, placement.alive_nodes(),
                                                 placement.autoscaler_capacity())
            self.pg = placement.reserve(self.shape, self.options.placement, timeout,
                                        say=lambda line: print(line, file=sys.stderr, flush=True))
        else:
            self.shape = placement.shape_of_group(self.pg, self.first_bundle, n)
        self.layout = GroupLayout.balanced(self.experiment.plan, self.shape.num_actors)

    def _start_actors(self) -> None:
        """Spawn the actors and wait until each is up, so start-up is not billed to training time
        and a worker that cannot start fails here."""
        self.actors = [self._start_actor(g) for g in range(len(self.layout.groups))]
        try:
            _fetch([actor.ping.remote() for actor in self.actors])
        except RayError as exc:
            raise WorkerFailure(f"a worker failed to start: {_first_line(exc)}") from None
        if self.options.transport != "object-store" and len(self.actors) > 1:
            from ray.experimental.collective import create_collective_group

            backend = "torch_gloo" if self.options.transport == "gloo" else "nccl"
            self.communicator = create_collective_group(self.actors, backend=backend)

    def _start_actor(self, g: int):
        """Group g's actor in its bundle of the placement group."""
        shape = self.shape
        generation = self.generation.get(g, -1) + 1
        self.generation[g] = generation
        return RemoteGroupActor.options(
            name=telemetry.actor_name(self.run_name, g, self.layout.groups[g], generation),
            num_cpus=shape.cpus, num_gpus=shape.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=self.first_bundle + g),
        ).remote(self.group_cls, [self.experiment.worker_spec(rank) for rank in self.layout.groups[g]], self.data_ref,
                 shape.threads, self.layout, g, straggle=self.straggle, transport=self.options.transport)

    def shutdown(self) -> None:
        if self.communicator is not None:
            from ray.experimental.collective import destroy_collective_group

            with contextlib.suppress(Exception):  # its actors may be dead already: they go next anyway
                destroy_collective_group(self.communicator)
            self.communicator = None
        for actor in self.actors:
            self._let_go(actor)
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
    def _step_task(self, g: int, has_inbox: bool, inbox: list) -> tuple[object, list]:
        """Submit group g's step: the ref of its step count and the refs of its outgoing bundles."""
        sends = len(self.layout.outgoing[g])
        if self.options.transport != "object-store":  # Ray Direct Transport: one small task per outgoing link
            done = self.actors[g].step.remote(has_inbox, *inbox)
            outbox = getattr(self.actors[g], f"outbox_{self.options.transport}")
            return done, [outbox.remote(k) for k in range(sends)]
        refs = self.actors[g].step.options(num_returns=1 + sends).remote(has_inbox, *inbox)
        refs = list(refs) if sends else [refs]
        return refs[0], refs[1:]

    def _submit_step(self, outboxes: list[list] | None) -> tuple[list[list], list]:
        """One task per group; returns, per group, the refs of its bundles of crossing messages, and
        the refs of the groups' step counts."""
        inboxes = self.layout.route(outboxes) if outboxes is not None else [[] for _ in self.actors]
        tasks = [self._step_task(g, outboxes is not None, inbox) for g, inbox in enumerate(inboxes)]
        return [bundles for _, bundles in tasks], [done for done, _ in tasks]

    def _advance(self) -> float:
        """Submit the next step; when more than ``window`` steps are in flight, wait for the oldest
        and read its step counts (small ints; a dead worker raises here, within ``window`` steps):
        back-pressure, so workers wait only for their neighbours.  The bundles stay where they are.
        Returns the seconds spent submitting (the driver's own work, not the waiting)."""
        started = time.perf_counter()
        self.outboxes, done = self._submit_step(self.outboxes)
        self.submitted += 1
        self.history.append((self.submitted, self.outboxes))
        while len(self.history) > self._history_steps:
            self.history.popleft()
        self.in_flight.append(done)
        submitted = time.perf_counter() - started
        if len(self.in_flight) > self.options.window:
            _fetch(self.in_flight.popleft())
        return submitted

    def _settle(self) -> None:
        """A step boundary: every worker finishes its averaging; nothing stays in flight."""
        while self.in_flight:
            self._guarded(_fetch, self.in_flight.popleft(), self.submitted)
        if self.outboxes is not None:
            for actor, inbox in zip(self.actors, self.layout.route(self.outboxes)):
                actor.receive.remote(*inbox)
        self.outboxes = None

    def run_steps(self, count: int) -> dict:
        """Take ``count`` training steps and nothing else (no evaluation, checkpoint or metrics file),
        through the same dataflow as ``run``, and wait until they are done; the benchmarks time this.
        Returns the wall seconds and the driver's own seconds spent submitting."""
        started = time.perf_counter()
        submit_s = sum(self._advance() for _ in range(count))
        while self.in_flight:
            _fetch(self.in_flight.popleft())
        return {"wall_s": time.perf_counter() - started, "submit_s": submit_s}

    def _evaluate(self, step: int, wall_start: float) -> dict:
        """Per-worker metrics, and the averaged model and consensus distance from per-group partial
        sums: no actor receives n models (DESIGN §4)."""
        n = self.num_members
        metric_refs = [actor.evaluate.remote() for actor in self.actors]
        mean = self.actors[0].mean_model.remote(n, *[actor.params_sum.remote() for actor in self.actors])
        deviation_refs = [actor.squared_deviation.remote(mean) for actor in self.actors]
        average_ref = self.actors[0].evaluate_params.remote(mean)
        per_worker = [row for rows in self._guarded(_fetch, metric_refs, step) for row in rows]
        consensus = sum(self._guarded(_fetch, deviation_refs, step)) / n
        return eval_row(step, per_worker, self._guarded(_fetch, average_ref, step), consensus,
                        time.perf_counter() - wall_start, self._metric())

    @property
    def _history_steps(self) -> int:
        """Steps of bundles kept for a recovery in place: every survivor is at most ``window`` + 1
        steps behind the last one submitted when a failure surfaces (none are kept for restart)."""
        return 0 if self.options.on_failure == "restart" else self.options.window + 3

    @property
    def members(self) -> list[int]:
        """The ranks still training: all of them, or the survivors after --on-failure continue."""
        return sorted(rank for ranks in self.layout.groups for rank in ranks)

    @property
    def num_members(self) -> int:
        return sum(len(ranks) for ranks in self.layout.groups)

    @property
    def _fill_after_failure(self) -> str | None:
        """RelaySGD's fill rule once a worker has died (a lost neighbour's mass: the receiver's model)."""
        return "current" if self.config.relays_models else None

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
        self.outboxes, self.in_flight, self.history, self.submitted = None, collections.deque(), collections.deque(), first
        if self.num_members < config.num_workers:
            checkpoints = None  # a checkpoint holds every rank; the survivors' plan is not the run's
        for step in range(first + 1, total + 1):
            try:
                self._advance()
            except Exception as exc:  # Ray refuses to submit to an actor it knows is dead
                failure = self._failure(exc, step)
                if not failure.dead:
                    raise
                raise failure from None
            bar.advance()
            self.gauges.step(step, len(self.in_flight), self.num_members, self.restarts)
            if self.on_step is not None:
                self.on_step(self, step)
            evaluate_now = config.evaluates_at(step, total)
            checkpoint_now = checkpoints is not None and config.checkpoints_at(step)
            if not (evaluate_now or checkpoint_now):
                continue
            self._settle()
            self.gauges.step(step, 0, self.num_members, self.restarts, force=True)
            row = self._evaluate(step, start) if evaluate_now else None
            if row is not None:
                recorder.record(row)
                bar.report(row)
                self.gauges.evaluation(row)
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
        restore, first = resume, None  # first: the step to go on from; None = load ``restore`` first
        try:
            while True:
                try:
                    if first is None:
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
                    why = None
                    if self.options.on_failure != "restart":
                        try:
                            first = self._survive(failure, recorder, bar, start)
                            continue
                        except (_CannotSurvive, WorkerFailure) as exc:
                            why = str(exc)
                    if self.restarts >= limit:
                        raise WorkerFailure(f"{failure}; gave up after {self.restarts} restart(s) "
                                            f"(--max-restarts {limit})") from None
                    self.restarts += 1
                    restore, first = (checkpoints.latest if checkpoints is not None else resume), None
                    where = f"checkpoint step {restore.step}" if restore else "step 0 (no checkpoint yet)"
                    instead = f"cannot {self.options.on_failure} ({why}); " if why else ""
                    bar.note(f"relay-ray: {failure}; {instead}restarting all workers from {where} "
                             f"(restart {self.restarts} of {limit})")
                    self._restart_actors()
        except Diverged as exc:
            exc.summary = self._summary(recorder, start, diverged=str(exc))
            recorder.finish(exc.summary)
            raise
        except BaseException:  # interrupted, or a failure the run gives up on
            recorder.close()
            raise
        finally:
            bar.close()
        summary = self._summary(recorder, start)
        recorder.finish(summary)
        return summary

    def _summary(self, recorder: RunRecorder, start: float, **extra) -> dict:
        if self.failures:
            extra["failures"] = self.failures
            extra["workers_at_end"] = self.num_members
        return summarize(self.experiment, recorder.rows, time.perf_counter() - start, "ray", startup_s=self.startup_s,
                         restarts=self.restarts, engine=self.describe(), **extra)

    # ---------------------------------------------------------------- surviving a failure in place
    def _survive(self, failure: WorkerFailure, recorder: RunRecorder, bar: Progress, start: float) -> int:
        """--on-failure continue / replace: nobody rewinds.  Every surviving group is brought to the
        newest step any survivor reached (its missing steps computed once, the dead workers'
        messages counted as lost), finishes its averaging, then goes on without the dead workers
        (continue: a plan re-spanned over the survivors) or with fresh ones in their place
        (replace: each starts from its nearest surviving neighbour's model).  Returns that step."""
        mode, layout = self.options.on_failure, self.layout
        dead = set(failure.dead)
        dead_groups = [g for g, ranks in enumerate(layout.groups) if dead & set(ranks)]
        alive = [g for g in range(len(self.actors)) if g not in dead_groups]
        if not alive:
            raise _CannotSurvive("no worker survived")
        at, settled = self._survivors_state(alive)
        self._catch_up(alive, dead_groups, at, settled)
        step = max(at.values())
        lost = sorted(rank for g in dead_groups for rank in layout.groups[g])
        who = f"worker {lost[0]}" if len(lost) == 1 else f"workers {lost}"
        if mode == "continue":
            note = self._continue_without(alive, lost)
            bar.note(f"relay-ray: {failure}; continuing from step {step} with {self.num_members} workers "
                     f"({who} and {'its' if len(lost) == 1 else 'their'} data lost; no rollback{note})")
        else:
            donors = self._replace(dead_groups, step)
            bar.note(f"relay-ray: {failure}; replaced {who} at step {step}, starting from the model of "
                     f"{', '.join(f'worker {d}' for d in sorted(set(donors.values())))} (no rollback)")
        self.failures.append({"mode": mode, "step": step, "lost_workers" if mode == "continue" else "replaced": lost,
                              "cause": str(failure)})
        bar.rewind(step)
        if self.config.evaluates_at(step, self.experiment.total_steps) and \
                not (recorder.rows and recorder.rows[-1]["step"] >= step):
            row = self._evaluate(step, start)
            recorder.record(row)
            bar.report(row)
            check_divergence(row)
        return step

    def _survivors_state(self, alive: list[int]) -> tuple[dict, dict]:
        """Wait for every task in flight (a task whose input died fails without running), then
        each surviving group's step count and whether it has received its last step's messages."""
        pending = [ref for done in self.in_flight for ref in done]
        self.in_flight.clear()
        _, unfinished = ray.wait(pending, num_returns=len(pending), timeout=SURVIVE_TIMEOUT_S)
        if unfinished:
            raise _CannotSurvive(f"the survivors' steps did not finish within {SURVIVE_TIMEOUT_S} s")
        states = self._guarded(_fetch, [self.actors[g].status.remote() for g in alive], self.submitted)
        at = {g: state[0] for g, state in zip(alive, states)}
        settled = {g: state[1] for g, state in zip(alive, states)}
        return at, settled

    def _catch_up(self, alive: list[int], dead_groups: list[int], at: dict, settled: dict) -> None:
        """Steps min(at)+1 .. max(at) for the survivors behind, then every survivor's averaging at
        max(at); each survivor computes each of its steps exactly once.  ``at``/``settled`` are updated."""
        history = dict(self.history)
        lost = [[[None] * len(edges) for _, edges in self.layout.outgoing[g]] for g in dead_groups]

        def inboxes_at(s: int) -> list[list]:
            if s not in history:
                raise _CannotSurvive(f"step {s}'s messages are no longer kept (a window of {self.options.window})")
            boxes = list(history[s])
            for g, bundles in zip(dead_groups, lost):
                boxes[g] = bundles
            return self.layout.route(boxes)

        last = max(at.values())
        for s in range(min(at.values()) + 1, last + 1):
            behind = [g for g in alive if at[g] == s - 1]
            inboxes = inboxes_at(s - 1) if any(not settled[g] for g in behind) else None
            boxes, done = list(history[s]), []
            for g in behind:
                count, boxes[g] = self._step_task(g, not settled[g], inboxes[g] if not settled[g] else [])
                done.append(count)
                at[g], settled[g] = s, False
            history[s] = boxes
            self._guarded(_fetch, done, s)
        unsettled = [g for g in alive if not settled[g]]
        if unsettled:
            inboxes = inboxes_at(last)
            self._guarded(_fetch, [self.actors[g].receive.remote(*inboxes[g]) for g in unsettled], last)
        self.outboxes = None

    def _continue_without(self, alive: list[int], lost: list[int]) -> str:
        """The survivors take the re-spanned plan; the dead actors are let go."""
        from relay_ray.respan import CannotRespan, survivor_plan

        members = sorted(set(self.members) - set(lost))
        try:
            survivors = survivor_plan(self.experiment, members)
        except CannotRespan as exc:
            raise _CannotSurvive(str(exc)) from None
        layout = GroupLayout.from_groups(survivors.plan, [self.layout.groups[g] for g in alive])
        self._guarded(_fetch, [self.actors[g].reconfigure.remote(survivors.plan, layout, i, survivors.lr_scale,
                                                                 self._fill_after_failure)
                               for i, g in enumerate(alive)], self.submitted)
        for g in set(range(len(self.actors))) - set(alive):
            self._let_go(self.actors[g])
        self.actors, self.layout = [self.actors[g] for g in alive], layout
        scale = f"; lr x{survivors.lr_scale:.3g} for the new tree" if self.config.relays_models else ""
        return f"{scale}; checkpoints stop" if self.config.checkpoint_every else scale

    def _replace(self, dead_groups: list[int], step: int) -> dict[int, int]:
        """Fresh actors in the dead groups' bundles; each of their workers adopts the model of its
        nearest surviving neighbour in the plan.  Returns {replaced rank: donor rank}."""
        plan = self.experiment.plan
        dead_ranks = {rank for g in dead_groups for rank in self.layout.groups[g]}
        group_of = {rank: g for g, ranks in enumerate(self.layout.groups) for rank in ranks}
        fresh = {g: self._start_actor(g) for g in dead_groups}
        try:
            _fetch([actor.ping.remote() for actor in fresh.values()], timeout=SURVIVE_TIMEOUT_S)
        except (RayError, TimeoutError) as exc:
            for actor in fresh.values():
                self._let_go(actor)
            raise _CannotSurvive(f"a replacement did not start: {_first_line(exc)}") from None
        donors = {rank: _nearest_alive(plan, rank, dead_ranks) for rank in sorted(dead_ranks)}
        fill = self._fill_after_failure
        adopted = [fresh[g].adopt.remote(step, fill, *[self.actors[group_of[donors[r]]].params_of.remote(donors[r])
                                                       for r in self.layout.groups[g]]) for g in dead_groups]
        survivors = [actor.set_fill.remote(fill) for g, actor in enumerate(self.actors) if g not in fresh]
        self._guarded(_fetch, adopted + survivors, step)
        for g, actor in fresh.items():
            self._let_go(self.actors[g])
            self.actors[g] = actor
        return donors

    @staticmethod
    def _let_go(actor) -> None:
        try:
            ray.kill(actor)
        except ActorHandleNotFoundError:
            pass

    def describe(self) -> dict:
        """How this run executes (saved in config.yaml and summary.json)."""
        return {**self.shape.to_dict(), "placement": self.options.placement, "window": self.options.window,
                "max_restarts": self.options.max_restarts, "on_failure": self.options.on_failure,
                **({"straggle": self.options.straggle} if self.options.straggle else {})}


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
