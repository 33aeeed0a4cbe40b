"""The GPU checks, one script: ``python -m pytest -m gpu -s tests/gpu`` (under 8 minutes on one H200).

bf16 on CUDA end to end: the abliterate and sweep flows on the packaged SmolLM2 (refusals removed, the
sweep's front found), DeepSpeed ZeRO-3 on the tiny Mixtral through Ray Train, and, when two GPUs are
visible, a model spanning both and two Ray Train workers. Each test prints one ``GPU FIGURE`` line
(tokens/s, prompts/s, trials/hour, peak GPU memory) and, with COMPALIGN_GPU_REPORT=<file>, appends it
there as JSON. Without CUDA every test here skips (the marker, tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.gpu

PROMPTS = [f"Write one sentence about the number {i}." for i in range(64)]


def report(name: str, **figures: float) -> None:
    line = {"check": name, **{k: round(float(v), 3) for k, v in figures.items()}}
    print("GPU FIGURE", json.dumps(line), flush=True)
    if path := os.environ.get("COMPALIGN_GPU_REPORT"):
        with open(path, "a") as handle:
            handle.write(json.dumps(line) + "\n")


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def run_flow(flow: str, work: Path, *overrides: str) -> tuple[float, str]:
    """``python -m flows.<flow>`` in ``work``; (wall seconds, MLflow run id)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", f"flows.{flow}", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
         f"hydra.run.dir={work}/run", *overrides],
        cwd=work, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1)
    return time.monotonic() - start, runs[0].info.run_id


def metrics(work: Path, run_id: str) -> dict[str, float]:
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db").get_run(run_id).data.metrics


def test_smollm2_collects_and_generates_in_bf16(packaged_dir):
    from tasks.core.config import ModelOptions
    from tasks.core.model import load_model
    from tasks.core.prompts import format_chat
    from tasks.directions.collect import collect_activation_sums

    loaded = load_model("packaged:smollm2", ModelOptions())  # device auto: cuda, dtype auto: bf16
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    torch.cuda.reset_peak_memory_stats()
    collect_activation_sums(loaded.model, loaded.tokenizer, PROMPTS[:8], 3, 32)  # warm-up
    torch.cuda.synchronize()
    start = time.monotonic()
    sums = collect_activation_sums(loaded.model, loaded.tokenizer, PROMPTS, 3, 32)
    torch.cuda.synchronize()
    prompts_s = len(PROMPTS) / (time.monotonic() - start)
    assert torch.isfinite(sums.sums).all()
    batch = loaded.tokenizer(format_chat(loaded.tokenizer, PROMPTS[:32]), return_tensors="pt", padding=True)
    start = time.monotonic()
    out = loaded.model.generate(
        **batch.to(loaded.device), max_new_tokens=128, min_new_tokens=128, do_sample=False
    )
    torch.cuda.synchronize()
    tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    report("smollm2 bf16", prompts_per_s=prompts_s, tokens_per_s=tokens / (time.monotonic() - start),
           peak_gib=peak_gib())  # fmt: skip


def test_abliterate_on_cuda_removes_refusals(tmp_path, packaged_dir):
    wall, run_id = run_flow("abliterate", tmp_path, f"cache.uri={tmp_path}/cache")
    m = metrics(tmp_path, run_id)
    assert m["before.target_rate"] >= 0.8 and m["after.target_rate"] <= 0.2, m
    report("abliterate smollm2-refusal", wall_s=wall, kl=m["after.kl"], refusals_after=m["after.target_rate"])


def test_sweep_on_cuda_finds_a_front(tmp_path, packaged_dir):
    wall, run_id = run_flow("sweep", tmp_path, f"cache.uri={tmp_path}/cache", "search.trials=64")
    m = metrics(tmp_path, run_id)
    assert m["search.front_size"] >= 1, m
    report("sweep smollm2 french", wall_s=wall, trials_per_hour=m["time.trials_per_hour"])


def _train(tiny_dirs, tokenizer, tmp_path, workers: int) -> dict[str, float]:
    from tasks.sft.config import TrainConfig
    from tasks.sft.train import fit
    from tests.tasks.sft.test_train import _job

    train = TrainConfig(workers=workers, gpus_per_worker=1, max_steps=8, batch_size=4, lr=2e-3)
    job = _job(tiny_dirs["mixtral"], tokenizer, train, 3, str(tmp_path / "final"), precision="bf16")
    result = fit(job, str(tmp_path / "ray"), f"gpu-mixtral-{workers}")
    losses = [m["loss"] for m in result.history]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    last = result.history[-1]
    return {"tokens_per_s": last["tokens_per_s"], "peak_gib": last.get("gpu_mem_mb_max", 0) / 1024}


def test_zero3_mixtral_trains_in_bf16_on_a_gpu(ray_local, tiny_dirs, tokenizer, tmp_path):
    report("zero3 tiny mixtral, 1 GPU worker", **_train(tiny_dirs, tokenizer, tmp_path, 1))


needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 visible GPUs")


@needs_two
def test_zero3_on_two_ray_train_workers(ray_local, tiny_dirs, tokenizer, tmp_path):
    report("zero3 tiny mixtral, 2 GPU workers", **_train(tiny_dirs, tokenizer, tmp_path, 2))


@needs_two
def test_a_model_spans_two_gpus_and_matches_one(tiny_dirs):
    from tasks.core.config import ModelOptions
    from tasks.core.hooks import Ablation, intervene
    from tasks.core.model import load_model

    one = load_model(str(tiny_dirs["mixtral"]), ModelOptions(device="cuda:0"))
    both = load_model(str(tiny_dirs["mixtral"]), ModelOptions())  # every visible GPU, balanced
    assert {str(d) for d in both.model.hf_device_map.values()} >= {"0", "1"}, both.model.hf_device_map
    ids = torch.randint(0, one.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    r = torch.nn.functional.normalize(torch.randn(one.model.config.hidden_size), dim=0)
    with torch.no_grad(), intervene(one.model, ablation=Ablation(direction=r)):
        a = one.model(ids.to(one.device)).logits.float().cpu()
    with torch.no_grad(), intervene(both.model, ablation=Ablation(direction=r)):
        b = both.model(ids.to(both.device)).logits.float().cpu()
    assert (a - b).abs().max() < 5e-2  # bf16 on both; the split changes no arithmetic, only placement
    report("mixtral spanning 2 GPUs", max_abs_logit_diff=float((a - b).abs().max()))


@pytest.mark.parametrize("quantization", ["bnb_4bit", "bnb_8bit"])
def test_a_quantized_read_collects_and_ablates(quantization, packaged_dir):
    pytest.importorskip("bitsandbytes")
    from tasks.core.config import ModelOptions
    from tasks.core.hooks import Ablation, intervene
    from tasks.core.model import load_model
    from tasks.directions.collect import collect_activation_sums

    torch.cuda.reset_peak_memory_stats()
    loaded = load_model("packaged:smollm2", ModelOptions(quantization=quantization))
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cuda"
    start = time.monotonic()
    sums = collect_activation_sums(loaded.model, loaded.tokenizer, PROMPTS, 3, 32)
    torch.cuda.synchronize()
    prompts_s = len(PROMPTS) / (time.monotonic() - start)
    assert torch.isfinite(sums.sums).all()
    r = torch.nn.functional.normalize(sums.sums[16, -1].float(), dim=0)
    ids = loaded.tokenizer(["Hello there, how are you?"], return_tensors="pt").input_ids.to(loaded.device)
    with torch.no_grad():
        clean = loaded.model(ids).logits.float()
        with intervene(loaded.model, ablation=Ablation(direction=r)):
            ablated = loaded.model(ids).logits.float()
    assert torch.isfinite(ablated).all() and (ablated - clean).abs().max() > 1e-2
    report(f"smollm2 {quantization}", prompts_per_s=prompts_s, peak_gib=peak_gib())
