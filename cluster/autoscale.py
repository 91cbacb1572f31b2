"""Scale an autoscaling Ray cluster up for one relay-ray command, run it, then let it scale down.

relay_ray checks, before any actor starts, that the cluster *as it is now* can hold every actor,
and fails fast with a one-line error otherwise: right for a fixed cluster, too early for an
autoscaling one whose worker nodes start at zero. This wrapper works out the run's actor bundles
with relay_ray's own parser and placement rule (``relay_ray.engine.placement.actor_shape``), asks
Ray's autoscaler for them (``ray.autoscaler.sdk.request_resources``), waits until enough nodes have
joined, runs the command, and withdraws the request, so the nodes go idle and are removed after the
cluster's idle timeout. Use it as a job entrypoint (RAY_ADDRESS is set there):

    ray job submit --working-dir . -- python cluster/autoscale.py \\
        relay-ray run --workers 16 --workers-per-actor 1 --cpus-per-actor 1 --dataset digits --out /shared/runs/d16

The command must give an explicit shape, --workers-per-actor K and --cpus-per-actor C: with the
default (auto) the number of actors follows the CPUs the cluster has when the run starts, so a
cluster that starts empty has nothing fixed to grow to. GPUs per actor follow the run's own rule
(--gpus-per-actor, default 1 with --device cuda, else 0).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time

PROG = "cluster/autoscale.py"


def _fail(message: str) -> SystemExit:
    return SystemExit(f"{PROG}: error: {message}")


def _parse_command(command: list[str]) -> argparse.Namespace:
    """``command`` parsed by the real `relay-ray` parser; its usage errors become one line of ours."""
    from relay_ray.cli import build_parser

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = build_parser().parse_args(command[1:])
    except SystemExit as exc:
        if not exc.code:                                   # --help: relay-ray printed it
            raise
        reason = " ".join(captured.getvalue().split()).removeprefix("relay-ray: error: ")
        raise _fail(f"the relay-ray command does not parse: {reason}") from None
    args.argv = command[1:]                                # which flags were given (--config / --resume)
    return args


def _run_config(args: argparse.Namespace):
    """The run's resolved settings (workers, device), as `relay-ray` resolves them."""
    from relay_ray import cli
    from relay_ray.config import RunConfig
    from relay_ray.errors import UserError

    if args.command == "compare":
        first = next((a.strip() for a in args.algorithms.split(",") if a.strip()), None)
        return RunConfig(**{**cli._run_settings(args), **({"algorithm": first} if first else {}), "out": None})
    if args.resume is not None and args.config is None:   # its config.yaml; no checkpoint loading here
        saved = os.path.join(args.resume, "config.yaml")
        if not os.path.isfile(saved):
            raise UserError(f"--resume {args.resume} has no config.yaml; give the --out directory of a run")
        args = argparse.Namespace(**{**vars(args), "resume": None, "config": saved})
    return cli._resolve_run(args).config


def _run_shape(command: list[str]):
    """The actors the command will place (a ``relay_ray.engine.placement.ActorShape``)."""
    if not command or os.path.basename(command[0]) != "relay-ray" or command[1:2] not in (["run"], ["compare"]):
        raise _fail("expected a `relay-ray run ...` or `relay-ray compare ...` command")
    from relay_ray.cli import engine_options
    from relay_ray.config import WORKERS_PER_ACTOR_AUTO
    from relay_ray.engine import placement
    from relay_ray.errors import UserError

    args = _parse_command(command)
    try:
        options = engine_options(args)
        if options.workers_per_actor == WORKERS_PER_ACTOR_AUTO or options.cpus_per_actor is None:
            raise _fail("the command must give --workers-per-actor K and --cpus-per-actor C: their defaults follow "
                        "the cluster's CPUs when the run starts, so a growing cluster has no fixed size to wait for")
        config = _run_config(args)
        if config.backend != "ray":
            raise _fail(f"the command runs with --backend {config.backend}, in one process: it needs no cluster")
        # explicit K and C: the shape is the same for every cluster, so no nodes are needed to compute it
        return placement.actor_shape(config.num_workers, options, config.device, [])
    except UserError as exc:
        raise _fail(" ".join(str(exc).split())) from None


def _fits(shape, nodes: list[dict]) -> bool:
    """Whether ``nodes`` hold every actor of ``shape`` (relay_ray's own bundles-that-fit rule)."""
    from relay_ray.engine.placement import bundles_that_fit

    return bundles_that_fit(shape.bundle, nodes) >= shape.num_actors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for the nodes to join (default: 900)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the relay-ray command to run")
    args = parser.parse_args(argv)
    shape = _run_shape(args.command)

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="ERROR")
    want = f"{shape.num_actors} x {shape.bundle}"
    print(f"{PROG}: {shape.describe()}; asking the autoscaler for {want}", flush=True)
    request_resources(bundles=[shape.bundle] * shape.num_actors)
    try:
        started = time.monotonic()
        while True:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            if _fits(shape, nodes):
                break
            if time.monotonic() - started > args.timeout:
                print(f"{PROG}: error: the cluster did not grow to {want} within {args.timeout:.0f}s "
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
