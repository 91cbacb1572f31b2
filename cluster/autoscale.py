"""Scale an autoscaling Ray cluster up for one relay-ray command, run it, then let it scale down.

relay_ray checks, before any actor starts, that the cluster *as it is now* can hold every worker,
and fails fast with a one-line error otherwise: right for a fixed cluster, too early for an
autoscaling one whose worker nodes start at zero. This wrapper asks Ray's autoscaler for the run's
worker bundles (``ray.autoscaler.sdk.request_resources``), waits until enough nodes have joined,
runs the command, and withdraws the request, so the nodes go idle and are removed after the
cluster's idle timeout. Use it as a job entrypoint (RAY_ADDRESS is set there):

    ray job submit --working-dir . -- python cluster/autoscale.py \\
        relay-ray run --workers 16 --cpus-per-worker 1 --dataset digits --out /shared/runs/d16

The command must name --workers and --cpus-per-worker (and --gpus-per-worker for GPU bundles).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

PROG = "cluster/autoscale.py"


def _bundles_that_fit(cpus: float, gpus: float, nodes: list[dict]) -> int:
    """How many {CPU: cpus, GPU: gpus} bundles the nodes hold (a bundle sits on one node)."""
    fit = 0
    for resources in nodes:
        per_node = math.floor(resources.get("CPU", 0.0) / cpus + 1e-9)
        if gpus:
            per_node = min(per_node, math.floor(resources.get("GPU", 0.0) / gpus + 1e-9))
        fit += per_node
    return fit


def _run_shape(command: list[str]) -> tuple[int, float, float]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--cpus-per-worker", type=float)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    known, _ = parser.parse_known_args(command)
    if not command or os.path.basename(command[0]) != "relay-ray" or command[1:2] not in (["run"], ["compare"]):
        raise SystemExit(f"{PROG}: error: expected a `relay-ray run ...` or `relay-ray compare ...` command")
    if known.workers is None or known.cpus_per_worker is None:
        raise SystemExit(f"{PROG}: error: the command must give --workers and --cpus-per-worker "
                         "(the cluster is sized from them)")
    return known.workers, known.cpus_per_worker, known.gpus_per_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for the nodes to join (default: 900)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the relay-ray command to run")
    args = parser.parse_args(argv)
    workers, cpus, gpus = _run_shape(args.command)

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="ERROR")
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    print(f"{PROG}: asking the autoscaler for {workers} x {bundle}", flush=True)
    request_resources(bundles=[bundle] * workers)
    try:
        started = time.monotonic()
        while True:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            if _bundles_that_fit(cpus, gpus, nodes) >= workers:
                break
            if time.monotonic() - started > args.timeout:
                print(f"{PROG}: error: the cluster did not grow to {workers} x {bundle} within {args.timeout:.0f}s "
                      f"(nodes: {len(nodes)}, CPUs: {sum(r.get('CPU', 0) for r in nodes):g}); check max_workers",
                      file=sys.stderr)
                return 1
            time.sleep(2)
        print(f"{PROG}: {len(nodes)} nodes, {sum(r.get('CPU', 0) for r in nodes):g} CPUs after "
              f"{time.monotonic() - started:.0f}s; running: {' '.join(args.command)}", flush=True)
        return subprocess.call(args.command)
    finally:
        request_resources(num_cpus=0)   # withdraw: idle nodes are removed after the idle timeout
        print(f"{PROG}: resource request withdrawn; idle worker nodes will be scaled down", flush=True)


if __name__ == "__main__":
    sys.exit(main())
