"""The Python API: ``run``, ``compare`` and ``sweep`` return results you can work with in a notebook.

    from relay_ray import RunConfig, run
    result = run(RunConfig(dataset="digits", num_workers=16, alpha=0.01, out="runs/api"))
    result.metrics            # one row per evaluation (pandas)
    result.summary["final"]   # what summary.json holds

The same checks and one-line ``UserError`` messages as the CLI (the CLI is a layer over these
functions plus argument parsing), the same run directory rules: an ``out`` that holds a finished
run is refused unless ``overwrite=True`` (or ``resume(out)`` continues it), and a live run's
directory is never written into.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from relay_ray import rundir, runner
from relay_ray.config import EngineOptions, RunConfig
from relay_ray.metrics import read_rows
from relay_ray.storage import Location, is_uri


@dataclass
class Result:
    """One finished run: its summary, its metrics and where its files are (``path`` is None
    for a run with ``out=None``, which writes nothing)."""

    config: RunConfig
    summary: dict
    metrics: pd.DataFrame
    path: Path | str | None  # a local folder, or the storage URI of an ``out="s3://..."`` run

    @property
    def final(self) -> dict:
        return self.summary["final"]

    @property
    def checkpoint(self) -> Path | str | None:
        """The newest complete checkpoint of the run (None without ``checkpoint_every``)."""
        if self.path is None:
            return None
        from relay_ray.checkpoint import MANIFEST  # torch: imported when asked, not with the API

        root = Location(self.path) / "checkpoints"
        steps = sorted(name for name in root.list_dirs() if (root / name / MANIFEST).exists())
        if not steps:
            return None
        newest = root / steps[-1]
        return str(newest) if newest.remote else newest.path


def _result(config: RunConfig, summary: dict, rows: list[dict] | None = None) -> Result:
    path = (config.out if is_uri(config.out) else Path(config.out)) if config.out else None
    if rows is None:
        rows = read_rows(str(Location(path) / "metrics.jsonl")) if path is not None else []
    metrics = pd.DataFrame([{k: v for k, v in row.items() if k != "metric_per_worker"} for row in rows])
    return Result(config, summary, metrics, path)


def run(config: RunConfig, options: EngineOptions | None = None, *, address: str | None = None,
        overwrite: bool = False, progress: bool = True) -> Result:
    """Train one configuration on its backend (``config.backend``: "ray" or "local")."""
    options = options or EngineOptions()
    rundir.check_out(config.out, overwrite=overwrite)
    with rundir.claimed(config.out, overwrite=overwrite):
        summary = runner.run(config, options, address=address, progress=progress)
    return _result(config, summary)


def resume(run_dir: str | Path, options: EngineOptions | None = None, *, address: str | None = None,
           progress: bool = True, **changes) -> Result:
    """Continue the run in ``run_dir`` from its newest complete checkpoint, with the same numbers as
    an uninterrupted run; ``changes`` may only touch what a resume may change (e.g. ``data_dir``)."""
    options = options or EngineOptions()
    rundir.check_out(str(run_dir), resume=True)
    resolved = runner.from_resume(str(run_dir), changes, options, address)
    with rundir.claimed(resolved.config.out):
        summary = runner.run(resolved.config, options, address=address, progress=progress,
                             experiment=resolved.experiment, resume=resolved.checkpoint)
    return _result(resolved.config, summary)


@dataclass
class Comparison:
    """Several algorithms on one split and seed: the Markdown table and each run's ``Result`` (keyed by
    algorithm, or ``algorithm@topology`` for an algorithm on several topologies)."""

    table: str
    results: dict[str, Result]
    path: Path | None


def compare(configs: list[RunConfig], options: EngineOptions | None = None, *, out: str | None = None,
            address: str | None = None, progress: bool = True, overwrite: bool = False) -> Comparison:
    """Run every config one after another on one Ray instance; ``out`` gets compare.md, compare.png
    and a run directory per algorithm (an ``out`` holding a comparison is refused unless ``overwrite``)."""
    from relay_ray.comparison import run_comparison, run_labels

    configs = [dataclasses.replace(c, out=None) for c in configs]  # compare places each run in out
    table, summaries, rows = run_comparison(configs, options, out_dir=out, address=address, progress=progress,
                                            overwrite=overwrite)
    results = {label: _result(c, summaries[label], rows.get(label, [])) for label, c in zip(run_labels(configs), configs)}
    return Comparison(table, results, Path(out) if out else None)


@dataclass
class Sweep:
    """A Ray Tune sweep: the best-per-group Markdown table and one row per trial."""

    table: str
    trials: pd.DataFrame
    path: Path


def sweep(sweep_file: str | Path, out: str | Path, *, address: str | None = None, resume: bool = False,
          storage: str | None = None, data_dir: str | None = None, progress: str = "lines") -> Sweep:
    """Run (or, with ``resume=True``, continue) the sweep in ``sweep_file`` (see tune_configs/)."""
    from relay_ray.tune import run_sweep

    table = run_sweep(sweep_file, out, address=address, resume=resume, storage=storage, data_dir=data_dir,
                      progress=progress)
    return Sweep(table, pd.read_csv(Path(out) / "results.csv"), Path(out))
