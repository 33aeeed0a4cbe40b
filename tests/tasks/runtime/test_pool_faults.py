"""A worker killed with SIGKILL (as the kernel's OOM killer or a lost node does) while it works: Ray
restarts it, the pool sets it up again and runs the lost calls again, and every result equals an
undisturbed run's; the order of a worker's calls is kept through the replay; beyond the restarts and
retries allowed, one clear error."""

from __future__ import annotations

import fcntl
import os
import signal
from pathlib import Path

import pytest
import torch

from tasks.core.config import ModelOptions, RayConfig, Resources
from tasks.core.errors import CompalignError
from tasks.core.model import load_model
from tasks.core.worker import Worker, sets_up
from tasks.directions.collect import ActivationSums, collect_activation_sums, collect_part

PROMPTS = [f"Tell me about the number {n} and why it matters." for n in range(12)]


def _die_on_call(marker: Path, call: int) -> None:
    """SIGKILL this process on the ``call``-th call (counted across processes in ``marker``), once."""
    with open(marker, "a+") as counter:
        fcntl.flock(counter, fcntl.LOCK_EX)  # two workers count at once
        counter.seek(0)
        seen = len(counter.read())
        counter.write(".")
        counter.flush()
    if seen + 1 == call:
        os.kill(os.getpid(), signal.SIGKILL)


def _collect_or_die(worker: Worker, shard: list[str], marker: Path, call: int) -> ActivationSums:
    _die_on_call(marker, call)
    return collect_part(worker, shard, 2, 4)


@sets_up
def _add(worker: Worker, value: int) -> int:
    return worker.count("total", value)


def _total_or_die(worker: Worker, marker: Path | None) -> int:
    if marker is not None:
        _die_on_call(marker, 1)
    return worker.state.get("total", 0)


def _pool(tiny_dirs, workers: int, restarts: int = 2, retries: int = 2):
    from tasks.runtime.pool import WorkerPool

    ray_cfg = RayConfig(max_restarts=restarts, retries=retries)
    return WorkerPool(str(tiny_dirs["llama"]), ModelOptions(), Resources(workers=workers), ray_cfg)


def test_collection_survives_a_killed_worker_with_the_same_sums(ray_local, tiny_dirs, tmp_path, caplog):
    loaded = load_model(str(tiny_dirs["llama"]), ModelOptions())
    alone = collect_activation_sums(loaded.model, loaded.tokenizer, PROMPTS, 2, 4)
    pool = _pool(tiny_dirs, 2)
    try:
        undisturbed = pool.map(
            _collect_or_die, PROMPTS, tmp_path / "never", 0, stage="collect", unit="prompts"
        )
        pids = pool.pids
        parts = pool.map(_collect_or_die, PROMPTS, tmp_path / "calls", 3, stage="collect", unit="prompts")
        # the worker that died is used again: as a new process (its first call finds it restarted)
        assert pool.each(_total_or_die, None) == [0, 0]
        assert sum(a != b for a, b in zip(pool.pids, pids, strict=True)) == 1
    finally:
        pool.shutdown()
    # shard by shard, the same values as the undisturbed run: none lost, doubled or moved in order
    assert len(parts) == len(undisturbed) == 8
    for part, same in zip(parts, undisturbed, strict=True):
        assert part.count == same.count and torch.equal(part.sums, same.sums)
    merged = ActivationSums.merge(parts)
    assert merged.count == alone.count == len(PROMPTS)
    # and what one process computes with other batches (float32 padding noise only); a dropped or
    # doubled shard would move these sums by a whole prompt's residuals
    assert torch.allclose(merged.sums, alone.sums, rtol=1e-5, atol=1e-5)
    assert "running it again on worker" in caplog.text


def test_a_restarted_worker_gets_its_setup_again_in_order(ray_local, tiny_dirs, tmp_path):
    pool = _pool(tiny_dirs, 1)
    try:
        assert pool.call(0, _add, 5) == 5
        # queued in this order on one worker: a read that kills it, a setup, a read after the setup
        before = pool.start(0, _total_or_die, tmp_path / "calls")
        pool.start(0, _add, 2)
        after = pool.start(0, _total_or_die, None)
        # the new process replays _add(5), runs the lost read, replays _add(2), then the last read
        assert (before.get(), after.get()) == (5, 7)
        assert pool.call(0, _total_or_die, None) == 7  # no setup ran twice
    finally:
        pool.shutdown()


def test_a_worker_lost_for_good_is_one_clear_error(ray_local, tiny_dirs, tmp_path):
    pool = _pool(tiny_dirs, 1, restarts=0)
    try:
        with pytest.raises(CompalignError, match="Ray will not restart it.*ray.max_restarts"):
            pool.call(0, _total_or_die, tmp_path / "calls")
    finally:
        pool.shutdown()


def test_retries_are_bounded(ray_local, tiny_dirs, tmp_path):
    def always_die(worker: Worker) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    pool = _pool(tiny_dirs, 1, restarts=5, retries=1)
    try:
        with pytest.raises(CompalignError, match="always_die lost its worker 2 times.*ray.retries"):
            pool.call(0, always_die)
    finally:
        pool.shutdown()
