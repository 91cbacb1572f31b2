"""`relay-ray`: run, compare, tune, topology and partition from the command line.

User mistakes (bad flags, missing data, bad files) exit with code 2 and one line
``relay-ray: error: ...``; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from relay_ray.algorithms import ALGORITHMS
from relay_ray.config import BACKENDS, TASKS, RunConfig
from relay_ray.errors import UserError, WorkerFailure
from relay_ray.models import MODELS
from relay_ray.topology import GRAPHS, TREES

PROG = "relay-ray"

DATA_HELP = (
    "where the dataset lives. digits: built into scikit-learn (no files). "
    "mnist: a folder with the idx files train-/t10k-images-idx3-ubyte(.gz) and -labels-idx1-ubyte(.gz). "
    "cifar10: a torchvision root (with cifar-10-batches-py/), an ImageFolder tree train/<class>/*.jpg + "
    "test/<class>/*.jpg, or a .tar.gz of such a tree. Without it, CIFAR-10/MNIST are downloaded by "
    "torchvision into ~/.cache/relay_ray/data (needs internet)."
)


def _alpha(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid alpha {text!r}; a number > 0, or inf for iid data") from None


def add_run_flags(parser: argparse.ArgumentParser, algorithm_flag: bool = True) -> None:
    """The flags shared by `run` and `compare` (and, later, sweeps)."""
    if algorithm_flag:
        parser.add_argument("--algorithm", default="relaysgd", metavar="A",
                            help=f"decentralized algorithm: {', '.join(ALGORITHMS)} (default: relaysgd)")
    parser.add_argument("--backend", default="ray", metavar="B",
                        help=f"{' or '.join(BACKENDS)}: Ray actors, or all workers in this process (default: ray)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address ('auto' or host:port); default: RAY_ADDRESS, else start an "
                             "embedded local Ray")
    parser.add_argument("--topology", default=None, metavar="T",
                        help=f"communication graph: {', '.join(GRAPHS)} (default: ring for gossip; for relay "
                             "algorithms the tree itself)")
    parser.add_argument("--topology-file", default=None, metavar="F",
                        help="graph as an edge list: one 'u v' per line, '#' comments, nodes 0..n-1")
    parser.add_argument("--tree", default="auto", metavar="TREE",
                        help=f"spanning tree(s) for relay algorithms: {', '.join(TREES)}; auto = bfs of --topology, "
                             "or chain without one (default: auto)")
    parser.add_argument("--workers", type=int, default=None, dest="num_workers",
                        help="number of workers (default: 16; 32 for --topology social)")
    parser.add_argument("--dataset", default="digits", metavar="D",
                        help=f"{', '.join(TASKS)} (default: digits, offline)")
    parser.add_argument("--data-dir", default=None, metavar="DIR", help=DATA_HELP)
    parser.add_argument("--alpha", type=_alpha, default=1.0,
                        help="Dirichlet non-iid-ness of the split: small = each worker sees few classes; "
                             "inf = iid (default: 1.0)")
    parser.add_argument("--heterogeneity", type=float, default=10.0, metavar="ZETA2",
                        help="quadratics only: zeta^2 = mean_i ||grad f_i(x*)||^2 (default: 10)")
    parser.add_argument("--model", default=None, metavar="M",
                        help=f"{', '.join(MODELS)} (default per dataset: digits mlp, mnist cnn, cifar10 resnet20)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="number of steps")
    length.add_argument("--epochs", type=float, default=None, help="number of epochs over a worker's shard")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default per dataset)")
    parser.add_argument("--lr-correction", default="auto", metavar="{auto,none,FLOAT}",
                        help="RelaySGD's lr multiplier: auto = computed from the tree (5.4 for a 16-chain), "
                             "none, or a number (default: auto)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear lr warm-up steps (default: 0)")
    parser.add_argument("--decay-at", type=float, nargs="*", default=[], metavar="FRAC",
                        help="fractions of the run where the lr is multiplied by 0.1 (e.g. 0.75 0.9)")
    parser.add_argument("--momentum", type=float, default=None, help="local Nesterov momentum (default per dataset)")
    parser.add_argument("--weight-decay", type=float, default=None, help="weight decay (default per dataset)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size per worker (default: 32)")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every K steps (default per dataset)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="test samples per evaluation (default: the whole test set)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: data split, init, batches (default: 0)")
    parser.add_argument("--drop-prob", type=float, default=0.0, metavar="P",
                        help="unreliable links: each received message is lost with probability P, seeded per "
                             "step and edge; RelaySGD fills the gap with x0, gossip renormalises (default: 0)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where each worker's model computes; cuda on Ray needs --gpus-per-worker (default: cpu)")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="ray: CPUs reserved per worker actor (default: cluster CPUs / workers, at most 1)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="ray: GPUs per worker actor, e.g. 0.25 (default: 0)")
    parser.add_argument("--placement", default="spread", choices=("spread", "pack"),
                        help="ray: spread workers over nodes or pack them (default: spread)")
    parser.add_argument("--window", type=int, default=4,
                        help="ray: steps the driver may run ahead of the slowest worker (default: 4)")
    parser.add_argument("--workers-per-actor", type=int, default=1, metavar="K",
                        help="ray: pack K workers into one actor; messages between them stay in process "
                             "(default: 1, one actor per worker)")
    parser.add_argument("--max-restarts", type=int, default=3, metavar="N",
                        help="ray: when a worker actor or its node dies, restart all workers from the last "
                             "checkpoint (or step 0) at most N times, then give up (default: 3)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _run_settings(args: argparse.Namespace) -> dict:
    """The ``RunConfig`` fields the flags ask for."""
    return dict(
        algorithm=getattr(args, "algorithm", "relaysgd"), topology=args.topology, topology_file=args.topology_file,
        tree=args.tree, num_workers=args.num_workers, dataset=args.dataset, data_dir=args.data_dir,
        alpha=args.alpha, heterogeneity=args.heterogeneity, model=args.model, steps=args.steps,
        epochs=args.epochs, lr=args.lr, lr_correction=args.lr_correction, warmup_steps=args.warmup_steps,
        decay_at=list(args.decay_at), momentum=args.momentum, weight_decay=args.weight_decay,
        batch_size=args.batch_size, eval_every=args.eval_every, eval_samples=args.eval_samples, seed=args.seed, device=args.device,
        backend=args.backend, out=getattr(args, "out", None), drop_prob=args.drop_prob,
        checkpoint_every=getattr(args, "checkpoint_every", None), keep=getattr(args, "keep", 3),
    )


def _config_from_args(args: argparse.Namespace, **overrides) -> RunConfig:
    return RunConfig(**{**_run_settings(args), **overrides})


def _config_and_checkpoint(args: argparse.Namespace):
    """The run's config and, with --resume, the checkpoint it continues from (None otherwise).

    --config FILE / --resume DIR take their settings from FILE / DIR/config.yaml; a flag set to
    something other than its default overrides them.  A resumed run continues in DIR.
    """
    if args.resume is None and args.config is None:
        return _config_from_args(args), None
    if args.resume is not None and args.config is not None:
        raise UserError("give --config or --resume, not both (a resumed run uses its own config.yaml)")
    given = _explicit_dests(getattr(args, "argv", None))
    changed = {k: v for k, v in _run_settings(args).items() if k in given}  # settings are named as their dests
    if args.config is not None:
        if not Path(args.config).is_file():
            raise UserError(f"--config {args.config} does not exist or is not a file")
        return RunConfig.from_dict({**RunConfig.load(args.config).to_dict(), "out": args.out, **changed}), None
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise UserError(f"--resume {args.resume} does not exist or is not a directory")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume {args.resume} has no config.yaml; give the --out directory of a run")
    if "out" in changed and Path(changed["out"]).resolve() != run_dir.resolve():
        raise UserError(f"--resume continues the run in {args.resume}; drop --out {changed['out']}")
    config = RunConfig.from_dict({**RunConfig.load(run_dir / "config.yaml").to_dict(), **changed, "out": str(run_dir)})
    from relay_ray.checkpoint import find_latest
    from relay_ray.experiment import build_experiment

    experiment = build_experiment(config)
    checkpoint, skipped = find_latest(run_dir, config, experiment.plan)
    if skipped:
        print(f"{PROG}: newest checkpoint(s) unusable ({'; '.join(skipped)}); resuming from the previous one, "
              f"step {checkpoint.step}", file=sys.stderr)
    else:
        print(f"{PROG}: resuming {run_dir} from step {checkpoint.step}", file=sys.stderr)
    return config, (checkpoint, experiment)


def _explicit_dests(argv: list[str] | None) -> set[str]:
    """The dests of the `run` flags given on the command line (argparse itself resolves
    abbreviations): a parser whose defaults are all suppressed returns only those."""
    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    for action in run._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv or ["run"])))


def engine_options(args: argparse.Namespace) -> dict:
    return dict(cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                placement=args.placement, window=args.window, workers_per_actor=args.workers_per_actor,
                max_restarts=args.max_restarts)


def run_config(config: RunConfig, address: str | None = None, progress: bool = True, experiment=None,
               resume=None, **options) -> dict:
    """Run one configuration on its backend; returns the summary.  ``resume``: a ``Checkpoint``."""
    if config.backend == "local":
        from relay_ray.simulate import simulate

        return simulate(config, experiment=experiment, progress=progress, resume=resume)
    from relay_ray.engine import run_on_ray

    return run_on_ray(config, address=address, progress=progress, experiment=experiment, resume=resume, **options)


# ------------------------------------------------------------------------- subcommands


def cmd_run(args: argparse.Namespace) -> int:
    config, resumed = _config_and_checkpoint(args)
    checkpoint, experiment = resumed or (None, None)
    summary = run_config(config, address=args.address, progress=not args.quiet, experiment=experiment,
                         resume=checkpoint, **engine_options(args))
    print(json.dumps(summary["final"], indent=2))
    if config.out:
        print(f"wrote {config.out}/config.yaml, metrics.jsonl, summary.json, curves.png", file=sys.stderr)
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from relay_ray.experiment import build_topology
    from relay_ray.topology import plot_topology, topology_stats

    config = RunConfig(algorithm="relaysgd", topology=args.topology, topology_file=args.topology_file,
                       tree=args.tree, num_workers=args.num_workers, dataset="quadratics", backend="local")
    graph, trees = build_topology(config)
    stats = topology_stats(graph, trees).to_dict()
    if args.json:
        print(json.dumps(stats))
    else:
        name = args.topology_file or args.topology or "(tree only)"
        print(f"topology       {name}, tree {args.tree}")
        print(f"num_workers    {stats['num_workers']}")
        print(f"diameter       {stats['diameter']}  (max relay delay {max(stats['diameter'] - 1, 0)} steps)")
        print(f"max_degree     {stats['max_degree']}")
        print(f"spectral_gap   {stats['spectral_gap']:.4f}  (gossip matrix of the graph)")
        print(f"lr_correction  {stats['lr_correction']:.4f}  (RelaySGD --lr-correction auto)")
        for i, edges in enumerate(stats["tree_edges"]):
            print(f"tree {i} edges   " + " ".join(f"{u}-{v}" for u, v in edges))
    if args.plot:
        plot_topology(graph, trees, args.plot, title=f"{args.topology or 'tree'} / {args.tree}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from relay_ray.data import dirichlet_partition, label_histograms, load_dataset, plot_partition

    if args.dataset == "quadratics":
        raise UserError("the quadratics task has no labels to partition; use --heterogeneity instead")
    config = RunConfig(dataset=args.dataset, data_dir=args.data_dir, num_workers=args.num_workers, alpha=args.alpha,
                       seed=args.seed, backend="local")
    dataset = load_dataset(config.dataset, config.data_dir)
    shards = dirichlet_partition(dataset.y_train, config.num_workers, config.alpha, config.seed)
    hist = label_histograms(dataset.y_train, shards, dataset.num_classes)
    print("worker  size  classes  " + " ".join(f"{c:>5d}" for c in range(dataset.num_classes)))
    for rank, row in enumerate(hist):
        print(f"{rank:>6d} {row.sum():>5d} {int((row > 0).sum()):>8d}  " + " ".join(f"{v:>5d}" for v in row))
    if args.plot:
        plot_partition(hist, args.plot, title=f"{args.dataset}, {config.num_workers} workers, alpha={args.alpha}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from relay_ray.compare import compare

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not algorithms:
        raise UserError("--algorithms needs at least one algorithm")
    configs = [_config_from_args(args, algorithm=a, out=None) for a in algorithms]
    table = compare(configs, out_dir=args.out, address=args.address, progress=not args.quiet,
                    **engine_options(args))
    print(table)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from relay_ray.tune import run_sweep

    table = run_sweep(args.sweep_file, out=args.out, address=args.address, resume=args.resume,
                      storage=args.storage, data_dir=args.data_dir, verbose=0 if args.quiet else 1)
    print(table)
    print(f"wrote {args.out}/results.csv, best.md, sweep.png", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same single line as every other user error."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Decentralized deep learning on Ray: RelaySGD and "
                                     "the gossip baselines on non-iid data.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train with one algorithm", description="Train with one algorithm; writes "
                         "OUT/config.yaml, metrics.jsonl, summary.json and curves.png.")
    add_run_flags(run)
    run.add_argument("--out", default="runs/latest", help="output directory (default: runs/latest)")
    run.add_argument("--config", default=None, metavar="FILE.yaml",
                     help="take the settings from a run YAML (e.g. a run's config.yaml); flags given override it")
    run.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                     help="write a checkpoint every K steps to OUT/checkpoints/ (default: none)")
    run.add_argument("--keep", type=int, default=3, metavar="N",
                     help="complete checkpoints to keep; older ones are deleted (default: 3)")
    run.add_argument("--resume", default=None, metavar="DIR",
                     help="continue the run in DIR (its --out) from its newest complete checkpoint, with its "
                          "config.yaml; the result equals an uninterrupted run")
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compare", help="run several algorithms on the same split and seed",
                          description="Run several algorithms on the same data split and seed; print a Markdown "
                          "table and write OUT/compare.png, OUT/compare.md and one run directory per algorithm.")
    comp.add_argument("--algorithms", default="relaysgd,dsgd,allreduce",
                      help="comma-separated algorithms (default: relaysgd,dsgd,allreduce)")
    add_run_flags(comp, algorithm_flag=False)
    comp.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    comp.set_defaults(func=cmd_compare)

    sweep = sub.add_parser("tune", help="Ray Tune sweep over hyper-parameters, topologies, trees, heterogeneity",
                           description="Run the sweep in FILE.yaml (see tune_configs/) with Ray Tune; each trial is "
                           "one run with its workers in the trial's placement group. Writes OUT/results.csv, "
                           "OUT/best.md (best trial per algorithm x topology x alpha), OUT/sweep.png and prints "
                           "the table.")
    sweep.add_argument("sweep_file", metavar="FILE.yaml", help="sweep file: base:, search:, metric:, mode:, ...")
    sweep.add_argument("--out", default="runs/sweep", help="output directory (default: runs/sweep)")
    sweep.add_argument("--address", default=None,
                       help="Ray cluster address ('auto' or host:port); default: RAY_ADDRESS, else embedded local Ray")
    sweep.add_argument("--storage", default=None, metavar="PATH",
                       help="Tune storage path (shared on a cluster: NFS path or s3://...); default: OUT")
    sweep.add_argument("--data-dir", default=None, metavar="DIR",
                       help="dataset location for every trial (overrides the sweep's base: data_dir). " + DATA_HELP)
    sweep.add_argument("--resume", action="store_true",
                       help="continue an interrupted sweep in OUT; finished trials are not re-run")
    sweep.add_argument("--quiet", action="store_true", help="no Tune progress tables")
    sweep.set_defaults(func=cmd_tune)

    topo = sub.add_parser("topology", help="statistics and a drawing of a topology and its spanning tree(s)",
                          description="Print diameter, max degree, spectral gap and RelaySGD's lr correction.")
    topo.add_argument("--topology", default=None, metavar="T", help=f"{', '.join(GRAPHS)} (default: none, the tree only)")
    topo.add_argument("--topology-file", default=None, metavar="F", help="edge-list file, one 'u v' per line")
    topo.add_argument("--tree", default="auto", metavar="TREE", help=f"{', '.join(TREES)} (default: auto)")
    topo.add_argument("--workers", type=int, default=None, dest="num_workers", help="number of workers (default: 16)")
    topo.add_argument("--json", action="store_true", help="print JSON")
    topo.add_argument("--plot", default=None, metavar="FILE.png", help="draw graph and tree(s)")
    topo.set_defaults(func=cmd_topology)

    part = sub.add_parser("partition", help="per-worker label histograms of a Dirichlet split",
                          description="Show how the Dirichlet(alpha) split gives each worker its classes.")
    part.add_argument("--dataset", default="digits", metavar="D", help="digits, mnist, cifar10 (default: digits)")
    part.add_argument("--data-dir", default=None, metavar="DIR", help=DATA_HELP)
    part.add_argument("--workers", type=int, default=None, dest="num_workers", help="number of workers (default: 16)")
    part.add_argument("--alpha", type=_alpha, default=1.0, help="Dirichlet concentration; inf = iid (default: 1.0)")
    part.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    part.add_argument("--plot", default=None, metavar="FILE.png", help="stacked-bar plot of the histograms")
    part.set_defaults(func=cmd_partition)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # --resume / --config: which flags were given
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    except WorkerFailure as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
