"""The only Ray code of a run: actors holding worker groups, their placement, the driver loop."""

from relay_ray.engine.driver import Engine, connect, run_on_ray
from relay_ray.errors import WorkerFailure

__all__ = ["Engine", "WorkerFailure", "connect", "run_on_ray"]
