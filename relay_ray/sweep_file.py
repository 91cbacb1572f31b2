"""Sweep files: a YAML search space over run settings, validated before anything starts (pure; no Ray).

A sweep file has fixed ``base:`` run settings (the fields of ``RunConfig``), a ``search:`` map whose
values are ``{grid_search: [...]}``, ``{choice: [...]}``, ``{uniform: [lo, hi]}`` or
``{loguniform: [lo, hi]}``, and what to optimise (``metric``, ``mode``), how often (``num_samples``),
an optional ``scheduler`` and per-worker ``resources``.  The file is read with ``yaml.safe_load``;
nothing in it is ever evaluated as code.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from relay_ray.config import RunConfig
from relay_ray.errors import UserError
from relay_ray.loggers import parse_loggers

SEARCH_KINDS = ("grid_search", "choice", "uniform", "loguniform")
METRICS = ("test_acc_worst", "test_acc_mean", "test_acc_avg_model", "train_loss", "consensus_distance",
           "suboptimality", "suboptimality_worst")
SWEEP_KEYS = ("name", "description", "base", "search", "metric", "mode", "num_samples", "scheduler", "resources",
              "max_failures", "max_concurrent_trials", "loggers")
RESOURCE_KEYS = ("cpus_per_trial", "gpus_per_trial", "driver_cpus", "workers_per_actor", "window")
SCHEDULER_KEYS = {"fifo": (), "asha": ("max_t", "grace_period", "reduction_factor")}
# Settings a sweep owns itself: every trial runs on Ray and writes into its own trial directory, and
# experiment trackers are the sweep's (``loggers:``, Tune's own callbacks), not each trial's.
NOT_SEARCHABLE = ("backend", "out", "logger")
# ``search: {variant: {grid_search: [{algorithm: dsgd, topology: ring}, ...]}}`` couples settings that
# only make sense together (an algorithm and its graph); each variant is merged into the trial's settings.
VARIANT = "variant"
MAX_GRID_CHECK = 5000


@dataclass
class Sweep:
    name: str
    base: dict
    search: dict
    metric: str = "test_acc_worst"
    mode: str = "max"
    num_samples: int = 1
    scheduler: dict = field(default_factory=lambda: {"type": "fifo"})
    resources: dict = field(default_factory=dict)
    max_failures: int = 1
    max_concurrent_trials: int | None = None
    description: str = ""
    loggers: list = field(default_factory=list)

    @property
    def cpus_per_trial(self) -> float:
        """CPUs of a trial's actors (its driver's come on top)."""
        return float(self.resources.get("cpus_per_trial", 1.0))

    @property
    def gpus_per_trial(self) -> float:
        return float(self.resources.get("gpus_per_trial", 0.0))

    @property
    def driver_cpus(self) -> float:
        return float(self.resources.get("driver_cpus", 0.1))

    @property
    def window(self) -> int:
        return int(self.resources.get("window", 4))

    def trial_shape(self, num_workers: int):
        """A trial's actors: the engine's own rule (``workers_per_actor``; auto: one actor per GPU when the
        trial has GPUs, else one per whole CPU of ``cpus_per_trial``) on the trial's budget, which the
        actors share equally."""
        from relay_ray.config import EngineOptions
        from relay_ray.engine.placement import ActorShape, actor_shape

        gpus = self.gpus_per_trial
        node = {"CPU": self.cpus_per_trial, **({"GPU": gpus} if gpus else {})}
        options = EngineOptions(workers_per_actor=self.resources.get("workers_per_actor", "auto"),
                                gpus_per_actor=min(1.0, gpus) if gpus else None)
        shape = actor_shape(num_workers, options, "cuda" if gpus else "cpu", [node])
        return ActorShape(num_workers, shape.num_actors, self.cpus_per_trial / shape.num_actors,
                          gpus / shape.num_actors, shape.auto)

    def trial_bundles(self, num_workers: int) -> list[dict]:
        """Bundle 0 runs the trial's driver; bundle 1 + g holds actor g."""
        shape = self.trial_shape(num_workers)
        return [{"CPU": self.driver_cpus}] + [shape.bundle] * shape.num_actors

    def fixed_settings(self, sampled: dict) -> dict:
        return run_settings({**self.base, **sampled})

    def candidate_worker_counts(self) -> list[int]:
        """Every worker count a trial may have (for the resource check before the sweep starts)."""
        counts = set()
        for combo in self._discrete_combinations():
            counts.add(RunConfig.from_dict({**self.fixed_settings(combo), "backend": "local"}).num_workers)
        return sorted(counts)

    def _discrete_combinations(self):
        discrete = {k: v[kind] for k, v in self.search.items() for kind in v if kind in ("grid_search", "choice")}
        keys = list(discrete)
        for values in itertools.product(*(discrete[k] for k in keys)):
            yield dict(zip(keys, values))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_settings(trial_config: dict) -> dict:
    """A trial's run settings: its config with the chosen variant's settings merged in."""
    settings = {k: v for k, v in trial_config.items() if k != VARIANT}
    return {**settings, **(trial_config.get(VARIANT) or {})}


def _fail(path, message: str) -> None:
    raise UserError(f"{path}: {message}")


def _check_search(path, key: str, spec) -> None:
    if key in NOT_SEARCHABLE:
        _fail(path, f"search: '{key}' is set by the sweep itself and cannot be searched")
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    if key not in run_fields and key != VARIANT:
        _fail(path, f"search: unknown run setting '{key}'")
    if not isinstance(spec, dict) or len(spec) != 1:
        _fail(path, f"search.{key} must be one of {{{', '.join(k + ': ...' for k in SEARCH_KINDS)}}}, got {spec!r}")
    (kind, values), = spec.items()
    if kind not in SEARCH_KINDS:
        _fail(path, f"search.{key}: unknown kind '{kind}'; use one of {', '.join(SEARCH_KINDS)}")
    if kind in ("grid_search", "choice"):
        if not isinstance(values, list) or not values:
            _fail(path, f"search.{key}.{kind} must be a non-empty list, got {values!r}")
        if key == VARIANT:
            for variant in values:
                if not isinstance(variant, dict) or not variant:
                    _fail(path, f"search.variant.{kind}: each variant must be a mapping of run settings, "
                                f"got {variant!r}")
                bad = sorted(set(variant) - run_fields) + sorted(set(variant) & set(NOT_SEARCHABLE))
                if bad:
                    _fail(path, f"search.variant: '{bad[0]}' is not a run setting a variant may set")
        return
    if key == VARIANT:
        _fail(path, f"search.variant takes grid_search or choice, not {kind}")
    if (not isinstance(values, list) or len(values) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        _fail(path, f"search.{key}.{kind} must be [lo, hi] numbers, got {values!r}")
    lo, hi = values
    if not lo < hi:
        _fail(path, f"search.{key}.{kind}: lo must be < hi, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        _fail(path, f"search.{key}.loguniform needs 0 < lo, got {lo}")
    if key in ("num_workers", "steps", "batch_size", "eval_every", "seed", "warmup_steps"):
        _fail(path, f"search.{key} is an integer setting; use grid_search or choice, not {kind}")


def _check_runs(path, sweep: Sweep) -> None:
    """Every discrete combination (and both ends of every range) must be a valid run."""
    ranges = {k: v[kind] for k, v in sweep.search.items() for kind in v if kind in ("uniform", "loguniform")}
    n_combos = math.prod(len(next(iter(v.values()))) for v in sweep.search.values()
                         if next(iter(v)) in ("grid_search", "choice"))
    if n_combos > MAX_GRID_CHECK:
        _fail(path, f"the search has {n_combos} discrete combinations; at most {MAX_GRID_CHECK} are allowed")
    for combo in sweep._discrete_combinations():
        ends = [{k: v[i] for k, v in ranges.items()} for i in (0, 1)] if ranges else [{}]
        for end in ends:
            settings = {**sweep.fixed_settings(combo), **end, "backend": "local"}
            try:
                RunConfig.from_dict(settings)
            except UserError as exc:
                where = ", ".join(f"{k}={v}" for k, v in run_settings({**combo, **end}).items()) or "base"
                _fail(path, f"invalid run for {where}: {exc}")


def load_sweep(path: str | Path, base_overrides: dict | None = None) -> Sweep:
    """Read and validate a sweep file (``base_overrides`` replace base: settings, e.g. a local data_dir);
    every mistake is a one-line ``UserError``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read sweep file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if base_overrides and isinstance(data, dict):
        data = {**data, "base": {**(data.get("base") or {}), **base_overrides}}
    return parse_sweep(data, path)


def parse_sweep(data, path: str | Path = "sweep.yaml") -> Sweep:
    if not isinstance(data, dict):
        _fail(path, "a sweep file must be a mapping with base: and search:")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        _fail(path, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SWEEP_KEYS)}")
    base = data.get("base") or {}
    search = data.get("search") or {}
    if not isinstance(base, dict) or not isinstance(search, dict):
        _fail(path, "base: and search: must be mappings")
    for key in NOT_SEARCHABLE:
        if key in base:
            _fail(path, f"base: '{key}' is set by the sweep itself (each trial runs on Ray in its own directory; "
                        "trackers: loggers: at the top of the sweep file)")
    for key, spec in search.items():
        _check_search(path, key, spec)
    variant_keys = {k for v in (search.get(VARIANT) or {}).get("grid_search", []) + (search.get(VARIANT) or {}).get(
        "choice", []) for k in v}
    # a variant may override base: (it is the more specific setting); nothing else may be set twice
    overlap = sorted(set(base) & set(search) | set(search) & variant_keys)
    if overlap:
        _fail(path, f"{', '.join(overlap)} set in both base: and search: (or search: and a variant)")
    metric, mode = data.get("metric", "test_acc_worst"), data.get("mode", "max")
    if metric not in METRICS:
        _fail(path, f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if mode not in ("max", "min"):
        _fail(path, f"mode must be max or min, got {mode!r}")
    num_samples = data.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        _fail(path, f"num_samples must be an integer >= 1, got {num_samples!r}")
    scheduler = data.get("scheduler") or {"type": "fifo"}
    if not isinstance(scheduler, dict) or scheduler.get("type") not in SCHEDULER_KEYS:
        _fail(path, f"scheduler must be {{type: fifo}} or {{type: asha, ...}}, got {scheduler!r}")
    extra = sorted(set(scheduler) - {"type", *SCHEDULER_KEYS[scheduler["type"]]})
    if extra:
        _fail(path, f"scheduler {scheduler['type']}: unknown key(s) {', '.join(extra)}; allowed: "
                    f"{', '.join(SCHEDULER_KEYS[scheduler['type']]) or 'none'}")
    for key in SCHEDULER_KEYS[scheduler["type"]]:
        value = scheduler.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            _fail(path, f"scheduler.{key} must be a number > 0, got {value!r}")
    resources = data.get("resources") or {}
    if not isinstance(resources, dict):
        _fail(path, "resources: must be a mapping")
    unknown = sorted(set(resources) - set(RESOURCE_KEYS))
    if unknown:
        _fail(path, f"resources: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(RESOURCE_KEYS)}")
    for key, value in resources.items():
        if key == "workers_per_actor":
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                _fail(path, f"resources.workers_per_actor must be auto or an integer >= 1, got {value!r}")
            continue
        minimum_ok = value >= 0 if key == "gpus_per_trial" else value > 0
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not minimum_ok:
            _fail(path, f"resources.{key} must be a number {'>= 0' if key == 'gpus_per_trial' else '> 0'}, "
                        f"got {value!r}")
    for key in ("max_failures", "max_concurrent_trials"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            _fail(path, f"{key} must be an integer >= 0, got {value!r}")
    try:
        loggers = parse_loggers(data.get("loggers"))
    except UserError as exc:
        _fail(path, f"loggers: {exc}")
    name = str(data.get("name") or Path(str(path)).stem)
    if not name.replace("_", "").replace("-", "").isalnum():
        _fail(path, f"name may hold letters, digits, '-' and '_' only, got {name!r}")
    sweep = Sweep(name=name, base=base, search=search, metric=metric, mode=mode, num_samples=num_samples,
                  scheduler=scheduler, resources=resources,
                  max_failures=data.get("max_failures", 1) if data.get("max_failures") is not None else 1,
                  max_concurrent_trials=data.get("max_concurrent_trials"),
                  description=str(data.get("description") or ""), loggers=list(loggers))
    _check_runs(path, sweep)
    return sweep


def grid_edge(value: float, grid: list[float]) -> str:
    """Which edge of the grid ``value`` sits on ("lower"/"upper"), or "" inside it: a tuned value on
    the edge may be cut off by the grid, so extend the grid that way."""
    if len(grid) < 2:
        return ""
    if value <= min(grid):
        return "lower"
    return "upper" if value >= max(grid) else ""


def edge_notes(best: list[dict], sweep: "Sweep", group_keys: tuple[str, ...]) -> list[str]:
    """One line per best trial (a row per group) whose grid-searched numeric setting (the lr) lies
    on its grid's edge."""
    notes = []
    for key, spec in sweep.search.items():
        grid = spec.get("grid_search") if isinstance(spec, dict) else None
        if not grid or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in grid):
            continue
        for row in best:
            edge = grid_edge(row[key], grid) if key in row else ""
            if edge:
                where = ", ".join(f"{k} {row[k]}" for k in group_keys if k in row)
                notes.append(f"{where}: best {key} {row[key]:g} is the grid's {edge} edge; extend the grid "
                             f"{'below' if edge == 'lower' else 'above'} it")
    return notes
