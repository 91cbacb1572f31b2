"""All workers in one process: the oracle the Ray engine is checked against, and the fast path
for algorithm studies.  It routes exactly the messages the engine routes, in the same order."""

from __future__ import annotations

import time

import numpy as np

from relay_ray.config import RunConfig
from relay_ray.experiment import Experiment, build_experiment
from relay_ray.metrics import Progress, RunRecorder, consensus_distance, eval_row, summarize
from relay_ray.worker import Worker


def evaluate(workers: list[Worker], metric: str, step: int, wall_s: float) -> dict:
    per_worker = [w.evaluate() for w in workers]
    params = [w.params() for w in workers]
    average = np.mean(np.asarray(params, dtype=np.float64), axis=0).astype(np.float32)
    return eval_row(step, per_worker, workers[0].evaluate_params(average), consensus_distance(params), wall_s,
                    metric)


def simulate(config: RunConfig, experiment: Experiment | None = None, progress: bool = True) -> dict:
    """Run ``config`` with every worker in this process; returns the summary dict."""
    start = time.perf_counter()
    experiment = experiment or build_experiment(config)
    workers = [Worker(experiment.worker_spec(rank), experiment.task_data) for rank in range(config.num_workers)]
    recorder = RunRecorder(config.out, config)
    total = experiment.total_steps
    bar = Progress(total, f"{config.algorithm} (local)", enabled=progress)
    metric = workers[0].problem.metric
    outboxes = None
    try:
        for step in range(total):
            inboxes = experiment.plan.route(outboxes) if outboxes is not None else [[] for _ in workers]
            outboxes = [w.step(*inbox) for w, inbox in zip(workers, inboxes)]
            bar.advance()
            if (step + 1) % config.eval_every == 0 or step + 1 == total:
                for w, inbox in zip(workers, experiment.plan.route(outboxes)):
                    w.receive(*inbox)
                outboxes = None
                row = evaluate(workers, metric, step + 1, time.perf_counter() - start)
                recorder.record(row)
                bar.report(row)
    finally:
        bar.close()
    summary = summarize(experiment, recorder.rows, time.perf_counter() - start, "local")
    recorder.finish(summary)
    return summary
