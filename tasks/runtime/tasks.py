"""Plain Ray tasks for work that holds no model (the streamed edit's shards): ``run_tasks(fn, calls)`` runs
``fn(*args)`` for each argument tuple as its own task, retried on another worker when its worker dies,
and returns the results in order, with progress counted as tasks finish."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tasks.core.progress import Progress
from tasks.runtime.cluster import forwarded_env

log = logging.getLogger(__name__)
T = TypeVar("T")


def run_tasks(
    fn: Callable[..., T],
    calls: Sequence[tuple],
    *,
    stage: str,
    unit: str,
    num_cpus: float = 1.0,
    memory: int | None = None,
    max_retries: int = 3,
    on_this_node: bool = False,
) -> list[T]:
    """``fn(*args)`` for each of ``calls`` as Ray tasks (``num_cpus`` and, when given, ``memory`` bytes
    reserved each, so that no more run at once than fit); a task whose worker died runs again, up to
    ``max_retries`` times. ``fn`` must be safe to run again. ``on_this_node``: the tasks run on the
    driver's node (they read or write its local files). Results in the order of ``calls``."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": max_retries}
    if on_this_node:
        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    if memory:
        options["memory"] = int(memory)
    remote = ray.remote(fn).options(**options, runtime_env={"env_vars": forwarded_env()})
    refs = [remote.remote(*args) for args in calls]
    index = {ref: i for i, ref in enumerate(refs)}
    with Progress(stage, len(refs), unit) as bar:
        left = list(refs)
        while left:
            done, left = ray.wait(left, num_returns=1)
            ray.get(done[0])  # raises the task's own error (after its retries) at once
            bar.update(1)
            log.debug("%s: %s %d finished", stage, unit, index[done[0]])
    return ray.get(refs)
