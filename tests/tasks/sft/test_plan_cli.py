"""The memory plan's refusal (tasks/sft/plan.py check: the numbers, each suggestion with its need and
whether it fits, the host side) and its CLI's printed plan and table, exactly."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tasks.core.errors import CompalignError
from tasks.sft.plan import check, main, plan_fit
from tests.conftest import REPO
from tests.tasks.sft.test_plan import TOY, _setup

MIXTRAL_JSON = REPO / "cluster/models/mixtral-8x7b-config.json"
TRY = "lora.enabled=true or a smaller model"


def _refusal(plan, *budgets) -> str:
    with pytest.raises(CompalignError) as refused:
        check(plan, *budgets)
    return str(refused.value)


def test_refusal_lists_every_change_that_lowers_the_need_and_what_fits():
    setup = replace(_setup(1, checkpointing=False), micro_batch=4)
    budget = plan_fit(TOY, replace(setup, workers=8)).per_gpu  # exactly what 8 workers need: it fits
    assert _refusal(plan_fit(TOY, setup), budget) == (
        "the memory plan does not fit: 21.4 GiB per GPU > 17.6 GiB (train.gpu_memory_gib). Per worker: model "
        "states 16.8 (weights 5.6, grads/optimizer 11.2, gathered 0.0), activations 1.7, buffers 2.9 GiB; "
        "ZeRO-1, 4 workers, micro-batch 4 x 512 tokens. Try deepspeed=zero3 (13.8 GiB, fits), "
        "deepspeed.offload_optimizer=true (10.2 GiB, fits), deepspeed=zero2_offload (10.2 GiB, fits), "
        "train.workers=8 (17.6 GiB, fits), train.batch_size=1 (and a larger train.grad_accum) (20.1 GiB), "
        "train.gradient_checkpointing=true (21.1 GiB), data.max_length=256 (20.5 GiB), " + TRY
    )


def test_refusal_offers_no_change_that_does_not_lower_the_need():
    # Already checkpointed, micro-batch 1, ZeRO-3: no batch, checkpointing or zero3 suggestion.
    assert _refusal(plan_fit(TOY, replace(_setup(3), micro_batch=1)), 8.0) == (
        "the memory plan does not fit: 12.5 GiB per GPU > 8.0 GiB (train.gpu_memory_gib). Per worker: model "
        "states 9.2 (weights 1.4, grads/optimizer 7.5, gathered 0.4), activations 0.4, buffers 2.9 GiB; "
        "ZeRO-3, 4 workers, micro-batch 1 x 512 tokens. Try deepspeed.offload_optimizer=true (5.1 GiB, fits), "
        "deepspeed=zero3_offload (3.7 GiB, fits), train.workers=8 (8.1 GiB), data.max_length=256 (12.3 GiB), "
        + TRY
    )
    # ZeRO-2: the offload is ZeRO-2's (its parameters stay on the GPU), zero3 shards the weights.
    assert _refusal(plan_fit(TOY, _setup(2, workers=2)), 20.0) == (
        "the memory plan does not fit: 26.0 GiB per GPU > 20.0 GiB (train.gpu_memory_gib). Per worker: model "
        "states 22.4 (weights 5.6, grads/optimizer 16.8, gathered 0.0), activations 0.7, buffers 2.9 GiB; "
        "ZeRO-2, 2 workers, micro-batch 2 x 512 tokens. Try deepspeed=zero3 (21.7 GiB), "
        "deepspeed=zero2_offload (9.2 GiB, fits), train.workers=4 (17.6 GiB, fits), train.batch_size=1 (and a "
        "larger train.grad_accum) (25.6 GiB), data.max_length=256 (25.6 GiB), " + TRY
    )


def test_host_refusal_and_exact_budgets():
    cpu = plan_fit(TOY, _setup(2, workers=2, gpus=0, precision="fp32"))
    # The host side ranks by what the node needs before the batch: no batch-shape suggestion.
    assert _refusal(cpu, None, 60.0) == (
        "the memory plan does not fit: 61.6 GiB of host memory (before activations) > 60.0 GiB here. Per "
        "worker: model states 27.9 (weights 11.2, grads/optimizer 16.8, gathered 0.0), activations 0.8, "
        "buffers 2.9 GiB; ZeRO-2, 2 workers, micro-batch 2 x 512 tokens. Try deepspeed=zero3 (48.2 GiB, "
        "fits), deepspeed=zero2_offload (57.9 GiB, fits), " + TRY
    )
    check(cpu, 1.0, cpu.host_floor_per_node)  # exactly the budget fits; a GPU budget means nothing to CPUs
    gpu = plan_fit(TOY, _setup())
    check(gpu, gpu.per_gpu, gpu.host_floor_per_node)
    both = _refusal(gpu, 1.0, 0.5)  # 4 workers on one node, 1 GiB of host memory each
    assert both.startswith(
        f"the memory plan does not fit: {gpu.per_gpu:.1f} GiB per GPU > 1.0 GiB (train.gpu_memory_gib); 4.0 "
        "GiB of host memory (before activations) > 0.5 GiB here. Per worker:"
    )


def _printed(capsys, *argv: str) -> list[str]:
    main(["--config", *argv])
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[")]


HEAD = "ZeRO-3 offload        states DS states    activ.   buffers   per GPU host/node   DS host      fits"
FIRST = (
    "46.70B parameters (46.7B trainable), largest ZeRO-3 gather 1.41B (MixtralSparseMoeBlock, a leaf module)"
)


def test_cli_defaults_table_and_refusals(capsys):
    out = _printed(capsys, str(MIXTRAL_JSON))
    assert out[:7] == [
        f"memory plan: mistralai/Mixtral-8x7B-Instruct-v0.1, {FIRST}",
        "  8 workers x 1 GPU, ZeRO-3, offload none, bf16, micro-batch 1 x 2048 tokens, gradient checkpointing on",
        "  80 GiB per GPU, 8 GPUs per node; GiB, ours beside DeepSpeed's estimate (DS: model states only)",
        HEAD,
        "none                  103.11    103.11      2.08      2.93    108.13      8.00     63.00   REFUSED",
        "optimizer              16.12     16.12      2.08      2.93     21.14    703.93   1043.89       yes",
        "optimizer+params        5.25      5.25      2.08      2.93     10.26    790.92   1174.37       yes",
    ]
    assert out[7:] == [
        "",
        "offload none: the memory plan does not fit: 108.1 GiB per GPU > 80.0 GiB (train.gpu_memory_gib). Per "
        "worker: model states 103.1 (weights 10.9, grads/optimizer 87.0, gathered 5.3), activations 2.1, "
        "buffers 2.9 GiB; ZeRO-3, 8 workers, micro-batch 1 x 2048 tokens. Try deepspeed.offload_optimizer=true "
        "(21.1 GiB, fits), deepspeed=zero3_offload (10.3 GiB, fits), train.workers=16 (59.2 GiB, fits), "
        "data.max_length=1024 (107.1 GiB), " + TRY,
    ]


def test_cli_flags_and_a_config_folder(capsys, tmp_path):
    values = json.loads(MIXTRAL_JSON.read_text())
    del values["_name_or_path"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    flags = ["--gpus", "4", "--gpus-per-node", "2", "--gpu-memory-gib", "40", "--batch-size", "2"]
    out = _printed(capsys, str(tmp_path), *flags, "--seq-len", "1024", "--no-gradient-checkpointing")
    assert out[:7] == [
        f"memory plan: config.json, {FIRST}",  # no _name_or_path: the file's name
        "  4 workers x 1 GPU, ZeRO-3, offload none, bf16, micro-batch 2 x 1024 tokens, gradient checkpointing off",
        "  40 GiB per GPU, 2 GPUs per node; GiB, ours beside DeepSpeed's estimate (DS: model states only)",
        HEAD,
        "none                  200.98    200.98     24.11      2.93    228.02      2.00     15.75   REFUSED",
        "optimizer              27.00     27.00     24.11      2.93     54.04    349.96    521.94   REFUSED",
        "optimizer+params        5.25      5.25     24.11      2.93     32.29    393.46    587.19       yes",
    ]
    assert out[7] == "" and len(out) == 10
    assert out[8].startswith("offload none: the memory plan does not fit: 228.0 GiB per GPU > 40.0 GiB")
    assert out[9] == (
        "offload optimizer: the memory plan does not fit: 54.0 GiB per GPU > 40.0 GiB (train.gpu_memory_gib). "
        "Per worker: model states 27.0 (weights 21.7, grads/optimizer 0.0, gathered 5.3), activations 24.1, "
        "buffers 2.9 GiB; ZeRO-3, 4 workers, micro-batch 2 x 1024 tokens. Try deepspeed=zero3_offload (32.3 "
        "GiB, fits), train.workers=8 (43.2 GiB), train.batch_size=1 (and a larger train.grad_accum) (42.0 GiB), "
        "train.gradient_checkpointing=true (32.0 GiB, fits), data.max_length=512 (42.0 GiB), " + TRY
    )


def test_cli_help_and_a_missing_config(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m tasks.sft.plan [-h] --config CONFIG")
    assert (
        "Print the ZeRO-3 plan of a model config, without and with offload, beside DeepSpeed's estimate."
        in text
    )
    assert "a transformers config.json (file or directory)" in text and "--no-gradient-checkpointing" in text
    with pytest.raises(SystemExit) as done:
        main([])
    assert (
        done.value.code == 2 and "the following arguments are required: --config" in capsys.readouterr().err
    )
