"""What a figure says about itself: the run it shows and the command that made it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

STAMP_CHARS = 160  # one line under a figure; longer commands are cut with "..."


# The command a CLI invocation runs (set by ``cli.main``); empty for library callers, whose figures
# are stamped with their script's own command line.
COMMAND: list[str] = []


def command_stamp(argv: list[str] | None = None) -> str:
    """The command line that made a figure (``relay-ray ...`` for the CLI), cut to one line."""
    if argv is None:
        argv = COMMAND or [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    text = shlex.join(argv)
    return text if len(text) <= STAMP_CHARS else text[:STAMP_CHARS - 3] + "..."


def layout_name(config) -> str:
    """The communication structure: ``graph / tree`` for relays, the gossip graph, or exact all-reduce."""
    if config.algorithm == "allreduce":
        return "complete (exact)"
    if config.uses_trees:
        return f"{config.topology or config.topology_file or 'any link'} / {config.tree}"
    if config.algorithm == "btpp":
        return f"{config.branching}-ary tree"
    return config.topology or config.topology_file or "ring"


def run_title(config) -> str:
    """``relaysgd, 16 workers, digits (alpha 0.01), any link / auto`` — the run a figure shows."""
    alpha = "" if config.dataset == "quadratics" else f" (alpha {config.alpha:g})"
    return f"{config.algorithm}, {config.num_workers} workers, {config.dataset}{alpha}, {layout_name(config)}"
