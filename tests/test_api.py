"""The Python API: results to work with, the CLI's errors and run-directory rules, exact resume."""

import numpy as np
import pandas as pd
import pytest

from relay_ray import RunConfig, UserError, compare, resume, run


def _config(tmp_path, name="run", **overrides):
    settings = dict(dataset="digits", num_workers=4, alpha=0.1, steps=20, eval_every=5, backend="local",
                    out=str(tmp_path / name))
    return RunConfig(**{**settings, **overrides})


def test_run_returns_metrics_summary_and_files(tmp_path):
    result = run(_config(tmp_path), progress=False)
    assert isinstance(result.metrics, pd.DataFrame)
    assert list(result.metrics["step"]) == [5, 10, 15, 20]
    assert result.final["step"] == 20 and result.final == result.summary["final"]
    assert result.metrics["test_acc_worst"].iloc[-1] == pytest.approx(result.final["test_acc_worst"])
    assert result.path == tmp_path / "run" and (result.path / "curves.png").exists()
    assert result.checkpoint is None  # no checkpoint_every


def test_the_api_names_are_functions_even_beside_same_named_modules():
    import relay_ray.comparison  # noqa: F401  (the module behind `relay-ray compare`)
    import relay_ray.sweep_file  # noqa: F401

    assert callable(relay_ray.compare) and relay_ray.compare.__module__ == "relay_ray.api"
    assert callable(relay_ray.sweep) and relay_ray.sweep.__module__ == "relay_ray.api"
    with pytest.raises(AttributeError):
        relay_ray.no_such_thing  # noqa: B018


def test_user_errors_are_the_clis_one_liners(tmp_path):
    with pytest.raises(UserError, match="unknown algorithm 'sgdx'"):
        run(_config(tmp_path, algorithm="sgdx"))
    run(_config(tmp_path), progress=False)
    with pytest.raises(UserError, match="already holds a run; give --resume"):
        run(_config(tmp_path), progress=False)  # never overwritten without asking
    assert run(_config(tmp_path), overwrite=True, progress=False).final["step"] == 20


def test_resume_gives_the_uninterrupted_numbers(tmp_path):
    whole = run(_config(tmp_path, "whole", checkpoint_every=10), progress=False)
    assert whole.checkpoint is not None and whole.checkpoint.name.endswith("20")
    # a run cut after its checkpoint at step 10: its later files removed, as a kill would leave it
    cut = _config(tmp_path, "cut", checkpoint_every=10, steps=20)
    run(cut, progress=False)
    for late in sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))[1:]:
        for path in late.iterdir():
            path.unlink()
        late.rmdir()
    (tmp_path / "cut" / "summary.json").unlink()
    metrics = tmp_path / "cut" / "metrics.jsonl"  # the rows after the checkpoint must be computed again
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:2]))  # steps 5, 10
    resumed = resume(tmp_path / "cut", progress=False)
    assert resumed.final["step"] == 20
    for key in ("train_loss", "test_acc_worst", "consensus_distance"):
        np.testing.assert_allclose(resumed.metrics[key], whole.metrics[key], rtol=1e-6)


def test_compare_returns_each_runs_result(tmp_path):
    configs = [_config(tmp_path, algorithm=a, out=None) for a in ("relaysgd", "allreduce")]
    comparison = compare(configs, out=str(tmp_path / "cmp"), progress=False)
    assert set(comparison.results) == {"relaysgd", "allreduce"}
    assert "| relaysgd |" in comparison.table and (comparison.path / "compare.png").exists()
    exact = comparison.results["allreduce"]
    assert (exact.metrics["consensus_distance"] == 0).all() and exact.summary["algorithm"] == "allreduce"
    assert all(c.out is None for c in configs)  # the caller's configs are left as they were
