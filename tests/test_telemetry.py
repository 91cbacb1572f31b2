"""The Ray dashboard's view of a run: named actors, and relay_ray's gauges on Ray's Prometheus endpoint."""

import socket
import time
import urllib.request

import pytest
import ray

from relay_ray.config import EngineOptions, RunConfig
from relay_ray.engine import Engine
from relay_ray.engine.telemetry import actor_name
from relay_ray.experiment import build_experiment

pytestmark = pytest.mark.ray


def test_actor_names_say_which_workers_they_hold():
    assert actor_name("latest-3fa2c1", 1, [8, 9, 10, 11]) == "latest-3fa2c1-g1[8:12]"
    assert actor_name("r", 0, [9, 3, 7]) == "r-g0[3,7,9]"
    assert actor_name("r", 2, [4, 5], generation=1) == "r-g2[4:6]-r1"


@pytest.fixture
def ray_with_metrics():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 500})
    yield port
    ray.shutdown()


def _scrape(port: int, needle: str, timeout_s: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        lines = [line for line in text.splitlines() if needle in line and not line.startswith("#")]
        if lines:
            return lines
        time.sleep(0.5)
    return []


def test_named_actors_and_prometheus_gauges(ray_with_metrics, tmp_path):
    config = RunConfig(algorithm="relaysgd", num_workers=8, dataset="digits", alpha=0.1, model="logreg", steps=30,
                       eval_every=10, seed=3, backend="ray", out=str(tmp_path / "latest"))
    seen = {}

    def look(engine, step):
        if step == 5:  # mid-run: every actor is reachable by its name
            seen["names"] = [actor_name(engine.run_name, g, ranks) for g, ranks in enumerate(engine.layout.groups)]
            seen["found"] = [ray.get_actor(name) for name in seen["names"]]

    engine = Engine(config, build_experiment(config), EngineOptions(workers_per_actor=4), on_step=look)
    try:
        summary = engine.run(progress=False)
    finally:
        engine.shutdown()
    assert seen["names"] == [f"{engine.run_name}-g0[0:4]", f"{engine.run_name}-g1[4:8]"]
    assert engine.run_name.startswith("latest-") and len(seen["found"]) == 2
    tag = f'run="{engine.run_name}"'
    steps = [line for line in _scrape(ray_with_metrics, "ray_relay_ray_step{") if tag in line]
    assert steps and float(steps[-1].rsplit(" ", 1)[1]) == 30.0, steps
    consensus = [line for line in _scrape(ray_with_metrics, "ray_relay_ray_consensus_distance{") if tag in line]
    assert consensus and float(consensus[-1].rsplit(" ", 1)[1]) == pytest.approx(
        summary["final"]["consensus_distance"], rel=1e-5)
    for gauge in ("workers", "restarts", "bytes_sent_per_worker"):
        assert [line for line in _scrape(ray_with_metrics, f"ray_relay_ray_{gauge}{{") if tag in line], gauge
