"""Where a run's actors go: how many actors, the bundle each reserves, and whether the cluster holds
them.  One bundles-that-fit rule for ``relay-ray run`` and for Tune trials.

The shape arithmetic is pure (a sweep file is checked with it before Ray starts); only the functions
that talk to the cluster import Ray."""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass

from relay_ray.config import WORKERS_PER_ACTOR_AUTO, EngineOptions
from relay_ray.errors import UserError

PLACEMENT_TIMEOUT_S = 60.0  # default wait on a fixed cluster
AUTOSCALING_PLACEMENT_TIMEOUT_S = 900.0  # ... and on an autoscaling one, which may be adding nodes
WAITING_LINE_EVERY_S = 10.0


@dataclass(frozen=True)
class ActorShape:
    """How many actors a run has and what each one reserves."""

    num_workers: int
    num_actors: int
    cpus: float
    gpus: float = 0.0
    auto: bool = False  # chosen by --workers-per-actor auto

    @property
    def bundle(self) -> dict:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    @property
    def threads(self) -> int:
        """torch threads per actor: its whole CPUs (at least one)."""
        return max(1, int(self.cpus))

    @property
    def workers_per_actor(self) -> int:
        return math.ceil(self.num_workers / self.num_actors)

    def describe(self) -> str:
        k = self.workers_per_actor
        per = f"{k} per actor" if self.num_workers % self.num_actors == 0 else f"up to {k} per actor"
        gpus = f" + {self.gpus:g} GPU" if self.gpus else ""
        return (f"{self.num_workers} workers on {self.num_actors} actor{'s' * (self.num_actors > 1)} "
                f"({per}{', auto' if self.auto else ''}), {self.cpus:g} CPU{gpus} each")

    def to_dict(self) -> dict:
        return {"workers_per_actor": self.workers_per_actor, "chosen_by": WORKERS_PER_ACTOR_AUTO if self.auto else "flag",
                "num_actors": self.num_actors, "cpus_per_actor": self.cpus, "gpus_per_actor": self.gpus}


def alive_nodes() -> list[dict]:
    """The resources of every live node (``CPU``, ``GPU``, ...)."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def bundles_that_fit(bundle: dict, nodes: list[dict]) -> int:
    """How many copies of ``bundle`` the nodes can hold (a bundle sits on one node)."""
    def on(node: dict) -> int:
        return min(int(math.floor(node.get(k, 0.0) / v + 1e-9)) for k, v in bundle.items() if v > 0)
    return sum(on(node) for node in nodes)


def _largest_cpu_share(count: int, nodes: list[dict], gpus: float) -> float:
    """The largest CPU share (in 1/100 steps) at which ``count`` bundles fit."""
    total = sum(n.get("CPU", 0.0) for n in nodes)
    largest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    share = math.floor(min(total / count, largest) * 100 + 1e-6)
    gpu = {"GPU": gpus} if gpus else {}
    while share > 1 and bundles_that_fit({"CPU": share / 100, **gpu}, nodes) < count:
        share -= 1
    return max(share, 1) / 100


def actor_shape(num_workers: int, options: EngineOptions, device: str, nodes: list[dict]) -> ActorShape:
    """How many actors (``--workers-per-actor``) and their bundles, for the given nodes.

    auto: one actor per GPU share when the actors use GPUs, else one per whole CPU core of the
    cluster (or per ``--cpus-per-actor``), never more actors than workers."""
    gpus = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if device == "cuda" else 0.0)
    auto = options.workers_per_actor == WORKERS_PER_ACTOR_AUTO
    if not auto:
        num_actors = math.ceil(num_workers / options.workers_per_actor)
    elif gpus:
        num_actors = int(math.floor(sum(n.get("GPU", 0.0) for n in nodes) / gpus + 1e-9))
    elif options.cpus_per_actor is not None:
        num_actors = bundles_that_fit({"CPU": options.cpus_per_actor}, nodes)
    else:
        num_actors = int(math.floor(sum(n.get("CPU", 0.0) for n in nodes) + 1e-9))
    num_actors = min(num_workers, max(1, num_actors))
    cpus = options.cpus_per_actor or _largest_cpu_share(num_actors, nodes, gpus)
    return ActorShape(num_workers, num_actors, cpus, gpus, auto)


def check_fits(shape: ActorShape, nodes: list[dict], autoscaling: bool = False) -> None:
    """A clear error before anything is reserved when the cluster cannot hold the actors."""
    what = (f"{shape.num_workers} workers in {shape.num_actors} actor{'s' * (shape.num_actors > 1)}"
            if shape.num_actors != shape.num_workers else f"{shape.num_workers} workers")
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    if shape.gpus and shape.gpus * shape.num_actors > total_gpu + 1e-9:
        raise UserError(f"{what} x {shape.gpus:g} GPU exceed the cluster's {total_gpu:g} GPUs")
    fits = bundles_that_fit(shape.bundle, nodes)
    node_cpus = ", ".join(f"{n.get('CPU', 0.0):g}" for n in nodes)
    if fits < shape.num_actors:
        raise UserError(f"{what} x {shape.cpus:g} CPU = {shape.cpus * shape.num_actors:g} CPUs, but the cluster has "
                        f"{total_cpu:g} (nodes: {node_cpus}) and fits only "
                        f"{fits}; lower --cpus-per-actor, raise --workers-per-actor or add nodes"
                        + ("" if autoscaling else " (an autoscaling cluster that will grow: --placement-timeout "
                                                  "SECONDS waits for it)"))


def autoscaler_capacity() -> dict | None:
    """What an autoscaling cluster can grow to (the sum over its node types' max_workers), or None
    for a fixed cluster.  Ray has no public call for this; the one internal call lives here."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or None
    except Exception:  # an internal API: without it, the current cluster is what a run can get
        return None


def planning_nodes(nodes: list[dict], capacity: dict | None) -> list[dict]:
    """The nodes to size and check a run against: those alive, or on an autoscaling cluster whose
    live nodes do not hold it, what the autoscaler may add (one pool: node types are its business)."""
    if capacity is None:
        return nodes
    grown = {k: max(v, sum(n.get(k, 0.0) for n in nodes)) for k, v in capacity.items()}
    return [grown] if sum(n.get("CPU", 0.0) for n in nodes) < grown.get("CPU", 0.0) else nodes


def plan(num_workers: int, options: EngineOptions, device: str, nodes: list[dict],
         capacity: dict | None) -> tuple[ActorShape, float]:
    """The run's actors and how long to wait for their bundles.

    A cluster whose live nodes cannot hold the run fails at once, unless it can grow: an autoscaler
    that publishes its capacity (autoscaler v2, KubeRay) is checked against that and waited for (900 s
    by default); with one that does not (the v1 autoscaler), ``--placement-timeout`` says the cluster
    will grow and how long to wait."""
    sizing = planning_nodes(nodes, capacity)
    shape = actor_shape(num_workers, options, device, sizing)
    timeout = options.placement_timeout or (AUTOSCALING_PLACEMENT_TIMEOUT_S if capacity else PLACEMENT_TIMEOUT_S)
    if capacity is not None or options.placement_timeout is None:
        check_fits(shape, sizing, autoscaling=capacity is not None)
    elif (shape.auto or options.cpus_per_actor is None) and bundles_that_fit(shape.bundle, nodes) < shape.num_actors:
        # auto sizes and default CPUs follow the nodes alive now: a shape for a cluster that is not there yet
        raise UserError(f"the cluster's live nodes ({sum(n.get('CPU', 0.0) for n in nodes):g} CPUs) cannot hold "
                        f"{num_workers} workers yet; to wait --placement-timeout for it to grow, give the actors' "
                        "shape: --workers-per-actor K --cpus-per-actor C")
    return shape, timeout


def reserve(shape: ActorShape, strategy: str, timeout_s: float, say=None):
    """One placement group with a bundle per actor, waiting up to ``timeout_s`` while an autoscaler
    adds nodes; ``say`` gets a line every ``WAITING_LINE_EVERY_S`` seconds of waiting."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([shape.bundle] * shape.num_actors, strategy=strategy.upper())
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        try:
            ray.get(pg.ready(), timeout=max(0.0, min(WAITING_LINE_EVERY_S, timeout_s - waited)))
            return pg
        except GetTimeoutError:
            waited = time.monotonic() - started
            nodes = alive_nodes()
            where = f"{len(nodes)} nodes, {sum(n.get('CPU', 0.0) for n in nodes):g} CPUs"
            if waited >= timeout_s - 1e-3:
                remove_placement_group(pg)
                raise UserError(f"the cluster could not place {shape.num_actors} actors x {shape.bundle} within "
                                f"{timeout_s:g}s (now {where}); raise --placement-timeout or check the cluster's "
                                "max_workers") from None
            if say is not None:
                say(f"relay-ray: waiting for the cluster to place {shape.num_actors} actors x {shape.bundle}: "
                    f"{waited:.0f}s of {timeout_s:g}s (now {where})")


def shape_of_group(pg, first_bundle: int, num_workers: int) -> ActorShape:
    """The actors an existing placement group holds from ``first_bundle`` on (a Tune trial's)."""
    from ray.util.placement_group import placement_group_table

    bundles = [b for i, b in sorted(placement_group_table(pg)["bundles"].items()) if i >= first_bundle]
    if not bundles:
        raise UserError(f"the placement group has no bundle from index {first_bundle} on for the actors")
    num_actors = min(num_workers, len(bundles))
    return ActorShape(num_workers, num_actors, bundles[0].get("CPU", 0.0), bundles[0].get("GPU", 0.0))


def remove_and_wait(pg, timeout_s: float = 5.0) -> None:
    """Remove ``pg`` and wait until the cluster's free resources show its bundles back. Removal is
    asynchronous: a group reserved right after (a restart, the next run in the same process) would
    otherwise see the old bundles as taken, and a SPREAD group would leave those nodes out."""
    import ray
    from ray.util.placement_group import placement_group_table, remove_placement_group

    released = collections.Counter()
    for bundle in placement_group_table(pg).get("bundles", {}).values():
        released.update({k: v for k, v in bundle.items() if k in ("CPU", "GPU")})
    free_before = ray.available_resources()
    remove_placement_group(pg)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0) >= free_before.get(k, 0) + v - 1e-6 for k, v in released.items()):
            return
        time.sleep(0.05)
