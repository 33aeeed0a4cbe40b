"""A finetune run (Ray Train + DeepSpeed on 2 CPU workers, tiny random llama) whose Ray Train checkpoints
and final Hugging Face checkpoint go to S3 (moto): both land there whole, and the final one reloads with
trained weights."""

from __future__ import annotations

import pytest
import torch

from flows._common import to_config
from flows.finetune import finetune
from tasks.core import publish
from tasks.sft.config import FinetuneConfig
from tests.conftest import compose


@pytest.fixture(scope="module")
def run(s3, s3_ray, tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-s3")
    raw = compose(
        "finetune",
        [
            f"model={tiny_dirs['llama']}",
            "data=chat_small",
            "data.filter=none",
            "data.limit=24",
            "data.max_length=64",
            "data.val_fraction=0",
            "deepspeed=zero2",
            "train.workers=2",
            "train.batch_size=2",
            "train.max_steps=2",
            "train.lr=1e-3",
            "eval.enabled=false",
            f"train.storage_uri={s3.url('ray-train')}",
            f"output.uri={s3.url('sft', 'tiny')}",
            f"storage.s3_endpoint_url={s3.endpoint}",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            "mlflow.experiment=finetune-s3",
        ],
    )
    return finetune(to_config(raw, FinetuneConfig), raw)


def test_ray_train_checkpoint_on_s3(run, s3):
    resumable = run.train.resumable
    assert resumable and resumable.startswith(f"{s3.bucket}/ray-train/")
    files = s3.filesystem().find(resumable)
    assert files, f"no files under {resumable}"


def test_final_checkpoint_on_s3_reloads_trained(run, s3, tiny_dirs, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    uri = run.train.checkpoint
    assert uri == s3.url("sft", "tiny")
    fs = s3.filesystem()
    root = publish.resolve(uri).removeprefix("s3://")  # the current version
    names = {p.removeprefix(root + "/") for p in fs.find(root)}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= names
    assert not [p for p in fs.find(s3.url("sft").removeprefix("s3://")) if ".partial-" in p]

    fs.get(root + "/", str(tmp_path / "ckpt") + "/", recursive=True)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    ids = tokenizer("What is the capital of France?", return_tensors="pt").input_ids
    with torch.no_grad():
        new, old = trained(ids).logits, original(ids).logits
    assert torch.isfinite(new).all()
    assert not torch.allclose(new, old, atol=1e-4)
