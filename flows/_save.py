"""Step 9 of abliterate and sweep: save the edited checkpoint, with its coverage report, and check it.

The source checkpoint (a safetensors folder, a hub snapshot, or the packaged GGUF's safetensors cache) is
edited shard by shard as Ray tasks on this node (``tasks/directions/stream.py``: memory bounded by one
tensor, resumable), then loaded back in a task of its own and its logits compared with a worker's model
under the edit's hooks before it is published: no worker ever holds an edited copy. Every parameter is
listed as edited or left, with the reason, in MLflow (coverage.json) and in the model card."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import mlflow
import torch

from flows import _tracking as tracking
from tasks.core.config import ModelOptions
from tasks.core.errors import CompalignError
from tasks.core.writers import coverage_table
from tasks.directions.stream import Edit, is_streamable, stream_checkpoint
from tasks.directions.verify import checkpoint_logits, logits_loaded
from tasks.runtime.pool import WorkerPool
from tasks.runtime.tasks import run_tasks

log = logging.getLogger("compalign.save")

CHECK_TEXTS = ["The capital of France is", "Write a short poem about the sea.", "1, 1, 2, 3, 5, 8,"]
CHECK_TOLERANCE = {"float32": 1e-2, "float16": 0.5, "bfloat16": 0.5}
"""Largest |logit difference| allowed between the saved checkpoint and the hooked model. Hooks and edited
weights round differently (up to 5e-4 on SmolLM2 in float32, tests/tasks/directions/test_orthogonalize.py);
a missed or wrong writer moves logits by more than 1."""


def with_coverage(card: str, report: dict) -> str:
    return f"{card}\n## What was edited\n\n{coverage_table(report)}\n"


def save_edited(
    pool: WorkerPool,
    worker: int,
    source: str,
    uri: str,
    card: str,
    extra: dict[str, bytes],
    edit: Edit,
    opts: ModelOptions,
    dtype: str,
    checkpoint_mode: str,
) -> str:
    """Save ``edit`` of the checkpoint at ``source`` to ``uri`` (see the module docstring), checked against
    worker ``worker``'s (unedited) model with the edit's hooks; the pool is shut down once that model's
    logits are taken. Returns the location."""
    if not is_streamable(source):
        raise CompalignError(
            f"{source} holds no safetensors checkpoint (model.safetensors or its index) to edit; "
            "set output.save=false, or give the model as a safetensors folder"
        )
    # The reference logits first: then the model workers go, so the shard tasks get this node's CPUs (the
    # workers' placement group holds them) and memory.
    expected = pool.call(worker, logits_loaded, CHECK_TEXTS, edit)
    pool.shutdown()
    run = functools.partial(run_tasks, stage="orthogonalize shards", unit="shards", on_this_node=True)
    check = functools.partial(_check, expected, opts, dtype)
    cards = functools.partial(with_coverage, card)
    done = stream_checkpoint(source, uri, edit, cards, run, extra, check=check)
    report, location = done.coverage, done.location
    edited, left = len(report["edited"]), len(report["left"])
    mlflow.log_dict(report, "coverage.json")
    mlflow.log_metrics(
        {"coverage.edited": edited, "coverage.left": left, "checkpoint.shards_resumed": done.skipped}
    )
    log.info("save: %d tensors edited, %d left as they are (coverage.json says why)", edited, left)
    tracking.log_checkpoint(checkpoint_mode, location)
    return location


def _check(expected: torch.Tensor, opts: ModelOptions, dtype: str, stage: Path) -> None:
    """Load the staged checkpoint in a task and compare its logits with ``expected``, the hooked model's."""
    (got,) = run_tasks(
        checkpoint_logits, [(str(stage), opts, CHECK_TEXTS)], stage="check the saved checkpoint",
        unit="checkpoints", on_this_node=True,
    )  # fmt: skip
    diff = float((got - expected).abs().max())
    mlflow.log_metric("checkpoint.max_abs_logit_diff", diff)
    log.info("save: the streamed checkpoint's logits differ from the edited model's by at most %.2g", diff)
    if diff > CHECK_TOLERANCE.get(dtype, 0.5):
        raise CompalignError(
            f"the streamed checkpoint's logits differ from the edited model's by {diff:.3g} (more than "
            f"{CHECK_TOLERANCE.get(dtype, 0.5)} for {dtype}); it was not published"
        )
