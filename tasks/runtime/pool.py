"""A pool of Ray actors that each load the model once and run plain functions on it.

``ModelActor.run(fn, *args)`` calls ``fn(worker, *args)`` with the actor's ``tasks.core.worker.Worker``;
the functions live beside their tasks (``tasks/directions/collect.py: collect_part`` ...), so the same
work runs without Ray in tests and go-to-definition follows every call. The pool offers typed calls:
``call`` (one worker, wait), ``start`` (one worker, a ``Pending`` result), ``each`` (every worker) and
``map`` (items sharded over the workers, a few shards each so progress moves, results in order).
A worker that dies is restarted by Ray and set up again by the pool (``WorkerPool``'s docstring).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tasks.core.config import ModelOptions, RayConfig, Resources
from tasks.core.errors import CompalignError
from tasks.core.progress import Progress
from tasks.core.worker import Worker, is_setup
from tasks.runtime.cluster import init_ray

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


class StaleWorker(Exception):
    """A call reached a worker process that is not the one the pool set up (Ray restarted it)."""


@ray.remote
class ModelActor:
    """Holds one loaded model (a ``Worker``) and runs functions on it. ``incarnation`` names this
    process: a restarted actor has a new one, and refuses calls meant for the process it replaces."""

    def __init__(self, model: str, options: ModelOptions, threads: int) -> None:
        import torch

        from tasks.core.logs import quiet_libraries
        from tasks.core.model import load_model

        quiet_libraries()
        torch.set_num_threads(max(1, threads))
        logging.basicConfig(level=logging.WARNING)
        self.worker = Worker(load_model(model, options))
        self.incarnation = uuid.uuid4().hex

    def hello(self) -> tuple[str, str, int]:
        """(incarnation, the loaded weights' identity, process id)."""
        return self.incarnation, self.worker.loaded.identity, os.getpid()

    def run(self, incarnation: str, fn: Callable[..., Any], *args: Any) -> Any:
        if incarnation != self.incarnation:
            raise StaleWorker(incarnation)
        return fn(self.worker, *args)


# A worker process that died (ActorUnavailableError while Ray restarts it, ActorDiedError when it will
# not), or a restarted one that was sent a call for its predecessor.
LOST = (RayActorError, StaleWorker)


class Pending(Generic[T]):
    """A call started on one worker; ``get()`` waits for its result, running the call again (bounded by
    ``ray.retries``) when its worker was lost."""

    def __init__(self, pool: WorkerPool, worker: int, fn: Callable, args: tuple, anywhere: bool) -> None:
        self.pool, self.worker, self.fn, self.args, self.anywhere = pool, worker, fn, args, anywhere
        self.attempts = 0
        self.ref = pool._submit(self)

    def get(self) -> T:
        while True:
            ref = self.ref
            try:
                value = ray.get(ref)
            except LOST as exc:
                self.pool._recover_call(self, ref, exc)
                continue
            self.pool._settled(self)
            return value


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
    """``resources.workers`` model-holding actors, each with ``cpus_per_worker`` and ``gpus_per_worker``.

    Surviving a lost worker: Ray restarts a dead actor (``ray.max_restarts``), which loads the model
    again. The pool keeps, per worker, the calls marked ``@sets_up`` that it sent there (in order) and
    replays them on the new process before anything else runs on it; a call the loss interrupted runs
    again, a shard of ``map`` (or a call started ``anywhere``) on the next worker, any other call on
    its own worker once that is back. Results therefore equal an undisturbed run's."""

    def __init__(self, model: str, options: ModelOptions, resources: Resources, ray_cfg: RayConfig) -> None:
        init_ray(ray_cfg)
        self.size, self.model, self.retries = resources.workers, model, ray_cfg.retries
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
        actor = ModelActor.options(
            num_cpus=cpus,
            num_gpus=gpus,
            scheduling_strategy=strategy,
            max_restarts=ray_cfg.max_restarts,
            max_task_retries=0,  # the pool decides what runs again, and where
        )
        self._actors = [actor.remote(model, options, int(cpus)) for _ in range(self.size)]
        # Per worker, in the order sent: its setup calls, and the calls whose results are not in yet.
        self._history: list[list[Pending]] = [[] for _ in range(self.size)]
        hello = ray.get([a.hello.remote() for a in self._actors])
        self._incarnation = [h[0] for h in hello]
        self._pids = [h[2] for h in hello]
        identities = {h[1] for h in hello}
        if len(identities) != 1:
            raise CompalignError(f"workers loaded different weights for {model!r}: {sorted(identities)}")
        self.identity = identities.pop()
        log.info("%d workers ready in %.0f s", self.size, time.monotonic() - started)

    @property
    def pids(self) -> list[int]:
        """Each worker's process id, as last seen."""
        return list(self._pids)

    def start(
        self, worker: int, fn: Callable[Concatenate[Worker, P], T], *args: Any, anywhere: bool = False
    ) -> Pending[T]:
        """Start ``fn(worker's Worker, *args)``; calls on one worker run one after another, in order. A
        ``Pending`` among ``args`` arrives as its result, straight from the worker that made it.
        ``anywhere``: a pure call that, if its worker is lost, may run again on another one."""
        pending: Pending[T] = Pending(self, worker, fn, args, anywhere and not is_setup(fn))
        self._history[worker].append(pending)
        return pending

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
        per-shard results in order. Progress counts items as their shards finish. ``fn`` must be pure
        (a shard may run again on another worker)."""
        if is_setup(fn):
            raise CompalignError(f"map runs pure functions; {fn.__name__} sets its worker up (use each)")
        shards = [s for s in split(items, self.size * shards_per_worker) if s]
        pending = [self.start(i % self.size, fn, s, *args, anywhere=True) for i, s in enumerate(shards)]
        return self.gather(pending, stage, [len(s) for s in shards], unit)

    def gather(
        self,
        pending: list[Pending[T]],
        stage: str | None = None,
        weights: list[int] | None = None,
        unit: str = "",
    ) -> list[T]:
        """Results of ``pending`` in order; with ``stage``, a progress bar advancing as each finishes
        (a call that has to run again counts once, when it finally does)."""
        if stage is None:
            return [p.get() for p in pending]
        weights = weights or [1] * len(pending)
        with Progress(stage, sum(weights), unit) as bar:
            left = dict(enumerate(pending))
            while left:
                by_ref = {p.ref: i for i, p in left.items()}
                done, _ = ray.wait(list(by_ref), num_returns=1)
                for ref in done:
                    i = by_ref[ref]
                    try:
                        ray.get(ref)
                    except LOST as exc:
                        self._recover_call(left[i], ref, exc)  # a new ref: waited for on the next round
                        continue
                    self._settled(left.pop(i))
                    bar.update(weights[i])
        return [p.get() for p in pending]

    @staticmethod
    def wait_any(pending: list[Pending]) -> list[Pending]:
        """The calls of ``pending`` that have finished, or failed (at least one; waits for it)."""
        done, _ = ray.wait([p.ref for p in pending], num_returns=1)
        finished = set(done)
        return [p for p in pending if p.ref in finished]

    # ------------------------------------------------------------------------- losing a worker

    def _submit(self, pending: Pending) -> Any:
        args = tuple(a.ref if isinstance(a, Pending) else a for a in pending.args)
        w = pending.worker
        return self._actors[w].run.remote(self._incarnation[w], pending.fn, *args)

    def _settled(self, pending: Pending) -> None:
        """``pending`` has its result: a pure call need not run again if its worker is lost later."""
        history = self._history[pending.worker]
        if not is_setup(pending.fn) and pending in history:
            history.remove(pending)

    def _recover_call(self, pending: Pending, failed_ref: Any, exc: Exception) -> None:
        """``pending``'s call (the one behind ``failed_ref``) was lost with its worker: move it to the
        next worker (a pure call started anywhere), or bring its worker back (which sends it again)."""
        if pending.ref is not failed_ref:
            return  # sent again already, when its worker came back
        pending.attempts += 1
        name, lost = pending.fn.__name__, pending.worker
        if pending.attempts > self.retries:
            raise CompalignError(
                f"{name} lost its worker {pending.attempts} times ({_reason(exc)}), the last time worker "
                f"{lost}; raise ray.retries (now {self.retries}) or find what kills the workers (memory?)"
            ) from exc
        if pending.anywhere and self.size > 1 and not isinstance(exc, StaleWorker):
            # its worker is restarting (or gone): do not wait for it. A restarted one is brought back
            # at its next call (which it refuses as stale).
            self._history[lost].remove(pending)
            pending.worker = (lost + 1) % self.size
            self._history[pending.worker].append(pending)
        elif self._bring_back(lost):
            return
        log.warning(
            "%s lost worker %d (%s); running it again on worker %d (attempt %d of %d)",
            name,
            lost,
            _reason(exc),
            pending.worker,
            pending.attempts + 1,
            self.retries + 1,
        )
        self._resend(pending)

    def _resend(self, pending: Pending) -> None:
        for arg in pending.args:
            if isinstance(arg, Pending):
                arg.get()  # an argument lost with its worker is made again first
        pending.ref = self._submit(pending)

    def _bring_back(self, w: int, report_every_s: float = 60.0) -> bool:
        """Wait for worker ``w`` to answer. When it is a new process (True), send it again, in their
        order, its setup calls and every call it had not finished."""
        begun = time.monotonic()
        reported = 0
        while True:
            try:
                incarnation, identity, pid = ray.get(self._actors[w].hello.remote(), timeout=report_every_s)
                break
            except (ActorUnavailableError, GetTimeoutError):
                waited = time.monotonic() - begun
                if waited >= (reported + 1) * report_every_s:
                    reported += 1
                    log.warning("worker %d: still waiting for Ray to restart it after %.0f s", w, waited)
                time.sleep(0.2)
            except RayActorError as exc:
                raise CompalignError(
                    f"worker {w} was lost and Ray will not restart it ({_reason(exc)}); ray.max_restarts "
                    "sets how many restarts a worker gets"
                ) from exc
        if incarnation == self._incarnation[w]:
            return False
        if identity != self.identity:
            raise CompalignError(f"worker {w} came back with different weights for {self.model!r}")
        self._incarnation[w], self._pids[w] = incarnation, pid
        again = [p for p in self._history[w] if is_setup(p.fn) or not _succeeded(p.ref)]
        self._history[w] = again
        log.warning(
            "worker %d was restarted (now process %d): sending it again %d calls (%d that set it up)",
            w,
            pid,
            len(again),
            sum(is_setup(p.fn) for p in again),
        )
        for p in again:
            self._resend(p)
        return True

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None


def _succeeded(ref: Any) -> bool:
    """The call behind ``ref`` has finished without losing its worker (its own error counts as finished)."""
    if not ray.wait([ref], timeout=0)[0]:
        return False  # still queued for a process that is gone: it can only fail
    try:
        ray.get(ref, timeout=0)
    except LOST:
        return False
    except Exception:  # noqa: BLE001 - the call's own error reaches its caller from get()
        return True
    return True


def _reason(exc: Exception) -> str:
    if isinstance(exc, StaleWorker):
        return "it was restarted"
    return type(exc).__name__
