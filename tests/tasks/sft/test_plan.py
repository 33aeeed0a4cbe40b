"""The SFT memory plan (tasks/sft/plan.py): parameter counts from a config alone (Mixtral 8x7B with fused
experts, a Llama, LoRA as peft counts it), model states equal to DeepSpeed's own estimators, Mixtral 8x7B
on 8 x 80 GB with ZeRO-3 refused without offload and fitting with it, the cluster example's plan, and a
plan that does not fit refused by the flow before any worker starts. No weights, no Ray."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from flows._common import to_config
from flows.finetune import FinetuneConfig  # registers the schema the compose below needs
from tasks.core.errors import CompalignError, ConfigError
from tasks.sft.config import LoraSettings, TrainConfig
from tasks.sft.plan import (
    GIB,
    ModelCounts,
    Setup,
    check,
    count_model,
    deepspeed_estimate,
    main,
    plan_fit,
    plan_run,
)
from tests.cluster.test_manifests import _flow_of
from tests.conftest import REPO, compose, tiny_config

MIXTRAL_JSON = REPO / "cluster/models/mixtral-8x7b-config.json"
RAYJOB = REPO / "cluster/kuberay/rayjob-finetune-mixtral.yaml"


@pytest.fixture(scope="module")
def mixtral_config():
    from transformers import AutoConfig

    return AutoConfig.for_model(**json.loads(MIXTRAL_JSON.read_text()))


@pytest.fixture(scope="module")
def mixtral(mixtral_config):
    return count_model(mixtral_config)


def _zero3(workers: int = 8, opt: bool = False, par: bool = False, **kw) -> Setup:
    return Setup(
        workers, 1, 3, opt, par, kw.pop("micro_batch", 1), kw.pop("seq_len", 2048), True, "bf16", **kw
    )


def test_mixtral_8x7b_counts_from_its_config_alone(mixtral):
    assert mixtral.total == pytest.approx(46.7e9, rel=0.01)
    assert mixtral.trainable == mixtral.total
    # A whole sparse MoE block (8 fused experts + router) is the largest ZeRO-3 gather unit.
    assert mixtral.gather == 8 * 3 * 4096 * 14336 + 8 * 4096
    assert "MixtralSparseMoeBlock" in mixtral.gather_unit and "leaf" in mixtral.gather_unit
    assert (mixtral.layers, mixtral.hidden, mixtral.vocab) == (32, 4096, 32000)


@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen2_moe"])
def test_counts_match_the_built_model_and_peft(kind):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind, 512)
    counts = count_model(config)
    model = AutoModelForCausalLM.from_config(config)
    assert counts.total == sum(p.numel() for p in model.parameters())  # tied embeddings once
    lora = count_model(config, LoraSettings(enabled=True, r=4))
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert lora.trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert lora.total == sum(p.numel() for p in adapted.parameters())
    named = count_model(config, LoraSettings(enabled=True, r=2, target_modules=["q_proj", "v_proj"]))
    assert named.trainable == 3 * 2 * ((64 + 64) + (64 + 2 * 16))  # 3 layers; v_proj is 2 kv heads x 16


def test_frozen_router_is_not_trained():
    counts = count_model(tiny_config("mixtral", 512), freeze_router=True)
    assert counts.total - counts.trainable == 3 * 4 * 64  # 3 layers of a (4 experts x 64) gate


@pytest.mark.parametrize("opt,par", [(False, False), (True, False), (True, True)])
def test_zero3_model_states_equal_deepspeeds_estimator(mixtral, opt, par):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    plan = plan_fit(mixtral, _zero3(8, opt, par))
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(mixtral.total, mixtral.gather, 8, 1, opt, par, True)
    assert plan.model_states * GIB == pytest.approx(gpu, abs=2)
    assert deepspeed_estimate(mixtral, plan.setup) == pytest.approx((cpu / GIB, gpu / GIB))


@pytest.mark.parametrize("opt", [False, True])
def test_zero2_model_states_equal_deepspeeds_estimator(opt):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = count_model(tiny_config("llama", 49152))
    plan = plan_fit(counts, replace(_zero3(4, opt), stage=2))
    _, gpu = estimate_zero2_model_states_mem_needs(counts.total, 4, 1, opt)
    assert plan.model_states * GIB == pytest.approx(gpu, abs=2)


def test_mixtral_on_8x80gb_zero3_needs_offload(mixtral):
    bare = plan_fit(mixtral, _zero3())
    # 18 bytes per parameter over 8 GPUs (~98 GiB) plus one gathered MoE block (2 x 2 bytes per param).
    assert bare.weights + bare.states == pytest.approx(18 * 46.70e9 / 8 / GIB, rel=0.01)
    assert bare.gathered == pytest.approx(4 * mixtral.gather / GIB)
    assert 100 < bare.per_gpu < 115
    with pytest.raises(CompalignError) as refused:
        check(bare, 80.0)
    message = str(refused.value)
    assert f"{bare.per_gpu:.1f} GiB per GPU > 80.0 GiB (train.gpu_memory_gib)" in message
    assert "deepspeed=zero3_offload" in message and "train.workers=16" in message

    optimizer = plan_fit(mixtral, _zero3(opt=True))
    both = plan_fit(mixtral, _zero3(opt=True, par=True))
    assert 15 < optimizer.per_gpu < 30 and 5 < both.per_gpu < optimizer.per_gpu
    check(optimizer, 80.0)
    check(both, 80.0)
    # Offloaded: 16 bytes per parameter (+ 2 with the parameters) in host memory, split over the node.
    assert optimizer.host_per_node == pytest.approx(16 * mixtral.total / GIB + 8, rel=0.01)
    assert both.host_per_node == pytest.approx(18 * mixtral.total / GIB + 8, rel=0.01)


def test_activations_scale_with_batch_sequence_and_checkpointing(mixtral):
    base = plan_fit(mixtral, _zero3(opt=True))
    assert plan_fit(mixtral, _zero3(opt=True, micro_batch=2)).activations == pytest.approx(
        2 * base.activations
    )
    assert plan_fit(mixtral, _zero3(opt=True, micro_batch=2)).logits == pytest.approx(2 * base.logits)
    assert base.logits == pytest.approx(2048 * 32000 * 14 / GIB)  # bf16 logits, fp32 loss and gradients
    full = plan_fit(mixtral, replace(_zero3(opt=True), gradient_checkpointing=False))
    assert full.activations > 10 * base.activations


def _rayjob() -> tuple[FinetuneConfig, dict]:
    job = yaml.safe_load(RAYJOB.read_text())
    flow, tokens = _flow_of(job["spec"]["entrypoint"])
    assert flow == "finetune"
    return to_config(compose("finetune", tokens), FinetuneConfig), job


def test_cluster_mixtral_example_plan_fits(mixtral_config):
    cfg, job = _rayjob()
    assert cfg.model == json.loads(MIXTRAL_JSON.read_text())["_name_or_path"]
    assert cfg.deepspeed.stage == 3 and cfg.train.workers == 8 and cfg.train.gpu_memory_gib == 80
    fit = plan_run(cfg, mixtral_config, "bf16", local=False)
    check(fit, cfg.train.gpu_memory_gib)
    assert fit.per_gpu < 40
    # The host side of the plan, ours and DeepSpeed's, fits the one gpu-8x pod's memory.
    (pod,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    container = pod["template"]["spec"]["containers"][0]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == fit.setup.workers_per_node == 8
    limit_gib = float(container["resources"]["limits"]["memory"].removesuffix("Gi"))
    ds_host, ds_gpu = deepspeed_estimate(fit.counts, fit.setup)
    assert fit.host_per_node < limit_gib and ds_host < limit_gib
    assert fit.model_states == pytest.approx(ds_gpu)
    # The same job without the offload is refused.
    with pytest.raises(CompalignError, match="GiB per GPU > 80.0 GiB"):
        check(plan_fit(fit.counts, replace(fit.setup, offload_optimizer=False)), cfg.train.gpu_memory_gib)


def test_cli_prints_ours_beside_deepspeeds(capsys):
    main(["--config", str(MIXTRAL_JSON), "--gpus", "8", "--gpu-memory-gib", "80"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("none", "optim"))}
    assert rows["none"][-1] == "REFUSED" and rows["optimizer"][-1] == rows["optimizer+params"][-1] == "yes"
    for row in rows.values():
        assert row[1] == row[2]  # model states: ours == DeepSpeed's
    assert "46.70B parameters" in out and "offload none: the memory plan does not fit" in out


def test_the_ci_cpu_run_fits_and_host_memory_is_checked():
    cfg = to_config(compose("finetune", []), FinetuneConfig)  # packaged SmolLM2, 2 CPU workers
    from tasks.core.model import inspect_model

    fit = plan_run(cfg, inspect_model(cfg.model, cfg.model_options).config, "fp32", local=True)
    assert not fit.setup.on_gpu and fit.setup.workers_per_node == 2
    assert fit.host_per_node == pytest.approx(2 * fit.per_worker) and fit.host_per_node < 16
    check(fit, None, 24.0)  # the CI machine
    with pytest.raises(CompalignError, match=r"GiB of host memory \(before activations\) > 2.0 GiB here"):
        check(fit, None, 2.0)  # the model states alone do not fit
    # Batches of data.max_length tokens do not count against the host (most sequences are shorter).
    huge = plan_fit(fit.counts, replace(fit.setup, micro_batch=512, seq_len=8192))
    assert (
        huge.host_per_node > 1000 > 2 * huge.host_floor_per_node == pytest.approx(2 * fit.host_floor_per_node)
    )
    check(huge, None, 24.0)
    assert "plan.gpu_gib" not in fit.metrics() and fit.metrics()["plan.worker_gib"] == fit.per_worker


def test_gpu_memory_key_is_checked():
    with pytest.raises(ConfigError, match="train.gpu_memory_gib must be > 0"):
        TrainConfig(gpus_per_worker=1, gpu_memory_gib=0)
    with pytest.raises(ConfigError, match=r"train.gpu_memory_gib needs GPU workers"):
        TrainConfig(gpu_memory_gib=80)
    assert math.isclose(TrainConfig(gpus_per_worker=1, gpu_memory_gib=80).gpu_memory_gib, 80)


def _mixtral_without_weights(folder: Path, packaged_dir: Path) -> Path:
    """Mixtral 8x7B's config beside the packaged SmolLM2's tokenizer and an empty weights file: a model the
    flow inspects (and plans) but never loads."""
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.json").write_text(MIXTRAL_JSON.read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (packaged_dir / name).is_file():
            shutil.copy(packaged_dir / name, folder / name)
    return folder


def test_flow_refuses_a_plan_that_does_not_fit_before_any_worker(tmp_path, packaged_dir):
    mixtral = _mixtral_without_weights(tmp_path / "mixtral", packaged_dir)
    gpu = "GiB per GPU > 1.0 GiB (train.gpu_memory_gib)"
    host = "GiB of host memory (before activations) > "  # 2 CPU workers with ~470 GiB of fp32 states each
    # Batches of data.max_length tokens beyond this machine's memory are only a warning: that run then
    # fails on its schedule (97 training sequences do not fill one step of 2 x 512).
    batch = "lower them if workers are killed"
    cases = [  # (overrides, what the output says, refused by the plan)
        (["train.gpus_per_worker=1", "train.gpu_memory_gib=1"], gpu, True),
        ([f"model={mixtral}"], host, True),
        (["train.batch_size=512", "data.max_length=8192"], batch, False),
    ]
    common = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"train.storage_uri={tmp_path}/ray"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")} | {"PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "flows.finetune", *common]
    started = [  # together: each spends its ~10 s importing
        subprocess.Popen(
            [*command, *extra],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for extra, _, _ in cases
    ]
    for (extra, message, refused), proc in zip(cases, started, strict=True):
        output, _ = proc.communicate(timeout=600)
        context = (extra, output[-3000:])
        assert proc.returncode == 2 and message in output and "Traceback" not in output, context
        assert "memory plan: " in output and ("the memory plan does not fit" in output) == refused, context
        assert refused or "fewer than one optimizer step" in output, context
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()


def test_the_general_finetune_rayjob_fits_its_gpus(mixtral_config):
    job = yaml.safe_load((REPO / "cluster/kuberay/rayjob-finetune.yaml").read_text())
    flow, tokens = _flow_of(job["spec"]["entrypoint"])
    cfg = to_config(compose(flow, tokens), FinetuneConfig)
    assert cfg.train.max_steps is None  # trains its epochs, not the CPU default's 8 steps
    fit = plan_run(cfg, mixtral_config, "bf16", local=False)
    check(fit, cfg.train.gpu_memory_gib)
    assert fit.per_gpu < cfg.train.gpu_memory_gib


@pytest.mark.parametrize(
    "kind,width,router,gather,unit",
    [  # h 64, 4 heads of 16, 2 kv heads: 4h + 3 x 64 + 2 x 32 = 512, then the MLP's 5 x intermediate
        ("llama", 512 + 5 * 128, 0, 512 * 64, "largest module"),  # the embedding
        ("mixtral", 512 + 2 * (2 * 64 + 5 * 96), 2 * 4, 4 * 3 * 64 * 96 + 4 * 64, "MixtralSparseMoeBlock"),
        ("qwen2_moe", 512 + 2 * (2 * 64 + 5 * 48) + 2 * 64 + 5 * 64, 2 * 4,
         4 * 3 * 64 * 48 + 4 * 64 + 3 * 64 * 64 + 64, "Qwen2MoeSparseMoeBlock"),
    ],
)  # fmt: skip
def test_count_model_activation_widths_and_gather_unit(kind, width, router, gather, unit):
    counts = count_model(tiny_config(kind, 512))
    assert (counts.token_width, counts.router_width, counts.gather) == (width, router, gather)
    assert counts.gather_unit == (unit if unit == "largest module" else f"{unit}, a leaf module")
    assert (counts.name, counts.layers, counts.hidden, counts.vocab) == (kind, 3, 64, 512)


def test_count_model_head_dim_name_and_frozen_shared_expert_router():
    from transformers import LlamaConfig

    config = LlamaConfig(**{**tiny_config("llama", 512).to_dict(), "head_dim": 32})
    config._name_or_path = "org/tiny"
    counts = count_model(config)
    assert counts.token_width == 4 * 64 + 3 * 4 * 32 + 2 * 2 * 32 + 5 * 128 and counts.name == "org/tiny"
    qwen = count_model(tiny_config("qwen2_moe", 512), freeze_router=True)
    assert qwen.total - qwen.trainable == 3 * 4 * 64  # the routers' gates, not the shared expert's gate


TOY = ModelCounts(
    "toy", 3_000_000_000, 2_000_000_000, 100_000_000, "largest module", 10, 1000, 50_000, 9000, 16
)


def _setup(stage=3, opt=False, par=False, checkpointing=True, precision="bf16", workers=4, gpus=1.0, **kw):
    return Setup(workers, gpus, stage, opt, par, 2, 512, checkpointing, precision, **kw)


def _bytes(plan) -> tuple[float, ...]:
    fields = ("weights", "states", "gathered", "activations", "logits", "buffers", "host_per_worker")
    return tuple(getattr(plan, f) * GIB for f in fields)


# 1024 tokens; a layer keeps 1024 x (9000 x e + 16 x 4) bytes, checkpointing 10 x 1024 x 1000 x e + one layer.
BF16_LAYER, FP32_LAYER = 1024 * (9000 * 2 + 64), 1024 * (9000 * 4 + 64)
BF16_CKPT, BF16_LOGITS = 10 * 1024 * 1000 * 2 + BF16_LAYER, 1024 * 50_000 * 14


@pytest.mark.parametrize(
    "setup,expected",
    [
        (_setup(), (1.5e9, 8e9, 4e8, BF16_CKPT, BF16_LOGITS, 1e9 + 2 * GIB, GIB)),
        (_setup(checkpointing=False), (1.5e9, 8e9, 4e8, 10 * BF16_LAYER, BF16_LOGITS, 1e9 + 2 * GIB, GIB)),
        (_setup(par=True), (0, 8e9, 4e8, BF16_CKPT, BF16_LOGITS, 1e9 + 2 * GIB, 1.5e9 + GIB)),
        (_setup(opt=True), (1.5e9, 0, 4e8, BF16_CKPT, BF16_LOGITS, 1e9 + 2 * GIB, 8e9 + GIB)),
        (_setup(2, opt=True, precision="fp32"),
         (1.2e10, 0, 0, 10 * 1024 * 1000 * 4 + FP32_LAYER, 1024 * 50_000 * 16, 2e9 + 2 * GIB, 8e9 + GIB)),
        (_setup(1, reduce_bucket=10**8), (6e9, 4e9 + 8e9, 0, BF16_CKPT, BF16_LOGITS, 2e8 + 2 * GIB, GIB)),
        (_setup(0), (6e9, 3.6e10, 0, BF16_CKPT, BF16_LOGITS, 2 * GIB, GIB)),
    ],
)  # fmt: skip
def test_plan_fit_bytes_by_stage_offload_and_precision(setup, expected):
    assert _bytes(plan_fit(TOY, setup)) == pytest.approx(expected, abs=0.5)


def test_cpu_workers_plan_lines_and_metrics():
    cpu = plan_fit(replace(TOY, trainable=10**8), _setup(2, workers=2, gpus=0, precision="fp32"))
    device = 1.2e10 + 18e8 / 2 + 10 * 1024 * 1000 * 4 + FP32_LAYER + 1024 * 50_000 * 16 + 4e8 + GIB
    assert cpu.buffers * GIB == 4e8 + GIB and cpu.host_per_worker * GIB == pytest.approx(device, abs=0.5)
    assert cpu.lines() == [
        "memory plan: toy, 3.00B parameters (0.1B trainable), largest ZeRO-3 gather 0.1B (largest module)",
        "  2 workers x CPU, ZeRO-2, offload none, fp32, micro-batch 2 x 512 tokens, gradient checkpointing on",
        "  model states 12.01 GiB (weights 11.18, grads/optimizer 0.84, gathered 0.00), activations 0.07 + "
        "logits 0.76, buffers 1.37",
        "  per worker 14.22 GiB; host 14.22 GiB per worker, 28.4 GiB per node of 2 workers",
    ]
    assert cpu.metrics() == {
        "plan.params": 3e9, "plan.trainable_params": 1e8, "plan.model_states_gib": cpu.model_states,
        "plan.worker_gib": cpu.per_worker, "plan.activations_gib": cpu.activations + cpu.logits,
        "plan.host_node_gib": 2 * cpu.per_worker,
    }  # fmt: skip
    assert cpu.activations + cpu.logits == pytest.approx(
        (10 * 1024 * 1000 * 4 + FP32_LAYER + 819_200_000) / GIB
    )


def test_gpu_plan_lines_and_metrics():
    counts = replace(TOY, total=2_005_000_001, trainable=1_005_000_001, gather=1_005_000_001)
    gpu = plan_fit(counts, _setup(opt=True, par=True, checkpointing=False, workers=3, gpus=0.5))
    assert gpu.lines() == [
        "memory plan: toy, 2.01B parameters (1.01B trainable), largest ZeRO-3 gather 1.01B (largest module)",
        "  3 workers x 0.5 GPU, ZeRO-3, offload optimizer+params, bf16, micro-batch 2 x 512 tokens, gradient "
        "checkpointing off",
        f"  model states {gpu.model_states:.2f} GiB (weights 0.00, grads/optimizer 0.00, gathered 3.74), "
        "activations 0.17 + logits 0.67, buffers 2.93",
        f"  per GPU {2 * gpu.per_worker:.2f} GiB; host {gpu.host_per_worker:.2f} GiB per worker, "
        f"{3 * gpu.host_per_worker:.1f} GiB per node of 3 workers",
    ]
    assert gpu.metrics() == {
        "plan.params": 2_005_000_001.0, "plan.trainable_params": 1_005_000_001.0,
        "plan.model_states_gib": gpu.model_states, "plan.worker_gib": gpu.per_worker,
        "plan.activations_gib": gpu.activations + gpu.logits, "plan.host_node_gib": 3 * gpu.host_per_worker,
        "plan.gpu_gib": 2 * gpu.per_worker,
    }  # fmt: skip
    assert gpu.activations + gpu.logits == pytest.approx((10 * BF16_LAYER + BF16_LOGITS) / GIB)
