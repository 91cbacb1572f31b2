"""Real training on digits: the headline claim at small scale (DESIGN: RelaySGD ~ all-reduce >> D-SGD)."""

from relay_ray.config import RunConfig
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
