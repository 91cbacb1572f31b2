"""Figures explain themselves: trees drawn as trees, every CLI figure titled with the run and the
command, diverged runs and zero consensus said in the figure."""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.figure  # noqa: E402
import networkx as nx  # noqa: E402
import pytest  # noqa: E402

from relay_ray import cli  # noqa: E402
from relay_ray.metrics import plot_curves  # noqa: E402
from relay_ray.topology import binary_tree, bfs_tree, make_graph, tree_layout, tree_root  # noqa: E402


@pytest.mark.parametrize("tree", [
    nx.path_graph(16), binary_tree(16), binary_tree(16, mirrored=True), bfs_tree(make_graph("social", 32)),
    nx.random_labeled_tree(40, seed=3),
], ids=["chain", "binary", "binary-mirrored", "bfs-social", "random"])
def test_tree_layout_places_every_node_one_level_below_its_parent(tree):
    root = tree_root(tree)
    pos = tree_layout(tree)
    assert set(pos) == set(tree.nodes)
    depth = nx.single_source_shortest_path_length(tree, root)
    for node, (x, y) in pos.items():
        assert y == -depth[node]
    for parent, child in nx.bfs_edges(tree, root):
        assert pos[child][1] == pos[parent][1] - 1
    # no two nodes on one spot, and siblings side by side under their parent
    assert len(set(pos.values())) == len(pos)
    for node in tree.nodes:
        children = [c for c in tree.neighbors(node) if depth[c] == depth[node] + 1]
        if children:
            xs = [pos[c][0] for c in children]
            assert min(xs) <= pos[node][0] <= max(xs)


def test_a_long_chain_is_drawn_from_its_centre():
    pos = tree_layout(nx.path_graph(3000))
    assert min(y for _, y in pos.values()) == -1500  # drawn from its centre: two branches of 1500


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved during the test: (path, suptitle, all its texts)."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def record(fig, path, *args, **kwargs):
        title = fig._suptitle.get_text() if fig._suptitle is not None else ""
        texts = [t.get_text() for t in fig.texts] + [ax.get_title() for ax in fig.axes] + \
            [ax.get_xlabel() for ax in fig.axes]
        name = Path(path if isinstance(path, (str, Path)) else path.name)  # or the file an atomic write renames
        name = name.with_name(re.sub(r"^\.(.+)\.\d+\.tmp$", r"\1", name.name))
        saved.append((str(name), title, "\n".join(texts)))
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return saved


def test_every_figure_of_the_cli_is_titled_with_the_run_and_the_command(figures, tmp_path, capsys):
    assert cli.main(["topology", "--tree", "double-binary", "--workers", "16", "--plot", str(tmp_path / "t.png")]) == 0
    assert cli.main(["run", "--backend", "local", "--dataset", "digits", "--workers", "8", "--steps", "20",
                     "--alpha", "0.1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert cli.main(["compare", "--backend", "local", "--dataset", "digits", "--workers", "8", "--steps", "20",
                     "--algorithms", "relaysgd,allreduce", "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    assert cli.main(["partition", "--dataset", "digits", "--workers", "8", "--plot", str(tmp_path / "p.png")]) == 0
    err = capsys.readouterr().err
    titles = {str(Path(path).relative_to(tmp_path)): (title, texts)
              for path, title, texts in figures}
    assert set(titles) == {"t.png", "run/curves.png", "cmp/relaysgd/curves.png", "cmp/allreduce/curves.png",
                           "cmp/compare.png", "p.png"}, titles.keys()
    for name, (title, texts) in titles.items():  # each names its run and the command that made it
        assert "8 workers" in title + texts or "16 workers" in title + texts, name
        assert "relay-ray " in title + texts, name
    tree_title, tree_texts = titles["t.png"]
    assert "16 workers" in tree_title and "double-binary" in tree_title and "relay-ray topology" in tree_title
    assert "tree 1 of 2" in tree_texts and "tree 2 of 2" in tree_texts
    run_title = titles["run/curves.png"][0]
    assert "relaysgd, 8 workers, digits (alpha 0.1)" in run_title and "relay-ray run --backend local" in run_title
    compare_title, compare_texts = titles["cmp/compare.png"]
    assert "digits (alpha 1), 8 workers" in compare_title and "allreduce: complete (exact)" in compare_title
    assert "allreduce: consensus distance 0 at every step" in compare_texts  # off the log axis, and said so
    assert "8 workers" in titles["p.png"][0] + titles["p.png"][1]
    assert f"wrote {tmp_path / 'cmp'}/compare.md, compare.png" in err


def test_a_diverged_run_says_so_in_its_figure(figures, tmp_path):
    rows = [{"step": 10, "train_loss": 2.0, "test_acc_mean": 0.3, "test_acc_worst": 0.1, "test_acc_avg_model": 0.3,
             "consensus_distance": 0.5},
            {"step": 20, "train_loss": float("nan"), "test_acc_mean": 0.1, "test_acc_worst": 0.1,
             "test_acc_avg_model": 0.1, "consensus_distance": float("nan")}]
    plot_curves({"dsgd": rows, "d2": []}, tmp_path / "c.png", title="t")
    texts = figures[-1][2]
    assert "dsgd diverged: training loss non-finite at step 20" in texts
    assert "d2: no evaluation before the run stopped" in texts



def test_sweep_figure_fits_one_alpha_and_says_when_a_winner_sits_on_the_grid_edge(figures, tmp_path):
    import pandas as pd

    from relay_ray.sweep_file import parse_sweep
    from relay_ray.tune import best_per_group, plot_sweep

    sweep = parse_sweep({"name": "lrs", "base": {"dataset": "digits", "alpha": 0.01},
                         "search": {"algorithm": {"grid_search": ["relaysgd", "dsgd"]},
                                    "lr": {"grid_search": [0.02, 0.05, 0.1]}},
                         "metric": "test_acc_worst", "mode": "max"}, "lrs.yaml")
    frame = pd.DataFrame([{"algorithm": a, "topology": t, "alpha": 0.01, "lr": lr, "test_acc_worst": acc}
                          for a, t, accs in (("relaysgd", "chain tree", (0.90, 0.95, 0.93)),
                                             ("dsgd", "ring", (0.50, 0.60, 0.70)))
                          for lr, acc in zip((0.02, 0.05, 0.1), accs)])
    plot_sweep(frame, best_per_group(frame, sweep), sweep, tmp_path / "sweep.png")
    _, title, texts = figures[-1]
    assert "sweep lrs: 6 trials, max test_acc_worst" in title
    assert "dsgd, topology ring, alpha 0.01: best lr 0.1 is the grid's upper edge" in texts
    assert "relaysgd" not in texts.split("edge")[0].split("\n")[-1]  # relaysgd's best (0.05) is inside the grid
    assert "algorithm / topology (alpha 0.01)" in texts  # one alpha swept: bars, not a line through one point
    assert "lr (star: each group's best)" in texts
