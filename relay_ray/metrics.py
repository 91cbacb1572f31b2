"""Metrics of a decentralized run and the files a run writes (pure; no Ray)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from relay_ray.config import RunConfig
from relay_ray.errors import Diverged
from relay_ray.files import write_atomic
from relay_ray.loggers import STATE_FILE, Trackers
from relay_ray.storage import Location, Mirror, is_uri
from relay_ray.titles import command_stamp, run_title


def consensus_distance(params: list[np.ndarray] | np.ndarray) -> float:
    """(1/n) sum_i ||x_i - xbar||^2 (Kong et al. 2021, arXiv:2102.04828)."""
    stacked = np.asarray(params, dtype=np.float64)
    return float(np.mean(np.sum((stacked - stacked.mean(axis=0)) ** 2, axis=1)))


def eval_row(step: int, per_worker: list[dict], avg_model_metric: float, consensus: float, wall_s: float,
             metric: str) -> dict:
    """One line of metrics.jsonl from the workers' small metric dicts.

    Classification reports test accuracy (mean / worst worker / averaged model); quadratics
    reports suboptimality F(x) - F* the same three ways (worst = largest).
    """
    values = [w["metric"] for w in per_worker]
    row = {
        "step": step,
        "train_loss": float(np.mean([w["train_loss"] for w in per_worker])),
        "test_acc_mean": None,
        "test_acc_worst": None,
        "test_acc_avg_model": None,
        "consensus_distance": consensus,
        "bytes_sent_per_worker": float(np.mean([w["bytes_sent"] for w in per_worker])),
        "samples": int(sum(w["samples"] for w in per_worker)),
        "wall_s": wall_s,
    }
    if metric == "test_acc":
        row.update(test_acc_mean=float(np.mean(values)), test_acc_worst=float(np.min(values)),
                   test_acc_avg_model=float(avg_model_metric))
    else:
        row.update(suboptimality=float(avg_model_metric), suboptimality_mean=float(np.mean(values)),
                   suboptimality_worst=float(np.max(values)))
    row["samples_per_s"] = row["samples"] / wall_s if wall_s > 0 else None
    # by rank, for the final metrics averaged over the last evaluations (--final-evals)
    by_rank = sorted(per_worker, key=lambda w: w["rank"])
    row["metric_per_worker"] = [float(w["metric"]) for w in by_rank]
    # a worker with a non-finite training loss (or model metric) has diverged: name the first one
    diverged = next((w for w in by_rank if not math.isfinite(w["train_loss"]) or not math.isfinite(w["metric"])),
                    None)
    if diverged is not None:
        loss_bad = not math.isfinite(diverged["train_loss"])
        what, value = ("loss", diverged["train_loss"]) if loss_bad else (metric, diverged["metric"])
        row["diverged"] = {"worker": int(diverged["rank"]), "what": what, "value": str(value)}
    return row


def check_divergence(row: dict) -> None:
    """Stop a run whose evaluation found a non-finite loss or model (``eval_row``'s ``diverged``)."""
    if row.get("diverged"):
        bad = row["diverged"]
        raise Diverged(f"diverged at step {row['step']} on worker {bad['worker']}: {bad['what']} {bad['value']}; "
                       "lower --lr", row)


def final_evals_metrics(rows: list[dict], k: int, metric: str) -> dict:
    """The paper's metric: each worker's metric averaged over the last ``k`` evaluations, then the
    worst and the mean worker (for accuracy worst = lowest, for suboptimality worst = highest)."""
    last = [r for r in rows if r.get("metric_per_worker")][-k:]
    if not last:
        return {}
    per_worker = np.mean(np.asarray([r["metric_per_worker"] for r in last], dtype=np.float64), axis=0)
    worst = float(per_worker.min() if metric == "test_acc" else per_worker.max())
    return {"k": len(last), "steps": [r["step"] for r in last], f"{metric}_worst": worst,
            f"{metric}_mean": float(per_worker.mean())}


def format_row(row: dict, total_steps: int) -> str:
    """A one-line progress summary of an evaluation."""
    parts = [f"step {row['step']}/{total_steps}", f"loss {row['train_loss']:.4f}"]
    if row["test_acc_mean"] is not None:
        parts += [f"acc avg-model {row['test_acc_avg_model']:.4f}", f"mean {row['test_acc_mean']:.4f}",
                  f"worst {row['test_acc_worst']:.4f}"]
    else:
        parts += [f"subopt {row['suboptimality']:.3e}", f"worst {row['suboptimality_worst']:.3e}"]
    parts += [f"consensus {row['consensus_distance']:.3e}", f"{row['wall_s']:.1f}s"]
    return " | ".join(parts)


def read_rows(path: str | Path) -> list[dict]:
    """The complete lines of a metrics.jsonl, local or at a storage URI (a line cut short by a crash
    is not a row)."""
    location = Location(path)
    text = location.read_text() if location.exists() else ""
    rows = []
    for line in text.split("\n")[:-1]:  # the part after the last newline is unfinished
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


TENSORBOARD_DIR = "tensorboard"
# what a resumed run with an --out URI brings back into its local mirror before it goes on
MIRRORED_ON_RESUME = ("metrics.jsonl", STATE_FILE, TENSORBOARD_DIR)


class TensorBoardLog:
    """TensorBoard event files beside metrics.jsonl: every numeric metric of an evaluation as a
    scalar, and the per-worker test metric as a histogram (plus its worst/mean as scalars).  A run
    that goes back to a checkpoint reopens the log with ``purge_step``, so TensorBoard drops the
    events after that step instead of showing them twice."""

    def __init__(self, directory: Path, resume_step: int | None = None):
        self.directory = directory
        self.writer = None
        self.purge_step = resume_step + 1 if resume_step else None

    def _open(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported only by a run that writes files

            self.writer = SummaryWriter(str(self.directory), purge_step=self.purge_step)
            self.purge_step = None
        return self.writer

    def record(self, row: dict) -> None:
        writer, step = self._open(), row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"relay_ray/{key}", value, step)
        per_worker = np.asarray(row.get("metric_per_worker") or [], dtype=float)
        if per_worker.size and np.isfinite(per_worker).all():
            try:
                with np.errstate(over="ignore"):
                    writer.add_histogram("relay_ray/metric_per_worker", per_worker, step)
            except ValueError:  # TensorBoard cannot bin huge values (a diverging run); the scalars keep them
                pass
        writer.flush()

    def rewind(self, step: int) -> None:
        """Later events are recorded again after a restart from ``step``: purge them on reopening."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.purge_step = step + 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class RunRecorder:
    """Writes ``config.yaml``, ``metrics.jsonl`` (a line per evaluation), ``summary.json`` and plots.

    No file is ever half-written: config.yaml, summary.json and curves.png are renamed into place,
    and each metrics line is one ``write`` to a file opened with O_APPEND.  ``resume_step``: the
    run continues from a checkpoint at that step, so the rows up to it are kept and later ones
    (written after the checkpoint by the interrupted run) are dropped, not duplicated.
    """

    def __init__(self, out_dir: str | Path | None, config: RunConfig, resume_step: int | None = None,
                 engine: dict | None = None):
        # an --out URI: the files are written to a local mirror and pushed after each evaluation
        self.mirror = Mirror.staging(Location(out_dir)) if is_uri(out_dir) else None
        if self.mirror is not None and resume_step is not None:
            self.mirror.pull(MIRRORED_ON_RESUME)
        self.out_dir = self.mirror.local if self.mirror else Path(out_dir) if out_dir else None
        self.config = config
        self.rows: list[dict] = []
        self.events = TensorBoardLog(self.out_dir / TENSORBOARD_DIR, resume_step) if self.out_dir else None
        self.trackers = Trackers(config.loggers, self.out_dir, self.out_dir.name, config.to_dict()) \
            if self.out_dir and config.loggers else None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            config.dump(self.out_dir / "config.yaml", engine=engine)
            self.metrics_path = self.out_dir / "metrics.jsonl"
            if resume_step is not None:
                self.rows = read_rows(self.metrics_path)
            self.truncate(resume_step or 0)
            self._push()

    def _push(self) -> None:
        if self.mirror is not None:
            self.mirror.push()

    def truncate(self, step: int) -> None:
        """Forget the rows after ``step`` (a run going back to a checkpoint will record them again)."""
        self.rows = [row for row in self.rows if row["step"] <= step]
        if self.events is not None:
            self.events.rewind(step)
        if self.out_dir is not None:
            write_atomic(self.metrics_path, "".join(json.dumps(row) + "\n" for row in self.rows))

    def record(self, row: dict) -> None:
        self.rows.append(row)
        if self.out_dir is not None:
            # one write() of a whole line with O_APPEND: a reader never sees half a row
            data = (json.dumps(row) + "\n").encode()
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
            finally:
                os.close(fd)
            if written != len(data):
                raise OSError(f"short write to {self.metrics_path} ({written} of {len(data)} bytes)")
            self.events.record(row)
            if self.trackers is not None:
                self.trackers.record(row)
            self._push()

    def finish(self, summary: dict) -> None:
        if self.out_dir is None:
            return
        self.events.close()
        write_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_atomic(self.out_dir / "curves.png", lambda f: plot_curves(
            {self.config.algorithm: self.rows}, f, title=f"{run_title(self.config)}\n{command_stamp()}",
            diverged={self.config.algorithm: summary["diverged"]} if summary.get("diverged") else None))
        if self.trackers is not None:
            self.trackers.close("failed" if summary.get("diverged") else "finished",
                                [self.out_dir / "curves.png", self.out_dir / "summary.json"])
            self.trackers = None
        self._push()

    def close(self) -> None:
        """A run that stops without ``finish`` (interrupted, or out of restarts): its trackers' runs
        are marked killed (``--resume`` continues them) and a remote --out gets the files so far."""
        if self.trackers is not None:
            trackers, self.trackers = self.trackers, None
            try:
                trackers.close("killed")
            except Exception as exc:  # the run's own error is the one to report
                print(f"relay-ray: could not mark the tracker run as killed: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
        if self.mirror is not None:
            try:
                self._push()
            except Exception as exc:
                print(f"relay-ray: could not push the run files to {self.mirror.remote.shown}: {exc}", file=sys.stderr)


def plot_curves(runs: dict[str, list[dict]], path: str | Path, title: str = "",
                diverged: dict[str, str] | None = None) -> None:
    """Test metric, train loss and consensus distance vs step; one line per run.

    What cannot be drawn is said in the figure: a run with no evaluation yet, a diverged run (its
    non-finite points are gaps), and a run whose consensus distance is 0 (exact averaging) on the
    log axis.  ``diverged``: run label -> the reason, from the summary."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry is touched

    fig = Figure(figsize=(15, 4.6))
    axes = fig.subplots(1, 3, sharex=True)
    notes: list[str] = []
    stopped_at = []
    for label, rows in runs.items():
        if not rows:
            notes.append(f"{label}: no evaluation before the run stopped")
            continue
        steps = [r["step"] for r in rows]
        dots = dict(marker="o", markersize=3) if len(rows) <= 30 else {}  # a run of one or two rows still shows
        if rows[0]["test_acc_mean"] is not None:
            line, = axes[0].plot(steps, [r["test_acc_avg_model"] for r in rows], label=f"{label} (avg model)", **dots)
            axes[0].plot(steps, [r["test_acc_worst"] for r in rows], linestyle="--", color=line.get_color(),
                         label=f"{label} (worst worker)", **dots)
            axes[0].set_ylabel("test accuracy")
        else:
            line, = axes[0].semilogy(steps, [max(r["suboptimality"], 1e-16) for r in rows], label=label, **dots)
            axes[0].set_ylabel("suboptimality F(x̄) − F*")
        losses = [r["train_loss"] for r in rows]
        axes[1].plot(steps, losses, label=label, color=line.get_color(), **dots)
        bad = next((r["step"] for r in rows if not math.isfinite(r["train_loss"])), None)
        if bad is not None or (diverged and label in diverged):
            why = (diverged or {}).get(label) or f"diverged: training loss non-finite at step {bad}"
            notes.append(f"{label} {why} (dotted line; non-finite points are not drawn)")
            stopped_at.append((bad or steps[-1], line.get_color()))
        # exact averaging has zero consensus distance: leave it off the log axis and say so
        consensus = [r["consensus_distance"] for r in rows]
        axes[2].semilogy(steps, [c if c > 0 else np.nan for c in consensus], label=label, color=line.get_color(),
                         **dots)
        if all(c == 0 for c in consensus):
            notes.append(f"{label}: consensus distance 0 at every step (exact averaging), not drawable on a log axis")
    axes[1].set_ylabel("train loss")
    axes[2].set_ylabel("consensus distance")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for step, colour in stopped_at:
            ax.axvline(step, color=colour, linestyle=":", linewidth=1.5)
    all_steps = [r["step"] for rows in runs.values() for r in rows]
    if all_steps:  # shared x: a panel with nothing drawable (all-zero consensus) keeps the runs' steps
        low, high = min(all_steps), max(all_steps)
        pad = max((high - low) * 0.03, 0.5)
        axes[0].set_xlim(low - pad, high + pad)
    if notes:
        fig.text(0.5, 0.01, "\n".join(notes), ha="center", va="bottom", fontsize=8, color="tab:red")
    if any(rows for rows in runs.values()):  # a run stopped before its first evaluation has no lines
        axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.035 * len(notes), 1, 1))
    fig.savefig(path, dpi=110, format="png")


class Progress:
    """A tqdm bar on a terminal (with its ETA); plain lines otherwise: one per evaluation, and between
    them, at least every ``heartbeat_s`` seconds of training, ``step s/N | r steps/s | ETA``, so a log
    file shows a live run from its first steps (a CIFAR-10 run's first evaluation can be minutes away)."""

    HEARTBEAT_S = 10.0

    def __init__(self, total: int, desc: str, enabled: bool = True, heartbeat_s: float | None = None):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.total = total
        self.bar = None
        self.heartbeat_s = self.HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.done = 0
        self._since = (time.monotonic(), 0)  # (when, steps done then): the rate since the last (re)start
        self._last_line = time.monotonic()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self.bar is not None:
            self.bar.update(steps)
        elif self.enabled and time.monotonic() - self._last_line >= self.heartbeat_s:
            self._print(self._heartbeat())

    def _heartbeat(self) -> str:
        started, at = self._since
        elapsed, steps = time.monotonic() - started, self.done - at
        rate = steps / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "?"
        return f"step {self.done}/{self.total} | {rate:.2f} steps/s | ETA {eta}"

    def rewind(self, step: int) -> None:
        """Show ``step`` steps done (a resumed or restarted run)."""
        self.done = step
        self._since = (time.monotonic(), step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def _print(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        self._last_line = time.monotonic()

    def note(self, line: str) -> None:
        """A line the user must see even with --quiet (a restart, a fallback)."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            self._print(line)

    def report(self, row: dict) -> None:
        if not self.enabled:
            return
        line = format_row(row, self.total)
        if self.bar is not None:
            self.bar.write(line)
        else:
            self._print(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summarize(experiment, rows: list[dict], wall_s: float, backend: str, **extra) -> dict:
    """summary.json: the final evaluation, the run's shape and the topology statistics."""
    config = experiment.config
    final = rows[-1] if rows else {}
    metric = "test_acc" if final.get("test_acc_mean") is not None else "suboptimality"
    return {
        "algorithm": config.algorithm,
        "dataset": config.dataset,
        "num_workers": config.num_workers,
        "backend": backend,
        "steps": experiment.total_steps,
        "lr": config.lr,
        "lr_scale": experiment.lr_scale,
        "topology": {k: v for k, v in experiment.stats.to_dict().items() if k not in ("tree_edges", "graph_edges")},
        "wall_s": wall_s,
        "final": final,
        "final_evals": final_evals_metrics(rows, config.final_evals, metric),
        "nan_detected": any(isinstance(v, float) and math.isnan(v) for v in final.values()),
        **extra,
    }
