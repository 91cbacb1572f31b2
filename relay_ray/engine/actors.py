"""The Ray side of a worker group: ``GroupActor`` holds one group and is wrapped by ``ray.remote`` once.

The group class is a constructor argument (``group_cls``): tests hand in failing doubles and
benchmarks relay-only groups, with no monkeypatching.  This is also where the off-driver rule
for messages lives: crossing messages and partial sums go back as task return values, which Ray
writes once into the shared-memory store and the receiving task reads in place; but Ray returns
values of 100 KB or less *inline to the caller*, the driver, so those are ``ray.put`` first and
the driver only ever holds refs, whatever the model size (DESIGN §4).
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from relay_ray.group import WorkerGroup
from relay_ray.straggle import Straggle

# Ray's max_direct_call_object_size (100 KiB): returns up to this size are inlined to the caller
INLINE_RETURN_BYTES = 100 * 1024


def off_driver(value: np.ndarray | list[np.ndarray]):
    """``value`` (an array or a bundle of arrays) as a task return that never lands in the driver's
    memory: itself when Ray stores it in the object store anyway, else the ref of a ``ray.put``."""
    nbytes = value.nbytes if isinstance(value, np.ndarray) else sum(m.nbytes for m in value)
    return value if nbytes > INLINE_RETURN_BYTES else ray.put(value)


def resolved(values) -> list:
    """Task arguments with the refs made by ``off_driver`` fetched (one ``ray.get`` for all)."""
    values = list(values)
    at = [i for i, v in enumerate(values) if isinstance(v, ray.ObjectRef)]
    for i, fetched in zip(at, ray.get([values[i] for i in at])):
        values[i] = fetched
    return values


def _returns(values: list):
    """A list as Ray task returns: ``num_returns`` = max(1, len), a group with none returns None."""
    if len(values) > 1:
        return tuple(values)
    return values[0] if values else None


class GroupActor:
    """One worker group in an actor; every method is one task of the engine's dataflow."""

    def __init__(self, group_cls: type[WorkerGroup], *group_args, straggle: Straggle | None = None,
                 transport: str = "object-store"):
        self.group = group_cls(*group_args)
        self.straggle = straggle
        self.transport = transport
        self.outgoing: list[list[torch.Tensor]] = []  # with Ray Direct Transport: this step's bundles, as tensors
        if transport == "nccl":
            self.group.host_bundles = False  # they go GPU to GPU

    def step(self, has_inbox: bool, *bundles):
        """Returns the steps taken (a small int the driver reads to notice a dead worker within its
        window), then one bundle per outgoing link.  ``--straggle`` delays are slept here, outside
        the pure code, so they cost wall time and never change a number."""
        if self.straggle is not None:
            time.sleep(self.straggle.group_seconds(self.group.ranks, self.group.step_count + 1))
        bundles_out = self.group.step(has_inbox, *resolved(bundles))
        if self.transport != "object-store":  # kept here; the driver asks for each with outbox_<transport>
            self.outgoing = [[torch.as_tensor(m) for m in bundle] for bundle in bundles_out]
            return self.group.step_count
        return _returns([self.group.step_count, *[off_driver(bundle) for bundle in bundles_out]])

    # Ray Direct Transport: the bundle for outgoing link k of the last step, sent actor to actor by Ray
    # (gloo over TCP; nccl between GPUs) when the receiving actor's task needs it; never via the driver.
    @ray.method(tensor_transport="gloo")
    def outbox_gloo(self, link: int) -> list:
        return self.outgoing[link]

    @ray.method(tensor_transport="nccl")
    def outbox_nccl(self, link: int) -> list:
        return self.outgoing[link]

    def receive(self, *bundles) -> None:
        self.group.receive(*resolved(bundles))

    def evaluate(self) -> list[dict]:
        return self.group.evaluate()

    def params_sum(self):
        return off_driver(self.group.params_sum())

    def mean_model(self, num_workers: int, *sums):
        """The averaged model from every group's partial sum (G arrays here, never n models)."""
        return off_driver(np.sum(resolved(sums), axis=0) / num_workers)

    def squared_deviation(self, mean) -> float:
        return self.group.squared_deviation(*resolved([mean]))

    def evaluate_params(self, params) -> float:
        return self.group.evaluate_params(*resolved([params]))

    def save_checkpoint(self, directory: str) -> list[dict]:
        return self.group.save_checkpoint(directory)

    def load_checkpoint(self, directory: str) -> int:
        return self.group.load_checkpoint(directory)

    def status(self) -> tuple[int, bool]:
        return self.group.status()

    def params_of(self, rank: int):
        return off_driver(self.group.params_of(rank))

    def set_fill(self, fill) -> None:
        self.group.set_fill(fill)

    def reconfigure(self, *args) -> None:
        self.group.reconfigure(*args)

    def adopt(self, step: int, fill, *models) -> None:
        self.group.adopt(step, fill, *resolved(models))

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def ping(self) -> int:
        return self.group.ranks[0]


RemoteGroupActor = ray.remote(GroupActor)
