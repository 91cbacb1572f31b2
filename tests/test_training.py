"""Real training on digits: the headline claim at small scale (DESIGN: RelaySGD ~ all-reduce >> D-SGD)."""

import numpy as np
import pytest

from relay_ray.config import RunConfig
from relay_ray.experiment import build_experiment
from relay_ray.simulate import simulate


def _final(**settings):
    config = RunConfig(dataset="digits", num_workers=16, alpha=0.01, backend="local", seed=0, **settings)
    return simulate(config, progress=False)["final"]


def test_relaysgd_beats_dsgd_on_heterogeneous_digits():
    relay = _final(algorithm="relaysgd")
    gossip = _final(algorithm="dsgd", topology="ring")
    assert relay["test_acc_avg_model"] >= 0.90
    assert relay["test_acc_worst"] >= 0.90
    assert gossip["test_acc_worst"] < relay["test_acc_worst"] - 0.10
    assert gossip["consensus_distance"] > 10 * relay["consensus_distance"]


def test_warmup_epochs_is_a_linear_ramp_over_that_many_epochs_of_steps():
    from relay_ray.optim import learning_rate

    config = RunConfig(dataset="digits", num_workers=4, epochs=4, warmup_epochs=1.5, decay_at=[0.75, 0.9],
                       backend="local")
    experiment = build_experiment(config)
    per_epoch = experiment.total_steps / 4
    assert experiment.warmup_steps == round(1.5 * per_epoch)
    assert experiment.worker_spec(0).warmup_steps == experiment.warmup_steps
    lrs = [learning_rate(s, 1.0, experiment.total_steps, experiment.warmup_steps, (0.75, 0.9))
           for s in range(experiment.total_steps)]
    ramp = lrs[:experiment.warmup_steps]
    assert ramp[0] == pytest.approx(1 / experiment.warmup_steps) and ramp[-1] == 1.0
    assert np.allclose(np.diff(ramp), 1 / experiment.warmup_steps)
    assert lrs[experiment.warmup_steps] == 1.0 and lrs[-1] == pytest.approx(0.01)
