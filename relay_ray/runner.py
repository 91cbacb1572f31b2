"""Resolve a config, a config file or a resumed run directory into a run, and run it on its backend.

The CLI, ``compare``, Tune trials and the benchmarks share these; heavy imports (torch via the
experiment, Ray via the engine) happen here, when a run starts, not when the CLI parses flags.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from relay_ray import preflight
from relay_ray.config import EngineOptions, RunConfig
from relay_ray.errors import UserError
from relay_ray.storage import Location, is_uri


@dataclass
class ResolvedRun:
    """A run ready to start: its config and, when it continues one, the checkpoint and experiment."""

    config: RunConfig
    checkpoint: object | None = None  # relay_ray.checkpoint.Checkpoint
    experiment: object | None = None  # relay_ray.experiment.Experiment


def from_file(path: str, changed: dict) -> ResolvedRun:
    """The settings of a run YAML (e.g. an earlier run's config.yaml), with ``changed`` on top."""
    if not Path(path).is_file():
        raise UserError(f"--config {path} does not exist or is not a file")
    return ResolvedRun(RunConfig.from_dict({**RunConfig.load(path).to_dict(), **changed}))


def from_resume(run_dir: str, changed: dict, options: EngineOptions | None = None,
                address: str | None = None) -> ResolvedRun:
    """Continue the run in ``run_dir`` from its newest complete checkpoint; ``changed`` may only
    touch settings a resume may change (checked against the checkpoint).  ``options``/``address``:
    where it will run, for the checks made before its experiment is built."""
    directory = Location(run_dir)
    if not directory.is_dir():
        raise UserError(f"--resume {directory.shown} does not exist or is not a directory")
    if not (directory / "config.yaml").exists():
        raise UserError(f"--resume {directory.shown} has no config.yaml; give the --out directory of a run")
    if changed.get("out") is not None and not _same_place(changed["out"], run_dir):
        raise UserError(f"--resume continues the run in {directory.shown}; drop --out {changed['out']}")
    saved = RunConfig.load(str(directory / "config.yaml")).to_dict()
    config = RunConfig.from_dict({**saved, **changed, "out": str(directory)})
    preflight.check_run(config, options, address)  # this machine may not be the one that started it
    from relay_ray.checkpoint import find_latest
    from relay_ray.experiment import build_experiment

    experiment = build_experiment(config)
    checkpoint, skipped = find_latest(str(directory), config, experiment.plan)
    if skipped:
        print(f"relay-ray: newest checkpoint(s) unusable ({'; '.join(skipped)}); resuming from the previous one, "
              f"step {checkpoint.step}", file=sys.stderr)
    else:
        print(f"relay-ray: resuming {directory.shown} from step {checkpoint.step}", file=sys.stderr)
    return ResolvedRun(config, checkpoint, experiment)


def _same_place(a: str, b: str) -> bool:
    if is_uri(a) or is_uri(b):
        return Location(a) == Location(b)
    return Path(a).resolve() == Path(b).resolve()


def run(config: RunConfig, options: EngineOptions | None = None, address: str | None = None, progress: bool = True,
        experiment=None, resume=None) -> dict:
    """Run one configuration on its backend; returns the summary.  ``resume``: a ``Checkpoint``.

    Without ``experiment`` the pre-start checks (``preflight``) run first; a caller that builds the
    experiment itself (``compare``, ``from_resume``) runs them before building it."""
    if experiment is None:
        preflight.check_run(config, options, address)
    if config.fill_rule is not None and config.drop_prob > 0:
        print(f"relay-ray: {fill_note(config)}", file=sys.stderr)
    if config.backend == "local":
        from relay_ray.simulate import simulate

        return simulate(config, experiment=experiment, progress=progress, resume=resume)
    from relay_ray.engine import run_on_ray

    return run_on_ray(config, options, address=address, progress=progress, experiment=experiment, resume=resume)


FILL_MEANING = {"x0": "the initial model x0", "current": "the receiver's current model",
                "last": "the last message received on that edge"}


def fill_note(config: RunConfig) -> str:
    """One line: what RelaySGD does with a lost message, and why (the run's first line with drops)."""
    rule = config.fill_rule
    why = ("--relay-fill auto: the better of current and last in benchmarks/drops.py"
           if config.relay_fill == "auto" else f"--relay-fill {rule}")
    return (f"--drop-prob {config.drop_prob:g}: RelaySGD fills what a lost message carried with "
            f"{FILL_MEANING[rule]} ({why})")
