"""User-facing errors: the CLI turns these into one line and exit code 2."""


class UserError(ValueError):
    """A mistake in what the user asked for (flag, file, data location); never a bug."""


class DataError(UserError):
    """Data that is missing or unreadable; the message says where data goes."""


class WorkerFailure(RuntimeError):
    """A worker actor (or its node) died mid-run: not the user's mistake, but one clear line.

    ``dead``: the ranks of the workers that died (empty when a worker raised instead: a replay
    would raise again, so the engine does not restart for it)."""

    def __init__(self, message: str, dead: tuple[int, ...] = ()):
        super().__init__(message)
        self.dead = tuple(dead)


class Diverged(RuntimeError):
    """A worker's loss or model became non-finite: the run stops (the CLI exits with code 3).

    ``row``: the evaluation that found it (already in metrics.jsonl); ``summary``: the run's summary,
    set by the loop that stopped (summary.json is written with ``diverged``)."""

    def __init__(self, message: str, row: dict | None = None):
        super().__init__(message)
        self.row = row
        self.summary: dict | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM (how Slurm and Kubernetes stop a job), raised in the main thread like Ctrl-C, so the
    same cleanup runs: the newest complete checkpoint stays, Ray is stopped; the CLI exits 143."""


def raise_terminated(signum, frame) -> None:
    raise Terminated()
