"""The memory plan of an SFT run, made from the model's config alone (no weights) before any worker starts.

Per worker (one DeepSpeed rank, one GPU): model states + activations + buffers. Model states follow
DeepSpeed's own estimators (``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``,
``stage_1_and_2.estimate_zero2_model_states_mem_needs``): for 16-bit training of every weight they are
the same numbers, generalised here to fp32 (4-byte weights) and to frozen weights (LoRA, a frozen
router: no gradient or optimizer state). Under ZeRO-3 a whole sparse MoE block is one gather unit (the
training loop makes it a leaf module), so for Mixtral the largest "layer" is a block's 8 experts.
Activations assume memory-efficient attention (SDPA / flash: no sequence x sequence scores kept) and
count the logits of the loss in fp32. Sizes are bytes inside and GiB (2**30 bytes) in ``FitPlan``.

    python -m tasks.sft.plan --config cluster/models/mixtral-8x7b-config.json --gpus 8 --gpu-memory-gib 80
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from tasks.core.errors import CompalignError
from tasks.sft.config import FinetuneConfig, LoraSettings

GIB = 2**30
GPU_OVERHEAD_GIB = 2.0  # per GPU process: CUDA context, NCCL buffers, allocator fragmentation
CPU_OVERHEAD_GIB = 1.0  # per process, in host memory: Python, torch, the gloo/Ray worker
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)
GPUS_PER_NODE = 8  # GPUs per node of a cluster run (cluster/'s gpu-8x node type), for host memory per node


@dataclass(frozen=True)
class ModelCounts:
    """What the plan needs of a model: parameter counts and the widths activations scale with."""

    name: str
    total: int  # parameters, tied weights once
    trainable: int  # with a gradient and optimizer state (LoRA: the adapters only)
    gather: int
    """Parameters of the largest ZeRO-3 gather unit: a whole sparse MoE block (a leaf module), else the
    largest module's own parameters (DeepSpeed's largest_layer_params)."""
    gather_unit: str
    layers: int
    hidden: int
    vocab: int
    token_width: int  # 16-bit (fp32) values per token per layer kept for the backward pass
    router_width: int  # fp32 values per token per layer of MoE routers (0: dense)


@dataclass(frozen=True)
class Setup:
    """How the model is trained: workers, ZeRO, batch shape and precision (bf16 or fp32)."""

    workers: int
    gpus_per_worker: float
    stage: int
    offload_optimizer: bool
    offload_param: bool
    micro_batch: int  # sequences per worker per micro-step
    seq_len: int  # tokens per sequence: data.max_length (a batch is padded to its longest, never beyond)
    gradient_checkpointing: bool
    precision: str
    reduce_bucket: int = REDUCE_BUCKET
    gpus_per_node: int = GPUS_PER_NODE

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def workers_per_node(self) -> int:
        """Workers sharing one node's host memory (CPU workers: all, on one host)."""
        per_node = int(self.gpus_per_node / self.gpus_per_worker) if self.on_gpu else self.workers
        return max(1, min(self.workers, per_node))


@dataclass(frozen=True)
class FitPlan:
    """Memory of one worker in GiB, on its GPU (host memory for CPU workers): weights (the ZeRO-3 shard
    or a full copy), states (gradients, fp32 master weights, Adam m and v), gathered (weights and gradients
    of the largest ZeRO-3 gather unit), activations, logits (the output, the loss's fp32 log-softmax and
    their gradients), buffers (gradient reduce bucket, per-process overhead), and the host memory per
    worker (offloaded states and the process; CPU workers: all of it)."""

    counts: ModelCounts
    setup: Setup
    weights: float
    states: float
    gathered: float
    activations: float
    logits: float
    buffers: float
    host_per_worker: float

    @property
    def model_states(self) -> float:
        return self.weights + self.states + self.gathered

    @property
    def per_worker(self) -> float:
        return self.model_states + self.activations + self.logits + self.buffers

    @property
    def per_gpu(self) -> float:
        """Workers sharing a GPU (gpus_per_worker < 1) add up on it."""
        share = self.setup.gpus_per_worker
        return self.per_worker * (min(self.setup.workers, int(1 / share)) if 0 < share < 1 else 1)

    @property
    def host_per_node(self) -> float:
        return self.host_per_worker * self.setup.workers_per_node

    @property
    def host_floor_per_node(self) -> float:
        """``host_per_node`` less what the batch takes (CPU workers' activations and logits): the host
        memory a node needs whatever the sequences' lengths."""
        batch = 0.0 if self.setup.on_gpu else self.activations + self.logits
        return (self.host_per_worker - batch) * self.setup.workers_per_node

    def lines(self) -> list[str]:
        """The plan, for the log."""
        c, s = self.counts, self.setup
        offload = [k for k, on in (("optimizer", s.offload_optimizer), ("params", s.offload_param)) if on]
        where, total = (f"{s.gpus_per_worker:g} GPU", self.per_gpu) if s.on_gpu else ("CPU", self.per_worker)
        return [
            f"memory plan: {c.name}, {c.total / 1e9:.2f}B parameters ({c.trainable / 1e9:.3g}B trainable), "
            f"largest ZeRO-3 gather {c.gather / 1e9:.3g}B ({c.gather_unit})",
            f"  {s.workers} workers x {where}, ZeRO-{s.stage}, offload {'+'.join(offload) or 'none'}, "
            f"{s.precision}, micro-batch {s.micro_batch} x {s.seq_len} tokens, gradient checkpointing "
            f"{'on' if s.gradient_checkpointing else 'off'}",
            f"  model states {self.model_states:.2f} GiB (weights {self.weights:.2f}, grads/optimizer "
            f"{self.states:.2f}, gathered {self.gathered:.2f}), activations {self.activations:.2f} + logits "
            f"{self.logits:.2f}, buffers {self.buffers:.2f}",
            f"  per {'GPU' if s.on_gpu else 'worker'} {total:.2f} GiB; host {self.host_per_worker:.2f} GiB "
            f"per worker, {self.host_per_node:.1f} GiB per node of {s.workers_per_node} workers",
        ]

    def metrics(self) -> dict[str, float]:
        """The plan's numbers under ``plan.`` keys (the flow logs them to MLflow)."""
        out = {"plan.params": float(self.counts.total), "plan.trainable_params": float(self.counts.trainable),
               "plan.model_states_gib": self.model_states, "plan.worker_gib": self.per_worker,
               "plan.activations_gib": self.activations + self.logits,
               "plan.host_node_gib": self.host_per_node}  # fmt: skip
        return {**out, "plan.gpu_gib": self.per_gpu} if self.setup.on_gpu else out


def count_model(
    config, lora: LoraSettings | None = None, freeze_router: bool = False, trust_remote_code: bool = False
) -> ModelCounts:
    """Parameter counts and activation widths of a transformers config, from a model built on the meta
    device (no memory, no weights). ``lora``: only the adapters peft adds train."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    total = sum(p.numel() for p in model.parameters())
    blocks = [m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")]
    own = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    leaf = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    unit = f"{type(blocks[0]).__name__}, a leaf module" if leaf >= own else "largest module"
    if lora is not None:  # the adapters peft adds (as the training loop asks), built on meta too
        from peft import LoraConfig, get_peft_model

        targets = list(lora.target_modules) or "all-linear"
        with torch.device("meta"):
            model = get_peft_model(model, LoraConfig(r=lora.r, target_modules=targets, task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    else:
        router = sum(p.numel() for b in blocks if hasattr(b, "gate") for p in b.gate.parameters())
        trainable = total - (router if freeze_router else 0)
    h, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    # Saved for backward, per token: both norms' input and output; q, the attention output and its
    # contiguous copy; k, v; per MLP (each chosen expert, its input and weighted output too): gate, up,
    # activation, product, down_proj input.
    width, router_width = 4 * h + 3 * heads * head_dim + 2 * kv, 0
    if blocks:
        inter = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        width += text.num_experts_per_tok * (2 * h + 5 * inter)
        if shared := getattr(text, "shared_expert_intermediate_size", None):
            width += 2 * h + 5 * shared
        router_width = 2 * (getattr(text, "num_local_experts", None) or text.num_experts)
    else:
        width += 5 * text.intermediate_size
    name = getattr(config, "_name_or_path", "") or text.model_type
    return ModelCounts(name, total, trainable, max(own, leaf), unit, text.num_hidden_layers, h,
                       text.vocab_size, width, router_width)  # fmt: skip


def plan_fit(counts: ModelCounts, setup: Setup) -> FitPlan:
    """Per-worker memory of ``setup`` for ``counts``. ZeRO-3: 16-bit weight shard (unless offloaded) +
    16 bytes of gradient and optimizer state per trainable parameter / workers (unless offloaded) + 2 x
    16-bit of the largest gather unit (DeepSpeed's 4 x largest layer); ZeRO-1/2: full weights + 18 bytes
    per trainable parameter / workers (stage 1 keeps full 16-bit gradients). Activations: every layer's
    (or, with gradient checkpointing, every layer's input and one layer's) plus the logits."""
    e, n, t, g = 2 if setup.precision == "bf16" else 4, counts.total, counts.trainable, setup.workers
    gathered = 0.0
    if setup.stage == 3:
        weights = 0.0 if setup.offload_param else e * n / g
        states = 0.0 if setup.offload_optimizer else 16 * t / g
        gathered = 2 * e * counts.gather
    else:
        weights = e * n
        states = {0: 18 * t, 1: e * t + 16 * t / g, 2: 18 * t / g}[setup.stage]
        states = 0.0 if setup.offload_optimizer else states
    tokens = setup.micro_batch * setup.seq_len
    layer = tokens * (counts.token_width * e + counts.router_width * 4)
    # Gradient checkpointing keeps every layer's input and recomputes one layer at a time.
    checkpointed = counts.layers * tokens * counts.hidden * e + layer
    activations = checkpointed if setup.gradient_checkpointing else counts.layers * layer
    logits = tokens * counts.vocab * (e + 12)  # output, fp32 log-softmax, its gradient, the logits' gradient
    bucket = e * min(setup.reduce_bucket, t) if setup.stage >= 1 else 0
    overhead = (GPU_OVERHEAD_GIB if setup.on_gpu else CPU_OVERHEAD_GIB) * GIB
    device = weights + states + gathered + activations + logits + bucket + overhead
    offloaded = (16 * t / g if setup.offload_optimizer else 0) + (e * n / g if setup.offload_param else 0)
    host = offloaded + (CPU_OVERHEAD_GIB * GIB if setup.on_gpu else device)
    return FitPlan(
        counts, setup, *(x / GIB for x in (weights, states, gathered, activations, logits)),
        buffers=(bucket + overhead) / GIB, host_per_worker=host / GIB,
    )  # fmt: skip


def plan_run(cfg: FinetuneConfig, model_config, precision: str, local: bool) -> FitPlan:
    """The plan of a finetune run on the model with ``model_config`` (``local``: every worker on this
    host; else nodes of GPUS_PER_NODE GPUs)."""
    train, ds, lora = cfg.train, cfg.deepspeed, (cfg.lora if cfg.lora.enabled else None)
    counts = count_model(model_config, lora, train.freeze_router, cfg.model_options.trust_remote_code)
    bucket = (ds.extra.get("zero_optimization") or {}).get("reduce_bucket_size", REDUCE_BUCKET)
    per_node = max(1, math.ceil(train.workers * train.gpus_per_worker)) if local else GPUS_PER_NODE
    setup = Setup(train.workers, train.gpus_per_worker, ds.stage, ds.offload_optimizer, ds.offload_param,
                  train.batch_size, cfg.data.max_length, train.gradient_checkpointing, precision,
                  int(bucket), per_node)  # fmt: skip
    return plan_fit(replace(counts, name=cfg.model), setup)


def check(plan: FitPlan, gpu_memory_gib: float | None, host_memory_gib: float | None = None) -> None:
    """Raise CompalignError, with the numbers and what to change, when ``plan`` needs more than each GPU
    (``gpu_memory_gib``: all of the plan, batches of data.max_length tokens included) or the host
    (``host_memory_gib``: what it needs whatever the batch, ``host_floor_per_node``) has; None checks
    nothing there."""
    s, over = plan.setup, []
    gpu_side = s.on_gpu and gpu_memory_gib is not None and plan.per_gpu > gpu_memory_gib
    if gpu_side:
        over.append(f"{plan.per_gpu:.1f} GiB per GPU > {gpu_memory_gib:.1f} GiB (train.gpu_memory_gib)")
    if host_memory_gib is not None and plan.host_floor_per_node > host_memory_gib:
        floor = plan.host_floor_per_node
        over.append(f"{floor:.1f} GiB of host memory (before activations) > {host_memory_gib:.1f} GiB here")
    if not over:
        return
    need = (lambda p: p.per_gpu) if gpu_side else (lambda p: p.host_floor_per_node)
    options = {  # what to change, with its need; only what lowers it is offered
        replace(s, stage=3, offload_param=False): "deepspeed=zero3",
        replace(s, offload_optimizer=True): "deepspeed.offload_optimizer=true",
        replace(s, stage=max(s.stage, 2), offload_optimizer=True, offload_param=s.stage == 3):
            f"deepspeed=zero{max(s.stage, 2)}_offload",
        replace(s, workers=2 * s.workers): f"train.workers={2 * s.workers}",
        replace(s, micro_batch=1): "train.batch_size=1 (and a larger train.grad_accum)",
        replace(s, gradient_checkpointing=True): "train.gradient_checkpointing=true",
        replace(s, seq_len=s.seq_len // 2): f"data.max_length={s.seq_len // 2}",
    }  # fmt: skip
    budget = gpu_memory_gib if gpu_side else host_memory_gib
    tried = ""
    for option, label in options.items():
        if (n := need(plan_fit(plan.counts, option))) < need(plan) - 0.05:
            tried += f"{label} ({n:.1f} GiB{', fits' if n <= budget else ''}), "
    raise CompalignError(
        f"the memory plan does not fit: {'; '.join(over)}. Per worker: model states {plan.model_states:.1f} "
        f"(weights {plan.weights:.1f}, grads/optimizer {plan.states:.1f}, gathered {plan.gathered:.1f}), "
        f"activations {plan.activations + plan.logits:.1f}, buffers {plan.buffers:.1f} GiB; ZeRO-{s.stage}, "
        f"{s.workers} workers, micro-batch {s.micro_batch} x {s.seq_len} tokens. Try {tried}"
        "lora.enabled=true or a smaller model"
    )


def deepspeed_estimate(counts: ModelCounts, setup: Setup) -> tuple[float, float] | None:
    """(host GiB per node, GPU GiB) of the model states by DeepSpeed's own estimator for the same counts
    (it assumes 16-bit training of every weight; zero_init under ZeRO-3, as HfDeepSpeedConfig loads the
    model). None for stage 0, which DeepSpeed does not estimate."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as zero3
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as zero2

    per_node, offload = setup.workers_per_node, setup.offload_optimizer
    nodes = math.ceil(setup.workers / per_node)
    if setup.stage == 3:
        cpu, gpu, _ = zero3(counts.total, counts.gather, per_node, nodes, offload, setup.offload_param, True)
        return cpu / GIB, gpu / GIB
    return tuple(x / GIB for x in zero2(counts.total, per_node, nodes, offload)) if setup.stage else None


def main(argv: list[str] | None = None) -> None:
    """Print the ZeRO-3 plan of a model config, without and with offload, beside DeepSpeed's estimate."""
    from transformers import AutoConfig

    ap = argparse.ArgumentParser(prog="python -m tasks.sft.plan", description=main.__doc__)
    ap.add_argument("--config", required=True, help="a transformers config.json (file or directory)")
    for flag, kind, default in (("--gpus", int, 8), ("--gpus-per-node", int, GPUS_PER_NODE),
                                ("--gpu-memory-gib", float, 80.0), ("--batch-size", int, 1),
                                ("--seq-len", int, 2048)):  # fmt: skip
        ap.add_argument(flag, type=kind, default=default)
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    path = Path(args.config) / "config.json" if Path(args.config).is_dir() else Path(args.config)
    values = json.loads(path.read_text())
    counts = replace(count_model(AutoConfig.for_model(**values)), name=values.get("_name_or_path", path.name))
    base = Setup(args.gpus, 1, 3, False, False, args.batch_size, args.seq_len, args.gradient_checkpointing,
                 "bf16", gpus_per_node=args.gpus_per_node)  # fmt: skip
    print(*plan_fit(counts, base).lines()[:2], sep="\n")
    print(f"  {args.gpu_memory_gib:g} GiB per GPU, {base.workers_per_node} GPUs per node; GiB, ours beside "
          "DeepSpeed's estimate (DS: model states only)")  # fmt: skip
    head = ("states", "DS states", "activ.", "buffers", "per GPU", "host/node", "DS host", "fits")
    print(f"{'ZeRO-3 offload':<18}" + "".join(f"{h:>10}" for h in head))
    refused = []
    for label, opt, par in (("none", 0, 0), ("optimizer", 1, 0), ("optimizer+params", 1, 1)):
        plan = plan_fit(counts, replace(base, offload_optimizer=bool(opt), offload_param=bool(par)))
        ds_host, ds_gpu = deepspeed_estimate(counts, plan.setup)
        try:
            check(plan, args.gpu_memory_gib)
            verdict = "yes"
        except CompalignError as exc:
            verdict, refused = "REFUSED", [*refused, f"offload {label}: {exc}"]
        row = (plan.model_states, ds_gpu, plan.activations + plan.logits, plan.buffers, plan.per_gpu,
               plan.host_per_node, ds_host)  # fmt: skip
        print(f"{label:<18}" + "".join(f"{x:10.2f}" for x in row) + f"{verdict:>10}")
    print("\n".join(["", *refused]))


if __name__ == "__main__":
    main()
