"""The training loop each Ray Train worker runs (see tasks/sft/train.py for the driver side).

Per optimizer step every rank runs ``grad_accum`` micro-batches through the DeepSpeed engine; losses,
token counts and (for MoE models) expert loads are summed over ranks, and rank 0 puts the step's metrics
on the event queue. Resumable checkpoints are DeepSpeed checkpoints reported through the Ray Train session (``tasks.runtime.train.Session``)
(every rank uploads its own shard files into the same checkpoint directory).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tasks.core.model import MOE_MODEL_TYPES
from tasks.runtime.train import Session
from tasks.sft.data import collate, micro_batches
from tasks.sft.export import export_checkpoint

log = logging.getLogger("compalign.train")
TAG = "deepspeed"
STATE_FILE = "trainer_state.json"


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sparse MoE blocks (router + experts) of Mixtral / Qwen-MoE style models."""
    return [m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")]


def expert_load(router_logits, top_k: int, n_experts: int, mask: torch.Tensor | None) -> torch.Tensor:
    """(layers, experts) token counts routed to each expert (top-k choices), padding excluded."""
    out = torch.zeros((len(router_logits), n_experts), dtype=torch.float64)
    for layer, logits in enumerate(router_logits):
        chosen = logits.detach().float().topk(top_k, dim=-1).indices.cpu()  # (tokens, top_k)
        weight = torch.ones(chosen.shape[0]) if mask is None else mask.reshape(-1).float().cpu()
        out[layer].scatter_add_(0, chosen.reshape(-1), weight.repeat_interleave(top_k).double())
    return out


def _load_model(job, ds_config: dict):
    """The model, loaded partitioned when ZeRO-3 is on (HfDeepSpeedConfig must stay referenced while
    from_pretrained runs), with MoE router logits / aux loss set up. Returns (model, moe info, keep)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    common = {"revision": job.revision, "trust_remote_code": job.trust_remote_code}
    config = AutoConfig.from_pretrained(job.model_path, **common)
    moe = None
    if config.model_type in MOE_MODEL_TYPES:
        moe = {
            "saved_output_router_logits": bool(getattr(config, "output_router_logits", False)),
            "top_k": config.num_experts_per_tok,
            "experts": getattr(config, "num_local_experts", None) or config.num_experts,
        }
        config.output_router_logits = job.train.moe_aux_loss
        if job.train.router_aux_loss_coef is not None:
            config.router_aux_loss_coef = job.train.router_aux_loss_coef
        moe["coef"] = float(getattr(config, "router_aux_loss_coef", 0.0)) if job.train.moe_aux_loss else 0.0
    keep = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    dtype = torch.bfloat16 if job.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(job.model_path, config=config, dtype=dtype, **common)
    if moe is not None:
        import deepspeed

        blocks = moe_blocks(model)
        if blocks and keep is not None:
            # One ZeRO-3 fetch for the whole block: which experts run differs between ranks, and
            # per-expert fetches would then disagree on the collective calls.
            deepspeed.utils.set_z3_leaf_modules(model, [type(blocks[0])])
        if job.train.freeze_router:
            for block in blocks:
                block.gate.requires_grad_(False)
    if job.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if job.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = list(job.lora.target_modules) or "all-linear"
        lora = LoraConfig(
            r=job.lora.r,
            lora_alpha=job.lora.alpha,
            lora_dropout=job.lora.dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        if job.train.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, lora)
    return model, moe, keep


def _engine(job, model, ds_config: dict):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(params, lr=job.train.lr, weight_decay=job.train.weight_decay)
    train = job.train

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, job.total_steps, train.warmup_steps, train.min_lr_ratio)
        )

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    return engine, scheduler


class _Worker:
    """One rank's state: the engine, its data and where it reports."""

    def __init__(self, job, session: Session) -> None:
        self.job, self.session = job, session
        self.rank, self.world, self.device = session.rank, session.world, session.device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        import deepspeed

        # Ray Train already started the process group; DeepSpeed wraps it (and must, before anything
        # reads its world size).
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.train_data = session.fetch(job.train_data)
        self.val_data = session.fetch(job.val_data) if job.val_data is not None else None
        self.start_step = 0
        with session.restored() as folder:
            if folder is not None:
                self.start_step = json.loads((folder / STATE_FILE).read_text())["step"]
        self.emit(
            {"type": "worker", "rank": self.rank, "pid": os.getpid(), "resumed_from": self.start_step}, True
        )
        self.model, self.moe, self._keep = _load_model(job, job.deepspeed)
        self.engine, self.scheduler = _engine(job, self.model, job.deepspeed)
        with session.restored() as folder:
            if folder is not None:
                self.engine.load_checkpoint(str(folder), tag=TAG)

    def emit(self, event: dict, every_rank: bool = False) -> None:
        self.session.emit(event, every_rank)

    def batch(self, indices: list[int], data) -> dict[str, torch.Tensor]:
        out = collate(data, indices, self.job.pad_id, self.job.packed)
        return {k: v.to(self.device) for k, v in out.items()}

    def step(self, step: int, batches: list[list[int]]) -> dict[str, float]:
        """One optimizer step (grad_accum micro-batches); metrics summed over ranks."""
        job, moe = self.job, self.moe
        started = time.perf_counter()
        stats = torch.zeros(5, dtype=torch.float64)  # ce sum, aux sum, tokens, loss tokens, micro-batches
        loads = (
            torch.zeros((self.model.config.num_hidden_layers, moe["experts"]), dtype=torch.float64)
            if moe
            else None
        )
        lr = float(self.engine.get_lr()[0])
        for micro in batches:
            batch = self.batch(micro, self.train_data)
            out = self.engine(**batch, use_cache=False)  # no cache: packed batches keep attention apart
            self.engine.backward(out.loss)
            self.engine.step()
            aux = float(out.aux_loss.detach()) if moe and out.aux_loss is not None else 0.0
            ce = float(out.loss.detach()) - (moe["coef"] * aux if moe else 0.0)
            mask = batch.get("attention_mask")
            tokens = float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
            stats += torch.tensor(
                [ce, aux, tokens, float((batch["labels"] != -100).sum()), 1.0], dtype=torch.float64
            )
            if moe and out.router_logits is not None:
                loads += expert_load(out.router_logits, moe["top_k"], moe["experts"], mask)
        dist.all_reduce(stats)
        if loads is not None:
            dist.all_reduce(loads)
        memory = torch.tensor([psutil.Process().memory_info().rss / 2**20], dtype=torch.float64)
        if self.device.type == "cuda":
            memory = torch.tensor([torch.cuda.max_memory_allocated(self.device) / 2**20], dtype=torch.float64)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        elapsed = time.perf_counter() - started
        metrics = {
            "loss": float(stats[0] / stats[4]),
            "lr": lr,
            "tokens_per_s": float(stats[2] / elapsed),
            "tokens": float(stats[2]),
            "loss_tokens": float(stats[3]),
            "step_time_s": elapsed,
            "epoch": (step + 1) / job.steps_per_epoch,
            ("gpu_mem_mb_max" if self.device.type == "cuda" else "rss_mb_max"): float(memory[0]),
        }
        if moe:
            metrics["aux_loss"] = float(stats[1] / stats[4])
            if loads is not None and loads.sum() > 0:
                share = loads / loads.sum(-1, keepdim=True)
                for layer in range(share.shape[0]):
                    metrics[f"moe.layer{layer}.max_load"] = float(share[layer].max() * moe["experts"])
                    for expert in range(share.shape[1]):
                        metrics[f"moe.layer{layer}.expert{expert}"] = float(share[layer, expert])
        return metrics

    @torch.no_grad()
    def val_loss(self) -> float | None:
        """Token-weighted validation cross-entropy over all ranks (every rank runs the same number of
        forwards, which ZeRO-3's collective parameter fetches need)."""
        data = self.val_data
        if data is None or len(data) == 0:
            return None
        self.engine.eval()
        size = self.job.train.batch_size
        per_rank = math.ceil(len(data) / self.world)
        totals = torch.zeros(2, dtype=torch.float64)
        for start in range(0, per_rank, size):
            real = [i for i in (self.rank + self.world * (start + j) for j in range(size)) if i < len(data)]
            batch = self.batch(real or [0], data)
            labels = batch.pop("labels")
            logits = self.engine(**batch, use_cache=False).logits.float()
            ce = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
            )
            if real:
                totals += torch.tensor([float(ce), float((labels[:, 1:] != -100).sum())], dtype=torch.float64)
        dist.all_reduce(totals)
        self.engine.train()
        return float(totals[0] / totals[1].clamp_min(1))

    def save_resumable(self, step: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="compalign-ckpt-") as folder:
            self.engine.save_checkpoint(folder, tag=TAG)
            if self.rank == 0:
                (Path(folder) / STATE_FILE).write_text(json.dumps({"step": step}))
            report = {k: v for k, v in metrics.items() if not k.startswith("moe.")}
            self.session.report({**report, "step": step}, folder)
        self.emit({"type": "checkpoint", "step": step})

    def gathered_state(self) -> dict | None:
        """The full state dict on rank 0 (ZeRO-3: gathered layer by layer), None elsewhere."""
        if self.job.deepspeed["zero_optimization"]["stage"] == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.engine.module.state_dict() if self.rank == 0 else None

    @torch.no_grad()
    def probe_logits(self) -> torch.Tensor | None:
        if not self.job.probe:
            return None
        self.engine.eval()
        ids = torch.tensor([self.job.probe], device=self.device)
        return self.engine(input_ids=ids).logits[0].float().cpu()


def worker_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker: train ``config["job"]`` (a tasks.sft.job.TrainJob)."""
    job = config["job"]
    for key, value in job.env.items():
        os.environ.setdefault(key, value)
    from tasks.core.logs import quiet_libraries

    quiet_libraries()
    # DeepSpeed calls torch.distributed functions that torch deprecates, once per collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor|.*reduce_scatter_tensor")
    torch.set_num_threads(max(1, int(job.train.cpus_per_worker)))
    torch.manual_seed(job.train.seed)
    worker = _Worker(job, Session(config))
    train = job.train
    accum = train.grad_accum
    order, order_epoch, metrics, saved = None, None, {}, worker.start_step
    for step in range(worker.start_step, job.total_steps):
        epoch, within = divmod(step, job.steps_per_epoch)
        if order_epoch != epoch:
            order = micro_batches(
                len(worker.train_data), train.batch_size, worker.world, worker.rank, accum, epoch, train.seed
            )
            order_epoch = epoch
        metrics = worker.step(step, order[within * accum : (within + 1) * accum])
        done = step + 1
        if train.eval_every and done % train.eval_every == 0 and done < job.total_steps:
            value = worker.val_loss()
            if value is not None:
                worker.emit({"type": "eval", "step": done, "val_loss": value})
        if done % train.log_every == 0 or done == job.total_steps:
            worker.emit({"type": "step", "step": done, "metrics": {**metrics, "step": done}})
        if train.checkpoint_every and done % train.checkpoint_every == 0 and done < job.total_steps:
            worker.save_resumable(done, metrics)
            saved = done
    final_val = worker.val_loss()
    if saved < job.total_steps:
        worker.save_resumable(job.total_steps, {**metrics, **({"val_loss": final_val} if final_val else {})})
    location = None
    if job.output_uri:  # every rank takes part in gathering ZeRO-3 partitions; rank 0 writes
        state = worker.gathered_state()
        location = (
            export_checkpoint(worker.engine.module, state, job, worker.moe) if worker.rank == 0 else None
        )
    logits = worker.probe_logits()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in worker.model.parameters() if p.requires_grad)
    worker.emit(
        {
            "type": "final",
            "step": job.total_steps,
            "checkpoint": location,
            "val_loss": final_val,
            "probe_logits": logits,
            "trainable_params": trainable,
        }
    )
    dist.barrier()
