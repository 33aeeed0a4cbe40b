"""Ray Train for the SFT pipeline: the driver side (``fit``: a TorchTrainer whose workers send events
back through a queue while it runs) and the worker side (``session``: rank, device, the object store,
resumable checkpoints). ``tasks/sft/train_loop.py`` trains through these and imports no Ray itself.
"""

from __future__ import annotations

import contextlib
import queue as stdlib_queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from tasks.core import storage

EVENTS_KEY = "events"


@dataclass
class Scaling:
    """Ray Train workers and what each reserves, with the restart policy."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    keep_checkpoints: int


def fit(
    loop: Callable[[dict], None],
    config: dict,
    scaling: Scaling,
    storage_uri: str,
    run_name: str,
    env: dict[str, str],
    on_event: Callable[[dict], None],
) -> str | None:
    """Run ``loop(config)`` on ``scaling.workers`` Ray Train workers (Ray must be initialised); each
    event a worker emits (``Session.emit``) reaches ``on_event`` in this thread as it arrives. A worker
    that dies is replaced (``max_failures`` times) and the group resumes from the last reported
    checkpoint, kept under ``storage_uri``/``run_name`` (local or fsspec URL). Returns the last
    resumable checkpoint's path (None when none was reported)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    use_gpu = scaling.gpus_per_worker > 0
    events = Queue()
    filesystem, path = storage.pyarrow_filesystem(storage_uri)
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config={**config, EVENTS_KEY: events},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=scaling.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
    )
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    while True:
        alive = thread.is_alive()
        for event in _drain(events, timeout=0.5 if alive else 0):
            on_event(event)
        if not alive:
            break
    thread.join()
    events.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    checkpoint = outcome["result"].checkpoint
    return checkpoint.path if checkpoint is not None else None


def _drain(events, timeout: float) -> list[dict]:
    out = []
    try:
        out.append(events.get(timeout=timeout) if timeout else events.get_nowait())
        while True:
            out.append(events.get_nowait())
    except (stdlib_queue.Empty, ray.util.queue.Empty):
        pass
    return out


class Session:
    """One Ray Train worker's view of its group: rank, world size, device, and its channels back."""

    def __init__(self, config: dict) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device: torch.device = ray.train.torch.get_device()
        self._events = config[EVENTS_KEY]

    def emit(self, event: dict, every_rank: bool = False) -> None:
        """Send ``event`` to the driver's ``on_event`` (from rank 0 only, unless ``every_rank``)."""
        if every_rank or self.rank == 0:
            self._events.put(event)

    @staticmethod
    def fetch(ref: Any) -> Any:
        """An object the driver put in the object store (``tasks.runtime.cluster.share``)."""
        return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref

    @staticmethod
    @contextlib.contextmanager
    def restored() -> Iterator[Path | None]:
        """The folder of the checkpoint this attempt resumes from (None on a first attempt)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    @staticmethod
    def report(metrics: dict, folder: str) -> None:
        """Report a resumable checkpoint (every rank, its own shard in ``folder``) with its metrics."""
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
