"""Typed configuration of the finetune flow (data, filter, train, deepspeed, lora, eval).

Values live in ``conf/finetune.yaml``, ``conf/data/<sft set>.yaml`` and ``conf/deepspeed/*.yaml``; these
dataclasses are the schema. ``FinetuneConfig`` composes them with the shared sections of every run
(``tasks.core.config.RunConfig``); checks that involve two sections are in its ``__post_init__``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from tasks.core.concept_config import EvalConfig, JudgeConfig, PromptSource
from tasks.core.config import PACKAGED_MODEL, Resources, RunConfig
from tasks.core.errors import ConfigError, choice, require

FILTER_RULES = ("phrases", "direction")


class SftFormat(StrEnum):
    auto = "auto"
    chat = "chat"
    alpaca = "alpaca"
    sharegpt = "sharegpt"


class Precision(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def filter_rules(spec: str) -> list[str]:
    """The rules of a ``data.filter`` value: none -> [], phrases+direction -> [phrases, direction]."""
    if spec.strip().lower() == "none":
        return []
    rules = [part.strip().lower() for part in spec.split("+") if part.strip()]
    bad = [r for r in rules if r not in FILTER_RULES]
    require(
        bool(rules) and not bad,
        f"data.filter must be none, phrases, direction or phrases+direction, got {spec!r}",
    )
    return rules


@dataclass
class SftDataConfig:
    """An instruction data set (config group conf/data: chat_small, alpaca_small, refusal_teach, ...)."""

    name: str = MISSING
    """Short name, used in run names (chat_small, ...)."""
    source: str = MISSING
    """bundled:<name> (tasks/data/sft/<name>.jsonl), a .jsonl/.json/.parquet/.csv file (local path or
    fsspec URL such as s3://bucket/sft.jsonl), or hf:<dataset name> read through `datasets`."""
    format: str = "auto"
    """auto (chat if rows have ``messages_column``, sharegpt if they have ``conversations``, alpaca if they
    have instruction/output), chat ({"messages": [{"role", "content"}, ...]}), alpaca (instruction, input,
    output) or sharegpt ({"conversations": [{"from": "human"|"gpt", "value"}, ...]})."""
    messages_column: str = "messages"
    """Column holding the turns, for chat rows."""
    split: str = "train"
    """Dataset split, for hf: sources only."""
    limit: int | None = None
    """Keep only the first N rows (before filtering)."""
    filter: str = "phrases"
    """Which filters drop rows: none, phrases (refusal/moralising phrase list), direction (projection on a
    refusal direction; needs filter.direction), or phrases+direction. Settings live under ``filter``."""
    system_prompt: str | None = None
    """System turn added to rows that have none (null: the chat template's own default, if any)."""
    max_length: int = 512
    """Tokens per training sequence; longer conversations are cut at the right (rows with no answer token
    left are dropped)."""
    packing: bool = False
    """Pack several conversations into each sequence of ``max_length`` tokens (attention stays within each
    conversation: position ids restart at every one)."""
    val_fraction: float = 0.1
    """Fraction of the filtered rows held out for validation loss (0: none)."""
    seed: int = 0
    """Seed of the shuffle before the validation split and of the per-epoch order."""

    def __post_init__(self) -> None:
        require(bool(self.source), "data.source must not be empty")
        self.format = choice(SftFormat, self.format, "data.format")
        filter_rules(self.filter)
        require(self.limit is None or self.limit > 0, f"data.limit must be > 0, got {self.limit}")
        require(self.max_length >= 8, f"data.max_length must be >= 8, got {self.max_length}")
        require(0 <= self.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class FilterConfig(Resources):
    """How the filters named by ``data.filter`` decide that an answer refuses or moralises, and the Ray
    actors that score answers for the direction filter (``workers``, ``cpus_per_worker``, ...)."""

    key = "filter"
    workers: int = 1

    phrases: list[str] = field(default_factory=list)
    """Case-insensitive substrings that drop a row when any assistant turn contains one; empty means the
    built-in list (tasks/sft/filter.py DEFAULT_BOILERPLATE_PHRASES)."""
    extra_phrases: list[str] = field(default_factory=list)
    """Phrases added to ``phrases`` (or to the built-in list), so the defaults can be extended."""
    direction: str | None = None
    """Refusal direction for the direction filter: the MLflow run id of an abliterate run (its
    directions/chosen.safetensors, layer from its metadata), or a .safetensors/.pt/.npy file or URL."""
    layer: int | None = None
    """Residual layer the answers are read at (null: the direction's own layer from its metadata)."""
    threshold: float | None = None
    """Drop rows whose score (the mean projection of the answer tokens' residuals on the unit direction,
    highest over the row's assistant turns) is above this. Null: an outlier cut, median + ``mad_factor``
    x MAD of all scores (for data where refusals are a minority)."""
    mad_factor: float = 10.0
    """Robust outlier cut used when ``threshold`` is null (median absolute deviations above the median)."""
    tokens: int | None = None
    """Average over at most this many tokens from the start of each answer (null: the whole answer)."""
    batch_size: int = 16
    """Rows per forward pass of the direction filter."""
    sample: int = 20
    """How many dropped rows are logged (per rule) in the filter report."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.threshold is None or math.isfinite(self.threshold),
            f"filter.threshold must be a finite number or null, got {self.threshold}",
        )
        require(self.mad_factor > 0, f"filter.mad_factor must be > 0, got {self.mad_factor}")
        require(
            self.tokens is None or self.tokens > 0, f"filter.tokens must be > 0 or null, got {self.tokens}"
        )
        require(self.batch_size > 0, f"filter.batch_size must be > 0, got {self.batch_size}")
        require(self.sample >= 0, f"filter.sample must be >= 0, got {self.sample}")
        require(self.layer is None or self.layer >= 0, f"filter.layer must be >= 0, got {self.layer}")


@dataclass
class TrainConfig(Resources):
    """The training loop and the Ray Train workers that run it: ``workers`` data-parallel ranks over
    which DeepSpeed shards the model state, each with ``cpus_per_worker`` (its torch threads) and
    ``gpus_per_worker`` (1 on a GPU cluster; 0 trains on CPU with the gloo backend)."""

    key = "train"
    epochs: int = 1
    """Passes over the training rows (``max_steps`` stops earlier)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (null: the epochs decide)."""
    batch_size: int = 4
    """Sequences per worker per micro-step."""
    grad_accum: int = 1
    """Micro-steps accumulated per optimizer step."""
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 0
    """Linear warm-up steps, then cosine decay to ``min_lr_ratio`` x lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32 or bf16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower)."""
    gpu_memory_gib: float | None = None
    """Memory of each GPU in GiB, which the run's memory plan (tasks/sft/plan.py) must fit before any
    worker starts. Null: read from torch.cuda when the driver sees GPUs, else the plan is logged but
    not enforced (a cluster driver without GPUs: set it, e.g. 80 for A100/H100 80GB). CPU workers are
    checked against this machine's memory instead when Ray is local."""
    seed: int = 0
    """Seed of the model's dropout and the data order."""
    checkpoint_every: int | None = None
    """Save a resumable checkpoint (through ray.train.report) every N optimizer steps (null: at the end only)."""
    keep_checkpoints: int = 2
    """How many resumable checkpoints Ray Train keeps."""
    max_failures: int = 2
    """Worker failures tolerated: the worker group is restarted and resumes from the last checkpoint."""
    storage_uri: str | None = None
    """Where Ray Train writes resumable checkpoints: a local directory or an fsspec URL (s3://...).
    Null: checkpoints/ray_train under the working directory (on a multi-node cluster use a shared URL)."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""
    eval_every: int | None = None
    """Validation loss every N optimizer steps (null: only at the end)."""
    moe_aux_loss: bool = True
    """MoE models: return router logits and add the load-balancing loss."""
    router_aux_loss_coef: float | None = None
    """Coefficient of the load-balancing loss (null: the model config's, e.g. 0.02 for Mixtral)."""
    freeze_router: bool = False
    """MoE models: keep the router (gate) weights fixed."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            require(value > 0, f"train.{name} must be > 0, got {value}")
        require(
            self.max_steps is None or self.max_steps > 0, f"train.max_steps must be > 0, got {self.max_steps}"
        )
        require(math.isfinite(self.lr) and self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        require(self.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        self.precision = choice(Precision, self.precision, "train.precision")
        for name in ("checkpoint_every", "eval_every"):
            value = getattr(self, name)
            require(value is None or value > 0, f"train.{name} must be > 0 or null, got {value}")
        require(
            self.gpu_memory_gib is None or (math.isfinite(self.gpu_memory_gib) and self.gpu_memory_gib > 0),
            f"train.gpu_memory_gib must be > 0 or null, got {self.gpu_memory_gib}",
        )
        require(
            self.gpu_memory_gib is None or self.gpus_per_worker > 0,
            "train.gpu_memory_gib needs GPU workers (train.gpus_per_worker > 0); CPU workers are checked "
            "against host memory",
        )
        require(self.max_failures >= 0, f"train.max_failures must be >= 0, got {self.max_failures}")
        require(
            self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0,
            f"train.router_aux_loss_coef must be >= 0 or null, got {self.router_aux_loss_coef}",
        )


@dataclass
class DeepSpeedSettings:
    """DeepSpeed ZeRO settings (config group conf/deepspeed: zero2, zero3, zero3_offload, ...)."""

    name: str = "zero3"
    """Name of the preset, for run names."""
    stage: int = 3
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the update) in CPU memory."""
    offload_param: bool = False
    """Keep parameters in CPU memory between uses (stage 3 only)."""
    train_batch_size: int | None = None
    """Global batch (sequences per optimizer step). Null: train.batch_size x train.grad_accum x
    train.workers. When set it must equal that product."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys merged over the generated config (e.g. zero_optimization.reduce_bucket_size)."""

    def __post_init__(self) -> None:
        require(self.stage in (0, 1, 2, 3), f"deepspeed.stage must be 0, 1, 2 or 3, got {self.stage}")
        require(
            not self.offload_param or self.stage == 3,
            f"deepspeed.offload_param needs deepspeed.stage=3, got stage {self.stage}",
        )
        require(
            not self.offload_optimizer or self.stage >= 1,
            "deepspeed.offload_optimizer needs deepspeed.stage >= 1",
        )
        require(
            self.train_batch_size is None or self.train_batch_size > 0,
            f"deepspeed.train_batch_size must be > 0 or null, got {self.train_batch_size}",
        )


@dataclass
class LoraSettings:
    """Optional LoRA adapters through peft (the base weights stay frozen)."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = 16
    """Adapter rank."""
    alpha: float = 32
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=list)
    """Module names to adapt (empty: every linear layer but the LM head, peft's all-linear)."""
    merge: bool = True
    """Merge the adapters into the base weights in the final checkpoint (else save the adapter beside it)."""

    def __post_init__(self) -> None:
        require(self.r > 0, f"lora.r must be > 0, got {self.r}")
        require(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class FinetuneEvalConfig(EvalConfig):
    """Before/after evaluation with the abliterate flow's judges: behaviour rate on target and baseline
    prompts, first-token KL on the baseline prompts (after vs before) and perplexity on held-out text."""

    enabled: bool = True
    """Evaluate the base model before and the fine-tuned model after training."""
    target: PromptSource = field(
        default_factory=lambda: PromptSource(source="bundled:refusal_harmful", limit=16)
    )
    """Prompts whose behaviour is measured (harmful requests: the refusal rate)."""
    baseline: PromptSource = field(
        default_factory=lambda: PromptSource(source="bundled:refusal_harmless", limit=16)
    )
    """Contrast prompts (harmless requests: over-refusal, and the KL reference)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """How an answer is judged (refusal phrases by default)."""
    cpus_per_worker: float = 2
    """CPUs of the Ray actor that evaluates (its torch threads on CPU: evaluation runs alone, between the
    training runs, so it may take what the two default training workers use)."""
    gpus_per_worker: float = 0
    """GPUs of the Ray actor that evaluates."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.cpus_per_worker > 0, f"eval.cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass
class FinetuneConfig(RunConfig):
    model: str = PACKAGED_MODEL
    data: SftDataConfig = MISSING
    """The instruction set (config group conf/data: chat_small, alpaca_small, refusal_teach)."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSettings = MISSING
    """ZeRO settings (config group conf/deepspeed: zero2, zero3, zero3_offload, zero2_offload)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)

    def __post_init__(self) -> None:
        if "direction" in filter_rules(self.data.filter) and not self.filter.direction:
            raise ConfigError(
                f"data.filter={self.data.filter} needs filter.direction: the MLflow run id of an abliterate "
                "run, or a direction .safetensors file"
            )
