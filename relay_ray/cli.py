"""`relay-ray`: run, compare, tune, topology and partition from the command line.

User mistakes (bad flags, missing data, bad files) exit with code 2 and one line
``relay-ray: error: ...``; no traceback.  A run whose loss or model becomes non-finite stops at that
evaluation with one line and exit code 3; a worker that died for good, exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path

from relay_ray import preflight, rundir, runner, titles
from relay_ray.config import DATA_HELP, EngineOptions, RunConfig, field_kind
from relay_ray.errors import Diverged, Terminated, UserError, WorkerFailure, raise_terminated
from relay_ray.runner import ResolvedRun, from_file, from_resume
from relay_ray.titles import command_stamp

PROG = "relay-ray"
DEFAULT_OUT = "runs/latest"
DEFAULT_COMPARE_OUT = "runs/compare"
EXIT_DIVERGED = 3

def _flag(f: dataclasses.Field) -> str | None:
    flag = f.metadata.get("flag", "")
    return ("--" + f.name.replace("_", "-")) if flag == "" else flag


def _argparse_type(f: dataclasses.Field):
    parse = f.metadata.get("parse")
    if parse is not None:
        def typed(text: str):
            try:
                return parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return typed
    return {"int": int, "float": float, "floats": float}.get(field_kind(f).rstrip("?"))


def add_settings(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), groups=("run",),
                 title: str | None = None, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of ``cls`` (``RunConfig`` or ``EngineOptions``), from its declaration;
    ``only``: just these fields (in declaration order)."""
    target = parser.add_argument_group(title) if title else parser
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in dataclasses.fields(cls):
        flag = _flag(f)
        if f.name in skip or flag is None or f.metadata.get("group", "run") not in groups:
            continue
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        where = target
        if meta.get("exclusive"):
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = target.add_mutually_exclusive_group()
            where = exclusive[meta["exclusive"]]
        kwargs = dict(dest=f.name, help=meta["help"], metavar=meta.get("metavar"), type=_argparse_type(f))
        if meta.get("choices"):
            kwargs.update(choices=meta["choices"], metavar=None)
        if field_kind(f) == "floats":
            kwargs.update(nargs="*", default=[])
        else:
            kwargs.update(default=f.default)
        where.add_argument(flag, **kwargs)


def add_run_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The flags shared by `run` and `compare`: the run settings, then how Ray runs them."""
    add_settings(parser, RunConfig, skip=skip)
    parser.add_argument("--address", default=None,
                        help="Ray cluster address ('auto' or host:port); default: RAY_ADDRESS, else start an "
                             "embedded local Ray")
    add_settings(parser, EngineOptions, title="ray engine (where and how; never changes the numbers)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _run_settings(args: argparse.Namespace) -> dict:
    """The ``RunConfig`` fields the flags ask for (each setting's flag stores under its name)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if hasattr(args, f.name)}


def engine_options(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineOptions)})


def _resolve_run(args: argparse.Namespace) -> ResolvedRun:
    """The run's config and, with --resume, the checkpoint it continues from.

    --config FILE / --resume DIR take their settings from FILE / DIR/config.yaml; the flags given on
    the command line override them (argparse itself resolves which were given).
    """
    given = _explicit_dests(getattr(args, "argv", None))
    if args.resume is not None and args.overwrite:
        raise UserError("give --resume (continue the run) or --overwrite (replace it), not both")
    if args.resume is None and args.config is None:
        rundir.check_out(args.out, overwrite=args.overwrite, default="out" not in given)
        return ResolvedRun(RunConfig(**_run_settings(args)))
    if args.resume is not None and args.config is not None:
        raise UserError("give --config or --resume, not both (a resumed run uses its own config.yaml)")
    changed = {k: v for k, v in _run_settings(args).items() if k in given}
    if args.config is not None:
        if "out" in given:  # --out on the command line beats out: in the file; the file's beats the default
            changed["out"] = args.out
        resolved = from_file(args.config, changed)
        if resolved.config.out is None:
            resolved.config.out = args.out
        rundir.check_out(resolved.config.out, overwrite=args.overwrite,
                         default="out" not in given and resolved.config.out == args.out)
        return resolved
    rundir.check_out(args.resume, resume=True)
    return from_resume(args.resume, changed, engine_options(args), args.address)


def _explicit_dests(argv: list[str] | None) -> set[str]:
    """The dests of the flags given on the command line (of `run`, `compare`, ...): a parser whose
    defaults are all suppressed returns only those."""
    parser = build_parser()
    commands = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    for command in commands.choices.values():
        for action in command._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv or ["run"])))


def ignored_flags(config: RunConfig, given: set[str]) -> list[str]:
    """A note for each flag given on the command line that this run does not use (it still runs)."""
    notes = []
    if "data_dir" in given and config.dataset in ("digits", "quadratics"):
        notes.append(f"--data-dir is not used by --dataset {config.dataset} (it needs no files)")
    if "heterogeneity" in given and config.dataset != "quadratics":
        notes.append("--heterogeneity applies to --dataset quadratics only; use --alpha for a data split")
    if config.dataset == "quadratics":
        notes += [f"--{name} applies to datasets with labels, not --dataset quadratics (use --heterogeneity)"
                  for name in ("alpha", "partition") if name in given]
    if not config.uses_trees:
        notes += [f"--{name.replace('_', '-')} applies to relay algorithms only, not --algorithm {config.algorithm}"
                  for name in ("tree", "lr_correction", "relay_fill") if name in given]
    if "branching" in given and config.algorithm != "btpp":
        notes.append(f"--branching applies to --algorithm btpp only, not --algorithm {config.algorithm}")
    if "consensus_lr" in given and config.algorithm != "choco":
        notes.append(f"--consensus-lr applies to --algorithm choco only, not --algorithm {config.algorithm}")
    if config.algorithm == "allreduce" and given & {"topology", "topology_file"}:
        notes.append("allreduce averages over all workers exactly; the --topology is not used")
    if config.backend == "local":
        notes += [f"{_flag(f)} applies to --backend ray only" for f in dataclasses.fields(EngineOptions)
                  if f.name in given and f.name != "straggle"]  # --straggle is refused (it would fake nothing)
    return notes


# ------------------------------------------------------------------------- subcommands


def cmd_run(args: argparse.Namespace) -> int:
    resolved = _resolve_run(args)
    options = engine_options(args)  # every check before the default --out is replaced
    config = resolved.config
    for note in ignored_flags(config, _explicit_dests(args.argv)):
        print(f"relay-ray: note: {note} (ignored)", file=sys.stderr)
    if resolved.experiment is None:  # (a resumed run was checked before its experiment was built)
        preflight.check_run(config, options, args.address)
    # the default --out (runs/latest) is the latest run: replaced, with a note; any other is protected
    replace_default = resolved.checkpoint is None and not args.overwrite and config.out == DEFAULT_OUT and \
        Path(DEFAULT_OUT, rundir.RUN_MARKER).exists()
    with rundir.claimed(config.out, overwrite=args.overwrite or replace_default):  # --resume refuses --overwrite
        if replace_default:
            print(f"relay-ray: replacing the previous run in {DEFAULT_OUT} (the default --out)", file=sys.stderr)
        summary = runner.run(config, options, address=args.address, progress=not args.quiet,
                             experiment=resolved.experiment, resume=resolved.checkpoint)
    final = {k: v for k, v in summary["final"].items() if k != "metric_per_worker"}
    if config.final_evals > 1:
        final["final_evals"] = summary["final_evals"]
    print(json.dumps(final, indent=2))
    if config.out:
        print(f"wrote {config.out}/config.yaml, metrics.jsonl, summary.json, curves.png", file=sys.stderr)
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from relay_ray.experiment import build_topology
    from relay_ray.topology import DIRECTED, TIME_VARYING, check_bounded, plot_topology, topology_stats

    # the statistics need only a config that accepts the graph: relays refuse the changing and directed ones
    algorithm = "sgp" if args.topology in TIME_VARYING + DIRECTED else "relaysgd"
    config = RunConfig(algorithm=algorithm, topology=args.topology, topology_file=args.topology_file,
                       tree=args.tree, num_workers=args.num_workers, dataset="quadratics", backend="local")
    check_bounded(config.num_workers)  # before the (complete) graph is built
    graph, trees = build_topology(config)
    stats = topology_stats(graph, trees, args.topology).to_dict()
    if args.json:
        print(json.dumps(stats))
    else:
        name = args.topology_file or args.topology or "(tree only)"
        print(f"topology       {name}, tree {args.tree}")
        print(f"num_workers    {stats['num_workers']}")
        print(f"diameter       {stats['diameter']}  (max relay delay {max(stats['diameter'] - 1, 0)} steps)")
        print(f"max_degree     {stats['max_degree']}")
        if stats["period"] > 1 or args.topology in DIRECTED:
            print(f"period         {stats['period']}  (steps until the schedule repeats)")
            print(f"consensus_rate {stats['consensus_rate']:.4f}  (per step, of the product of one period's "
                  "mixing matrices; 0 = exact averaging)")
        print(f"spectral_gap   {stats['spectral_gap']:.4f}  (gossip matrix of the graph"
              f"{'; 1 - consensus_rate' if stats['period'] > 1 or args.topology in DIRECTED else ''})")
        if algorithm == "relaysgd":  # the relays refuse a graph that changes with the step or is directed
            print(f"lr_correction  {stats['lr_correction']:.4f}  (RelaySGD --lr-correction auto)")
            for i, edges in enumerate(stats["tree_edges"]):
                print(f"tree {i} edges   " + " ".join(f"{u}-{v}" for u, v in edges))
    if args.plot:
        graph_name = args.topology_file or args.topology or "no graph (the tree is the topology)"
        plot_topology(graph, trees, args.plot,
                      title=f"{stats['num_workers']} workers, topology {graph_name}, --tree {args.tree}: diameter "
                      f"{stats['diameter']}, lr correction x{stats['lr_correction']:.3g}\n{command_stamp()}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from relay_ray.data import dirichlet_partition, label_histograms, load_dataset, paper_partition, plot_partition

    if args.dataset == "quadratics":
        raise UserError("the quadratics task has no labels to partition; use --heterogeneity instead")
    config = RunConfig(dataset=args.dataset, data_dir=args.data_dir, num_workers=args.num_workers, alpha=args.alpha,
                       seed=args.seed, partition=args.partition, backend="local")
    dataset = load_dataset(config.dataset, config.data_dir)
    split = paper_partition if config.partition == "paper" else dirichlet_partition
    shards = split(dataset.y_train, config.num_workers, config.alpha, config.seed)
    hist = label_histograms(dataset.y_train, shards, dataset.num_classes)
    print("worker  size  classes  " + " ".join(f"{c:>5d}" for c in range(dataset.num_classes)))
    for rank, row in enumerate(hist):
        print(f"{rank:>6d} {row.sum():>5d} {int((row > 0).sum()):>8d}  " + " ".join(f"{v:>5d}" for v in row))
    if args.plot:
        plot_partition(hist, args.plot, title=f"{args.dataset}, {config.num_workers} workers, alpha={args.alpha}, "
                                             f"--partition {config.partition}\n{command_stamp()}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from relay_ray.comparison import compare, run_labels

    entries = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not entries:
        raise UserError("--algorithms needs at least one algorithm")
    configs = []
    for entry in entries:  # ALGORITHM or ALGORITHM@TOPOLOGY (this run's --topology)
        algorithm, _, topology = entry.partition("@")
        own = {"topology": topology, "topology_file": None} if topology else {}
        configs.append(RunConfig(**{**_run_settings(args), "algorithm": algorithm, **own, "out": None}))
    labels = run_labels(configs)
    # like run's runs/latest: the default --out is the latest comparison, replaced; any other is protected
    replace_default = "out" not in _explicit_dests(getattr(args, "argv", None)) and args.out == DEFAULT_COMPARE_OUT
    if replace_default and not args.overwrite and Path(DEFAULT_COMPARE_OUT, "compare.md").exists():
        print(f"relay-ray: replacing the previous comparison in {DEFAULT_COMPARE_OUT} (the default --out)", file=sys.stderr)
    table = compare(configs, engine_options(args), out_dir=args.out, address=args.address, progress=not args.quiet,
                    overwrite=args.overwrite or replace_default)
    print(table)
    if args.out:
        print(f"wrote {args.out}/compare.md, compare.png and one run directory per run "
              f"({', '.join(f'{args.out}/{label}' for label in labels)})", file=sys.stderr)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from relay_ray.tune import run_sweep

    table = run_sweep(args.sweep_file, out=args.out, address=args.address, resume=args.resume,
                      storage=args.storage, data_dir=args.data_dir,
                      progress="tune" if args.verbose else "none" if args.quiet else "lines")
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
    outputs = run.add_argument_group("outputs")
    outputs.add_argument("--out", default=DEFAULT_OUT, help=f"output directory; one that holds a run is refused "
                         f"unless --resume or --overwrite, except the default (default: {DEFAULT_OUT}, replaced "
                         "by each run that does not name another)")
    outputs.add_argument("--overwrite", action="store_true", help="replace the run in --out (its metrics, summary, "
                         "plots and checkpoints)")
    add_settings(outputs, RunConfig, groups=("output",))
    run.add_argument("--config", default=None, metavar="FILE.yaml",
                     help="take the settings from a run YAML (e.g. a run's config.yaml); flags given override it")
    run.add_argument("--resume", default=None, metavar="DIR",
                     help="continue the run in DIR (its --out) from its newest complete checkpoint, with its "
                          "config.yaml; the result equals an uninterrupted run")
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compare", help="run several algorithms on the same split and seed",
                          description="Run several algorithms on the same data split and seed; print a Markdown "
                          "table and write OUT/compare.png, OUT/compare.md and one run directory per algorithm.")
    comp.add_argument("--algorithms", default="relaysgd,dsgd,allreduce",
                      help="comma-separated algorithms, each optionally ALGORITHM@TOPOLOGY to run it on its own "
                           "topology (e.g. dsgd@exponential-one-peer) (default: relaysgd,dsgd,allreduce)")
    add_run_flags(comp, skip=("algorithm",))
    comp.add_argument("--out", default=DEFAULT_COMPARE_OUT, help="output directory; one that holds a comparison is "
                      f"refused unless --overwrite, except the default (default: {DEFAULT_COMPARE_OUT}, replaced by "
                      "each comparison that does not name another)")
    comp.add_argument("--overwrite", action="store_true", help="replace the comparison in --out")
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
    sweep.add_argument("--quiet", action="store_true", help="no progress lines (only errors and the result table)")
    sweep.add_argument("--verbose", action="store_true",
                       help="Ray Tune's own progress tables instead of relay-ray's one line per finished trial")
    sweep.set_defaults(func=cmd_tune)

    topo = sub.add_parser("topology", help="statistics and a drawing of a topology and its spanning tree(s)",
                          description="Print diameter, max degree, spectral gap and RelaySGD's lr correction.")
    add_settings(topo, RunConfig, only=("topology", "topology_file", "tree", "num_workers"))
    topo.add_argument("--json", action="store_true", help="print JSON")
    topo.add_argument("--plot", default=None, metavar="FILE.png", help="draw graph and tree(s)")
    topo.set_defaults(func=cmd_topology)

    part = sub.add_parser("partition", help="per-worker label histograms of the non-iid split",
                          description="Show which classes each worker gets from the split: --partition dirichlet "
                          "(Dirichlet(alpha) per class) or paper (the authors' split).")
    add_settings(part, RunConfig, only=("dataset", "data_dir", "num_workers", "partition", "alpha", "seed"))
    next(a for a in part._actions if a.dest == "num_workers").help = "number of workers (default: 16)"
    part.add_argument("--plot", default=None, metavar="FILE.png", help="stacked-bar plot of the histograms")
    part.set_defaults(func=cmd_partition)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # --resume / --config: which flags were given
    titles.COMMAND[:] = ["relay-ray", *args.argv]  # what the figures of this command are stamped with
    if args.command is None:
        parser.print_help()
        return 2
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)  # the engine keeps it when Ray starts
    try:
        return args.func(args)
    except UserError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    except WorkerFailure as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except Diverged as exc:  # metrics.jsonl, summary.json and the last good checkpoint stay
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM); the newest complete checkpoint is kept (continue with --resume)",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `relay-ray partition | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    finally:
        titles.COMMAND.clear()  # a library call after this one stamps its own command line


if __name__ == "__main__":
    sys.exit(main())
