"""Ray Tune sweeps: one trial = one engine run inside the trial's own placement group.

The trial reserves ``[driver bundle] + [worker bundle] * num_workers`` (``PlacementGroupFactory``);
its workers go into bundles 1..n, so trials never compete for each other's CPUs and a trial never
waits for resources outside its reservation.  Each evaluation is reported with ``ray.tune.report``.
The sweep directory ``OUT`` holds Tune's experiment (``OUT/<name>``, restorable with ``--resume``),
``sweep.yaml`` (the validated sweep), ``results.csv``, ``best.md`` and ``sweep.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import yaml
from ray import tune

from relay_ray.algorithms import TREE_ALGORITHMS
from relay_ray.checkpoint import inspect_checkpoint
from relay_ray.config import EngineOptions, RunConfig
from relay_ray.engine import Engine, connect
from relay_ray.engine.placement import autoscaler_capacity
from relay_ray.errors import Diverged, UserError
from relay_ray.experiment import build_experiment
from relay_ray.loggers import DEFAULT_PROJECT, check_installed
from relay_ray.sweep_file import VARIANT, Sweep, edge_notes, load_sweep, parse_sweep, run_settings
from relay_ray.titles import command_stamp

CONFIG_PREFIX = "config/"
GROUP_KEYS = ("algorithm", "topology", "alpha")


def _domain(spec: dict):
    (kind, values), = spec.items()
    if kind == "grid_search":
        return tune.grid_search(values)
    if kind == "choice":
        return tune.choice(values)
    return getattr(tune, kind)(*values)


def param_space(sweep: Sweep) -> dict:
    return {**sweep.base, **{key: _domain(spec) for key, spec in sweep.search.items()}}


FINAL_STATE = "final.json"


def _tune_metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# Tune saves its experiment state every STATE_PERIOD_S and keeps the newest KEPT_CHECKPOINTS of a trial.
# A trial hands Tune a checkpoint at most every 2 x STATE_PERIOD_S (and always its final one), so the
# checkpoint named in the last saved state is never pruned before the next save: at most one periodic
# and the final checkpoint can follow it within one period.
STATE_PERIOD_S = 1.0
KEPT_CHECKPOINTS = 3
CHECKPOINT_INTERVAL_S = 2 * STATE_PERIOD_S


class _Reporter:
    """The engine's ``on_progress`` in a trial: report every evaluation to Tune, with the run's checkpoint
    when one was just written and the last one handed over is old enough (see above; Tune keeps it and
    hands it back when the trial is restored).  The last report also marks the trial finished, so a
    sweep restored after its driver died never re-runs a finished trial."""

    def __init__(self):
        self.last_checkpoint_s = -math.inf

    def __call__(self, engine: Engine, step: int, row: dict | None, checkpoint) -> None:
        if row is None:
            return  # a checkpoint between evaluations: reported with the next evaluation's
        final = step == engine.experiment.total_steps
        now = time.monotonic()
        if checkpoint is not None and not final and now - self.last_checkpoint_s < CHECKPOINT_INTERVAL_S:
            checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(checkpoint.directory) if checkpoint is not None else Path(tmp)
            if final:
                (directory / FINAL_STATE).write_text(json.dumps({"step": step, "final": row}))
            keep = checkpoint is not None or final
            if keep:
                self.last_checkpoint_s = now
            tune.report(_tune_metrics(row), checkpoint=tune.Checkpoint.from_directory(directory) if keep else None)


def train_trial(settings: dict, window: int) -> None:
    """Tune's function trainable: build the run from the trial's settings and drive it; a restored trial
    continues from the checkpoint Tune hands back (or, if it had finished, does nothing)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per checkpoint on the console
    trial_dir = Path(tune.get_context().get_trial_dir())
    settings = {**run_settings(settings), "backend": "ray", "out": str(trial_dir / "run")}
    config = RunConfig.from_dict(settings)
    if config.checkpoint_every is None:  # a trial checkpoints at every evaluation unless told otherwise
        config = RunConfig.from_dict({**settings, "checkpoint_every": config.eval_every, "keep": 2})
    experiment = build_experiment(config)
    restored = tune.get_checkpoint()
    with contextlib.ExitStack() as stack:
        resume = None
        if restored is not None:
            directory = Path(stack.enter_context(restored.as_directory()))
            if (directory / FINAL_STATE).exists():
                return  # it had finished: its final result is already in Tune's state
            resume = inspect_checkpoint(directory, config, experiment.plan)
            print(f"relay-ray tune: trial restored from its checkpoint at step {resume.step}", file=sys.stderr)
            Path(config.out).mkdir(parents=True, exist_ok=True)
            Path(config.out, "restored.json").write_text(json.dumps({"from_step": resume.step}) + "\n")
        engine = Engine(config, experiment, EngineOptions(window=window), on_progress=_Reporter(),
                        placement_group=ray.util.get_current_placement_group(), first_bundle=1)
        try:
            engine.run(progress=False, resume=resume)
        except Diverged as exc:  # a diverged trial is a (bad) result of the sweep, not a failure to retry
            print(f"relay-ray tune: {exc}", file=sys.stderr)
            if exc.row is not None:  # found at an evaluation (not at a checkpoint between evaluations)
                tune.report(_tune_metrics(exc.row))
        finally:
            engine.shutdown()


def _trainable(sweep: Sweep):
    def resources(settings: dict) -> tune.PlacementGroupFactory:
        num_workers = RunConfig.from_dict({**run_settings(settings), "backend": "local"}).num_workers
        return tune.PlacementGroupFactory(sweep.trial_bundles(num_workers), strategy="PACK")

    trainable = tune.with_parameters(train_trial, window=sweep.window)
    return tune.with_resources(trainable, resources)


def check_resources(sweep: Sweep) -> None:
    """Fail before the sweep starts if its largest trial cannot fit in the cluster (Tune would wait forever).

    On an autoscaling cluster the bound is what the cluster config lets it grow to, not what runs now."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total_cpu = sum(r.get("CPU", 0.0) for r in nodes)
    total_gpu = sum(r.get("GPU", 0.0) for r in nodes)
    largest_cpu = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    capacity = autoscaler_capacity()
    if capacity is not None:
        total_cpu, total_gpu = max(total_cpu, capacity.get("CPU", 0)), max(total_gpu, capacity.get("GPU", 0))
        largest_cpu = math.inf  # node types are the autoscaler's business
    for n in sweep.candidate_worker_counts():
        actors = sweep.trial_shape(n)
        need_cpu = sweep.driver_cpus + actors.cpus * actors.num_actors
        need_gpu = actors.gpus * actors.num_actors
        shape = (f"driver {sweep.driver_cpus:g} + {actors.num_actors} actors x {actors.cpus:g} CPU "
                 f"= {need_cpu:g} CPUs")
        if need_cpu > total_cpu + 1e-9:
            raise UserError(f"a trial with {n} workers needs {shape}, but the cluster has {total_cpu:g} CPUs "
                            f"({need_cpu - total_cpu:g} short); lower resources.cpus_per_trial in the sweep file "
                            "or add nodes")
        if need_gpu > total_gpu + 1e-9:
            raise UserError(f"a trial with {n} workers needs {need_gpu:g} GPUs, but the cluster has {total_gpu:g}")
        if max(actors.cpus, sweep.driver_cpus) > largest_cpu + 1e-9:
            raise UserError(f"a bundle of {max(actors.cpus, sweep.driver_cpus):g} CPUs fits on no node "
                            f"(largest node has {largest_cpu:g})")


def _scheduler(sweep: Sweep):
    if sweep.scheduler["type"] == "asha":
        options = {k: v for k, v in sweep.scheduler.items() if k != "type"}
        return tune.schedulers.ASHAScheduler(time_attr="training_iteration", **options)
    return None


class TrialLines(tune.Callback):
    """relay-ray's progress for a sweep, in place of Tune's tables: one line per finished or failed trial."""

    def __init__(self, sweep: Sweep):
        self.metric, self.finished, self.started = sweep.metric, 0, time.monotonic()

    def _line(self, trials, trial, outcome: str) -> None:
        self.finished += 1
        params = ", ".join(f"{k.split('/')[-1]}={v}" for k, v in (trial.evaluated_params or {}).items())
        print(f"relay-ray tune: [{self.finished}/{len(trials)}] {params or trial.trial_id}: {outcome} "
              f"({time.monotonic() - self.started:.0f}s)", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        value = (trial.last_result or {}).get(self.metric)
        self._line(trials, trial, f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, trial, "FAILED (see results.csv and the trial's error.txt)")


def tracker_callbacks(sweep: Sweep) -> list:
    """Tune's own MLflow and W&B callbacks for ``loggers:``: one tracker run per trial, named by Tune,
    in the MLflow experiment / W&B project ``relay_ray`` (MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT)."""
    callbacks = []
    if "mlflow" in sweep.loggers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"), tags={"sweep": sweep.name},
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)))
    if "wandb" in sweep.loggers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
                                             group=sweep.name))
    return callbacks


PROGRESS = ("lines", "tune", "none")


@contextlib.contextmanager
def _tune_output(progress: str):
    """Tune's new console engine prints its experiment banner even at verbose=0; unless Tune's own
    output was asked for (--verbose), use its legacy engine, which verbose=0 silences."""
    if progress == "tune":
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def run_sweep(sweep_file: str | Path, out: str | Path, address: str | None = None, resume: bool = False,
              storage: str | None = None, data_dir: str | None = None, progress: str = "lines") -> str:
    """Run (or resume) a sweep; writes results.csv, best.md and sweep.png into ``out``; returns best.md's table.

    ``progress``: ``lines`` (one relay-ray line per finished trial), ``tune`` (Tune's own tables) or ``none``."""
    if progress not in PROGRESS:
        raise UserError(f"progress must be one of {', '.join(PROGRESS)}, got {progress!r}")
    out = Path(out).resolve()
    saved = out / "sweep.yaml"
    sweep = load_sweep(sweep_file, {"data_dir": str(Path(data_dir).resolve())} if data_dir else None)
    check_installed(tuple(sweep.loggers))
    if resume:
        if not saved.exists():
            raise UserError(f"--resume: {out} holds no sweep (no sweep.yaml); run it once without --resume")
        if parse_sweep(yaml.safe_load(saved.read_text()), saved).to_dict() != sweep.to_dict():
            raise UserError(f"{sweep_file} differs from the sweep being resumed ({saved}); resume with the same file")
    elif saved.exists():
        raise UserError(f"{out} already holds a sweep; pass --resume to continue it, or choose another --out")
    # Save Tune's experiment state every second (default: at most every ~10 s), so an interrupted sweep
    # knows which trials had finished; a finished trial's final checkpoint covers the last second.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", f"{STATE_PERIOD_S:g}")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # that is on purpose
    storage_path = storage or str(out)
    experiment_path = f"{storage_path.rstrip('/')}/{sweep.name}"

    started = connect(address)
    try:
        check_resources(sweep)
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            if not tune.Tuner.can_restore(experiment_path):
                raise UserError(f"--resume: no restorable Tune experiment at {experiment_path}")
            print(f"relay-ray tune: resuming {experiment_path}", file=sys.stderr)
            tuner = tune.Tuner.restore(experiment_path, trainable=_trainable(sweep), resume_unfinished=True,
                                       resume_errored=True)
        else:
            saved.write_text(yaml.safe_dump(sweep.to_dict(), sort_keys=False))
            tuner = tune.Tuner(
                _trainable(sweep),
                param_space=param_space(sweep),
                tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                                            scheduler=_scheduler(sweep),
                                            max_concurrent_trials=sweep.max_concurrent_trials),
                run_config=tune.RunConfig(name=sweep.name, storage_path=storage_path,
                                          verbose=1 if progress == "tune" else 0,
                                          callbacks=([TrialLines(sweep)] if progress == "lines" else []) +
                                          tracker_callbacks(sweep),
                                          failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=KEPT_CHECKPOINTS),
                                          # each trial's run files (metrics.jsonl, curves.png) reach the storage
                                          sync_config=tune.SyncConfig(sync_artifacts=True)),
            )
        with _tune_output(progress):
            grid = tuner.fit()
        frame = results_frame(grid.get_dataframe(), sweep)
    finally:
        if started:
            ray.shutdown()
    table = write_reports(frame, sweep, out)
    errors = [r for r in grid if r.error is not None]
    if errors:
        first = str(errors[0].error).strip().splitlines()[-1][:300]
        print(f"relay-ray tune: {len(errors)} of {len(grid)} trials failed; first: {first}", file=sys.stderr)
    return table


# ------------------------------------------------------------------------- reports (pure pandas/matplotlib)


def _topology_label(row) -> str:
    topology = row.get("topology")
    if isinstance(topology, str) and topology:
        return topology
    if row.get("algorithm") == "allreduce":
        return "complete"
    if row.get("algorithm") == "btpp":
        return f"{int(row.get('branching') or 2)}-ary tree"
    if row.get("algorithm") in TREE_ALGORITHMS:
        tree = row.get("tree") or "auto"
        return f"{'chain' if tree == 'auto' else tree} tree"  # auto without a graph relays over a chain
    return "ring"


def _searched_keys(sweep: Sweep) -> list[str]:
    """The settings that vary between trials (a variant's settings count as searched)."""
    keys = []
    for key, spec in sweep.search.items():
        if key == VARIANT:
            keys += [k for variant in next(iter(spec.values())) for k in variant]
        else:
            keys.append(key)
    return list(dict.fromkeys(keys))


def results_frame(frame: pd.DataFrame, sweep: Sweep) -> pd.DataFrame:
    """One row per trial: its settings (base + searched), final metrics, and how many times it reported."""
    frame = frame.copy()
    # Tune flattens nested configs: config/lr, config/variant/algorithm -> lr, algorithm
    frame.columns = [c.removeprefix(CONFIG_PREFIX).removeprefix(f"{VARIANT}/") for c in frame.columns]
    for key, value in sweep.base.items():
        if key not in frame.columns:
            frame[key] = [value] * len(frame)
    defaults = RunConfig(backend="local", dataset=sweep.base.get("dataset", "digits"))
    for key in ("algorithm", "tree", "alpha", "topology"):
        if key not in frame.columns:
            frame[key] = getattr(defaults, key)
    frame["topology"] = [_topology_label(row) for row in frame.to_dict("records")]
    frame["alpha"] = frame["alpha"].astype(float)
    frame = frame.rename(columns={"training_iteration": "reports"})
    searched = [k for k in _searched_keys(sweep) if k in frame.columns]
    metrics = [m for m in ("test_acc_worst", "test_acc_mean", "test_acc_avg_model", "suboptimality",
                           "consensus_distance", "train_loss", "step") if m in frame.columns]
    keep = ["trial_id", *dict.fromkeys([*GROUP_KEYS, "tree", *searched]), *metrics, "reports"]
    keep = [k for k in dict.fromkeys(keep) if k in frame.columns]
    return frame[keep].sort_values(list(GROUP_KEYS) + searched, kind="stable").reset_index(drop=True)


def best_per_group(frame: pd.DataFrame, sweep: Sweep) -> pd.DataFrame:
    """The best trial of every algorithm x topology x alpha group (by the sweep's metric and mode)."""
    scored = frame.dropna(subset=[sweep.metric]) if sweep.metric in frame.columns else frame.iloc[0:0]
    if scored.empty:
        return scored
    pick = scored.groupby(list(GROUP_KEYS), sort=True)[sweep.metric]
    index = pick.idxmax() if sweep.mode == "max" else pick.idxmin()
    return scored.loc[index.values].reset_index(drop=True)


def markdown_table(best: pd.DataFrame, sweep: Sweep) -> str:
    searched = [k for k in _searched_keys(sweep) if k not in GROUP_KEYS and k in best.columns]
    columns = [*GROUP_KEYS, *searched, sweep.metric]
    extra = [m for m in ("test_acc_avg_model", "consensus_distance") if m in best.columns and m != sweep.metric]
    columns += extra
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in best.to_dict("records"):
        cells = []
        for c in columns:
            value = row[c]
            if isinstance(value, float):
                cells.append("inf" if math.isinf(value) else f"{value:.4g}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    notes = edge_notes(best.to_dict("records"), sweep, GROUP_KEYS)
    if notes:
        lines += ["", "At the edge of the grid (the best may lie outside it):", *(f"- {n}" for n in notes)]
    return "\n".join(lines)


def plot_sweep(frame: pd.DataFrame, best: pd.DataFrame, sweep: Sweep, path: Path) -> None:
    """The best score per algorithm/topology: against alpha when several were swept, else as bars;
    beside it, score vs lr when lr was searched, each group's winner starred and a winner on the
    grid's edge said in the figure (the grid may not hold the best lr)."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry is touched

    with_lr = "lr" in sweep.search and "lr" in frame.columns
    fig = Figure(figsize=(12.5 if with_lr else 6.5, 4.6))
    axes = fig.subplots(1, 2 if with_lr else 1, squeeze=False)
    ax = axes[0][0]
    groups = list(best.groupby(["algorithm", "topology"], sort=True))
    if best["alpha"].nunique() > 1:
        finite = best["alpha"].replace(math.inf, float("nan")).dropna()
        inf_at = (finite.max() * 10) if not finite.empty else 1.0
        for (algorithm, topology), group in groups:
            group = group.sort_values("alpha")
            x = [inf_at if math.isinf(a) else a for a in group["alpha"]]
            ax.plot(x, group[sweep.metric], marker="o", label=f"{algorithm} / {topology}")
        ax.set_xscale("log")
        ax.set_xlabel("alpha (Dirichlet; smaller = more heterogeneous; rightmost = iid)")
        ax.legend(fontsize=7)
    else:  # one alpha: a line through one point per group says nothing; bars do
        labels = [f"{algorithm}\n{topology}" for (algorithm, topology), _ in groups]
        values = [group[sweep.metric].iloc[0] for _, group in groups]
        bars = ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_xlabel(f"algorithm / topology (alpha {best['alpha'].iloc[0]:g})")
    ax.set_ylabel(f"best {sweep.metric}")
    ax.set_title("best trial per group", fontsize=10)
    ax.grid(alpha=0.3)
    notes = edge_notes(best.to_dict("records"), sweep, GROUP_KEYS)
    if with_lr:
        ax = axes[0][1]
        winners = {tuple(row[k] for k in GROUP_KEYS): row["lr"] for row in best.to_dict("records")}
        for (algorithm, topology, alpha), group in frame.groupby(list(GROUP_KEYS), sort=True):
            group = group.groupby("lr")[sweep.metric].agg("max" if sweep.mode == "max" else "min").sort_index()
            line, = ax.plot(group.index, group.values, marker="o", label=f"{algorithm} / {topology} / a={alpha:g}")
            won = winners.get((algorithm, topology, alpha))
            if won in group.index:
                ax.plot([won], [group[won]], marker="*", markersize=15, color=line.get_color(),
                        markeredgecolor="black", linestyle="none")
        ax.set_xscale("log")
        ax.set_xlabel("lr (star: each group's best)")
        ax.set_ylabel(sweep.metric)
        ax.set_title("score vs learning rate", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"sweep {sweep.name}: {len(frame)} trials, {sweep.mode} {sweep.metric}\n{command_stamp()}",
                 fontsize=10)
    if notes:
        fig.text(0.5, 0.01, "\n".join(notes[:4] + ([f"... and {len(notes) - 4} more (best.md)"] if len(notes) > 4
                                                  else [])), ha="center", va="bottom", fontsize=8, color="tab:red")
    fig.tight_layout(rect=(0, 0.035 * min(len(notes), 5), 1, 1))
    fig.savefig(path, dpi=110)


def write_reports(frame: pd.DataFrame, sweep: Sweep, out: Path) -> str:
    frame.to_csv(out / "results.csv", index=False)
    best = best_per_group(frame, sweep)
    table = markdown_table(best, sweep)
    (out / "best.md").write_text(f"# {sweep.name}: best trial per algorithm x topology x alpha\n\n"
                                 f"Metric: {sweep.metric} ({sweep.mode}); {len(frame)} trials.\n\n{table}\n")
    plot_sweep(frame, best, sweep, out / "sweep.png")
    return table

