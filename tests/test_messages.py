"""Messages and models never land in the driver, whatever K and the model size.

The mlp's messages and models (~38 kB) are small enough for Ray to return them inline to the caller,
the driver, if an actor returned them directly; the engine ``ray.put``s those first (DESIGN §4)."""

import time

import pytest
import ray

from relay_ray.config import EngineOptions
from relay_ray.engine import Engine
from relay_ray.experiment import build_experiment
from tests.test_engine import _config

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("k", [1, 3], ids=["K=1", "K=3"])
def test_no_message_or_model_lands_in_the_driver(ray_local, k, tmp_path):
    """Sample the driver's in-process object memory after every submitted step and every evaluation
    (the engine's on_step / on_progress hooks): it may hold refs and metric dicts, never a message."""
    config = _config("relaysgd", dict(tree="chain"), model="mlp", out=str(tmp_path))
    experiment = build_experiment(config)
    message_bytes = 4 * (experiment.task_data.x_train[0].size * 128 + 128 + 128 * 10 + 10)  # a whole model
    core_worker = ray._private.worker.global_worker.core_worker  # private: no public API reports this
    samples = []

    def sample(*_):
        time.sleep(0.05)  # let returns of finished tasks arrive
        samples.append(core_worker.get_local_memory_store_bytes_used())

    engine = Engine(config, experiment, EngineOptions(workers_per_actor=k), on_step=sample, on_progress=sample)
    try:
        engine.run(progress=False)
    finally:
        engine.shutdown()
    assert len(samples) >= config.steps
    assert max(samples) < message_bytes, f"the driver held {max(samples)} bytes; one message is {message_bytes}"


def test_the_probe_sees_a_message_in_the_driver(ray_local):
    """The same probe can fail: a model-sized array fetched into the driver shows up in it."""
    core_worker = ray._private.worker.global_worker.core_worker
    before = core_worker.get_local_memory_store_bytes_used()

    @ray.remote
    def model():
        import numpy as np

        return np.ones(9000, dtype=np.float32)  # 36 kB: Ray returns it inline to the caller

    ref = model.remote()
    ray.wait([ref])
    time.sleep(0.05)
    assert core_worker.get_local_memory_store_bytes_used() - before >= 36000
