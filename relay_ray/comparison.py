"""`relay-ray compare`: several algorithms on the same data split and seed, one table, one plot."""

from __future__ import annotations

import sys
from pathlib import Path

from relay_ray import preflight, rundir, runner
from relay_ray.config import EngineOptions, RunConfig
from relay_ray.errors import Diverged, UserError
from relay_ray.experiment import build_experiment
from relay_ray.metrics import plot_curves, read_rows
from relay_ray.storage import is_uri
from relay_ray.titles import command_stamp, layout_name


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and (abs(value) < 1e-3 or abs(value) >= 1e5) and value != 0:
        return f"{value:.2e}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(summaries: dict[str, dict]) -> str:
    """Final worst/mean/averaged-model accuracy (or suboptimality), consensus, wall time, bytes."""
    first = next(iter(summaries.values()))["final"]
    quality = (["worst-worker acc", "mean acc", "avg-model acc"] if first.get("test_acc_mean") is not None
               else ["worst suboptimality", "mean suboptimality", "avg-model suboptimality"])
    header = ["algorithm", "topology / tree", *quality, "consensus dist.", "wall s", "MB sent / worker"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, summary in summaries.items():
        final = summary["final"]
        # --final-evals k > 1: worst and mean worker over the last k evaluations, as the paper
        averaged = {**final, **summary["final_evals"]} if summary.get("final_evals", {}).get("k", 1) > 1 else final
        if final.get("test_acc_mean") is not None:
            values = [averaged["test_acc_worst"], averaged["test_acc_mean"], final["test_acc_avg_model"]]
        else:
            values = [averaged["suboptimality_worst"], averaged["suboptimality_mean"], final["suboptimality"]]
        lines.append("| " + " | ".join([
            label, summary["layout"], *(_fmt(v) for v in values), _fmt(final["consensus_distance"]),
            f"{summary['wall_s']:.1f}", f"{final['bytes_sent_per_worker'] / 1e6:.2f}",
        ]) + " |")
    return "\n".join(lines)


def run_labels(configs: list[RunConfig]) -> list[str]:
    """Each run's name in the table and its directory: the algorithm, or ``algorithm@topology`` when an
    algorithm runs on several topologies."""
    names = [c.algorithm for c in configs]
    labels = [c.algorithm if names.count(c.algorithm) == 1 else
              f"{c.algorithm}@{Path(c.topology_file).stem if c.topology_file else c.topology or c.tree}" for c in configs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"compare lists {repeated[0]} twice; give each run of an algorithm its own topology "
                        "(ALGORITHM@TOPOLOGY)")
    return labels


def compare(configs: list[RunConfig], options: EngineOptions | None = None, out_dir: str | None = None,
            address: str | None = None, progress: bool = True, overwrite: bool = False) -> str:
    """Run every config (same data, split and seed) and return the Markdown table."""
    return run_comparison(configs, options, out_dir, address, progress, overwrite)[0]


def _holds_comparison(out: Path) -> bool:
    return (out / "compare.md").exists() or any((d / rundir.RUN_MARKER).exists() for d in out.glob("*/"))


def run_comparison(configs: list[RunConfig], options: EngineOptions | None = None, out_dir: str | None = None,
                   address: str | None = None, progress: bool = True,
                   overwrite: bool = False) -> tuple[str, dict[str, dict], dict[str, list]]:
    """``compare``, also returning each run's summary and metrics rows (rows only with ``out_dir``), keyed
    by ``run_labels``.  An ``out_dir`` that holds a comparison is refused unless ``overwrite``; each run
    then replaces what an earlier one left in its folder (metrics, checkpoints, event files)."""
    labels = run_labels(configs)
    if is_uri(out_dir):
        raise UserError(f"compare writes its table and figure into a local folder, not {out_dir}; "
                        "give a local --out (a run's --out may be a storage URI)")
    preflight.check_out(out_dir)
    if out_dir and not overwrite and _holds_comparison(Path(out_dir)):
        raise UserError(f"--out {out_dir} already holds a comparison; give --overwrite to replace it, or another --out")
    for config in configs:  # runs one after another: each must fit on its own
        preflight.check_run(config, options, address)
    experiments = [build_experiment(configs[0])]  # validates + loads data once
    for config in configs[1:]:  # every user error surfaces before the first run starts
        experiments.append(build_experiment(config, task_data=experiments[0].task_data))
    out = Path(out_dir) if out_dir else None
    started_ray = False
    if configs[0].backend == "ray":
        from relay_ray.engine import connect

        started_ray = connect(address)
    summaries, rows = {}, {}
    try:
        for label, config, experiment in zip(labels, configs, experiments):
            if out is not None:
                config.out = str(out / label)
            try:
                with rundir.claimed(config.out, overwrite=True):  # refused above unless replacing was asked for
                    summary = runner.run(config, options, address=address, progress=progress, experiment=experiment)
            except Diverged as exc:  # one diverged algorithm is a result of the comparison, not its end
                print(f"relay-ray: {label}: {exc}", file=sys.stderr)
                summary = exc.summary
            summary["layout"] = layout_name(config)
            summaries[label] = summary
            if config.out:
                rows[label] = read_rows(Path(config.out, "metrics.jsonl"))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    table = markdown_table(summaries)
    if out is not None:
        (out / "compare.md").write_text(table + "\n")
        base = configs[0]
        layouts = ", ".join(f"{label}: {layout_name(c)}" for label, c in zip(labels, configs))
        plot_curves(rows, out / "compare.png",
                    title=f"{base.dataset} (alpha {base.alpha:g}), {base.num_workers} workers — {layouts}\n"
                          f"{command_stamp()}",
                    diverged={name: s["diverged"] for name, s in summaries.items() if s.get("diverged")})
    return table, summaries, rows
