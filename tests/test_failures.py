"""--on-failure continue / replace: a worker actor is killed (or its node removed) mid-run and nobody
rewinds.  Every worker group logs each (rank, step) it computes; a recovery in place computes no
step twice, the run finishes, and on the README's digits alpha = 0.01 run the final worst-worker
accuracy stays within 2 points of the undisturbed run."""

import collections

import pytest
import ray

from relay_ray.config import EngineOptions, RunConfig
from relay_ray.engine import Engine
from relay_ray.errors import UserError
from relay_ray.experiment import build_experiment
from relay_ray.group import WorkerGroup
from relay_ray.respan import CannotRespan, survivor_plan
from relay_ray.simulate import simulate

QUICKSTART = dict(algorithm="relaysgd", num_workers=16, dataset="digits", alpha=0.01)  # the README's first command


def _logging_group(log):
    """A worker group that appends "rank step" for every step its workers compute."""

    class LoggedGroup(WorkerGroup):
        def step(self, has_inbox, *bundles):
            sent = super().step(has_inbox, *bundles)
            with open(log, "a") as file:
                file.write("".join(f"{rank} {self.step_count}\n" for rank in self.ranks))
            return sent

    return LoggedGroup


def _once(step, action):
    """An ``on_step`` hook that runs ``action(engine)`` the first time step ``step`` is submitted."""
    done = []

    def hook(engine, submitted):
        if submitted == step and not done:
            done.append(step)
            action(engine)
    return hook


def _computed(log) -> dict[int, list[int]]:
    steps = collections.defaultdict(list)
    for line in log.read_text().splitlines():
        rank, step = map(int, line.split())
        steps[rank].append(step)
    return steps


def _run(config, options, hook, log):
    engine = Engine(config, build_experiment(config), options, group_cls=_logging_group(log), on_step=hook)
    try:
        return engine.run(progress=False)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def undisturbed():
    return simulate(RunConfig(**QUICKSTART, backend="local", out=None), progress=False)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["continue", "replace"])
def test_killed_actor_no_step_twice_and_worst_worker_within_2_points(ray_local, undisturbed, mode, tmp_path, capsys):
    config = RunConfig(**QUICKSTART, backend="ray", out=str(tmp_path / "run"))
    log = tmp_path / "steps.log"
    # 8 actors of 2 workers; actor 1 (workers 2 and 3) is killed half-way through the 90 steps
    summary = _run(config, EngineOptions(workers_per_actor=2, on_failure=mode),
                   _once(45, lambda engine: ray.kill(engine.actors[1])), log)
    total = summary["steps"]
    computed = _computed(log)
    twice = {rank: [s for s, c in collections.Counter(steps).items() if c > 1] for rank, steps in computed.items()}
    assert not any(twice.values()), twice
    assert summary["restarts"] == 0 and len(summary["failures"]) == 1, summary
    failure = summary["failures"][0]
    resumed_at = failure["step"]
    assert 40 <= resumed_at < total
    for rank in set(range(16)) - {2, 3}:
        assert sorted(computed[rank]) == list(range(1, total + 1)), rank
    for rank in (2, 3):
        died_after = max(s for s in computed[rank] if s <= resumed_at)
        before = list(range(1, died_after + 1))
        after = list(range(resumed_at + 1, total + 1)) if mode == "replace" else []
        assert sorted(computed[rank]) == before + after, rank
    if mode == "continue":
        assert failure["lost_workers"] == [2, 3] and summary["workers_at_end"] == 14
    else:
        assert failure["replaced"] == [2, 3] and summary["workers_at_end"] == 16
    assert summary["final"]["step"] == total
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("relay-ray: workers [2, 3] died")]
    assert len(notes) == 1 and "no rollback" in notes[0], notes
    assert summary["final"]["test_acc_worst"] >= undisturbed["final"]["test_acc_worst"] - 0.02, \
        (summary["final"], undisturbed["final"])


# ---------------------------------------------------------------------------- the survivors' plan (pure)
def _experiment(**overrides):
    settings = dict(algorithm="relaysgd", num_workers=8, dataset="quadratics", steps=10, backend="local", out=None)
    return build_experiment(RunConfig(**{**settings, **overrides}))


def test_survivor_plan_re_spans_the_tree_over_the_survivors():
    experiment = _experiment(tree="double-binary")
    survivors = survivor_plan(experiment, [0, 1, 4, 5, 6, 7])
    plan = survivors.plan
    assert plan.num_members == 6 and plan.members == (0, 1, 4, 5, 6, 7)
    assert plan.neighbors[2] == () and plan.neighbors[3] == ()
    for tree in plan.tree_neighbors:  # each tree spans the survivors: 5 edges, connected
        edges = {tuple(sorted((i, j))) for i in range(8) for j in tree[i]}
        assert len(edges) == 5 and not any({2, 3} & set(e) for e in edges)
    assert survivors.lr_scale > 1  # the correction of the new tree


def test_survivor_plan_gossip_and_allreduce_weights_average_over_the_survivors():
    for algorithm, overrides in (("dsgd", dict(topology="ring")), ("allreduce", {})):
        plan = survivor_plan(_experiment(algorithm=algorithm, **overrides), [0, 1, 2, 3, 4, 5, 6]).plan
        weights = plan.gossip_weights
        assert weights[7].sum() == 0 and weights[:, 7].sum() == 0
        assert weights[:7, :7].sum(axis=1) == pytest.approx([1.0] * 7)
        assert (weights == weights.T).all()


def test_survivor_plan_refuses_a_topology_that_falls_apart():
    experiment = _experiment(algorithm="dsgd", topology="chain")
    with pytest.raises(CannotRespan, match="2 pieces"):
        survivor_plan(experiment, [0, 1, 2, 4, 5, 6, 7])


@pytest.mark.parametrize("overrides", [dict(algorithm="btpp"), dict(algorithm="dsgd", topology="exponential-one-peer"),
                                       dict(algorithm="sgp", topology="exponential-directed")])
def test_survivor_plan_refuses_plans_fixed_by_the_worker_count(overrides):
    """BTPP's B-ary tree and the exponential schedules have no survivors' version: the engine restarts."""
    with pytest.raises(CannotRespan, match="no plan for the survivors"):
        survivor_plan(_experiment(**overrides), [0, 1, 2, 3, 4, 5, 6])


def test_a_reconfigured_worker_keeps_its_consensus_lr():
    from relay_ray.worker import Worker

    experiment = _experiment(algorithm="choco", topology="ring", consensus_lr=0.9)
    worker = Worker(experiment.worker_spec(0), experiment.task_data)
    worker.reconfigure(survivor_plan(experiment, [0, 1, 2, 3, 4, 5, 6]).plan, 1.0, None)
    assert worker.algorithm.consensus_lr == 0.9


def test_on_failure_is_checked():
    with pytest.raises(UserError, match="on_failure"):
        EngineOptions(on_failure="ignore")
