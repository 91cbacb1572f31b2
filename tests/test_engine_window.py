"""Back-pressure: the driver's in-flight window bounds the message objects alive in Ray."""

import pytest
import ray

from relay_ray.config import RunConfig
from relay_ray.engine import RayEngine
from relay_ray.experiment import build_experiment

pytestmark = pytest.mark.ray


def _max_live_refs(monkeypatch, window: int, steps: int) -> tuple[int, int]:
    """Run 16 workers for `steps` steps; sample Ray's own reference table on the driver every step."""
    config = RunConfig(algorithm="relaysgd", tree="chain", num_workers=16, dataset="quadratics", steps=steps,
                       eval_every=steps, backend="ray")
    engine = RayEngine(config, build_experiment(config), window=window)
    core_worker = ray._private.worker.global_worker.core_worker
    baseline = len(core_worker.get_all_reference_counts())
    samples = []
    submit = engine._submit_step

    def sampling_submit(outboxes):
        new = submit(outboxes)
        samples.append(len(core_worker.get_all_reference_counts()) - baseline)
        return new

    monkeypatch.setattr(engine, "_submit_step", sampling_submit)
    try:
        engine.run(progress=False)
    finally:
        engine.shutdown()
    directed_edges = sum(len(n) for n in engine.plan.neighbors)
    return max(samples), directed_edges


def test_window_bounds_live_messages(ray_local, monkeypatch):
    window = 4
    peak, directed_edges = _max_live_refs(monkeypatch, window, steps=500)
    print(f"window {window}: peak {peak} live refs, {directed_edges} messages per step")
    # each step creates one message per directed edge; the driver holds the newest `window + 1`
    # steps (the one just submitted plus the window it may run ahead), and each message is one
    # return ref plus the worker-owned object it points to
    bound = 2 * (window + 1) * directed_edges
    assert peak <= bound, f"{peak} live refs > {bound}"
    assert peak > 0


def test_without_window_refs_pile_up(ray_local, monkeypatch):
    """The same measurement can fail: with no back-pressure the driver races ahead."""
    peak, directed_edges = _max_live_refs(monkeypatch, window=10**6, steps=150)
    print(f"no window: peak {peak} live refs")
    assert peak > 2 * 5 * directed_edges
