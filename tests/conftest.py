"""Shared fixtures: the packaged SmolLM2 as safetensors, tiny random models with its tokenizer, a local Ray,
and a way to run a flow in-process with Hydra overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def packaged_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct converted once to safetensors (cached across sessions)."""
    from tasks.core.config import ModelOptions
    from tasks.core.model import convert_gguf, packaged_gguf_path

    return convert_gguf(packaged_gguf_path(), ModelOptions())


@pytest.fixture(scope="session")
def smollm2(packaged_dir):
    """The loaded packaged model in float32 on CPU (shared: tests must not edit it in place)."""
    from tasks.core.config import ModelOptions
    from tasks.core.model import load_model

    return load_model("packaged:smollm2", ModelOptions())


@pytest.fixture(scope="session")
def tokenizer(packaged_dir):
    from transformers import AutoTokenizer

    from tasks.core.model import prepare_tokenizer

    tok = AutoTokenizer.from_pretrained(packaged_dir)
    prepare_tokenizer(tok, None, "packaged")
    return tok


def tiny_config(kind: str, vocab: int):
    from transformers import (
        LlamaConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    if kind == "llama":
        return LlamaConfig(intermediate_size=128, **common)
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, **common)
    if kind == "qwen2":
        return Qwen2Config(intermediate_size=128, attention_bias=True, **common)
    if kind == "llama_bias":  # biases on every projection, the attention output's and the MLP's included
        return LlamaConfig(intermediate_size=128, attention_bias=True, mlp_bias=True, **common)
    if kind == "qwen2_moe":  # routed experts plus a gated shared expert
        return Qwen2MoeConfig(
            intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=64, num_experts=4,
            num_experts_per_tok=2, **common,
        )  # fmt: skip
    if kind == "phi3":  # fused qkv_proj and gate_up_proj; down_proj writes
        return Phi3Config(intermediate_size=128, pad_token_id=0, **common)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(
            intermediate_size=128, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2, **common
        )
    raise ValueError(kind)


def make_tiny(kind: str, tokenizer, seed: int = 0, vocab: int | None = None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, vocab or len(tokenizer)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # initialised to zero, a bias would hide an edit that skips it
                param.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Saved tiny random models (llama, mixtral) with the SmolLM2 tokenizer and chat template."""
    out = {}
    for kind in ("llama", "mixtral"):
        folder = tmp_path_factory.mktemp(f"tiny-{kind}")
        make_tiny(kind, tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[kind] = folder
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (flows reuse it instead of starting their own)."""
    import ray

    if not ray.is_initialized():
        from tasks.core.config import RayConfig
        from tasks.runtime.cluster import init_ray

        init_ray(RayConfig(num_cpus=4, log_to_driver=False))  # as the flows start it
    yield ray
    ray.shutdown()


def tiny_flow_overrides(model_dir: Path, work: Path) -> list[str]:
    """abliterate on a tiny model in seconds: few prompts, no thresholds, 3 generated tokens; tracked in
    ``work``."""
    return [
        f"model={model_dir}",
        "data=french",
        "data.target.limit=16",
        "data.baseline.limit=16",
        "score.screen_prompts=2",
        "score.finalists=3",
        "select.kl_limit=1e9",
        "select.induce_min_gain=-1e9",
        "select.min_behaviour=0",
        "eval.max_new_tokens=3",
        "eval.perplexity_tokens=64",
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        f"cache.uri={work}/cache",
    ]


def compose(config_name: str, overrides: list[str]):
    """The flow's Hydra config with overrides, as the entry point would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a temporary directory (checkpoints/ and MLflow artifacts land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_tiny_judge(
    folder: Path, tokenizer, labels: list[str] | None, pairs: list[tuple[str, str]] = (), seed: int = 0
) -> Path:
    """A tiny random judge model saved in ``folder``: a sequence classifier with ``labels``, or (None) a
    causal LM. A random model's last hidden states share one large component, so the classifier's first
    two label rows are +-(difference of the first two (prompt, answer) ``pairs``' last hidden states),
    orthogonal to those of all ``pairs``' mean: both labels then occur among inputs like them."""
    from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config("llama", len(tokenizer))
    if labels is None:
        model = AutoModelForCausalLM.from_config(config)
    else:
        config.num_labels, config.pad_token_id = len(labels), tokenizer.pad_token_id
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        model = LlamaForSequenceClassification(config)
        with torch.no_grad():
            last = torch.stack(
                [
                    model.model(**tokenizer(p, a, return_tensors="pt")).last_hidden_state[0, -1]
                    for p, a in pairs
                ]
            )
            mean = torch.nn.functional.normalize(last.mean(0), dim=0)
            split = last[0] - last[1]
            split -= (split @ mean) * mean
            model.score.weight[0], model.score.weight[1] = -split, split
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
