"""relay_ray: decentralized deep learning on Ray (RelaySGD and the gossip baselines on one engine).

The Python API (see relay_ray.api): ``run``, ``resume``, ``compare``, ``sweep``, with ``RunConfig`` and
``EngineOptions``.  Imported on first use, so ``import relay_ray`` (and the CLI's start) stays cheap.
"""

_API = {"run": "relay_ray.api", "resume": "relay_ray.api", "compare": "relay_ray.api", "sweep": "relay_ray.api",
        "Result": "relay_ray.api", "Comparison": "relay_ray.api", "Sweep": "relay_ray.api",
        "RunConfig": "relay_ray.config", "EngineOptions": "relay_ray.config", "UserError": "relay_ray.errors"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'relay_ray' has no attribute {name!r}")
