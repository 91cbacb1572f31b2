"""The README quickstart from Python: RelaySGD against D-SGD and all-reduce on highly non-iid digits
(16 workers, Dirichlet alpha = 0.01), on an embedded local Ray, offline.

    .venv/bin/python examples/quickstart.py
"""

from relay_ray import RunConfig, compare, run


def main() -> None:
    config = RunConfig(dataset="digits", num_workers=16, alpha=0.01, algorithm="relaysgd", out="runs/example")
    result = run(config, overwrite=True, progress=False)
    print(result.metrics[["step", "train_loss", "test_acc_worst", "test_acc_avg_model"]].to_string(index=False))
    print(f"final worst-worker accuracy {result.final['test_acc_worst']:.4f}; files in {result.path}")

    others = [RunConfig(dataset="digits", num_workers=16, alpha=0.01, algorithm=a) for a in ("dsgd", "allreduce")]
    comparison = compare([config, *others], out="runs/example-compare", progress=False)
    print(comparison.table)


if __name__ == "__main__":
    main()
