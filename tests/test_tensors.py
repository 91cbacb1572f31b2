"""Device-resident math: every algorithm with torch-tensor state computes what it computes with numpy
state (bit for bit on the CPU), checkpoints move between the kinds, and a process's workers batched in
one vmap call compute the gradients the loop computes.  The CUDA tests run where a GPU is."""

import numpy as np
import pytest
import torch

from relay_ray import tensors
from relay_ray.config import RunConfig
from relay_ray.experiment import build_experiment
from relay_ray.problems import ClassificationProblem, batched_loss_and_grad
from relay_ray.simulate import simulate
from relay_ray.worker import Worker, step_workers
from tests.test_group import groups_after

ALGORITHM_LAYOUTS = [("relaysgd", dict(tree="double-binary")), ("relaysgd", dict(tree="chain", relay_fill="current")),
                     ("relaysgd", dict(tree="double-binary", relay_fill="last")),
                     ("relaysum-grad", dict(tree="double-binary")), ("allreduce", {}), ("dsgd", dict(topology="ring")),
                     ("dsgd-qgm", dict(topology="ring")), ("d2", dict(topology="ring")),
                     ("gradient-tracking", dict(topology="chain")), ("relaysgd-qgm", dict(tree="double-binary")),
                     ("sgp", dict(topology="star")), ("momentum-tracking", dict(topology="exponential-one-peer")),
                     ("qg-gutm", dict(topology="ring")), ("btpp", dict(branching=3)),
                     ("relaysgd", dict(tree="double-binary", local_steps=3)), ("gut", dict(topology="ring")),
                     ("choco", dict(topology="ring")), ("choco", dict(topology="ring", compression="randk:0.2")),
                     ("relaysgd", dict(tree="double-binary", compression="topk:0.1")),
                     ("relaysum-grad", dict(tree="chain", compression="sign")), ("allreduce", dict(compression="qsgd:8")),
                     ("allreduce", dict(compression="topk:0.1"))]
IDS = [f"{a}-{'-'.join(map(str, layout.values())) or 'exact'}" for a, layout in ALGORITHM_LAYOUTS]


def _run_group(experiment, steps: int) -> list:
    return groups_after(experiment, 3, steps)


@pytest.mark.parametrize("algorithm,layout", ALGORITHM_LAYOUTS, ids=IDS)
def test_torch_state_computes_what_numpy_state_computes(algorithm, layout):
    """Quadratics, 8 workers in 3 groups, 20 % drops, momentum: torch state (CPU) equals numpy state exactly,
    and the state really is torch in one case and numpy in the other."""
    common = dict(algorithm=algorithm, num_workers=8, dataset="quadratics", steps=25, backend="local",
                  drop_prob=0.2, seed=4, momentum=0.9, weight_decay=1e-3, **layout)
    on_torch = _run_group(build_experiment(RunConfig(tensors="torch", **common)), 25)
    on_numpy = _run_group(build_experiment(RunConfig(tensors="numpy", **common)), 25)
    torch_workers = [w for g in on_torch for w in g.workers]
    numpy_workers = [w for g in on_numpy for w in g.workers]
    assert all(torch.is_tensor(w.params()) and torch.is_tensor(w.algorithm.optimizer.buffer) for w in torch_workers)
    assert all(isinstance(w.params(), np.ndarray) for w in numpy_workers)
    for a, b in zip(torch_workers, numpy_workers):
        np.testing.assert_array_equal(a.host_params(), b.host_params())
        np.testing.assert_array_equal(tensors.to_host(a.algorithm.optimizer.buffer), b.algorithm.optimizer.buffer)
    assert not np.allclose(numpy_workers[0].host_params(), numpy_workers[-1].host_params())


CHECKPOINT_CASES = [("relaysgd", dict(tree="double-binary")), ("d2", dict(topology="ring")),
                    ("choco", dict(topology="ring", compression="qsgd:8")),
                    ("relaysgd", dict(tree="double-binary", compression="topk:0.1")),
                    ("allreduce", dict(compression="sign"))]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            _assert_same_state(value, b[key])
        elif isinstance(value, np.ndarray):
            assert isinstance(b[key], np.ndarray), key
            np.testing.assert_array_equal(b[key], value)


@pytest.mark.parametrize("algorithm,layout", CHECKPOINT_CASES,
                         ids=[f"{a}-{'-'.join(map(str, layout.values()))}" for a, layout in CHECKPOINT_CASES])
def test_checkpoints_move_between_numpy_and_torch_state(algorithm, layout):
    """A worker's state dict is host numpy whatever the kind (compression copies and error memory
    included), and loads into the other kind exactly."""
    common = dict(algorithm=algorithm, num_workers=8, dataset="quadratics", steps=10, backend="local", seed=1, **layout)
    source = [w for g in _run_group(build_experiment(RunConfig(tensors="numpy", **common)), 10) for w in g.workers]
    experiment = build_experiment(RunConfig(tensors="torch", **common))
    for w in source:
        state = w.state_dict()
        assert isinstance(state["algorithm"]["params"], np.ndarray)
        target = Worker(experiment.worker_spec(w.rank), experiment.task_data)
        target.load_state_dict(state)
        assert torch.is_tensor(target.params())
        np.testing.assert_array_equal(target.host_params(), w.host_params())
        _assert_same_state(state["algorithm"], target.state_dict()["algorithm"])


def _digits_config(**overrides):
    settings = dict(algorithm="relaysgd", num_workers=4, dataset="digits", alpha=0.1, model="cnn", steps=6,
                    eval_every=3, seed=2, backend="local", tensors="torch")
    return RunConfig(**{**settings, **overrides})


def test_vmap_batched_workers_compute_the_loops_gradients():
    """Four CNN workers on digits: one vmap call gives each worker's loss and gradient of the loop path
    (float tolerance), and draws the same batches (the generators end in the same state)."""
    config = _digits_config()
    experiment = build_experiment(config)
    looped = [Worker(experiment.worker_spec(r), experiment.task_data) for r in range(4)]
    batched = [Worker(experiment.worker_spec(r), experiment.task_data) for r in range(4)]
    for step in range(3):
        expected = [w.problem.loss_and_grad(w.params()) for w in looped]
        got = batched_loss_and_grad([w.problem for w in batched], [w.params() for w in batched])
        for (loss_a, grad_a), (loss_b, grad_b) in zip(expected, got):
            assert torch.is_tensor(grad_b) and grad_b.shape == grad_a.shape
            assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-5)
            torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)
        for a, b in zip(looped, batched):
            assert torch.equal(a.problem.generator.get_state(), b.problem.generator.get_state())
            a.advance(*expected[a.rank])
            b.advance(*got[b.rank])


def test_batched_simulator_run_matches_the_loop_run(tmp_path):
    """--worker-batching vmap against loop on a whole (short) run: the same metrics within float tolerance."""
    rows = {}
    for batching in ("loop", "vmap"):
        summary = simulate(_digits_config(worker_batching=batching, out=str(tmp_path / batching)), progress=False)
        rows[batching] = summary["final"]
    for key in ("test_acc_mean", "test_acc_worst", "consensus_distance", "train_loss"):
        a, b = rows["loop"].get(key), rows["vmap"].get(key)
        assert a is not None and b == pytest.approx(a, rel=1e-3, abs=1e-5), key


def test_unequal_batches_fall_back_to_the_loop():
    """A shard smaller than the batch gives that worker a smaller batch: vmap cannot stack it, the loop runs."""
    config = _digits_config(num_workers=4)
    experiment = build_experiment(config)
    workers = [Worker(experiment.worker_spec(r), experiment.task_data) for r in range(4)]
    workers[0].problem.batch_size = 5
    messages = step_workers(workers, [[] for _ in workers], batched=True)
    assert len(messages) == 4 and all(len(m) == len(w.algorithm.neighbors) for m, w in zip(messages, workers))
    assert workers[0].problem.position == 5


def test_as_state_and_like_keep_kind_and_values():
    x0 = np.arange(6, dtype=np.float32)
    state = tensors.as_state(x0, "torch")
    assert torch.is_tensor(state) and state.dtype == torch.float32
    readonly = np.arange(6, dtype=np.float32)
    readonly.setflags(write=False)  # as an object-store buffer arrives
    moved = tensors.like(readonly, state)
    assert torch.is_tensor(moved) and torch.equal(moved, state)
    assert isinstance(tensors.like(state, x0), np.ndarray)
    message = tensors.concat([state, tensors.count_entry(3, state)])
    count = tensors.count_at(message, 6)
    assert torch.is_tensor(count) and int(count) == 3
    assert tensors.count_at(tensors.to_host(message), 6) == 3


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cpu_and_gpu_runs_agree(tmp_path):
    """CNN on digits, 4 workers, RelaySGD: the GPU run (torch state and training set on the device,
    vmap-batched workers) ends where the CPU run (numpy state, loop) does, within float tolerance."""
    cpu = simulate(_digits_config(device="cpu", tensors="numpy", steps=30, eval_every=10, out=str(tmp_path / "c")),
                   progress=False)["final"]
    gpu = simulate(_digits_config(device="cuda", steps=30, eval_every=10, out=str(tmp_path / "g")),
                   progress=False)["final"]
    for key in ("test_acc_mean", "test_acc_worst", "train_loss"):
        assert gpu[key] == pytest.approx(cpu[key], rel=2e-2, abs=2e-2), key


@cuda
def test_gpu_state_never_leaves_the_device():
    config = _digits_config(device="cuda")
    experiment = build_experiment(config)
    workers = [Worker(experiment.worker_spec(r), experiment.task_data) for r in range(4)]
    outboxes = step_workers(workers, [[] for _ in workers], batched=True)
    assert all(m.is_cuda for out in outboxes for m in out)
    assert all(w.params().is_cuda and w.algorithm.optimizer.buffer.is_cuda for w in workers)
    assert isinstance(workers[0].problem, ClassificationProblem) and workers[0].problem.train_on_device is not None


COMPRESSED_ON_DEVICE = [("relaysgd", dict(tree="double-binary"), "topk:0.1"), ("choco", dict(topology="ring"), "randk:0.2"),
                        ("allreduce", {}, "sign"), ("relaysum-grad", dict(tree="chain"), "qsgd:8")]


def _compressed_on(device: str, algorithm: str, layout: dict, spec: str, tmp_path) -> tuple[dict, list]:
    """A compressed logreg run on ``device`` (torch state there; numpy state on the CPU), and one step's
    messages and error-feedback copies from fresh workers on it."""
    tensor_kind = "torch" if device == "cuda" else "numpy"
    config = _digits_config(model="logreg", algorithm=algorithm, compression=spec, device=device, tensors=tensor_kind,
                            steps=20, eval_every=10, out=str(tmp_path / device), **layout)
    final = simulate(config, progress=False)["final"]
    experiment = build_experiment(RunConfig(**{**config.to_dict(), "out": None}))
    workers = [Worker(experiment.worker_spec(r), experiment.task_data) for r in range(4)]
    outboxes = step_workers(workers, [[] for _ in workers], batched=False)
    return final, [m for out in outboxes for m in out] + _copies(workers)


def _copies(workers) -> list:
    algorithms = [w.algorithm for w in workers]
    return [d.copy for a in algorithms for side in ("sent", "heard", "sent_hat", "heard_hat")
            for d in getattr(a, side, {}).values()] + [a.error for a in algorithms if getattr(a, "error", None) is not None]


@cuda
@pytest.mark.parametrize("algorithm,layout,spec", COMPRESSED_ON_DEVICE, ids=[f"{a}-{c}" for a, _, c in COMPRESSED_ON_DEVICE])
def test_compressed_messages_stay_on_the_gpu_and_agree_with_the_cpu(algorithm, layout, spec, tmp_path):
    """Encoding, decoding and the error-feedback copies run on the GPU; the run ends where the CPU's does."""
    cpu, _ = _compressed_on("cpu", algorithm, layout, spec, tmp_path)
    gpu, on_device = _compressed_on("cuda", algorithm, layout, spec, tmp_path)
    assert on_device and all(torch.is_tensor(m) and m.is_cuda for m in on_device)
    for key in ("test_acc_mean", "test_acc_worst", "train_loss"):
        assert gpu[key] == pytest.approx(cpu[key], rel=2e-2, abs=2e-2), key



@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_missing_message_is_lost_on_either_kind(kind):
    """The engine hands a dead neighbour's message in as None: lost (filled with x0), never an array."""
    config = RunConfig(algorithm="relaysgd", num_workers=4, dataset="quadratics", steps=5, backend="local",
                       tree="chain", tensors=kind)
    experiment = build_experiment(config)
    worker = Worker(experiment.worker_spec(1), experiment.task_data)
    worker.step()
    half = tensors.to_host(worker.algorithm.half).copy()
    worker.receive(*[None] * worker.degree)
    np.testing.assert_allclose(worker.host_params(), half / 4, rtol=1e-6)  # (x^{1/2} + 3 x0) / n with x0 = 0
    assert np.any(half != 0)
