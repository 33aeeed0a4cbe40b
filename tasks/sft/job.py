"""What the driver hands each Ray Train worker (TrainJob) and what a finished job returns (TrainResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.sft.config import LoraSettings, TrainConfig


@dataclass
class TrainJob:
    """Everything a worker needs (pickled to each Ray Train worker)."""

    model_path: str
    """Local directory or hub id the workers load (tasks.core.model.ModelSpec.path)."""
    trust_remote_code: bool
    revision: str | None
    tokenizer: Any
    """The prepared tokenizer (chat template included), saved with the final checkpoint."""
    train: TrainConfig
    lora: LoraSettings
    deepspeed: dict
    precision: str
    train_data: Any
    """ObjectRef of the training TokenizedSet."""
    val_data: Any
    """ObjectRef of the validation TokenizedSet (or None)."""
    packed: bool
    pad_id: int
    total_steps: int
    steps_per_epoch: int
    output_uri: str | None
    """Final Hugging Face checkpoint (local directory or fsspec URL); None: not saved."""
    card: str = ""
    probe: list[int] | None = None
    """Token ids whose logits the final model reports (to check a reload)."""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a finished training job returns to the driver."""

    steps: int
    history: list[dict]
    """Per-step metrics in order (with a restart, steps after the resumed one appear again)."""
    attempts: int
    """Worker-group starts (1 + restarts after failures)."""
    resumed_from: list[int]
    """The step each restart resumed from."""
    checkpoint: str | None
    """The final Hugging Face checkpoint's location (None if not saved)."""
    resumable: str | None
    """The last Ray Train checkpoint (DeepSpeed state) location."""
    final: dict = field(default_factory=dict)
    """The final event: val loss, probe logits, parameter counts."""
    worker_pids: dict[int, int] = field(default_factory=dict)
    """rank -> process id of the current attempt (for diagnostics and fault-injection tests)."""
