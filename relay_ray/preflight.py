"""Checks made before a run plans anything or starts Ray, each a one-line ``UserError`` (no Ray here).

``check_run`` is called before the experiment is built (topology, data, shards) and before
``ray.init``: a run too large for its machine, a GPU that is not there or a cluster address nobody
answers at is refused in a second instead of after Ray's start-up, a 24 GB allocation or 20 s of
retries.  The settings themselves are checked where they are declared (``RunConfig``,
``EngineOptions``); an unusable ``--out`` by ``rundir.check_out`` in the CLI.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from relay_ray.config import EngineOptions, RunConfig
from relay_ray.errors import UserError
from relay_ray.loggers import check_installed, check_stores
from relay_ray.storage import Location, is_uri
from relay_ray.topology import check_bounded, make_graph

GB = 1e9
CONNECT_TIMEOUT_S = 2.0

# Measured on the quickstart (digits, 16 workers, 2 actors; PSS, so shared libraries count once):
# each GroupActor process (Ray worker + torch) holds ~350 MB with no worker in it (8 actors: 349-356
# MB each, 2 actors: 396), the driver with torch and Ray imported ~560 MB, and Ray's own processes
# (gcs, raylet, dashboard and runtime-env agents, log monitor) ~290 MB together.
ACTOR_BYTES = 350e6
DRIVER_BYTES = 600e6
RAY_DAEMON_BYTES = 300e6
# Copies of the model a worker keeps between steps: the torch model's flat buffer, params, the
# half step, the update, the momentum buffer, and x0 (relays) or a correction (D2, tracking).
# Per neighbour: the relay buffer or the received neighbour copy, and the outgoing message.
STATE_COPIES = 6
COPIES_PER_NEIGHBOR = 2
GRAPH_EDGE_BYTES = 170  # a networkx edge (two adjacency entries and its attribute dict), measured
DENSE_PLAN_MATRICES = 3  # n x n float64: the gossip matrix, eigvalsh's workspace, all-reduce's W

# What the estimate needs to know of each dataset without loading it: (C, H, W), classes, train, test.
DATASET_SHAPES = {
    "digits": ((1, 8, 8), 10, 1437, 360),
    "mnist": ((1, 28, 28), 10, 60000, 10000),
    "cifar10": ((3, 32, 32), 10, 50000, 10000),
}
QUADRATICS_DIMENSION = 10  # relay_ray.quadratics.DIMENSION (imported lazily: numpy only, but keep this pure)


def check_run(config: RunConfig, options: EngineOptions | None = None, address: str | None = None) -> None:
    """Everything that can be known before the experiment is built and Ray starts, cheapest first."""
    check_bounded(config.num_workers)
    check_out(config.out)
    if config.loggers and not config.out:
        raise UserError("--logger needs an output directory (out): the tracker's run id is kept there")
    check_installed(config.loggers)
    if config.compression and options is not None and options.on_failure != "restart":
        raise UserError(f"--on-failure {options.on_failure} re-forms the graph, which would need fresh compression "
                        "copies on both ends of every new edge; with --compression use --on-failure restart")
    if config.backend == "local" and options is not None and options.straggle:
        raise UserError("--straggle delays Ray actors; it needs --backend ray")
    address = address or os.environ.get("RAY_ADDRESS")
    on_this_machine = config.backend == "local" or not address
    if config.device == "cuda" and on_this_machine:
        check_cuda()
    if config.backend == "ray" and address:
        check_reachable(address)
    if on_this_machine:
        check_memory(estimate_memory(config, options or EngineOptions()), available_memory())
    check_stores(config.loggers)  # last: it may ask a tracking server


# ------------------------------------------------------------------------- small checks


def check_out(out: str | None) -> None:
    """An --out that is a file, or whose nearest existing folder is not writable (for library callers:
    the CLI's ``rundir.check_out`` also tries a write)."""
    if out is None:
        return
    if is_uri(out):  # reachable with these credentials; the CLI's rundir.check_out also tries a write
        Location(out).exists()
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write there ({existing} is not writable)")


def check_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no GPU on this machine (torch.cuda.is_available() is False); "
                        "use --device cpu, or --address of a Ray cluster with GPUs")


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to a ``host:port`` (or ``ray://host:port``) address within ``timeout_s``; Ray
    itself retries for ~20 s and prints a dozen lines first.  ``auto``/``local`` are Ray's to resolve."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except socket.timeout:
        raise UserError(f"cannot reach Ray at {address}: no answer within {timeout_s:g} s; is `ray start --head` "
                        "running there and the port open?") from None
    except OSError as exc:
        raise UserError(f"cannot reach Ray at {address}: {exc.strerror or exc}; is `ray start --head` running "
                        "there and the port open?") from None


# ------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs on this machine, by where they live."""

    num_workers: int
    num_actors: int  # 0: all workers in this process (--backend local)
    num_params: int
    model: str
    per_worker: float
    per_actor: float
    planning: float  # the driver's graphs and n x n matrices
    fixed: float  # the driver process, Ray's own processes and the data

    @property
    def total(self) -> float:
        return self.num_workers * self.per_worker + self.num_actors * self.per_actor + self.planning + self.fixed

    def describe(self) -> str:
        where = (f"{self.num_workers} workers in this process" if not self.num_actors else
                 f"{self.num_workers} workers on {self.num_actors} actor{'s' * (self.num_actors > 1)} "
                 f"({math.ceil(self.num_workers / self.num_actors)} per actor)")
        parts = [f"{self.per_worker / 1e6:.2f} MB per worker for {self.model} with {self.num_params:,} parameters"]
        if self.num_actors:
            parts.append(f"{self.per_actor / 1e6:.0f} MB per actor")
        if self.planning >= 0.05 * GB:
            parts.append(f"{self.planning / GB:.1f} GB to plan the topology")
        return f"{where} need ~{self.total / GB:.1f} GB ({', '.join(parts)})"

    def hint(self) -> str:
        actors = self.num_actors * self.per_actor
        workers = self.num_workers * self.per_worker
        if actors >= max(workers, self.planning):
            return "raise --workers-per-actor (fewer actor processes) or use fewer workers"
        if self.planning >= workers:
            return "use fewer workers or a sparse --topology (not complete, no all-reduce)"
        return "use fewer workers, a smaller --model or --window, or a cluster (--address)"


def estimate_memory(config: RunConfig, options: EngineOptions, num_cpus: int | None = None,
                    num_gpus: int | None = None) -> MemoryEstimate:
    """Memory of ``config`` on this machine (embedded Ray, or everything in-process with --backend local).

    With P parameters (float32), w = --window, d = 2E/n the mean degree of the plan (E its edges; for
    gossip algorithms at most the number of actors A, as a worker sends one array to all its
    neighbours and each receiving actor holds one copy) and m = 2 for gradient tracking (its
    messages carry two vectors), else 1::

        per worker = 4 P (6 + (2 + w) d m)       model copies, per-neighbour buffers, messages in flight
                   + 16 B x shard + 8 B x test   shard indices and their shuffled order, test indices
        per actor  = 350 MB                      a Ray worker process with torch (measured)
                   + 8 n^2 (gossip algorithms)   the dense gossip matrix of the plan, one per actor
        planning   = 170 B x graph edges + 3 x 8 n^2    networkx graph, gossip matrix and its eigvalsh
        fixed      = 600 MB driver (+ 300 MB Ray's processes) + the data (twice on Ray: driver + ray.put)

    Conservative: the in-process simulator measured 6.2 (D-SGD) and 10.1 (RelaySGD) x 4P per worker
    on a ring/chain before messages in flight, against 10 here.
    """
    n = config.num_workers
    num_params, model, data_bytes, shard, test = _task_size(config)
    edges, graph_edges = _plan_edges(config)
    num_actors = 0 if config.backend == "local" else _num_actors(config, options, num_cpus, num_gpus)
    degree = 2 * edges / n
    if not config.uses_trees:  # one array to every neighbour: a copy per receiving actor, not per neighbour
        degree = min(degree, max(num_actors, 1))
    vectors = degree * (2 if config.algorithm in ("gradient-tracking", "momentum-tracking") else 1)
    per_worker = (4 * num_params * (STATE_COPIES + (COPIES_PER_NEIGHBOR + options.window) * vectors)
                  + 16 * shard + 8 * test)
    dense = 8 * n ** 2
    planning = GRAPH_EDGE_BYTES * graph_edges + DENSE_PLAN_MATRICES * dense
    if config.backend == "local":
        return MemoryEstimate(n, 0, num_params, model, per_worker, 0.0, planning, DRIVER_BYTES + data_bytes)
    gossip_matrix = 0 if config.uses_trees else dense
    return MemoryEstimate(n, num_actors, num_params, model, per_worker, ACTOR_BYTES + gossip_matrix, planning,
                          DRIVER_BYTES + RAY_DAEMON_BYTES + 2 * data_bytes)


def check_memory(estimate: MemoryEstimate, available: float | None) -> None:
    if available is not None and estimate.total > available:
        raise UserError(f"{estimate.describe()}; this machine has {available / GB:.1f} GB available; "
                        f"{estimate.hint()}")


def available_memory() -> float | None:
    """Bytes this machine can still give (Linux: MemAvailable); None where it cannot say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _task_size(config: RunConfig) -> tuple[int, str, float, float, int]:
    """(parameters, model, data bytes, samples per shard, test samples per evaluation), without
    loading the data: one model is built on torch's meta device, which allocates nothing."""
    n = config.num_workers
    if config.dataset == "quadratics":
        d = QUADRATICS_DIMENSION
        return d, "linear", 8.0 * n * (d * d + d), 0.0, 0
    import torch

    from relay_ray.models import build_model

    input_shape, classes, train, test = DATASET_SHAPES[config.dataset]
    with torch.device("meta"):
        num_params = sum(p.numel() for p in build_model(config.model, input_shape, classes).parameters())
    data_bytes = (train + test) * (math.prod(input_shape) + 8)  # uint8 images, int64 labels
    test = min(test, config.eval_samples or test)
    return num_params, config.model, float(data_bytes), train / n, test


def _plan_edges(config: RunConfig) -> tuple[int, int]:
    """(edges of the communication plan, edges of the graph the driver builds), counted, not built."""
    n = config.num_workers
    complete = n * (n - 1) // 2
    if config.algorithm == "allreduce":
        return complete, complete
    graph = _graph_edges(config) if (config.topology or config.topology_file) else complete  # any link
    if config.uses_trees:
        return (2 if config.tree == "double-binary" else 1) * (n - 1), graph
    return graph, graph


def _graph_edges(config: RunConfig) -> int:
    """The named or given graph's edges: built (sparse, n <= MAX_WORKERS), except the complete graph."""
    n = config.num_workers
    if config.topology == "complete":
        return n * (n - 1) // 2
    return make_graph(config.topology, n, config.topology_file).number_of_edges()


def _num_actors(config: RunConfig, options: EngineOptions, num_cpus: int | None, num_gpus: int | None) -> int:
    """How many actors the embedded Ray would start: the engine's own rule on this machine's CPUs/GPUs."""
    from relay_ray.engine.placement import actor_shape  # pure shape arithmetic; no Ray import

    if num_cpus is None:
        num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_gpus is None:
        num_gpus = _local_gpus() if config.device == "cuda" else 0
    node = {"CPU": float(num_cpus), **({"GPU": float(num_gpus)} if num_gpus else {})}
    return actor_shape(config.num_workers, options, config.device, [node]).num_actors


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()
