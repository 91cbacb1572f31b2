"""Run configuration: one dataclass, validated in ``__post_init__``, dumped/loaded as safe YAML."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from relay_ray.algorithms import ALGORITHMS, TREE_ALGORITHMS
from relay_ray.data import DATASETS
from relay_ray.errors import UserError
from relay_ray.models import MODELS
from relay_ray.topology import GRAPHS, TREES

TASKS = DATASETS + ("quadratics",)
BACKENDS = ("ray", "local")
DEVICES = ("cpu", "cuda")

# Per-task defaults for the settings left unset: what a user gets from `relay-ray run --dataset X`.
TASK_DEFAULTS = {
    "quadratics": dict(model="linear", lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=1, steps=3000,
                       eval_every=100),
    "digits": dict(model="mlp", lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=32, epochs=30,
                   eval_every=10),
    "mnist": dict(model="cnn", lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=32, epochs=5,
                  eval_every=100),
    "cifar10": dict(model="resnet20", lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=32, epochs=20,
                    eval_every=200),
}

DATA_HINTS = {
    "cifar10": "put CIFAR-10 there (a torchvision root with cifar-10-batches-py/, an ImageFolder tree "
               "train/<class>/*.jpg + test/<class>/*.jpg, or its .tar.gz), or drop --data-dir on a machine with "
               "internet to download it with torchvision into ~/.cache/relay_ray/data",
    "mnist": "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
             "t10k-labels-idx1-ubyte.gz there, or drop --data-dir on a machine with internet to download them",
    "digits": "digits ships with scikit-learn and needs no --data-dir",
    "quadratics": "the quadratics task is synthetic and needs no --data-dir",
}


@dataclass
class RunConfig:
    """Everything that defines a run; ``None`` fields take the task's defaults (``TASK_DEFAULTS``)."""

    algorithm: str = "relaysgd"
    topology: str | None = None  # None: ring for gossip; the tree itself for relay algorithms
    topology_file: str | None = None
    tree: str = "auto"
    num_workers: int | None = None  # None: 16, or what --topology social / --topology-file define
    dataset: str = "digits"
    data_dir: str | None = None
    alpha: float = 1.0
    heterogeneity: float = 10.0  # zeta^2 of the quadratics task
    model: str | None = None
    steps: int | None = None
    epochs: float | None = None
    lr: float | None = None
    lr_correction: str = "auto"  # auto | none | a float
    warmup_steps: int = 0
    decay_at: list[float] = field(default_factory=list)  # fractions of the run, lr *= 0.1 at each
    momentum: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    eval_every: int | None = None
    eval_samples: int | None = None  # test samples per evaluation (None: the whole test set)
    seed: int = 0
    device: str = "cpu"  # where a worker's model computes: cpu or cuda (with --gpus-per-worker on Ray)
    drop_prob: float = 0.0  # each received message is lost with this probability (seeded per step and edge)
    checkpoint_every: int | None = None  # write a checkpoint every K steps (OUT/checkpoints/step-XXXXXXXX/)
    keep: int = 3  # complete checkpoints kept; older ones are pruned
    backend: str = "ray"
    out: str | None = None

    def __post_init__(self) -> None:
        self._validate()
        self._resolve_num_workers()
        defaults = TASK_DEFAULTS[self.dataset]
        for name, value in defaults.items():
            if name in ("steps", "epochs"):
                continue
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.steps is None and self.epochs is None:
            if "steps" in defaults:
                self.steps = defaults["steps"]
            else:
                self.epochs = defaults["epochs"]
        self._validate_resolved()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("dataset", self.dataset, TASKS)
        _choice("backend", self.backend, BACKENDS)
        _choice("tree", self.tree, TREES)
        if self.topology is not None and self.topology_file is None:
            _choice("topology", self.topology, GRAPHS)
        if self.topology_file is None and self.num_workers is not None and self.num_workers < 2:
            raise UserError(f"--workers must be at least 2, got {self.num_workers}")
        if not (self.alpha > 0):
            raise UserError(f"--alpha must be > 0 (use inf for iid data), got {self.alpha}")
        if self.heterogeneity < 0:
            raise UserError(f"--heterogeneity must be >= 0, got {self.heterogeneity}")
        if self.steps is not None and self.epochs is not None:
            raise UserError("give either --steps or --epochs, not both")
        _positive("steps", self.steps)
        _positive("epochs", self.epochs)
        _positive("lr", self.lr)
        _positive("batch-size", self.batch_size)
        _positive("eval-every", self.eval_every)
        _positive("eval-samples", self.eval_samples)
        _positive("checkpoint-every", self.checkpoint_every)
        if not 0 <= self.drop_prob < 1:
            raise UserError(f"--drop-prob must be in [0, 1), got {self.drop_prob}")
        if self.keep < 1:
            raise UserError(f"--keep must be at least 1, got {self.keep}")
        _choice("device", self.device, DEVICES)
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if any(not 0 < f < 1 for f in self.decay_at):
            raise UserError(f"--decay-at takes fractions of the run in (0, 1), got {self.decay_at}")
        if self.lr_correction not in ("auto", "none"):
            try:
                value = float(self.lr_correction)
            except ValueError:
                raise UserError(f"--lr-correction must be auto, none or a number, got {self.lr_correction!r}") from None
            if not value > 0:
                raise UserError(f"--lr-correction must be > 0, got {self.lr_correction}")
        if self.model is not None and self.dataset != "quadratics":
            _choice("model", self.model, MODELS)
        if self.data_dir is not None and not Path(self.data_dir).exists():
            raise UserError(f"--data-dir {self.data_dir} does not exist; {DATA_HINTS.get(self.dataset, '')}")

    def _resolve_num_workers(self) -> None:
        if self.topology_file is not None:
            from relay_ray.topology import read_edge_list

            self.num_workers = read_edge_list(self.topology_file, self.num_workers).number_of_nodes()
        elif self.topology == "social":
            from relay_ray.topology import SOCIAL_NUM_WORKERS

            if self.num_workers not in (None, SOCIAL_NUM_WORKERS):
                raise UserError(f"topology 'social' has {SOCIAL_NUM_WORKERS} workers, got --workers {self.num_workers}")
            self.num_workers = SOCIAL_NUM_WORKERS
        elif self.num_workers is None:
            self.num_workers = 16

    def _validate_resolved(self) -> None:
        if self.dataset == "quadratics" and self.model != "linear":
            raise UserError("the quadratics task has its own linear model; drop --model")

    # ------------------------------------------------------------------ derived
    @property
    def uses_trees(self) -> bool:
        return self.algorithm in TREE_ALGORITHMS

    def lr_scale(self, auto_value: float) -> float:
        """The factor applied to --lr for RelaySGD: the tree's correction (auto), 1 (none) or a number.

        Other algorithms need no correction (their averaging is not damped by x0 fill-in): 1.
        """
        if self.algorithm != "relaysgd" or self.lr_correction == "none":
            return 1.0
        return auto_value if self.lr_correction == "auto" else float(self.lr_correction)

    def evaluates_at(self, step: int, total_steps: int) -> bool:
        """Evaluate after ``step`` steps (every eval_every steps, and at the end)."""
        return step % self.eval_every == 0 or step == total_steps

    def checkpoints_at(self, step: int) -> bool:
        return self.checkpoint_every is not None and step % self.checkpoint_every == 0

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if math.isinf(data["alpha"]):
            data["alpha"] = "inf"
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown run setting(s): {', '.join(unknown)}")
        data = dict(data)
        if isinstance(data.get("alpha"), str) and data["alpha"].strip().lower() in ("inf", "infinity"):
            data["alpha"] = math.inf
        for name, value in data.items():
            data[name] = _typed(name, value, _FIELD_TYPES[name])
        return cls(**data)

    def dump(self, path: str | Path) -> None:
        """Written to a temporary file and renamed: a reader never sees half a config."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise UserError(f"cannot read run config {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise UserError(f"cannot read run config {path}: {yaml_error_line(exc)}") from None
        if not isinstance(data, dict):
            raise UserError(f"run config {path} must be a mapping of settings, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except UserError as exc:
            raise UserError(f"run config {path}: {exc}") from None


# What each setting may be in a YAML file (a sweep or a run config): checked before validation,
# so a string where a number belongs is one clear line, not a TypeError deep inside.
_FIELD_TYPES = {
    "topology": "str?", "topology_file": "str?", "num_workers": "int?", "data_dir": "str?", "model": "str?",
    "steps": "int?", "epochs": "float?", "lr": "float?", "lr_correction": "str|float", "warmup_steps": "int",
    "decay_at": "floats", "momentum": "float?", "weight_decay": "float?", "batch_size": "int?",
    "eval_every": "int?", "eval_samples": "int?", "seed": "int", "alpha": "float", "heterogeneity": "float",
    "drop_prob": "float", "checkpoint_every": "int?", "keep": "int", "out": "str?",
    "algorithm": "str", "tree": "str", "dataset": "str", "backend": "str", "device": "str",
}


def _typed(name: str, value, kind: str):
    if value is None and kind.endswith("?"):
        return None
    base = kind.rstrip("?")
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if base == "int" and is_int:
        return int(value)
    if base == "float" and is_number:
        return float(value)
    if base == "str" and isinstance(value, str):
        return value
    if base == "str|float" and (isinstance(value, str) or is_number):
        return value if isinstance(value, str) else str(value)
    if base == "floats" and isinstance(value, list) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    wanted = {"int": "an integer", "float": "a number", "str": "a string", "str|float": "a string or a number",
              "floats": "a list of numbers"}[base]
    raise UserError(f"setting {name} must be {wanted}, got {value!r}")


def yaml_error_line(exc: Exception) -> str:
    """A YAML parse error in one line ("expected ',' or ']' at line 2, column 1"); PyYAML's own spans lines."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"unknown {flag} {value!r}; choose one of {', '.join(choices)}")


def _positive(flag: str, value) -> None:
    if value is not None and not value > 0:
        raise UserError(f"--{flag} must be > 0, got {value}")
