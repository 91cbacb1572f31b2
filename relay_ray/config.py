"""Run configuration: one dataclass, validated in ``__post_init__``, dumped/loaded as safe YAML."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from relay_ray.algorithms import ALGORITHMS, COMPRESSING_ALGORITHMS, FILL_RULES, RELAYSGD_FAMILY, TREE_ALGORITHMS, algorithm_class
from relay_ray.compression import parse_compression
from relay_ray.errors import UserError
from relay_ray.files import write_atomic
from relay_ray.loggers import parse_loggers
from relay_ray.storage import Location
from relay_ray.names import DATASETS, MODELS
from relay_ray.straggle import Straggle
from relay_ray.topology import DIRECTED, GRAPHS, TIME_VARYING, TREES

TASKS = DATASETS + ("quadratics",)
BACKENDS = ("ray", "local")
PARTITIONS = ("dirichlet", "paper")
RELAY_FILLS = ("auto",) + FILL_RULES
# RelaySGD's fill rule under --drop-prob > 0 with --relay-fill auto: the better of `current` and
# `last` in benchmarks/drops.py (3 seeds, digits and CIFAR-10, alpha 0.01); see benchmarks/RESULTS.md.
DROP_FILL = "last"
# --final-evals k > 1 adds evaluations this fraction of the run apart before the end (the paper
# averages epochs 196 and 200 of 200: 2 %).
FINAL_EVALS_SPACING = 0.02
DEVICES = ("cpu", "cuda")
TENSOR_KINDS = ("auto", "numpy", "torch")
WORKER_BATCHINGS = ("auto", "loop", "vmap")
ENGINE_RECORD = "engine"  # the key of config.yaml that records how the run executed

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

DATA_HELP = (
    "where the dataset lives. digits: built into scikit-learn (no files). "
    "mnist: a folder with the idx files train-/t10k-images-idx3-ubyte(.gz) and -labels-idx1-ubyte(.gz). "
    "cifar10: a torchvision root (with cifar-10-batches-py/), an ImageFolder tree train/<class>/*.jpg + "
    "test/<class>/*.jpg, or a .tar.gz of such a tree. Without it, CIFAR-10/MNIST are downloaded by "
    "torchvision into ~/.cache/relay_ray/data (needs internet)."
)

DATA_HINTS = {
    "cifar10": "put CIFAR-10 there (a torchvision root with cifar-10-batches-py/, an ImageFolder tree "
               "train/<class>/*.jpg + test/<class>/*.jpg, or its .tar.gz), or drop --data-dir on a machine with "
               "internet to download it with torchvision into ~/.cache/relay_ray/data",
    "mnist": "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
             "t10k-labels-idx1-ubyte.gz there, or drop --data-dir on a machine with internet to download them",
    "digits": "digits ships with scikit-learn and needs no --data-dir",
    "quadratics": "the quadratics task is synthetic and needs no --data-dir",
}


def parse_alpha(text: str) -> float:
    """A Dirichlet alpha from text: a number, or inf for iid data."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"invalid alpha {text!r}; a number > 0, or inf for iid data") from None


def setting(default, help: str, *, flag: str | None = "", metavar: str | None = None, choices=None, parse=None,
            kind: str | None = None, exclusive: str | None = None, resumable: bool = False, group: str = "run"):
    """A run setting declared once: its default, and what its CLI flag, YAML type and resume rule derive from.

    ``flag``: the CLI flag ("" = --kebab-case of the name, None = no derived flag); ``exclusive``: flags
    sharing this name are mutually exclusive; ``resumable``: a resumed run may change it."""
    metadata = dict(help=help, flag=flag, metavar=metavar, choices=choices, parse=parse, kind=kind,
                    exclusive=exclusive, resumable=resumable, group=group)
    if default is list:
        return field(default_factory=list, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything that defines a run; ``None`` fields take the task's defaults (``TASK_DEFAULTS``)."""

    algorithm: str = setting("relaysgd", f"decentralized algorithm: {', '.join(ALGORITHMS)} (default: relaysgd)",
                             metavar="A")
    topology: str | None = setting(None, f"communication graph: {', '.join(GRAPHS)} (default: ring for gossip; for "
                                   "relay algorithms the tree itself)", metavar="T")
    topology_file: str | None = setting(None, "graph as an edge list: one 'u v' per line, '#' comments, nodes 0..n-1",
                                        metavar="F")
    tree: str = setting("auto", f"spanning tree(s) for relay algorithms: {', '.join(TREES)}; auto = bfs of "
                        "--topology, or chain without one (default: auto)", metavar="TREE")
    num_workers: int | None = setting(None, "number of workers (default: 16; 32 for --topology social)",
                                      flag="--workers")
    dataset: str = setting("digits", f"{', '.join(TASKS)} (default: digits, offline)", metavar="D")
    data_dir: str | None = setting(None, DATA_HELP, metavar="DIR", resumable=True)
    partition: str = setting("dirichlet", "how labels are split: dirichlet = per class Dir(alpha) over all workers; "
                             "paper = the authors' split (groups of 10 workers, redrawn until each worker has half "
                             "its share, cut into equal shards, seed + 100) (default: dirichlet)", choices=PARTITIONS)
    alpha: float = setting(1.0, "Dirichlet non-iid-ness of the split: small = each worker sees few classes; "
                           "inf = iid (default: 1.0)", parse=parse_alpha)
    heterogeneity: float = setting(10.0, "quadratics only: zeta^2 = mean_i ||grad f_i(x*)||^2 (default: 10)",
                                   metavar="ZETA2")
    model: str | None = setting(None, f"{', '.join(MODELS)} (default per dataset: digits mlp, mnist cnn, cifar10 "
                                "resnet20)", metavar="M")
    steps: int | None = setting(None, "number of steps", exclusive="length")
    epochs: float | None = setting(None, "number of epochs over a worker's shard", exclusive="length")
    lr: float | None = setting(None, "learning rate (default per dataset)")
    lr_correction: str = setting("auto", "RelaySGD's lr multiplier: auto = computed from the tree (5.4 for a "
                                 "16-chain), none, or a number (default: auto)", metavar="{auto,none,FLOAT}",
                                 kind="str|float")
    warmup_steps: int = setting(0, "linear lr warm-up over the first N steps: lr x (step + 1) / N (default: 0)", metavar="N",
                                exclusive="warmup")
    warmup_epochs: float = setting(0.0, "linear lr warm-up over the first E epochs, as --warmup-steps (the paper: 5 of 200) "
                                   "(default: 0)", metavar="E", exclusive="warmup")
    decay_at: list[float] = setting(list, "fractions of the run where the lr is multiplied by 0.1 (e.g. 0.75 0.9)",
                                    metavar="FRAC")
    momentum: float | None = setting(None, "local Nesterov momentum (default per dataset)")
    weight_decay: float | None = setting(None, "weight decay (default per dataset)")
    batch_size: int | None = setting(None, "batch size per worker (default: 32)")
    eval_every: int | None = setting(None, "evaluate every K steps (default per dataset)")
    eval_samples: int | None = setting(None, "test samples per evaluation (default: the whole test set)")
    final_evals: int = setting(1, "the final metrics average each worker's accuracy over the last K evaluations, "
                               "then take the worst/mean worker (the paper: 2, epochs 196 and 200); K > 1 adds "
                               "evaluations 1/50 of the run apart before the end (default: 1)", metavar="K")
    seed: int = setting(0, "random seed: data split, init, batches (default: 0)")
    device: str = setting("cpu", f"where each worker's model computes: {', '.join(DEVICES)}; cuda on Ray gives "
                          "each actor a GPU unless --gpus-per-actor says otherwise (default: cpu)", choices=DEVICES)
    tensors: str = setting("auto", "where the algorithm state (models, momentum, relay buffers) lives: numpy = host "
                           "memory (with cuda every step copies the model to the GPU and back); torch = torch tensors on "
                           "--device, so nothing leaves a GPU between steps but the messages that cross actors; auto = numpy on cpu (fastest there), torch on cuda "
                           "(default: auto)", choices=TENSOR_KINDS, resumable=True)
    worker_batching: str = setting("auto", "how the workers sharing a process compute gradients: loop = one after "
                                   "another; vmap = one batched forward/backward over all of them (torch.func.vmap; "
                                   "dropout masks then come from one stream per process); auto = vmap on cuda, loop "
                                   "on cpu (measured fastest on each, benchmarks/gpu_throughput.py) (default: auto)",
                                   choices=WORKER_BATCHINGS, resumable=True)
    drop_prob: float = setting(0.0, "unreliable links: each received message is lost with probability P, seeded per "
                               "step and edge; RelaySGD fills the gap per --relay-fill, gossip renormalises (default: 0)",
                               metavar="P")
    relay_fill: str = setting("auto", "RelaySGD: what stands in for the models a worker has not received (README, "
                              "Reliability): x0 = the initial model (Algorithm 1); current = the receiver's current model "
                              "(the authors' robustness rule); last = the last message received on that edge. "
                              f"auto = x0 on reliable links, {DROP_FILL} with --drop-prob > 0 (measured best in "
                              "benchmarks/drops.py) (default: auto)", choices=RELAY_FILLS)
    compression: str | None = setting(None, "compress messages (README, Compressed communication): topk:F, randk:F "
                                      "(fraction F of coordinates), sign (1 bit each + a scale) or qsgd:S (S levels); "
                                      f"for {', '.join(COMPRESSING_ALGORITHMS)}: CHOCO and relays with error "
                                      "feedback, all-reduce EF-SGD (topk, sign) or unbiased QSGD (randk, qsgd) "
                                      "(default: none)", metavar="SPEC")
    consensus_lr: float = setting(0.5, "choco: the consensus step size gamma (default: 0.5)", metavar="GAMMA")
    local_steps: int = setting(1, "communicate every H steps, plain local steps in between (local SGD / FedAvg "
                               "periods; for all-reduce: local SGD); for the algorithms that average models "
                               "(default: 1, every step)", metavar="H")
    branching: int = setting(2, "btpp: the branching factor B of its pull and push trees (default: 2)", metavar="B")
    backend: str = setting("ray", f"{' or '.join(BACKENDS)}: Ray actors, or all workers in this process "
                           "(default: ray)", metavar="B", resumable=True)
    # outputs: where the run writes and how often it checkpoints (a resume may change them)
    checkpoint_every: int | None = setting(None, "write a checkpoint every K steps to OUT/checkpoints/ "
                                           "(default: none)", metavar="K", resumable=True, group="output")
    keep: int = setting(3, "complete checkpoints to keep; older ones are deleted (default: 3)", metavar="N",
                        resumable=True, group="output")
    out: str | None = setting(None, "output directory", resumable=True, group="output", flag=None)
    logger: str | None = setting(None, "also log every evaluation to an experiment tracker: mlflow, wandb or "
                                 "mlflow,wandb (MLFLOW_TRACKING_URI, WANDB_PROJECT, WANDB_MODE apply; TensorBoard "
                                 "files are always written) (default: none)", metavar="{mlflow,wandb}",
                                 resumable=True, group="output")

    def __post_init__(self) -> None:
        self._check_types()
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
    def _check_types(self) -> None:
        """Each setting of the type its flag and YAML key take (a config built in Python gets the
        same one-line error as a sweep file, not a TypeError from deep inside)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif f.name == "alpha" and isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
                value = math.inf
            elif isinstance(value, tuple):
                value = list(value)
            setattr(self, f.name, _typed(f.name, value, _FIELD_TYPES[f.name]))

    def _validate(self) -> None:
        self._validate_finite()
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
        parse_loggers(self.logger)
        if not 0 <= self.seed < 2 ** 31:
            raise UserError(f"--seed must be in [0, 2^31), got {self.seed}")
        if not 0 <= self.drop_prob < 1:
            raise UserError(f"--drop-prob must be in [0, 1), got {self.drop_prob}")
        _choice("relay-fill", self.relay_fill, RELAY_FILLS)
        if self.relay_fill != "auto" and not self.relays_models:
            raise UserError(f"--relay-fill is RelaySGD's fill rule; {self.algorithm} has none (drop --relay-fill)")
        _choice("partition", self.partition, PARTITIONS)
        if self.final_evals < 1:
            raise UserError(f"--final-evals must be >= 1, got {self.final_evals}")
        if self.keep < 1:
            raise UserError(f"--keep must be at least 1, got {self.keep}")
        _choice("device", self.device, DEVICES)
        _choice("tensors", self.tensors, TENSOR_KINDS)
        _choice("worker-batching", self.worker_batching, WORKER_BATCHINGS)
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not self.warmup_epochs >= 0:
            raise UserError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if self.warmup_steps and self.warmup_epochs:
            raise UserError("give either --warmup-steps or --warmup-epochs, not both")
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

    def _validate_finite(self) -> None:
        """nan and inf are never a learning rate or a momentum (only --alpha inf means something)."""
        for f in dataclasses.fields(self):
            values = getattr(self, f.name)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, float) and not math.isfinite(value) and not (f.name == "alpha" and value > 0):
                    flag = "--" + f.name.replace("_", "-") if f.name != "num_workers" else "--workers"
                    raise UserError(f"{flag} must be a finite number, got {value}")
        if self.lr_correction not in ("auto", "none"):
            try:
                finite = math.isfinite(float(self.lr_correction))
            except ValueError:
                return  # not a number: _validate says so
            if not finite:
                raise UserError(f"--lr-correction must be auto, none or a finite number, got {self.lr_correction}")

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
        if self.compression is not None:
            parse_compression(self.compression)
            if self.algorithm not in COMPRESSING_ALGORITHMS:
                raise UserError(f"--compression applies to {', '.join(COMPRESSING_ALGORITHMS)}, not --algorithm "
                                f"{self.algorithm}")
        if not 0 < self.consensus_lr <= 1:
            raise UserError(f"--consensus-lr must be in (0, 1], got {self.consensus_lr}")
        self._validate_communication()

    def _validate_communication(self) -> None:
        """--local-steps, --branching and time-varying / directed topologies against the algorithm."""
        cls = algorithm_class(self.algorithm)
        if self.local_steps < 1:
            raise UserError(f"--local-steps must be at least 1, got {self.local_steps}")
        if self.local_steps > 1 and (not cls.local_steps or self.compression is not None):
            able = ", ".join(a for a in ALGORITHMS if algorithm_class(a).local_steps)
            why = "with --compression" if cls.local_steps else "(its correction or relay assumes every step communicates)"
            raise UserError(f"--local-steps > 1 is for {able} without --compression, not {self.algorithm} {why}")
        if self.branching < 1:
            raise UserError(f"--branching must be at least 1, got {self.branching}")
        if self.topology in TIME_VARYING + DIRECTED and self.topology_file is None and self.algorithm != "allreduce" \
                and not cls.time_varying:
            able = ", ".join(a for a in ALGORITHMS if algorithm_class(a).time_varying)
            kind = "changes with the step" if self.topology in TIME_VARYING else "is directed"
            raise UserError(f"--topology {self.topology} {kind}; {self.algorithm} needs a static undirected graph "
                            f"(e.g. --topology exponential); the algorithms for it: {able}")

    def communicates_at(self, step: int) -> bool:
        """Whether step ``step`` (0-based) ends with communication: every --local-steps-th step."""
        return (step + 1) % self.local_steps == 0

    # ------------------------------------------------------------------ derived
    @property
    def loggers(self) -> tuple[str, ...]:
        """The experiment trackers of ``--logger``, parsed."""
        return parse_loggers(self.logger)

    @property
    def uses_trees(self) -> bool:
        return self.algorithm in TREE_ALGORITHMS

    @property
    def relays_models(self) -> bool:
        """RelaySGD or a variant of it: a fill rule and the tree's lr correction apply."""
        return self.algorithm in RELAYSGD_FAMILY

    def lr_scale(self, auto_value: float) -> float:
        """The factor applied to --lr for RelaySGD: the tree's correction (auto), 1 (none) or a number.

        Other algorithms need no correction (their averaging is not damped by x0 fill-in): 1.
        """
        if not self.relays_models or self.lr_correction == "none":
            return 1.0
        return auto_value if self.lr_correction == "auto" else float(self.lr_correction)

    @property
    def fill_rule(self) -> str | None:
        """RelaySGD's fill rule with ``auto`` resolved; None for other algorithms."""
        if not self.relays_models:
            return None
        if self.relay_fill != "auto":
            return self.relay_fill
        return DROP_FILL if self.drop_prob > 0 else "x0"

    @property
    def tensor_kind(self) -> str:
        """``numpy`` or ``torch``: --tensors with auto resolved for --device."""
        if self.tensors != "auto":
            return self.tensors
        return "torch" if self.device == "cuda" else "numpy"

    @property
    def batches_workers(self) -> bool:
        """Whether a process's workers compute their gradients in one vmap call (--worker-batching)."""
        return self.worker_batching == "vmap" or (self.worker_batching == "auto" and self.device == "cuda")

    def evaluates_at(self, step: int, total_steps: int) -> bool:
        """Evaluate after ``step`` steps: every eval_every steps, at the end, and (--final-evals k) at
        the k - 1 points before the end that the final metrics average over."""
        if step % self.eval_every == 0 or step == total_steps:
            return True
        return self.final_evals > 1 and step in self.final_eval_steps(total_steps)

    def final_eval_steps(self, total_steps: int) -> tuple[int, ...]:
        """The k - 1 extra evaluation steps of --final-evals k (empty for k = 1)."""
        gap = max(1, round(FINAL_EVALS_SPACING * total_steps))
        return tuple(s for s in (total_steps - i * gap for i in range(1, self.final_evals)) if s > 0)

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
        return cls(**data)  # __post_init__ checks each setting's type

    def dump(self, path: str | Path, engine: dict | None = None) -> None:
        """Written to a temporary file and renamed: a reader never sees half a config.

        ``engine``: how the run executed (actors, resources), saved under ``engine:`` as a record;
        it never changes the numbers, so ``load`` leaves it out."""
        data = {**self.to_dict(), **({ENGINE_RECORD: engine} if engine else {})}
        write_atomic(path, yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        try:
            data = yaml.safe_load(Location(path).read_text())
        except OSError as exc:
            raise UserError(f"cannot read run config {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise UserError(f"cannot read run config {path}: {yaml_error_line(exc)}") from None
        if not isinstance(data, dict):
            raise UserError(f"run config {path} must be a mapping of settings, got {type(data).__name__}")
        data.pop(ENGINE_RECORD, None)  # how an earlier run executed: a record, not a setting
        try:
            return cls.from_dict(data)
        except UserError as exc:
            raise UserError(f"run config {path}: {exc}") from None


WORKERS_PER_ACTOR_AUTO = "auto"
PLACEMENTS = ("spread", "pack")
ON_FAILURE = ("restart", "continue", "replace")
TRANSPORTS = ("object-store", "gloo", "nccl")


@dataclass
class EngineOptions:
    """Where and how a run executes on Ray; none of it changes the numbers a run computes.

    ``workers_per_actor``: ``"auto"`` (one actor per CPU core, or per GPU, the run may use; never more
    actors than workers) or K workers in each actor.  ``cpus_per_actor`` / ``gpus_per_actor``: each
    actor's bundle (default CPUs: the cluster's CPUs shared by the actors).
    """

    workers_per_actor: int | str = setting(
        WORKERS_PER_ACTOR_AUTO, "workers in each Ray actor: auto = one actor per CPU core (or per GPU) the run may "
        "use, never more actors than workers; K = K workers per actor, 1 = one actor per worker (default: auto)",
        metavar="{auto,K}", kind="str|int")
    cpus_per_actor: float | None = setting(None, "CPUs reserved per actor (default: the cluster's CPUs shared by "
                                           "the actors)")
    gpus_per_actor: float | None = setting(None, "GPUs per actor, e.g. 0.25 (default: 1 with --device cuda, else 0)")
    placement: str = setting("spread", "spread the actors over nodes or pack them (default: spread)",
                             choices=PLACEMENTS)
    window: int = setting(4, "steps the driver may run ahead of the slowest worker (default: 4)")
    placement_timeout: float | None = setting(
        None, "seconds to wait for the cluster to place the actors, printing a line every 10 s; an autoscaling "
        "cluster adds nodes meanwhile (default: 60, or 900 on an autoscaling cluster)", metavar="SECONDS")
    max_restarts: int = setting(3, "when an actor or its node dies, restart all workers from the last checkpoint "
                                "(or step 0) at most N times, then give up (default: 3)", metavar="N")

    on_failure: str = setting(
        "restart", "when an actor or its node dies: restart = all workers from the last checkpoint (exact, "
        "rewinds everyone); continue = the survivors go on from their current models without the dead workers "
        "(their data shards are lost; relays re-span the tree); replace = fresh workers take the dead ranks, "
        "starting from a neighbour's current model; nobody rewinds (default: restart)", choices=ON_FAILURE)
    straggle: str | None = setting(
        None, "inject compute delays to study stragglers (wall time only, never the numbers): "
        "slow:RANKS:SECONDS (those workers take SECONDS longer every step, e.g. slow:3,7:0.05) and/or "
        "jitter:SECONDS (every worker, every step, an exponential delay with that mean, seeded), joined by + "
        "(default: none)", metavar="SPEC")
    transport: str = setting(
        "object-store", "how messages cross actors: object-store = Ray's shared-memory store (measured fastest on "
        "CPU); gloo / nccl = Ray Direct Transport, actor to actor as torch tensors (nccl: GPU to GPU, for --device "
        "cuda); the driver holds only refs either way (default: object-store)", choices=TRANSPORTS)

    def __post_init__(self) -> None:
        if self.workers_per_actor != WORKERS_PER_ACTOR_AUTO:
            try:
                self.workers_per_actor = int(self.workers_per_actor)
            except (TypeError, ValueError):
                raise UserError(f"--workers-per-actor must be auto or an integer, got {self.workers_per_actor!r}") \
                    from None
            if self.workers_per_actor < 1:
                raise UserError(f"--workers-per-actor must be >= 1, got {self.workers_per_actor}")
        if self.cpus_per_actor is not None and not self.cpus_per_actor > 0:
            raise UserError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and not self.gpus_per_actor >= 0:
            raise UserError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        _choice("placement", self.placement, PLACEMENTS)
        _choice("on_failure", self.on_failure, ON_FAILURE)
        _choice("transport", self.transport, TRANSPORTS)
        if self.transport != "object-store" and self.on_failure != "restart":
            raise UserError(f"--transport {self.transport} works with --on-failure restart only (a survivors' plan "
                            "would need a new collective group); use --transport object-store")
        if self.window < 1:
            raise UserError(f"--window must be >= 1, got {self.window}")
        if self.placement_timeout is not None and not 0 < self.placement_timeout < math.inf:
            raise UserError(f"--placement-timeout must be a positive number of seconds, got {self.placement_timeout}")
        if self.max_restarts < 0:
            raise UserError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        Straggle.parse(self.straggle)  # the spec's syntax, before anything starts


# What each setting may be in a YAML file (a sweep or a run config), derived from the annotations:
# checked before validation, so a string where a number belongs is one clear line, not a TypeError.
_ANNOTATION_KINDS = {"str": "str", "str | None": "str?", "int": "int", "int | None": "int?", "float": "float",
                     "float | None": "float?", "list[float]": "floats"}


def field_kind(f: dataclasses.Field) -> str:
    return f.metadata.get("kind") or _ANNOTATION_KINDS[f.type]


_FIELD_TYPES = {f.name: field_kind(f) for f in dataclasses.fields(RunConfig)}
# Settings a resumed run may change (where it runs, its data's location, its outputs); the others
# define the trajectory and must equal those of the run that wrote the checkpoint.
RESUMABLE_CHANGES = tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("resumable"))


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
