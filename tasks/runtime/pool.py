"""A pool of Ray actors that each load the model once and run plain functions on it.

``ModelActor.run(fn, *args)`` calls ``fn(worker, *args)`` with the actor's ``tasks.core.worker.Worker``;
the functions live beside their tasks (``tasks/directions/collect.py: collect_part`` ...), so the same
work runs without Ray in tests and go-to-definition follows every call. The pool offers typed calls:
``call`` (one worker, wait), ``start`` (one worker, a ``Pending`` result), ``each`` (every worker) and
``map`` (items sharded over the workers, a few shards each so progress moves, results in order).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tasks.core.config import ModelOptions, RayConfig, Resources
from tasks.core.errors import CompalignError
from tasks.core.progress import Progress
from tasks.core.worker import Worker
from tasks.runtime.cluster import init_ray

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


@ray.remote
class ModelActor:
    """Holds one loaded model (a ``Worker``) and runs functions on it."""

    def __init__(self, model: str, options: ModelOptions, threads: int) -> None:
        import torch

        from tasks.core.logs import quiet_libraries
        from tasks.core.model import load_model

        quiet_libraries()
        torch.set_num_threads(max(1, threads))
        logging.basicConfig(level=logging.WARNING)
        self.worker = Worker(load_model(model, options))

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.worker, *args)


def identity(worker: Worker) -> str:
    return worker.loaded.identity


class Pending(Generic[T]):
    """A call started on one worker; ``get()`` waits for its result."""

    def __init__(self, ref: Any, worker: int) -> None:
        self.ref, self.worker = ref, worker

    def get(self) -> T:
        return ray.get(self.ref)


def split(items: Sequence, parts: int) -> list[list]:
    """Contiguous, nearly equal parts (none empty when len(items) >= parts)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def _wait_for_placement(pg, what: str, report_every_s: float = 60.0) -> None:
    """Wait until the placement group is placed, saying so now and then: on an autoscaling cluster a GPU
    node can take minutes to start, and on a cluster that has no node big enough it never comes."""
    waited, ready = 0.0, pg.ready()
    while not ray.wait([ready], timeout=report_every_s)[0]:
        waited += report_every_s
        log.warning(
            "still waiting for resources after %.0f s: %s (is there a node type with that much, and is the "
            "autoscaler allowed to start one?)",
            waited,
            what,
        )


class WorkerPool:
    """``resources.workers`` model-holding actors, each with ``cpus_per_worker`` and ``gpus_per_worker``."""

    def __init__(self, model: str, options: ModelOptions, resources: Resources, ray_cfg: RayConfig) -> None:
        init_ray(ray_cfg)
        self.size = resources.workers
        self._pg = None
        strategy = None
        started = time.monotonic()
        cpus, gpus = resources.cpus_per_worker, resources.gpus_per_worker
        log.info(
            "starting %d workers for %s (%g CPU, %g GPU each%s)",
            self.size,
            model,
            cpus,
            gpus,
            ", packed on one node" if ray_cfg.pack_on_one_node else "",
        )
        if ray_cfg.pack_on_one_node:
            bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
            self._pg = placement_group([bundle] * self.size, strategy="STRICT_PACK")
            _wait_for_placement(self._pg, f"{self.size} x {bundle} on one node")
            strategy = PlacementGroupSchedulingStrategy(placement_group=self._pg)
        actor = ModelActor.options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=strategy)
        self._actors = [actor.remote(model, options, int(cpus)) for _ in range(self.size)]
        identities = set(self.each(identity))
        if len(identities) != 1:
            raise CompalignError(f"workers loaded different weights for {model!r}: {sorted(identities)}")
        log.info("%d workers ready in %.0f s", self.size, time.monotonic() - started)

    def start(self, worker: int, fn: Callable[Concatenate[Worker, P], T], *args: Any) -> Pending[T]:
        """Start ``fn(worker's Worker, *args)``; calls on one worker run one after another, in order. A
        ``Pending`` among ``args`` arrives as its result, straight from the worker that made it."""
        args = tuple(a.ref if isinstance(a, Pending) else a for a in args)
        return Pending(self._actors[worker].run.remote(fn, *args), worker)

    def call(self, worker: int, fn: Callable[Concatenate[Worker, P], T], *args: Any) -> T:
        return self.start(worker, fn, *args).get()

    def each(self, fn: Callable[Concatenate[Worker, P], T], *args: Any) -> list[T]:
        """``fn`` on every worker (at once); results in worker order."""
        return self.gather([self.start(i, fn, *args) for i in range(self.size)])

    def map(
        self,
        fn: Callable[..., T],
        items: Sequence,
        *args: Any,
        stage: str,
        unit: str,
        shards_per_worker: int = 4,
    ) -> list[T]:
        """``fn(worker, shard, *args)`` for contiguous shards of ``items``, spread over the workers; the
        per-shard results in order. Progress counts items as their shards finish."""
        shards = [s for s in split(items, self.size * shards_per_worker) if s]
        pending = [self.start(i % self.size, fn, shard, *args) for i, shard in enumerate(shards)]
        return self.gather(pending, stage, [len(s) for s in shards], unit)

    def gather(
        self,
        pending: list[Pending[T]],
        stage: str | None = None,
        weights: list[int] | None = None,
        unit: str = "",
    ) -> list[T]:
        """Results of ``pending`` in order; with ``stage``, a progress bar advancing as each finishes."""
        if stage is None:
            return ray.get([p.ref for p in pending])
        weights = weights or [1] * len(pending)
        left = {p.ref: w for p, w in zip(pending, weights, strict=True)}
        with Progress(stage, sum(weights), unit) as bar:
            while left:
                done, _ = ray.wait(list(left), num_returns=1)
                for ref in done:
                    bar.update(left.pop(ref))
        return ray.get([p.ref for p in pending])

    @staticmethod
    def wait_any(pending: list[Pending]) -> list[Pending]:
        """The calls of ``pending`` that have finished (at least one; waits for it)."""
        done, _ = ray.wait([p.ref for p in pending], num_returns=1)
        finished = set(done)
        return [p for p in pending if p.ref in finished]

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
