"""Sweep files: validation before anything starts, and the shipped tune_configs/ (no Ray here)."""

from pathlib import Path

import pytest
import yaml

from relay_ray.errors import UserError
from relay_ray.sweep_file import load_sweep, parse_sweep

TUNE_CONFIGS = sorted((Path(__file__).parent.parent / "tune_configs").glob("*.yaml"))
BASE = {"dataset": "digits", "num_workers": 4, "steps": 30}


def sweep(**overrides):
    data = {"base": dict(BASE), "search": {"lr": {"grid_search": [0.05, 0.1]}}}
    data.update(overrides)
    return data


BAD_SWEEPS = [
    (sweep(serach={}), "unknown key(s) serach"),
    (sweep(loggers=["mlflow", "comet"]), "loggers: unknown --logger 'comet'"),
    (sweep(base={**BASE, "logger": "mlflow"}), "base: 'logger' is set by the sweep itself"),
    (sweep(search={"lrr": {"grid_search": [0.1]}}), "unknown run setting 'lrr'"),
    (sweep(search={"lr": {"uniformm": [0.1, 1]}}), "unknown kind 'uniformm'"),
    (sweep(search={"lr": {"uniform": [1.0, 0.1]}}), "lo must be < hi"),
    (sweep(search={"lr": {"loguniform": [0, 0.1]}}), "needs 0 < lo"),
    (sweep(search={"lr": {"uniform": [0.1]}}), "must be [lo, hi] numbers"),
    (sweep(search={"lr": {"grid_search": []}}), "non-empty list"),
    (sweep(search={"lr": [0.1, 0.2]}), "search.lr must be one of"),
    (sweep(search={"num_workers": {"uniform": [4, 8]}}), "integer setting"),
    (sweep(search={"algorithm": {"grid_search": ["relaysgd", "gossip"]}}), "algorithm=gossip"),
    (sweep(search={"out": {"grid_search": ["a"]}}), "'out' is set by the sweep itself"),
    (sweep(metric="accuracy"), "unknown metric 'accuracy'"),
    (sweep(mode="maximize"), "mode must be max or min"),
    (sweep(num_samples=0), "num_samples must be an integer >= 1"),
    (sweep(scheduler={"type": "hyperband"}), "scheduler must be"),
    (sweep(scheduler={"type": "asha", "grace": 1}), "unknown key(s) grace"),
    (sweep(scheduler={"type": "asha", "grace_period": -1}), "scheduler.grace_period must be a number > 0"),
    (sweep(resources={"cpus": 1}), "resources: unknown key(s) cpus"),
    (sweep(resources={"cpus_per_trial": 0}), "resources.cpus_per_trial must be a number > 0"),
    (sweep(resources={"cpus_per_worker": 0.1}), "resources: unknown key(s) cpus_per_worker"),
    (sweep(resources={"workers_per_actor": 0}), "resources.workers_per_actor must be auto or an integer >= 1"),
    (sweep(base={**BASE, "lr": 0.1}), "lr set in both base: and search:"),
    (sweep(base={**BASE, "backend": "local"}), "'backend' is set by the sweep itself"),
    (sweep(base={**BASE, "num_workers": 0}), "invalid run"),
    (sweep(name="my sweep"), "name may hold"),
    ([1, 2], "must be a mapping"),
]


@pytest.mark.parametrize("data, message", BAD_SWEEPS, ids=[m for _, m in BAD_SWEEPS])
def test_bad_sweep_is_one_line_error(data, message):
    with pytest.raises(UserError) as info:
        parse_sweep(data, "s.yaml")
    text = str(info.value)
    assert message in text and "\n" not in text


def test_yaml_is_never_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("base: !!python/object/apply:os.system ['touch pwned']\nsearch: {}\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_sweep(path)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read sweep file"):
        load_sweep(tmp_path / "nope.yaml")


def test_good_sweep_parses_with_defaults():
    s = parse_sweep(sweep(base={"dataset": "digits", "steps": 30}, search={"algorithm": {"grid_search": ["relaysgd", "dsgd"]},
                                  "num_workers": {"choice": [4, 8]}, "lr": {"loguniform": [0.01, 0.3]}}))
    assert (s.metric, s.mode, s.num_samples, s.scheduler) == ("test_acc_worst", "max", 1, {"type": "fifo"})
    assert s.candidate_worker_counts() == [4, 8]
    bundles = s.trial_bundles(4)
    assert bundles == [{"CPU": s.driver_cpus}, {"CPU": 1.0}]  # default: 1 CPU for the actors, so one actor


@pytest.mark.parametrize("resources, bundles", [
    ({"cpus_per_trial": 4}, [{"CPU": 1.0}] * 4),                       # auto: one actor per whole CPU
    ({"cpus_per_trial": 4, "workers_per_actor": 8}, [{"CPU": 4.0}]),   # one actor holds all 8 workers
    ({"cpus_per_trial": 0.8}, [{"CPU": 0.8}]),                        # under one CPU: one actor
    ({"cpus_per_trial": 4, "workers_per_actor": 3}, [{"CPU": 4 / 3}] * 3),  # 3 + 3 + 2
    ({"cpus_per_trial": 8, "gpus_per_trial": 2}, [{"CPU": 4.0, "GPU": 1.0}] * 2),  # auto: one actor per GPU
])
def test_trial_bundles_are_one_per_actor(resources, bundles):
    s = parse_sweep(sweep(base={**BASE, "num_workers": 8}, resources={"driver_cpus": 0.5, **resources}))
    assert s.trial_bundles(8) == [{"CPU": 0.5}] + bundles


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=[p.name for p in TUNE_CONFIGS])
def test_shipped_sweeps_are_valid(path):
    s = load_sweep(path)
    assert s.search, "a shipped sweep searches something"
    assert yaml.safe_load(path.read_text())["name"] == s.name


def test_shipped_sweeps_exist():
    names = {p.stem for p in TUNE_CONFIGS}
    assert {"quickstart", "lr_per_algorithm", "topologies", "heterogeneity"} <= names


def test_a_best_lr_on_the_grid_edge_is_flagged():
    from relay_ray.sweep_file import edge_notes, grid_edge

    assert [grid_edge(v, [0.05, 0.1, 0.2]) for v in (0.05, 0.1, 0.2)] == ["lower", "", "upper"]
    parsed = parse_sweep(sweep(search={"lr": {"grid_search": [0.05, 0.1, 0.2]}}), "s.yaml")
    best = [{"algorithm": "relaysgd", "alpha": 0.01, "lr": 0.2}, {"algorithm": "dsgd", "alpha": 0.01, "lr": 0.1},
            {"algorithm": "d2", "alpha": 1.0, "lr": 0.05}]
    notes = edge_notes(best, parsed, ("algorithm", "alpha"))
    assert notes == ["algorithm relaysgd, alpha 0.01: best lr 0.2 is the grid's upper edge; extend the grid above it",
                     "algorithm d2, alpha 1.0: best lr 0.05 is the grid's lower edge; extend the grid below it"]
