"""Communication graphs, spanning trees, gossip weights and their statistics (pure; no Ray).

Workers are the integers ``0 .. num_workers-1``.  Gossip algorithms talk over the edges of
a *graph*; relay algorithms talk over the edges of one or two spanning *trees* of it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np

from relay_ray.errors import UserError

GRAPHS = ("ring", "chain", "star", "complete", "torus", "binary-tree", "exponential", "exponential-one-peer",
          "exponential-directed", "social")
# graphs whose edges change with the step, or that are used in one direction only (DESIGN: time-varying plans)
TIME_VARYING = ("exponential-one-peer",)
DIRECTED = ("exponential-directed",)
TREES = ("auto", "chain", "binary", "double-binary", "bfs")
SOCIAL_NUM_WORKERS = 32
# The statistics of a topology are dense: the gossip matrix is n x n (8 n^2 bytes) and its spectral
# gap an O(n^3) eigen-decomposition; relay algorithms without --topology, and all-reduce, also build
# the complete graph (n^2 / 2 edges, ~170 B each in networkx).  At 4096 workers that took 30-50 s and
# up to 2.3 GB here (2 busy cores; `relay-ray topology` and a run's planning alike); 20000 workers
# were a MemoryError (3.2 GB per matrix) and 100000 was OOM-killed.  So larger counts are refused.
MAX_WORKERS = 4096


# --------------------------------------------------------------------------------------
# graphs


def make_graph(name: str, num_workers: int | None, topology_file: str | None = None) -> nx.Graph:
    """Build the communication graph ``name`` on ``num_workers`` nodes, or read ``topology_file``."""
    if topology_file is not None:
        graph = read_edge_list(topology_file, num_workers)
    else:
        if name not in GRAPHS:
            raise UserError(f"unknown topology {name!r}; choose one of {', '.join(GRAPHS)} or pass --topology-file")
        if name == "social":
            graph = nx.convert_node_labels_to_integers(nx.davis_southern_women_graph())
            graph = nx.Graph(graph.edges())
            if num_workers is not None and num_workers != graph.number_of_nodes():
                raise UserError(f"topology 'social' has {graph.number_of_nodes()} workers, got --workers {num_workers}")
        else:
            _check_num_workers(num_workers)
            graph = _named_graph(name, num_workers)
    _check_connected(graph, topology_file or name)
    return graph


def _check_num_workers(num_workers: int | None) -> None:
    if num_workers is None or num_workers < 2:
        raise UserError(f"need at least 2 workers, got {num_workers}")
    check_bounded(num_workers)


def check_bounded(num_workers: int) -> None:
    """One line, before any n x n structure exists, when ``num_workers`` is past ``MAX_WORKERS``."""
    if num_workers > MAX_WORKERS:
        gigabytes = 8 * num_workers ** 2 / 1e9
        raise UserError(f"--workers {num_workers}: at most {MAX_WORKERS} workers; the topology statistics use "
                        f"dense n x n matrices ({gigabytes:.1f} GB each at n = {num_workers}) and O(n^3) time")


def _named_graph(name: str, n: int) -> nx.Graph:
    if name == "ring":
        graph = nx.cycle_graph(n)
    elif name == "chain":
        graph = nx.path_graph(n)
    elif name == "star":
        graph = nx.star_graph(n - 1)
    elif name == "complete":
        graph = nx.complete_graph(n)
    elif name == "torus":
        rows = _torus_rows(n)
        grid = nx.grid_2d_graph(rows, n // rows, periodic=True)
        graph = nx.convert_node_labels_to_integers(grid, ordering="sorted")
    elif name == "binary-tree":
        graph = binary_tree(n)
    else:  # exponential (and the union of the one-peer / directed ones): i talks to i ± 2^k (SGP's graph)
        graph = nx.Graph(exponential_digraph(n))
    return nx.Graph(graph)


def exponential_hops(n: int) -> list[int]:
    """1, 2, 4, ... < n: the hops of the exponential graph (ceil(log2 n) of them)."""
    return [2 ** k for k in range(max(1, math.ceil(math.log2(n))))]


def exponential_digraph(n: int, hops: list[int] | None = None) -> nx.DiGraph:
    """i -> i + 2^k (mod n) for each hop: the static exponential graph, directed (Assran et al. 2019)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    for hop in hops or exponential_hops(n):
        graph.add_edges_from((i, (i + hop) % n) for i in range(n) if (i + hop) % n != i)
    return graph


def communication_schedule(name: str | None, graph: nx.Graph) -> list[nx.DiGraph]:
    """Who sends to whom at step t: ``schedule[t % len(schedule)]``, edges sender -> receiver.

    A static undirected graph is one entry with both directions of each edge; ``exponential-directed``
    one entry with i -> i + 2^k only; ``exponential-one-peer`` (Ying et al. 2021, arXiv:2110.13363)
    ceil(log2 n) entries, at step t the single edge i -> i + 2^(t mod ceil(log2 n)) per worker.
    ``graph`` is the undirected union (``make_graph``), the edges messages may use."""
    n = graph.number_of_nodes()
    if name == "exponential-one-peer":
        return [exponential_digraph(n, [hop]) for hop in exponential_hops(n)]
    if name == "exponential-directed":
        return [exponential_digraph(n)]
    return [graph.to_directed()]


def is_symmetric(schedule: list[nx.DiGraph]) -> bool:
    return len(schedule) == 1 and all(schedule[0].has_edge(j, i) for i, j in schedule[0].edges)


def mixing_matrices(schedule: list[nx.DiGraph]) -> list[np.ndarray]:
    """Doubly stochastic W_t per entry, W_t[i, j] = the weight of j's message in i's average:
    Metropolis-Hastings on an undirected graph; 1/(d + 1) on a directed graph where every worker
    receives from and sends to d others (the exponential ones).  Other directed graphs have none."""
    if is_symmetric(schedule):
        return [metropolis_hastings_weights(nx.Graph(schedule[0]))]
    matrices = []
    for digraph in schedule:
        degrees = {d for _, d in digraph.in_degree} | {d for _, d in digraph.out_degree}
        if len(degrees) != 1:
            raise UserError("this directed graph has unequal in- and out-degrees: no doubly stochastic weights; "
                            "use --algorithm sgp (push-sum)")
        (degree,) = degrees
        n = digraph.number_of_nodes()
        weights = np.eye(n) / (degree + 1)
        for sender, receiver in digraph.edges:
            weights[receiver, sender] = 1.0 / (degree + 1)
        matrices.append(weights)
    return matrices


def push_matrices(schedule: list[nx.DiGraph]) -> list[np.ndarray]:
    """Column stochastic P_t of push-sum (SGP): a sender keeps and sends equal shares, P[i, j] = 1/(out_j + 1)."""
    matrices = []
    for digraph in schedule:
        n = digraph.number_of_nodes()
        weights = np.diag([1.0 / (digraph.out_degree[j] + 1) for j in range(n)])
        for sender, receiver in digraph.edges:
            weights[receiver, sender] = 1.0 / (digraph.out_degree[sender] + 1)
        matrices.append(weights)
    return matrices


def consensus_rate(matrices: list[np.ndarray]) -> float:
    """Per step contraction of disagreement: ||W_P ... W_1 - 11^T/n||_2^(1/P) over one period of the
    schedule (|lambda_2| for one symmetric W; 0 when a period averages exactly)."""
    n = matrices[0].shape[0]
    product = np.eye(n)
    for weights in matrices:
        product = weights @ product
    norm = float(np.linalg.norm(product - np.full((n, n), 1.0 / n), 2))
    return max(norm, 0.0) ** (1.0 / len(matrices)) if norm > 1e-12 else 0.0


def _torus_rows(n: int) -> int:
    rows = int(math.isqrt(n))
    while n % rows:
        rows -= 1
    if rows < 2 or n // rows < 2:
        raise UserError(f"topology 'torus' needs a worker count that factors as r x c with r, c >= 2; got {n}")
    return rows


def read_edge_list(path: str, num_workers: int | None = None) -> nx.Graph:
    """Read ``u v`` edges, one per line, ``#`` comments; nodes must be ``0 .. n-1``."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"topology file {path} does not exist")
    if not file.is_file():
        kind = "a directory" if file.is_dir() else "not a regular file (a device, pipe or socket)"
        raise UserError(f"topology file {path} is {kind}; give a text file of 'u v' lines")
    try:
        text = file.read_text()
    except UnicodeDecodeError:
        raise UserError(f"topology file {path} is not a text file of 'u v' lines") from None
    except OSError as exc:
        raise UserError(f"topology file {path}: cannot read it ({exc.strerror})") from None
    edges, seen = [], {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2 or not all(re.fullmatch(r"-?[0-9]+", f) for f in fields):
            raise UserError(f"{path}:{lineno}: malformed edge line {raw.strip()!r}; expected two node ids 'u v'")
        u, v = int(fields[0]), int(fields[1])
        if u == v:
            raise UserError(f"{path}:{lineno}: self-loop {u} {v} is not an edge")
        first = seen.setdefault(frozenset((u, v)), lineno)
        if first != lineno:  # a repeated edge is likely a typo for a missing one: refuse rather than merge
            raise UserError(f"{path}:{lineno}: edge {u} {v} repeats line {first} (edges are undirected)")
        edges.append((u, v, lineno))
    if not edges:
        raise UserError(f"topology file {path} has no edges")
    nodes = {u for u, _, _ in edges} | {v for _, v, _ in edges}
    n = num_workers if num_workers is not None else max(nodes) + 1
    _check_num_workers(n)
    for u, v, lineno in edges:
        for node in (u, v):
            if not 0 <= node < n:
                raise UserError(f"{path}:{lineno}: node id {node} out of range 0..{n - 1}")
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from((u, v) for u, v, _ in edges)
    return graph


def _check_connected(graph: nx.Graph, what: str) -> None:
    if graph.number_of_nodes() < 2:
        raise UserError(f"need at least 2 workers, got {graph.number_of_nodes()}")
    if not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise UserError(f"topology {what} is disconnected ({parts} components); every worker must be reachable")


# --------------------------------------------------------------------------------------
# spanning trees


def binary_tree(n: int, mirrored: bool = False) -> nx.Graph:
    """Binary tree of the RelaySum paper: heap order on 1.., with worker 0 hanging off worker 1.

    The root (1) has children 2 and 3 plus the extra worker 0, so 16 workers fit in depth 3
    (diameter 6).  ``mirrored`` relabels i -> n-1-i: leaves of one tree are mostly inner nodes
    of the other, which balances bytes per worker for double binary trees.
    """
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edge(0, 1)
    graph.add_edges_from((child // 2, child) for child in range(2, n))
    if mirrored:
        graph = nx.relabel_nodes(graph, {i: n - 1 - i for i in range(n)})
    return graph


def b_ary_tree(n: int, branching: int) -> nx.Graph:
    """Root 0, parent(k) = (k - 1) // B: the pull/push tree of BTPP (You & Pu 2024)."""
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(((k - 1) // branching, k) for k in range(1, n))
    return graph


def bfs_tree(graph: nx.Graph) -> nx.Graph:
    """Shortest-path tree from a centre node (minimum eccentricity), using only graph edges.

    Ties are broken by the smallest node id so the tree is deterministic.
    """
    root = min(nx.center(graph))
    tree = nx.Graph()
    tree.add_nodes_from(graph.nodes)
    depth = {root: 0}
    frontier = [root]
    while frontier:
        next_frontier = []
        for parent in frontier:
            for child in sorted(graph.neighbors(parent)):
                if child not in depth:
                    depth[child] = depth[parent] + 1
                    tree.add_edge(parent, child)
                    next_frontier.append(child)
        frontier = sorted(next_frontier)
    return tree


def check_tree_in_graph(tree: nx.Graph, graph: nx.Graph, what: str, hint: str) -> None:
    """One line naming the first edge of ``tree`` that ``graph`` lacks."""
    missing = next((e for e in tree.edges if not graph.has_edge(*e)), None)
    if missing is not None:
        raise UserError(f"{what} needs edge {missing[0]}-{missing[1]} that the topology lacks; {hint}")


def spanning_trees(kind: str, graph: nx.Graph, graph_given: bool = True) -> list[nx.Graph]:
    """The tree(s) RelaySum relays over: one tree, or two for ``double-binary``.

    With ``graph_given`` the trees must use only edges of ``graph``; otherwise (no --topology)
    the tree itself defines who may talk to whom.
    """
    n = graph.number_of_nodes()
    if kind not in TREES:
        raise UserError(f"unknown tree {kind!r}; choose one of {', '.join(TREES)}")
    if kind == "auto":
        kind = "bfs" if graph_given else "chain"
    if kind == "chain":
        trees = [nx.path_graph(n)]
    elif kind == "binary":
        trees = [binary_tree(n)]
    elif kind == "double-binary":
        trees = [binary_tree(n), binary_tree(n, mirrored=True)]
    else:
        trees = [bfs_tree(graph)]
    if graph_given:
        for tree in trees:
            check_tree_in_graph(tree, graph, f"tree {kind!r}",
                                "use --tree bfs (a tree of the given topology) or --topology complete")
    for tree in trees:
        assert nx.is_tree(tree), "spanning tree construction produced a non-tree"
    return trees


# --------------------------------------------------------------------------------------
# gossip weights and statistics


def metropolis_hastings_weights(graph: nx.Graph) -> np.ndarray:
    """W_ij = 1/(max(deg_i, deg_j)+1) on edges, W_ii = 1 - sum_j W_ij (symmetric, doubly stochastic)."""
    n = graph.number_of_nodes()
    weights = np.zeros((n, n))
    for i, j in graph.edges:
        weights[i, j] = weights[j, i] = 1.0 / (max(graph.degree[i], graph.degree[j]) + 1)
    weights[np.diag_indices(n)] = 1.0 - weights.sum(axis=1)
    return weights


def spectral_gap(weights: np.ndarray) -> float:
    """1 - |lambda_2| of a symmetric gossip matrix (1 for exact averaging, -> 0 for slow mixing)."""
    moduli = np.sort(np.abs(np.linalg.eigvalsh(weights)))[::-1]
    return float(1.0 - moduli[1])


def max_delay(trees: list[nx.Graph]) -> int:
    """The longest tree distance: after this many steps every worker has every model."""
    return max(nx.diameter(tree, usebounds=True) for tree in trees)  # bounds: O(n)-ish on trees, not n BFSs


def _sum_of_distances(tree: nx.Graph) -> int:
    """sum over ordered pairs (i, k) of d(i, k) in a tree, in O(n): each edge lies on the path of
    every pair it separates, s * (n - s) pairs for a side of s nodes, counted in both directions."""
    n = tree.number_of_nodes()
    root = next(iter(tree.nodes))
    parent = {root: None}
    order = [root]
    for node in order:  # BFS: every node comes after its parent
        for child in tree.neighbors(node):
            if child not in parent:
                parent[child] = node
                order.append(child)
    size = dict.fromkeys(order, 1)
    total = 0
    for node in reversed(order[1:]):  # leaves first: a subtree's size is known before its parent's
        size[parent[node]] += size[node]
        total += size[node] * (n - size[node])
    return 2 * total


def lr_correction(trees: list[nx.Graph]) -> float:
    """RelaySGD's learning-rate correction 1/|x_inf| of the scalar impulse response (DESIGN §1).

    Every worker applies a -1 update at step 0 and the RelaySum-of-models mechanism runs with
    x0 = 0.  Worker k's half-step model reaches worker i after delta_ik = max(d(i,k)-1, 0) steps
    and counts as x0 until then, so x_i^{t+1} = (1/n) sum_k xhalf_k^{t - delta_ik}.  The final-value
    theorem on this delay system gives x_inf = -1 / (1 + sum_ik delta_ik / n^2): updates are damped
    by the average relay delay.  (16 workers: chain 5.375, binary tree 3.32.)  With several trees
    each carries an equal share of the coordinates, so their limits are averaged.
    ``tests/test_topology.py`` checks this against the message-level mechanism.
    """
    limits = []
    for tree in trees:
        n = tree.number_of_nodes()
        # sum_ik max(d_ik - 1, 0) = sum_{i != k} d_ik - n(n - 1): every pair i != k is at distance >= 1
        delays = _sum_of_distances(tree) - n * (n - 1)
        limits.append(1.0 / (1.0 + delays / n**2))
    return float(1.0 / np.mean(limits))


@dataclass(frozen=True)
class TopologyStats:
    num_workers: int
    diameter: int
    max_degree: int
    spectral_gap: float
    lr_correction: float
    tree_edges: list[list[tuple[int, int]]]
    graph_edges: list[tuple[int, int]]
    period: int = 1  # steps after which a time-varying schedule repeats
    consensus_rate: float | None = None  # per step, over a period (``consensus_rate``)

    def to_dict(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "diameter": self.diameter,
            "max_degree": self.max_degree,
            "spectral_gap": self.spectral_gap,
            "period": self.period,
            "consensus_rate": self.consensus_rate,
            "lr_correction": self.lr_correction,
            "tree_edges": [[list(e) for e in edges] for edges in self.tree_edges],
            "graph_edges": [list(e) for e in self.graph_edges],
        }


def topology_stats(graph: nx.Graph, trees: list[nx.Graph], name: str | None = None) -> TopologyStats:
    """Statistics a user needs to pick a topology: delays, degrees, mixing, lr correction.

    ``diameter`` and ``max_degree`` are those of the relay tree(s) (what RelaySGD sees);
    ``spectral_gap`` is that of the gossip matrix of the graph (what D-SGD sees).  For a time-varying
    or directed graph (``name``): ``period`` and the per-step ``consensus_rate`` of the product of the
    period's mixing matrices, and ``spectral_gap`` = 1 - that rate.
    """
    check_bounded(graph.number_of_nodes())
    union = nx.compose_all(trees)
    schedule = communication_schedule(name, graph)
    if is_symmetric(schedule):
        gap = spectral_gap(metropolis_hastings_weights(graph))
        rate = 1.0 - gap
    else:
        rate = consensus_rate(mixing_matrices(schedule))
        gap = 1.0 - rate
    return TopologyStats(
        num_workers=graph.number_of_nodes(),
        diameter=max_delay(trees),
        max_degree=max(d for _, d in union.degree),
        spectral_gap=gap,
        lr_correction=lr_correction(trees),
        tree_edges=[sorted(tuple(sorted(e)) for e in tree.edges) for tree in trees],
        graph_edges=sorted(tuple(sorted(e)) for e in graph.edges),
        period=len(schedule),
        consensus_rate=rate,
    )


def tree_root(tree: nx.Graph) -> int:
    """The node a tree is drawn from: its centre (smallest id on a tie), the root of the paper's
    binary trees and of ``bfs_tree``."""
    return min(nx.center(tree))


def tree_layout(tree: nx.Graph, root: int | None = None) -> dict[int, tuple[float, float]]:
    """A hierarchical layout: depth d at y = -d, leaves at consecutive x in depth-first order, every
    inner node centred over its children, so each node sits below its parent."""
    root = tree_root(tree) if root is None else root
    children: dict[int, list[int]] = {}
    depth, order, stack = {root: 0}, [], [root]
    while stack:  # depth-first, children in id order (no recursion: a chain is n deep)
        node = stack.pop()
        order.append(node)
        children[node] = sorted(child for child in tree.neighbors(node) if child not in depth)
        for child in children[node]:
            depth[child] = depth[node] + 1
        stack.extend(reversed(children[node]))
    x: dict[int, float] = {}
    leaves = (node for node in order if not children[node])
    for i, leaf in enumerate(leaves):
        x[leaf] = float(i)
    for node in reversed(order):  # children before their parent
        if children[node]:
            x[node] = (min(x[c] for c in children[node]) + max(x[c] for c in children[node])) / 2
    return {node: (x[node], -float(depth[node])) for node in order}


TREE_COLOURS = ("tab:blue", "tab:orange")


def plot_topology(graph: nx.Graph, trees: list[nx.Graph], path: str, title: str = "") -> None:
    """One panel per relay tree, drawn as a tree from its root (``tree_layout``), with the gossip
    graph's other edges in grey; the title says what was drawn."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry is touched
    from matplotlib.lines import Line2D

    n = graph.number_of_nodes()
    width = min(max(5.0, 0.45 * n), 14.0)
    fig = Figure(figsize=(width * len(trees), 5.5))
    axes = fig.subplots(1, len(trees), squeeze=False)
    tree_edges = {frozenset(e) for tree in trees for e in tree.edges}
    others = [e for e in graph.edges if frozenset(e) not in tree_edges]
    for i, (ax, tree) in enumerate(zip(axes[0], trees)):
        pos = tree_layout(tree)
        colour = TREE_COLOURS[i % len(TREE_COLOURS)]
        nx.draw_networkx_edges(graph, pos, edgelist=others, ax=ax, edge_color="#d0d0d0", width=0.8)
        nx.draw_networkx_edges(tree, pos, ax=ax, edge_color=colour, width=2.5)
        nx.draw_networkx_nodes(tree, pos, ax=ax, node_color="white", edgecolors="black",
                               node_size=260 if n <= 64 else 40)
        if n <= 64:
            nx.draw_networkx_labels(tree, pos, ax=ax, font_size=8)
        ax.set_title(f"tree {i + 1} of {len(trees)}: root {tree_root(tree)}, depth "
                     f"{max(-y for _, y in pos.values()):.0f}" if len(trees) > 1 else
                     f"relay tree: root {tree_root(tree)}, depth {max(-y for _, y in pos.values()):.0f}", fontsize=9)
        handles = [Line2D([], [], color=colour, lw=2.5, label=f"tree {i + 1} edges (relays)")]
        if others:
            handles.append(Line2D([], [], color="#d0d0d0", lw=1, label="other graph edges (gossip only)"))
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.12), fontsize=8, ncol=2,
                  frameon=False)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
