"""SFT throughput and memory: DeepSpeed ZeRO-3 on 2 Ray Train workers (gloo, 1 CPU each) against plain
single-process PyTorch training (AdamW, 2 threads) of the same tiny random Mixtral on the same data and
global batch. Hand-run:

    python tests/bench/bench_sft.py [--steps 12] [--kind mixtral|llama]

Prints tokens/s of each (steps after the first two), their ratio (ZeRO-3 / plain), and the per-step peak
resident memory of each process (ZeRO-3: the larger of the two workers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from tasks.core.config import ModelOptions, RayConfig  # noqa: E402
from tasks.core.model import convert_gguf, packaged_gguf_path, prepare_tokenizer  # noqa: E402
from tasks.runtime.cluster import init_ray  # noqa: E402
from tasks.sft.config import DeepSpeedSettings, LoraSettings, SftDataConfig, TrainConfig  # noqa: E402
from tasks.sft.data import collate, load_conversations, micro_batches, tokenize_set  # noqa: E402
from tasks.sft.job import TrainJob  # noqa: E402
from tasks.sft.train import deepspeed_config, ensure_torch_extensions_dir, fit, plan, worker_env  # noqa: E402
from tests.conftest import make_tiny  # noqa: E402

BATCH, WORKERS, MAX_LENGTH = 4, 2, 128


def plain(model_dir: str, data, steps: int, pad_id: int) -> tuple[list[float], list[float]]:
    """tokens/s and RSS (MiB) per step of one process training on the global batch."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(WORKERS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = micro_batches(len(data), BATCH * WORKERS, 1, 0, 1, 0, 0)
    rates, memory = [], []
    for step in range(steps):
        batch = collate(data, order[step % len(order)], pad_id, packed=False)
        started = time.perf_counter()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        rates.append(float(batch["attention_mask"].sum()) / (time.perf_counter() - started))
        memory.append(psutil.Process().memory_info().rss / 2**20)
    return rates, memory


def zero3(model_dir: str, tokenizer, data, steps: int) -> tuple[list[float], list[float]]:
    train = TrainConfig(workers=WORKERS, batch_size=BATCH, max_steps=steps, lr=1e-3)
    per_epoch, total = plan(data, train)
    job = TrainJob(
        model_path=model_dir, trust_remote_code=False, revision=None, tokenizer=tokenizer,
        train=train, lora=LoraSettings(), deepspeed=deepspeed_config(DeepSpeedSettings(stage=3), train, "fp32"),
        precision="fp32", train_data=ray.put(data), val_data=None, packed=False, pad_id=tokenizer.pad_token_id,
        total_steps=total, steps_per_epoch=per_epoch, output_uri=None,
        env=worker_env(ensure_torch_extensions_dir()),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as storage:
        result = fit(job, storage, "bench-zero3")
    history = sorted(result.history, key=lambda m: m["step"])
    return [m["tokens_per_s"] for m in history], [m["rss_mb_max"] for m in history]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--kind", default="mixtral", choices=["mixtral", "llama"])
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(convert_gguf(packaged_gguf_path(), ModelOptions()))
    prepare_tokenizer(tokenizer, None, "packaged:smollm2")
    convs = load_conversations(SftDataConfig(name="chat_small", source="bundled:chat_small"))
    data, _ = tokenize_set(tokenizer, convs, MAX_LENGTH, packing=False)
    with tempfile.TemporaryDirectory() as folder:
        make_tiny(args.kind, tokenizer).save_pretrained(folder)
        init_ray(RayConfig(num_cpus=WORKERS, log_to_driver=False))  # as the flows start it
        z_rates, z_mem = zero3(folder, tokenizer, data, args.steps)
        ray.shutdown()
        p_rates, p_mem = plain(folder, data, args.steps, tokenizer.pad_token_id)
    z, p = statistics.mean(z_rates[2:]), statistics.mean(p_rates[2:])
    print(
        f"tiny {args.kind}, {args.steps} steps of {BATCH * WORKERS} sequences (<= {MAX_LENGTH} tokens), fp32 on CPU"
    )
    print(f"  DeepSpeed ZeRO-3, {WORKERS} Ray Train workers x 1 CPU: {z:8.0f} tokens/s")
    print(f"  plain PyTorch, 1 process x {WORKERS} threads:        {p:8.0f} tokens/s")
    print(f"  ratio ZeRO-3 / plain: {z / p:.2f}")
    print("  peak RSS per step (MiB), ZeRO-3 (largest worker): " + " ".join(f"{m:.0f}" for m in z_mem))
    print("  peak RSS per step (MiB), plain process:           " + " ".join(f"{m:.0f}" for m in p_mem))


if __name__ == "__main__":
    main()
