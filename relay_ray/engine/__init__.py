"""The only Ray code of a run: actors holding worker groups, their placement, the driver loop.

``Engine``, ``connect`` and ``run_on_ray`` import Ray when first used, so ``relay_ray.engine.placement``
(pure shape arithmetic, used to check sweep files) can be imported without it.
"""

from relay_ray.errors import WorkerFailure

__all__ = ["Engine", "WorkerFailure", "connect", "run_on_ray"]


def __getattr__(name: str):
    if name in ("Engine", "connect", "run_on_ray"):
        from relay_ray.engine import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'relay_ray.engine' has no attribute {name!r}")
