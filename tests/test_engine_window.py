"""Back-pressure: the driver's in-flight window bounds the message objects alive in Ray."""

import pytest
import ray

from relay_ray.config import EngineOptions, RunConfig
from relay_ray.engine import Engine

pytestmark = pytest.mark.ray


def _max_live_refs(window: int, steps: int, k) -> tuple[int, int]:
    """Run 16 workers for `steps` steps; sample Ray's own reference table on the driver after every
    submitted step (the engine's on_step hook)."""
    config = RunConfig(algorithm="relaysgd", tree="chain", num_workers=16, dataset="quadratics", steps=steps,
                       eval_every=steps, backend="ray")
    core_worker = ray._private.worker.global_worker.core_worker  # private: no public API counts live refs
    baseline = len(core_worker.get_all_reference_counts())
    samples = []
    engine = Engine(config, options=EngineOptions(window=window, workers_per_actor=k),
                    on_step=lambda engine, step: samples.append(len(core_worker.get_all_reference_counts()) - baseline))
    try:
        engine.run(progress=False)
    finally:
        engine.shutdown()
    crossing = sum(len(links) for links in engine.layout.outgoing)  # bundles that leave an actor per step
    return max(samples), crossing


@pytest.mark.parametrize("k", [1, 3])
def test_window_bounds_live_messages(ray_local, k):
    window = 4
    peak, crossing = _max_live_refs(window, steps=100, k=k)
    print(f"K={k} window {window}: peak {peak} live refs, {crossing} crossing bundles per step")
    # each step creates one bundle per pair of neighbouring actors; the driver holds the newest
    # `window + 1` steps (the one just submitted plus the window it may run ahead), and each bundle
    # is one return ref plus, for small bundles, the ray.put object it points to
    bound = 2 * (window + 1) * crossing
    assert 0 < peak <= bound, f"{peak} live refs > {bound}"


def test_without_window_refs_pile_up(ray_local):
    """The same measurement can fail: with no back-pressure the driver races ahead."""
    peak, crossing = _max_live_refs(window=10**6, steps=150, k=4)
    print(f"no window: peak {peak} live refs")
    assert peak > 2 * 5 * crossing
