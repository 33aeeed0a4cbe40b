"""The generic pool on local Ray: functions run on each actor's loaded model, calls on one worker run in
order and share its state, ``map`` returns shards' results in item order, a ``Pending`` passed to another
call arrives as its value, and a failing function reaches the caller as its own error."""

from __future__ import annotations

import pytest

from tasks.core.config import ModelOptions, RayConfig, Resources
from tasks.core.worker import Worker
from tasks.runtime.pool import WorkerPool, split


def _hidden(worker: Worker) -> int:
    return worker.loaded.model.config.hidden_size


def _remember(worker: Worker, value: int) -> int:
    return worker.keep("value", value)


def _recall(worker: Worker, plus: int) -> int:
    return worker.held("value", int) + plus


def _lengths(worker: Worker, shard: list[str], offset: int) -> list[tuple[int, int]]:
    return [(len(item) + offset, worker.count("items", 1)) for item in shard]


def _fail(worker: Worker) -> None:
    raise ValueError("bad input on the worker")


def test_split_is_contiguous_and_balanced():
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split([1, 2], 5) == [[1], [2]]
    assert split([], 2) == [[]]


@pytest.fixture(scope="module")
def pool(ray_local, tiny_dirs):
    pool = WorkerPool(str(tiny_dirs["llama"]), ModelOptions(), Resources(workers=2), RayConfig())
    yield pool
    pool.shutdown()


def test_each_runs_on_every_worker_with_its_model(pool, tiny_dirs):
    from transformers import AutoConfig

    assert pool.each(_hidden) == [AutoConfig.from_pretrained(tiny_dirs["llama"]).hidden_size] * 2


def test_state_is_per_worker_and_calls_run_in_order(pool):
    first = pool.start(0, _remember, 10)
    pool.start(1, _remember, 20)
    # Queued behind _remember on the same worker, so it sees the value.
    assert pool.call(0, _recall, 1) == 11
    assert pool.call(1, _recall, 1) == 21
    assert first.get() == 10
    # A Pending argument arrives as its value.
    assert pool.call(1, _remember, pool.start(0, _recall, 5)) == 15


def test_map_returns_results_in_item_order(pool):
    items = ["a" * n for n in range(1, 12)]
    parts = pool.map(_lengths, items, 100, stage="lengths", unit="items", shards_per_worker=3)
    assert len(parts) == 6
    assert [length for part in parts for length, _ in part] == [n + 100 for n in range(1, 12)]


def test_a_failing_function_raises_its_own_error(pool):
    with pytest.raises(ValueError, match="bad input on the worker"):
        pool.call(0, _fail)
    assert pool.call(0, _hidden) > 0  # the worker survives its function's error
