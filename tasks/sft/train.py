"""Supervised fine-tuning with DeepSpeed ZeRO inside Ray Train's TorchTrainer.

The driver builds a ``TrainJob`` (the DeepSpeed config, tokenized data in the object store, the
schedule) and calls ``fit``; each Ray Train worker runs ``worker_loop`` (tasks/sft/train_loop.py):
it loads the model (partitioned at load time under ZeRO-3), trains, reports resumable checkpoints
through the Ray Train session (tasks/runtime/train.py) and, at the end, gathers the weights and writes a Hugging Face checkpoint.
Events (worker start, per-step metrics, checkpoints, the final result) come back through a queue,
so the caller can log them while training runs. A worker that dies is replaced by Ray Train
(``FailureConfig``) and the group resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.core.errors import CompalignError
from tasks.runtime.cluster import FORWARDED_ENV
from tasks.runtime.train import Scaling
from tasks.runtime.train import fit as run_trainer
from tasks.sft.config import DeepSpeedSettings, TrainConfig
from tasks.sft.data import TokenizedSet, steps_per_epoch
from tasks.sft.job import TrainJob, TrainResult
from tasks.sft.train_loop import worker_loop

log = logging.getLogger(__name__)

TORCH_EXTENSIONS_DEFAULT = "~/.cache/compalign/torch_extensions"
# Environment every Ray Train worker gets from the driver: the JIT-compiled DeepSpeed ops cache (built
# once per machine, ~1 min), DeepSpeed's accelerator choice, and storage/model-cache settings.
WORKER_ENV = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", *FORWARDED_ENV, "TOKENIZERS_PARALLELISM")


def ensure_torch_extensions_dir() -> str:
    """Point TORCH_EXTENSIONS_DIR at a persistent cache (unless already set) so DeepSpeed compiles its
    ops once per machine, not once per run. Returns the directory."""
    path = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path(TORCH_EXTENSIONS_DEFAULT).expanduser())
    os.environ["TORCH_EXTENSIONS_DIR"] = path
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """fp32 or bf16: auto is bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision == "bf16" and not use_gpu:
        raise CompalignError("train.precision=bf16 needs GPUs (train.gpus_per_worker > 0); use fp32 or auto")
    return precision


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def deepspeed_config(ds: DeepSpeedSettings, train: TrainConfig, precision: str) -> dict:
    """The DeepSpeed config dict for ``train.workers`` ranks, checked to fit them: raises
    CompalignError (before any worker starts) when the batch sizes disagree with the worker count."""
    use_gpu = train.gpus_per_worker > 0
    global_batch = train.batch_size * train.grad_accum * train.workers
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": ds.train_batch_size or global_batch,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if use_gpu:
        # DeepSpeed picks its fused Adam on GPU, or its CPU Adam when the optimizer is offloaded.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "weight_decay": train.weight_decay,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
            },
        }
    config = _merge(config, ds.extra)
    micro = config["train_micro_batch_size_per_gpu"]
    accum = config["gradient_accumulation_steps"]
    if config["train_batch_size"] != micro * accum * train.workers:
        raise CompalignError(
            f"the DeepSpeed config ({ds.name}) does not fit {train.workers} workers: train_batch_size="
            f"{config['train_batch_size']} but micro batch {micro} x gradient accumulation {accum} x "
            f"{train.workers} workers = {micro * accum * train.workers}; set deepspeed.train_batch_size="
            f"{micro * accum * train.workers} (or null), or change train.workers / train.batch_size / "
            "train.grad_accum"
        )
    if (micro, accum) != (train.batch_size, train.grad_accum):
        raise CompalignError(
            "deepspeed.extra must not set train_micro_batch_size_per_gpu or gradient_accumulation_steps; "
            "use train.batch_size and train.grad_accum"
        )
    if ds.offload_param and not use_gpu:
        raise CompalignError(
            f"the DeepSpeed config ({ds.name}) offloads parameters to the CPU, which needs GPU workers "
            "(train.gpus_per_worker > 0); on CPU use deepspeed=zero3 or zero2"
        )
    return config


def plan(
    train_set: TokenizedSet, train: TrainConfig, what: str = "the filtered training set"
) -> tuple[int, int]:
    """(steps per epoch, total steps). Raises when the data does not fill one optimizer step."""
    per_epoch = steps_per_epoch(len(train_set), train.batch_size, train.workers, train.grad_accum)
    need = train.batch_size * train.workers * train.grad_accum
    if per_epoch == 0:
        raise CompalignError(
            f"{what} has {len(train_set)} sequences, fewer than one optimizer step takes (train.batch_size "
            f"{train.batch_size} x train.workers {train.workers} x train.grad_accum {train.grad_accum} = "
            f"{need}); give more data, or lower those settings"
        )
    total = per_epoch * train.epochs
    return per_epoch, min(total, train.max_steps) if train.max_steps else total


def worker_env(extensions_dir: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env["TORCH_EXTENSIONS_DIR"] = extensions_dir
    return env


def fit(
    job: TrainJob,
    storage_uri: str,
    run_name: str,
    on_event: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Run ``job`` on ``job.train.workers`` Ray Train workers (Ray must be initialised). ``on_event`` is
    called in this thread for each event as it arrives: {"type": "worker"|"step"|"eval"|"checkpoint"|
    "final", ...}. Resumable checkpoints go to ``storage_uri``/``run_name`` (local or fsspec URL)."""
    train = job.train
    result = TrainResult(steps=0, history=[], attempts=0, resumed_from=[], checkpoint=None, resumable=None)

    def handle(event: dict) -> None:
        _record(result, event)
        if on_event is not None:
            on_event(event)

    scaling = Scaling(
        train.workers,
        train.cpus_per_worker,
        train.gpus_per_worker,
        train.max_failures,
        train.keep_checkpoints,
    )
    result.resumable = run_trainer(worker_loop, {"job": job}, scaling, storage_uri, run_name, job.env, handle)
    return result


def _record(result: TrainResult, event: dict) -> None:
    kind = event["type"]
    if kind == "worker":
        if event["rank"] == 0:
            result.attempts += 1
            if event["resumed_from"]:
                result.resumed_from.append(event["resumed_from"])
            result.worker_pids = {}
        result.worker_pids[event["rank"]] = event["pid"]
    elif kind == "step":
        result.history.append(event["metrics"])
        result.steps = max(result.steps, event["step"])
    elif kind == "final":
        result.final = event
        result.checkpoint = event.get("checkpoint")


def moe_warning(model_config, train: TrainConfig) -> str | None:
    """A warning when a MoE model would train without the load-balancing loss (its router can then
    collapse onto a few experts), else None."""
    from tasks.core.model import MOE_MODEL_TYPES

    if getattr(model_config, "model_type", None) not in MOE_MODEL_TYPES:
        return None
    coef = train.router_aux_loss_coef
    if coef is None:
        coef = getattr(model_config, "router_aux_loss_coef", 0.0)
    if not train.moe_aux_loss or not coef:
        return (
            f"{model_config.model_type} is a mixture-of-experts model and trains without the router's "
            "load-balancing loss (train.moe_aux_loss / train.router_aux_loss_coef): experts may collapse; "
            "set train.moe_aux_loss=true and a coefficient > 0 (0.001-0.02 is usual)"
        )
    return None
