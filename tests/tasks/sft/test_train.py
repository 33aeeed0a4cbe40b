"""Training on Ray Train with DeepSpeed: a tiny random Mixtral under ZeRO-3 on 2 gloo workers (falling
loss, router aux loss, per-layer expert load), a checkpoint that reloads with identical logits, and a
killed worker replaced with training resumed from the last checkpoint. Plus the driver-side checks
that fail before any worker starts."""

from __future__ import annotations

import json
import os
import signal

import pytest
import ray
import torch

from tasks.core.errors import CompalignError
from tasks.sft.config import DeepSpeedSettings, LoraSettings, SftDataConfig, TrainConfig
from tasks.sft.data import load_conversations, split_train_val, tokenize_set
from tasks.sft.job import TrainJob
from tasks.sft.train import (
    deepspeed_config,
    ensure_torch_extensions_dir,
    fit,
    moe_warning,
    plan,
    worker_env,
)
from tasks.sft.train_loop import expert_load, lr_factor

STEPS = 8
PROBE = list(range(100, 124))


def _job(
    model_dir, tokenizer, train: TrainConfig, stage: int, output: str, precision: str = "fp32"
) -> TrainJob:
    convs = load_conversations(SftDataConfig(name="chat_small", source="bundled:chat_small"))
    train_rows, val_rows = split_train_val(convs, 0.1, 0)
    train_set, _ = tokenize_set(tokenizer, train_rows, 96, packing=False)
    val_set, _ = tokenize_set(tokenizer, val_rows, 96, packing=False)
    per_epoch, total = plan(train_set, train)
    return TrainJob(
        model_path=str(model_dir),
        trust_remote_code=False,
        revision=None,
        tokenizer=tokenizer,
        train=train,
        lora=LoraSettings(),
        deepspeed=deepspeed_config(DeepSpeedSettings(stage=stage), train, precision),
        precision=precision,
        train_data=ray.put(train_set),
        val_data=ray.put(val_set),
        packed=False,
        pad_id=tokenizer.pad_token_id,
        total_steps=total,
        steps_per_epoch=per_epoch,
        output_uri=output,
        card="# tiny test model\n",
        probe=PROBE,
        env=worker_env(ensure_torch_extensions_dir()),
    )


@pytest.fixture(scope="module")
def mixtral_run(ray_local, tiny_dirs, tokenizer, tmp_path_factory):
    """One ZeRO-3 run of the tiny Mixtral on 2 workers; rank 1 is killed (SIGKILL) at the first step
    after Ray Train registered the step-2 checkpoint."""
    root = tmp_path_factory.mktemp("train")
    train = TrainConfig(workers=2, max_steps=STEPS, batch_size=4, lr=2e-3, checkpoint_every=2, max_failures=2)
    job = _job(tiny_dirs["mixtral"], tokenizer, train, 3, str(root / "final"))
    events, pids, killed = [], {}, []
    snapshot = root / "ray" / "tiny-mixtral" / "checkpoint_manager_snapshot.json"

    def registered_step() -> int:
        """The step of the checkpoint Ray Train has registered (what a restart resumes from)."""
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            return 0
        return int((latest.get("metrics") or {}).get("step", 0))

    def on_event(event):
        events.append(event)
        if event["type"] == "worker":
            pids[event["rank"]] = event["pid"]
        if event["type"] == "step" and not killed and registered_step() >= 2:
            killed.append(pids[1])
            os.kill(pids[1], signal.SIGKILL)

    result = fit(job, str(root / "ray"), "tiny-mixtral", on_event)
    return result, events, killed, root


def test_zero3_mixtral_trains_with_falling_loss_and_router_aux_loss(mixtral_run):
    result, _, _, _ = mixtral_run
    by_step = {m["step"]: m for m in result.history}  # the last attempt's value for repeated steps
    assert sorted(by_step) == list(range(1, STEPS + 1))
    losses = [by_step[s]["loss"] for s in range(1, STEPS + 1)]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    for metrics in by_step.values():
        assert metrics["aux_loss"] > 0
        assert metrics["tokens_per_s"] > 0 and metrics["lr"] > 0
        shares = [metrics[f"moe.layer0.expert{e}"] for e in range(4)]
        assert sum(shares) == pytest.approx(1.0)
        assert {f"moe.layer{i}.max_load" for i in range(3)} <= metrics.keys()
    assert result.final["val_loss"] is not None and result.final["trainable_params"] > 0


def test_saved_checkpoint_reloads_with_identical_logits(mixtral_run):
    from transformers import AutoModelForCausalLM

    result, _, _, root = mixtral_run
    assert result.checkpoint == str(root / "final")
    assert not [p for p in root.iterdir() if ".partial-" in p.name]  # staged, then moved into place
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint, dtype=torch.float32).eval()
    assert model.config.output_router_logits is False  # training-only setting not saved
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROBE])).logits[0]
    torch.testing.assert_close(logits, result.final["probe_logits"], atol=1e-5, rtol=1e-5)


def test_killed_worker_is_replaced_and_training_resumes_from_checkpoint(mixtral_run):
    result, events, killed, _ = mixtral_run
    assert killed and result.attempts == 2
    assert killed[0] not in result.worker_pids.values()
    assert result.resumed_from and result.resumed_from[0] >= 2
    resumed = result.resumed_from[0]
    # After the restart the first step reported continues after the checkpoint instead of starting at 1.
    restart = next(i for i, e in enumerate(events) if e["type"] == "worker" and e["resumed_from"])
    first_after = next(e["step"] for e in events[restart:] if e["type"] == "step")
    assert first_after == resumed + 1
    assert result.steps == STEPS and result.final["step"] == STEPS


def test_deepspeed_config_that_does_not_fit_the_workers_is_refused():
    train = TrainConfig(workers=3, batch_size=4, grad_accum=2)
    assert deepspeed_config(DeepSpeedSettings(stage=2), train, "fp32")["train_batch_size"] == 24
    with pytest.raises(CompalignError, match="does not fit 3 workers.*train_batch_size=32"):
        deepspeed_config(DeepSpeedSettings(stage=3, train_batch_size=32), train, "fp32")
    with pytest.raises(CompalignError, match="needs GPU workers"):
        deepspeed_config(DeepSpeedSettings(stage=3, offload_param=True), train, "fp32")


def test_plan_refuses_data_smaller_than_one_step(tokenizer):
    convs = load_conversations(SftDataConfig(name="x", source="bundled:chat_small", limit=5))
    data, _ = tokenize_set(tokenizer, convs, 64, packing=False)
    with pytest.raises(CompalignError, match="fewer than one optimizer step"):
        plan(data, TrainConfig(workers=2, batch_size=4))
    assert plan(data, TrainConfig(workers=1, batch_size=2, epochs=3)) == (2, 6)


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert factors[-1] > 0.1 and all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))


def test_expert_load_counts_top_k_choices_without_padding():
    logits = (torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 5.0, 4.0, 0.0], [0.0, 0.0, 5.0, 4.0]]),)
    counts = expert_load(logits, 2, 4, torch.tensor([[1, 1, 0]]))
    assert counts.tolist() == [[1.0, 2.0, 1.0, 0.0]]


def test_moe_without_aux_loss_warns(tiny_dirs):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dirs["mixtral"])
    assert moe_warning(config, TrainConfig()) is None
    assert "load-balancing" in moe_warning(config, TrainConfig(moe_aux_loss=False))
    assert "load-balancing" in moe_warning(config, TrainConfig(router_aux_loss_coef=0.0))
    assert (
        moe_warning(AutoConfig.from_pretrained(tiny_dirs["llama"]), TrainConfig(moe_aux_loss=False)) is None
    )


def test_moe_setup_turns_on_router_logits_and_can_freeze_the_router(tiny_dirs):
    from types import SimpleNamespace

    from tasks.sft.train_loop import _load_model, moe_blocks

    job = SimpleNamespace(
        model_path=str(tiny_dirs["mixtral"]),
        revision=None,
        trust_remote_code=False,
        train=TrainConfig(freeze_router=True, router_aux_loss_coef=0.05),
        lora=LoraSettings(),
        precision="fp32",
    )
    model, moe, _ = _load_model(job, {"zero_optimization": {"stage": 2}})
    assert model.config.output_router_logits and moe["coef"] == 0.05 and moe["experts"] == 4
    blocks = moe_blocks(model)
    assert len(blocks) == 3
    assert not any(p.requires_grad for b in blocks for p in b.gate.parameters())
    assert all(p.requires_grad for b in blocks for p in b.experts.parameters())
