"""The trained model as a Hugging Face checkpoint, written by rank 0 at the end of training."""

from __future__ import annotations

from pathlib import Path

from tasks.core.checkpoint import publish_staged
from tasks.sft.job import TrainJob


def export_checkpoint(module, state: dict | None, job: TrainJob, moe: dict | None) -> str | None:
    """Write the trained model as a Hugging Face checkpoint (safetensors, config, tokenizer, card) to
    ``job.output_uri``, staged and moved into place. ``state`` is the full state dict (gathered from
    ZeRO-3 partitions). LoRA adapters are merged into a fresh copy of the base model, or saved alone
    when lora.merge is off. Runs on rank 0 only."""
    if not job.output_uri or state is None:
        return None

    def write(stage: Path) -> None:
        if job.lora.enabled:
            _save_lora(module, state, job, stage)
        else:
            if moe is not None:
                module.config.output_router_logits = moe["saved_output_router_logits"]
            module.save_pretrained(stage, state_dict=state, safe_serialization=True)
        job.tokenizer.save_pretrained(stage)
        (stage / "README.md").write_text(job.card, encoding="utf-8")

    return publish_staged(job.output_uri, write)


def _save_lora(module, state: dict, job: TrainJob, stage: Path) -> None:
    if not job.lora.merge:
        module.save_pretrained(stage, state_dict=state)
        return
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a plain (not partitioned) copy of the base on this rank
    base = AutoModelForCausalLM.from_pretrained(
        job.model_path,
        dtype=torch.bfloat16 if job.precision == "bf16" else torch.float32,
        revision=job.revision,
        trust_remote_code=job.trust_remote_code,
    )
    fresh = get_peft_model(base, module.peft_config["default"])
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or any("lora_" in key for key in missing):
        raise RuntimeError(
            f"LoRA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    fresh.merge_and_unload().save_pretrained(stage, safe_serialization=True)
