"""All workers in one process: the oracle the Ray engine is checked against, and the fast path
for algorithm studies.  It routes exactly the messages the engine routes, in the same order."""

from __future__ import annotations

import time

import numpy as np

from relay_ray.checkpoint import Checkpoint, CheckpointStore
from relay_ray.config import RunConfig
from relay_ray.experiment import Experiment, build_experiment
from relay_ray.errors import Diverged
from relay_ray.metrics import Progress, RunRecorder, check_divergence, consensus_distance, eval_row, summarize
from relay_ray.worker import Worker, step_workers


def evaluate(workers: list[Worker], metric: str, step: int, wall_s: float) -> dict:
    per_worker = [w.evaluate() for w in workers]
    params = [w.host_params() for w in workers]
    average = np.mean(np.asarray(params, dtype=np.float64), axis=0).astype(np.float32)
    return eval_row(step, per_worker, workers[0].evaluate_params(average), consensus_distance(params), wall_s,
                    metric)


def simulate(config: RunConfig, experiment: Experiment | None = None, progress: bool = True,
             resume: Checkpoint | None = None) -> dict:
    """Run ``config`` with every worker in this process; returns the summary dict.

    ``resume``: continue from that checkpoint (see ``checkpoint.find_latest``) instead of step 0.
    """
    experiment = experiment or build_experiment(config)
    start = time.perf_counter() - (resume.wall_s if resume else 0.0)  # wall time counts the earlier part
    workers = [Worker(experiment.worker_spec(rank), experiment.task_data) for rank in range(config.num_workers)]
    if resume is not None:
        for w in workers:
            w.load_checkpoint(str(resume.directory))
    checkpoints = CheckpointStore.for_run(config, experiment.plan, latest=resume)
    recorder = RunRecorder(config.out, config, resume_step=resume.step if resume else None)
    total = experiment.total_steps
    first = resume.step if resume else 0
    bar = Progress(total, f"{config.algorithm} (local)", enabled=progress)
    bar.rewind(first)
    metric = workers[0].problem.metric
    outboxes = None
    try:
        for step in range(first, total):
            inboxes = experiment.plan.route(outboxes) if outboxes is not None else [[] for _ in workers]
            outboxes = step_workers(workers, inboxes, config.batches_workers)
            bar.advance()
            done = step + 1
            evaluate_now, checkpoint_now = config.evaluates_at(done, total), config.checkpoints_at(done)
            if evaluate_now or checkpoint_now:
                # a step boundary with nothing in flight: deliver this step's messages first
                for w, inbox in zip(workers, experiment.plan.route(outboxes)):
                    w.receive(*inbox)
                outboxes = None
            if evaluate_now:
                row = evaluate(workers, metric, done, time.perf_counter() - start)
                recorder.record(row)
                bar.report(row)
                check_divergence(row)  # before a checkpoint: the newest one stays a good one
            if checkpoint_now:
                directory = checkpoints.begin(done)
                records = [w.save_checkpoint(str(directory)) for w in workers]
                checkpoints.commit(done, records, time.perf_counter() - start)
    except Diverged as exc:
        exc.summary = summarize(experiment, recorder.rows, time.perf_counter() - start, "local", diverged=str(exc))
        recorder.finish(exc.summary)
        raise
    except BaseException:  # interrupted, or a failure the run gives up on
        recorder.close()
        raise
    finally:
        bar.close()
    summary = summarize(experiment, recorder.rows, time.perf_counter() - start, "local")
    recorder.finish(summary)
    return summary
