"""Everything the driver decides once per run, before any worker exists (pure; no Ray).

Both executions (``simulate`` in one process and the Ray ``engine``) build the same
``Experiment`` and hand each worker the same ``WorkerSpec``, so their numbers match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import numpy as np

from relay_ray.algorithms import CommPlan, build_plan
from relay_ray.config import RunConfig
from relay_ray.data import ArrayDataset, dirichlet_partition, load_dataset, paper_partition
from relay_ray.quadratics import QuadraticsTask, make_quadratics
from relay_ray.topology import TopologyStats, b_ary_tree, check_tree_in_graph, make_graph, spanning_trees, topology_stats


@dataclass
class WorkerSpec:
    """What a worker needs besides the (shared, large) task data."""

    config: RunConfig
    rank: int
    plan: CommPlan
    shard: np.ndarray | None
    lr_scale: float
    total_steps: int
    warmup_steps: int = 0


@dataclass
class Experiment:
    config: RunConfig
    graph: nx.Graph
    trees: list[nx.Graph]
    plan: CommPlan
    stats: TopologyStats
    lr_scale: float
    task_data: ArrayDataset | QuadraticsTask
    shards: list[np.ndarray] | None
    total_steps: int
    warmup_steps: int = 0  # --warmup-steps, or --warmup-epochs in steps

    def worker_spec(self, rank: int) -> WorkerSpec:
        shard = self.shards[rank] if self.shards is not None else None
        return WorkerSpec(self.config, rank, self.plan, shard, self.lr_scale, self.total_steps, self.warmup_steps)


def build_topology(config: RunConfig) -> tuple[nx.Graph, list[nx.Graph]]:
    """The graph and relay tree(s); without --topology, relay algorithms may use any link."""
    n = config.num_workers
    if config.algorithm == "allreduce":  # exact averaging: every worker hears every other
        graph = nx.complete_graph(n)
        return graph, spanning_trees("bfs", graph)
    if config.algorithm == "btpp":  # its own B-ary tree, inside --topology if one is given
        tree = b_ary_tree(n, config.branching)
        if config.topology_file is None and config.topology is None:
            return tree, [tree]
        graph = make_graph(config.topology or "file", n, config.topology_file)
        check_tree_in_graph(tree, graph, f"btpp's {config.branching}-ary tree",
                            "drop --topology (btpp talks over its tree only) or use complete")
        return graph, [tree]
    if config.topology_file is not None or config.topology is not None:
        graph = make_graph(config.topology or "file", n, config.topology_file)
        return graph, spanning_trees(config.tree, graph, graph_given=True)
    if config.uses_trees:
        trees = spanning_trees(config.tree, nx.complete_graph(n), graph_given=False)
        return nx.compose_all(trees), trees
    graph = make_graph("ring", n)
    return graph, spanning_trees("bfs", graph)


def build_experiment(config: RunConfig, task_data: ArrayDataset | QuadraticsTask | None = None) -> Experiment:
    """Topology, communication plan, lr correction, data and shards; all user errors surface here."""
    graph, trees = build_topology(config)
    topology = config.topology if config.topology_file is None else None
    plan = build_plan(config.algorithm, graph, trees, topology)
    stats = topology_stats(graph, trees, topology)
    lr_scale = config.lr_scale(stats.lr_correction)
    n = config.num_workers
    if config.dataset == "quadratics":
        task_data = task_data or make_quadratics(n, config.heterogeneity, config.seed)
        shards = None
        steps_per_epoch = 1
    else:
        task_data = task_data or load_dataset(config.dataset, config.data_dir)
        split = paper_partition if config.partition == "paper" else dirichlet_partition
        shards = split(task_data.y_train, n, config.alpha, config.seed)
        steps_per_epoch = max(1, math.ceil(min(len(s) for s in shards) / config.batch_size))
    total_steps = config.steps if config.steps is not None else max(1, round(config.epochs * steps_per_epoch))
    warmup_steps = config.warmup_steps or round(config.warmup_epochs * steps_per_epoch)
    return Experiment(config, graph, trees, plan, stats, lr_scale, task_data, shards, total_steps, warmup_steps)
