"""The checks made before a run plans anything or starts Ray (pure; nothing here starts Ray)."""

import socket

import pytest
import torch

from relay_ray import cli, preflight, runner
from relay_ray.comparison import compare
from relay_ray.config import EngineOptions, RunConfig
from relay_ray.errors import UserError
from relay_ray.models import build_model
from relay_ray.simulate import simulate

GB = 1e9


def estimate(num_workers=16, num_cpus=2, workers_per_actor="auto", window=4, **settings):
    config = RunConfig(**{"dataset": "digits", "num_workers": num_workers, **settings})
    options = EngineOptions(workers_per_actor=workers_per_actor, window=window)
    return preflight.estimate_memory(config, options, num_cpus=num_cpus, num_gpus=0)


def refuse_planning(monkeypatch):
    """From here on, a run that gets as far as building its experiment (topology, data) or starting
    Ray fails the test."""
    import ray

    import relay_ray.comparison
    import relay_ray.experiment

    def refuse(*args, **kwargs):
        raise AssertionError("got past the pre-start checks")

    monkeypatch.setattr(relay_ray.experiment, "build_experiment", refuse)
    monkeypatch.setattr(relay_ray.comparison, "build_experiment", refuse)
    monkeypatch.setattr(ray, "init", refuse)


# ------------------------------------------------------------------------- the estimate


def test_parameter_count_is_the_real_models():
    """Counted on the meta device (nothing allocated), equal to the model a worker builds."""
    for model, shape in (("mlp", (1, 8, 8)), ("resnet20", (3, 32, 32))):
        real = sum(p.numel() for p in build_model(model, shape, 10).parameters())
        dataset = "digits" if shape[0] == 1 else "cifar10"
        assert estimate(model=model, dataset=dataset).num_params == real


def test_estimate_grows_linearly_in_workers_apart_from_planning():
    """Same 2 actors: each worker adds the same bytes; only the driver's n x n planning is quadratic."""
    low, mid, high = (estimate(num_workers=n, algorithm="relaysgd", tree="chain") for n in (100, 200, 300))
    assert low.num_actors == mid.num_actors == high.num_actors == 2
    assert low.per_worker == pytest.approx(high.per_worker, rel=0.02)  # shards shrink: 16 B per sample only
    linear = [e.total - e.planning for e in (low, mid, high)]
    assert linear[2] - linear[1] == pytest.approx(linear[1] - linear[0], rel=0.02)
    assert linear[1] - linear[0] == pytest.approx(100 * low.per_worker, rel=0.02)


def test_quickstart_fits_and_is_near_its_measured_memory():
    """The README quickstart (digits, 16 workers, 2 actors here) measured 1.7 GB (PSS of the driver,
    Ray's processes and both actors); the estimate must be in that range and fit a laptop."""
    quickstart = estimate(alpha=0.01)
    assert 1.2 * GB < quickstart.total < 2.5 * GB
    preflight.check_memory(quickstart, available=8 * GB)


def test_a_machine_too_small_is_refused_with_what_to_change():
    with pytest.raises(UserError, match=r"16 workers on 2 actors \(8 per actor\) need ~1\.\d GB .*this machine has "
                                        r"0\.5 GB available; raise --workers-per-actor"):
        preflight.check_memory(estimate(), available=0.5 * GB)
    preflight.check_memory(estimate(), available=None)  # where the machine cannot say: no check


def test_one_actor_per_worker_costs_a_process_each():
    packed, unpacked = estimate(num_workers=8), estimate(num_workers=8, workers_per_actor=1)
    assert (packed.num_actors, unpacked.num_actors) == (2, 8)
    assert unpacked.total - packed.total == pytest.approx(6 * preflight.ACTOR_BYTES)


def test_bigger_models_wider_trees_and_windows_cost_more_per_worker():
    mlp, vgg = estimate(), estimate(model="vgg11", dataset="cifar10")
    assert vgg.per_worker > 500 * mlp.per_worker
    chain, double = estimate(num_workers=64, tree="chain"), estimate(num_workers=64, tree="double-binary")
    assert double.per_worker > 1.5 * chain.per_worker  # one relay buffer and message per tree neighbour
    assert estimate(window=16).per_worker > 2 * estimate(window=4).per_worker


def test_gossip_keeps_one_copy_per_receiving_actor_not_per_neighbour():
    """All-reduce sends the same array to its n - 1 neighbours; it must not count n - 1 copies."""
    allreduce, ring = estimate(num_workers=256, algorithm="allreduce"), estimate(num_workers=256, algorithm="dsgd",
                                                                                   topology="ring")
    assert allreduce.per_worker == pytest.approx(ring.per_worker)
    # but the driver builds the complete graph: 256 * 255 / 2 edges instead of the ring's 256
    assert allreduce.planning - ring.planning == preflight.GRAPH_EDGE_BYTES * (256 * 255 // 2 - 256)


def test_local_backend_has_no_actors_and_no_ray_processes():
    local, on_ray = estimate(backend="local"), estimate()
    assert local.num_actors == 0
    assert on_ray.total - local.total > 2 * preflight.ACTOR_BYTES + preflight.RAY_DAEMON_BYTES


# ------------------------------------------------------------------------- where the checks run


def test_runner_refuses_before_planning(monkeypatch):
    refuse_planning(monkeypatch)
    monkeypatch.setattr(preflight, "available_memory", lambda: 0.1 * GB)
    with pytest.raises(UserError, match="this machine has 0.1 GB available"):
        runner.run(RunConfig(dataset="digits", num_workers=16), progress=False)
    with pytest.raises(UserError, match="--workers 5000: at most 4096 workers"):
        runner.run(RunConfig(dataset="digits", num_workers=5000), progress=False)


def test_a_resumed_run_is_checked_before_its_experiment_is_built(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    simulate(RunConfig(dataset="quadratics", num_workers=4, steps=4, checkpoint_every=2, backend="local",
                       out=str(out)), progress=False)
    refuse_planning(monkeypatch)
    monkeypatch.setattr(preflight, "available_memory", lambda: 0.1 * GB)
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--resume", str(out), "--backend", "ray", "--workers-per-actor", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert "4 workers on 4 actors (1 per actor) need ~" in lines[0] and "0.1 GB available" in lines[0]


def test_compare_checks_every_algorithm_and_its_out(tmp_path, monkeypatch):
    refuse_planning(monkeypatch)
    (tmp_path / "a_file").write_text("")
    configs = [RunConfig(dataset="digits", algorithm=a, num_workers=8) for a in ("relaysgd", "allreduce")]
    with pytest.raises(UserError, match="is a file, not a directory"):
        compare(configs, out_dir=str(tmp_path / "a_file"), progress=False)
    monkeypatch.setattr(preflight, "available_memory", lambda: 0.1 * GB)
    with pytest.raises(UserError, match="0.1 GB available"):
        compare(configs, out_dir=str(tmp_path / "cmp"), progress=False)


# ------------------------------------------------------------------------- address, device, out


@pytest.fixture
def listening():
    server = socket.create_server(("127.0.0.1", 0))
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_an_address_that_answers_passes_and_one_that_does_not_is_one_line(listening):
    preflight.check_reachable(listening)
    preflight.check_reachable(f"ray://{listening}")
    preflight.check_reachable("auto")  # Ray's to resolve
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(UserError, match=f"cannot reach Ray at 127.0.0.1:{port}: .*ray start --head"):
        preflight.check_reachable(f"127.0.0.1:{port}")


def test_a_cluster_run_skips_this_machines_memory_and_gpu(listening, monkeypatch):
    """With --address the actors live on the cluster: its memory and GPUs are not this machine's."""
    monkeypatch.setattr(preflight, "available_memory", lambda: 0.1 * GB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = RunConfig(dataset="digits", num_workers=16, device="cuda")
    preflight.check_run(config, address=listening)
    with pytest.raises(UserError, match="--device cuda, but torch sees no GPU"):
        preflight.check_run(config)
    monkeypatch.setenv("RAY_ADDRESS", listening)  # what ray.init would attach to
    preflight.check_run(config)


def test_out_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="is a file, not a directory"):
        preflight.check_out(str(tmp_path / "a_file"))
    preflight.check_out(str(tmp_path / "new" / "deeper"))  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="cannot write there"):
        preflight.check_out(str(tmp_path / "new"))
