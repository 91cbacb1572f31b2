import math

import pytest

from relay_ray.config import RunConfig
from relay_ray.errors import UserError


def test_lr_correction_applies_to_relaysgd_only():
    assert RunConfig(algorithm="relaysgd", backend="local").lr_scale(5.375) == 5.375
    assert RunConfig(algorithm="relaysgd", lr_correction="2.5", backend="local").lr_scale(5.375) == 2.5
    assert RunConfig(algorithm="relaysgd", lr_correction="none", backend="local").lr_scale(5.375) == 1.0
    assert RunConfig(algorithm="dsgd", lr_correction="2.5", backend="local").lr_scale(5.375) == 1.0


@pytest.mark.parametrize("setting,message", [
    (dict(num_workers="4"), "setting num_workers must be an integer, got '4'"),
    (dict(num_workers=4.5), "setting num_workers must be an integer, got 4.5"),
    (dict(lr="0.1"), "setting lr must be a number, got '0.1'"),
    (dict(decay_at=0.5), "setting decay_at must be a list of numbers, got 0.5"),
])
def test_a_config_built_in_python_gets_the_one_line_type_errors(setting, message):
    with pytest.raises(UserError) as error:
        RunConfig(dataset="digits", backend="local", **setting)
    assert str(error.value) == message


def test_a_config_built_in_python_takes_paths_tuples_and_inf():
    from pathlib import Path

    config = RunConfig(dataset="digits", backend="local", out=Path("runs/x"), decay_at=(0.5, 0.75), alpha="inf")
    assert config.out == "runs/x" and config.decay_at == [0.5, 0.75] and math.isinf(config.alpha)


def test_task_defaults_fill_unset_fields_only():
    config = RunConfig(dataset="digits", lr=0.2, backend="local")
    assert config.lr == 0.2 and config.model == "mlp" and config.epochs == 30 and config.steps is None
    quad = RunConfig(dataset="quadratics", backend="local")
    assert quad.steps == 3000 and quad.momentum == 0.0 and quad.num_workers == 16
    assert RunConfig(topology="social", backend="local").num_workers == 32


def test_yaml_round_trip_keeps_inf_alpha(tmp_path):
    config = RunConfig(alpha=math.inf, decay_at=[0.75, 0.9], backend="local")
    config.dump(tmp_path / "c.yaml")
    loaded = RunConfig.load(tmp_path / "c.yaml")
    assert loaded == config and math.isinf(loaded.alpha)


def test_unknown_yaml_key_is_a_user_error(tmp_path):
    (tmp_path / "c.yaml").write_text("algorithm: relaysgd\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown run setting\\(s\\): learning_rate"):
        RunConfig.load(tmp_path / "c.yaml")


def test_placement_plan_waits_only_for_a_cluster_that_can_grow():
    from relay_ray.config import EngineOptions
    from relay_ray.engine.placement import AUTOSCALING_PLACEMENT_TIMEOUT_S, PLACEMENT_TIMEOUT_S, plan

    head_only = [{"CPU": 0.0}]
    explicit = dict(workers_per_actor=4, cpus_per_actor=4)
    # a fixed cluster that holds the run: the default wait
    shape, timeout = plan(16, EngineOptions(**explicit), "cpu", [{"CPU": 16.0}], None)
    assert (shape.num_actors, timeout) == (4, PLACEMENT_TIMEOUT_S)
    # an autoscaler that publishes its capacity: checked against it, waited for 900 s
    shape, timeout = plan(16, EngineOptions(**explicit), "cpu", head_only, {"CPU": 16})
    assert (shape.num_actors, shape.cpus, timeout) == (4, 4.0, AUTOSCALING_PLACEMENT_TIMEOUT_S)
    with pytest.raises(UserError, match="but the cluster has 8"):
        plan(16, EngineOptions(**explicit), "cpu", head_only, {"CPU": 8})
    # one that does not (autoscaler v1): --placement-timeout says it will grow, with an explicit shape
    with pytest.raises(UserError, match="placement-timeout SECONDS waits for it"):
        plan(16, EngineOptions(**explicit), "cpu", head_only, None)
    shape, timeout = plan(16, EngineOptions(**explicit, placement_timeout=300), "cpu", head_only, None)
    assert (shape.num_actors, timeout) == (4, 300)
    with pytest.raises(UserError, match="give the actors' shape: --workers-per-actor K --cpus-per-actor C"):
        plan(16, EngineOptions(placement_timeout=300), "cpu", head_only, None)
    for bad in (0, -1, float("inf")):
        with pytest.raises(UserError, match="--placement-timeout must be a positive number of seconds"):
            EngineOptions(placement_timeout=bad)
