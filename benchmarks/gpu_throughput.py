"""Decentralized workers on one device against one model at the same total batch: the GPU path's measure.

For each model (VGG-11, ResNet-20, the small CNN) on CIFAR-10-shaped data, side by side:

  one model, batch 512   a plain torch loop (SGD + Nesterov, the same on-device batches, crops and flips)
  16 x 32, vmap          RelaySGD (double binary trees), 16 workers x batch 32 in this process, torch
                         state on the device, the 16 forward/backwards in one vmap call (the GPU default)
  16 x 32, vmap, gradients only   the vmap call alone (batches gathered, forward/backward): the
                         rest of the vmap row's step is the local steps and the relay math
  16 x 32, loop          the same, workers' gradients one after another
  16 x 32, numpy loop    the previous path: state in host numpy, every model copied to the device and
                         back each step, relay math on the host (the CPU default; on CPU it is the path)

Only training steps are timed (after warm-up; CUDA synchronised), no evaluations.  samples/s =
512 x steps / wall time; epoch = 50 000 samples; the paper's run is 200 epochs.  Peak memory is
torch.cuda.max_memory_allocated (GPU) or this process's VmHWM (CPU).  Data: the CIFAR-10 archive
with --data-dir, else random uint8 images of CIFAR-10's shape (throughput does not depend on pixel
values); say which in the table.  --train-epochs E adds a real 16-worker RelaySGD run on CIFAR-10
(alpha 0.01, VGG-11, the default recipe) for E epochs, with its accuracy (needs --data-dir).

    .venv/bin/python benchmarks/gpu_throughput.py                       # CPU: small CNN, a few steps
    .venv/bin/python benchmarks/gpu_throughput.py --device cuda --data-dir ../shared/data/cifar10-jpg.tar.gz

On cuda it writes the section "## GPU throughput" of RESULTS.md (--results PATH elsewhere, --no-results
not at all); on cpu only with --results PATH, so a CPU check never replaces the GPU table.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, command_line, load_average, machine, write_section  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from relay_ray import problems as problems_module  # noqa: E402
from relay_ray.config import RunConfig  # noqa: E402
from relay_ray.data import ArrayDataset, load_dataset  # noqa: E402
from relay_ray.experiment import build_experiment  # noqa: E402
from relay_ray.problems import ClassificationProblem  # noqa: E402
from relay_ray.worker import Worker, gradients, step_workers  # noqa: E402

SECTION = "## GPU throughput (`benchmarks/gpu_throughput.py`)"
EPOCH_SAMPLES = 50_000
PAPER_EPOCHS = 200
VARIANTS = ("single", "vmap", "vmap-grads", "loop", "numpy-loop")
LABELS = {"single": "one model, batch {total}", "vmap": "{n} x {b}, vmap", "loop": "{n} x {b}, loop",
          "vmap-grads": "{n} x {b}, vmap, gradients only (no local step, no relay)",
          "numpy-loop": "{n} x {b}, numpy loop (previous path)"}


def synthetic_cifar(seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset("cifar10", rng.integers(0, 256, (EPOCH_SAMPLES, 3, 32, 32), dtype=np.uint8),
                        rng.integers(0, 10, EPOCH_SAMPLES).astype(np.int64),
                        rng.integers(0, 256, (1000, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 1000).astype(np.int64),
                        10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_memory(device: str) -> None:
    problems_module._ON_DEVICE.clear()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(step, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def single_model(dataset, model: str, batch: int, device: str, steps: int, warmup: int) -> float:
    """Seconds per step of one model at ``batch``, with the workers' own batch path on the device."""
    problem = ClassificationProblem(dataset, np.arange(len(dataset.y_train)), model, batch, 0, 0, device=device)
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    problem.model.train()

    def step():
        x, y, seed = problem.train_batch()
        if seed is not None:
            torch.manual_seed(seed)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(problem.model(x), y).backward()
        optimizer.step()

    return _timed(step, steps, warmup, device)


def decentralized(dataset, model: str, workers: int, batch: int, device: str, variant: str, steps: int,
                  warmup: int) -> float:
    """Seconds per step of ``workers`` RelaySGD workers in this process (the simulator's dataflow)."""
    tensors = "numpy" if variant == "numpy-loop" else "torch"
    batching = "vmap" if variant.startswith("vmap") else "loop"
    config = RunConfig(algorithm="relaysgd", dataset="cifar10", model=model, num_workers=workers, batch_size=batch,
                       alpha=1.0, epochs=1, backend="local", device=device, tensors=tensors, worker_batching=batching)
    experiment = build_experiment(config, task_data=dataset)
    pool = [Worker(experiment.worker_spec(r), experiment.task_data) for r in range(workers)]
    state = {"outboxes": None}

    def step():
        outboxes = state["outboxes"]
        inboxes = experiment.plan.route(outboxes) if outboxes is not None else [[] for _ in pool]
        state["outboxes"] = step_workers(pool, inboxes, batching == "vmap")

    def gradients_only():  # at the models of step 0
        gradients(pool, batched=True)

    return _timed(gradients_only if variant == "vmap-grads" else step, steps, warmup, device)


def train_run(dataset, epochs: float, device: str, out: Path, model: str = "vgg11") -> dict:
    """A real 16-worker RelaySGD run on CIFAR-10 (alpha 0.01, the default recipe) for ``epochs``."""
    from relay_ray.simulate import simulate

    config = RunConfig(algorithm="relaysgd", dataset="cifar10", model=model, num_workers=16, alpha=0.01,
                       epochs=epochs, backend="local", device=device, out=str(out))
    start = time.perf_counter()
    summary = simulate(config, build_experiment(config, task_data=dataset), progress=True)
    final = summary["final"]
    return {"model": model, "epochs": epochs, "wall_s": time.perf_counter() - start, "test_acc_mean": final["test_acc_mean"],
            "test_acc_worst": final["test_acc_worst"], "test_acc_avg_model": final["test_acc_avg_model"],
            "samples_per_s": final.get("samples_per_s")}


def table(rows: list[dict]) -> str:
    lines = ["| model | run | ms / step | samples/s | vs one model | epoch s | 200 epochs h | peak memory MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "–" if r["vs_single"] != r["vs_single"] else f"{r['vs_single']:.2f}x"  # nan: no single-model row
        lines.append(f"| {r['model']} | {r['label']} | {r['step_s'] * 1e3:.1f} | {r['samples_per_s']:.0f} | "
                     f"{ratio} | {r['epoch_s']:.1f} | {r['paper_h']:.2f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", help="comma-separated (default: vgg11,resnet20,cnn on cuda, cnn on cpu)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="per worker; the single model takes workers x batch")
    parser.add_argument("--steps", type=int, help="timed steps (default: 30 on cuda, 3 on cpu); the numpy loop "
                        "takes a sixth of them (at least 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3 on cuda, 1 on cpu)")
    parser.add_argument("--data-dir", help="CIFAR-10 (the JPEG archive or a torchvision root); default: random "
                        "images of its shape")
    parser.add_argument("--train-epochs", type=float, default=0, help="also train 16 workers of RelaySGD this many "
                        "epochs on the real data (needs --data-dir)")
    parser.add_argument("--train-model", default="vgg11", help="the model of --train-epochs (default: vgg11)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--results", help="Markdown file for the section (default: benchmarks/RESULTS.md on cuda; "
                        "none on cpu)")
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU")
    if args.train_epochs and not args.data_dir:
        parser.error("--train-epochs trains on the real CIFAR-10: give --data-dir")
    models = (args.models or ("vgg11,resnet20,cnn" if cuda else "cnn")).split(",")
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    steps = args.steps or (30 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    torch.backends.cudnn.benchmark = True
    dataset = load_dataset("cifar10", args.data_dir) if args.data_dir else synthetic_cifar()
    data_label = "CIFAR-10" if args.data_dir else "random images of CIFAR-10's shape"
    total = args.workers * args.batch
    started = time.perf_counter()
    rows = []
    for model in models:
        single_s = None
        for variant in variants:
            _reset_memory(args.device)
            n = max(2, steps // 6) if variant == "numpy-loop" else steps
            if variant == "single":
                step_s = single_model(dataset, model, total, args.device, n, warmup)
                single_s = step_s
            else:
                step_s = decentralized(dataset, model, args.workers, args.batch, args.device, variant, n,
                                       min(warmup, 1) if variant == "numpy-loop" else warmup)
            rate = total / step_s
            rows.append({"model": model, "variant": variant, "steps": n,
                         "label": LABELS[variant].format(total=total, n=args.workers, b=args.batch),
                         "step_s": step_s, "samples_per_s": rate,
                         "vs_single": (single_s / step_s) if single_s else float("nan"),
                         "epoch_s": EPOCH_SAMPLES / rate, "paper_h": PAPER_EPOCHS * EPOCH_SAMPLES / rate / 3600,
                         "peak_mb": _peak_mb(args.device)})
            print(json.dumps(rows[-1]), flush=True)
    training = None
    if args.train_epochs:
        _reset_memory(args.device)
        training = train_run(dataset, args.train_epochs, args.device, Path("/tmp") / "gpu-throughput-train",
                             args.train_model)
        print(json.dumps(training), flush=True)
    device_name = torch.cuda.get_device_name() if cuda else machine()
    header = (f"Command: `{command_line('gpu_throughput.py', argv)}` ({time.perf_counter() - started:.0f} s; "
              f"{device_name}; torch {torch.__version__}; load average {load_average()}). Data: {data_label}; "
              f"{steps} timed steps after {warmup} warm-up (the numpy loop: {max(2, steps // 6)}), no evaluations. "
              f"\"vs one model\" = samples/s against the same architecture at batch {total} on the same device.")
    text = f"{SECTION}\n\n{header}\n\n{table(rows)}\n"
    if training:
        text += (f"\nA real run: 16 x {training['model']} RelaySGD, CIFAR-10, alpha 0.01, the default recipe, "
                 f"{training['epochs']:g} epochs in {training['wall_s']:.0f} s on this device: test accuracy mean "
                 f"{training['test_acc_mean']:.3f}, worst worker {training['test_acc_worst']:.3f}, averaged model "
                 f"{training['test_acc_avg_model']:.3f}.\n")
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "training": training, "header": header}, indent=1))
    results = args.results or (str(ROOT / "benchmarks" / "RESULTS.md") if args.device == "cuda" else None)
    if results and not args.no_results:
        write_section(Path(results), SECTION, text)


if __name__ == "__main__":
    main()
