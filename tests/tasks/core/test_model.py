"""Model loading: packaged GGUF, local directories, identities and clear errors."""

import json

import pytest
import torch

from tasks.core.config import ModelOptions
from tasks.core.errors import CompalignError
from tasks.core.model import inspect_model, load_model, num_layers, weights_identity
from tasks.core.writers import residual_writers, untie_embeddings


def test_packaged_model_loads_with_template_and_identity(smollm2):
    assert smollm2.model.config.model_type == "llama"
    assert num_layers(smollm2.model) == 30
    assert smollm2.identity.startswith("gguf-sha256:")
    assert smollm2.dtype == torch.float32 and smollm2.device.type == "cpu"
    assert smollm2.tokenizer.chat_template and smollm2.tokenizer.padding_side == "left"


def test_local_directory_identity_follows_weights(tiny_dirs, tmp_path):
    spec = inspect_model(str(tiny_dirs["llama"]), ModelOptions())
    assert spec.identity == weights_identity(tiny_dirs["llama"])
    assert spec.n_layers == 3 and spec.hidden_size == 64
    loaded = load_model(str(tiny_dirs["mixtral"]), ModelOptions(dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    assert weights_identity(tiny_dirs["llama"]) != weights_identity(tiny_dirs["mixtral"])


def test_missing_model_and_unsupported_architecture(tmp_path, tokenizer):
    with pytest.raises(CompalignError, match="not a directory with a safetensors checkpoint"):
        inspect_model(str(tmp_path / "nothing" / "here"), ModelOptions())
    with pytest.raises(CompalignError, match="does not exist"):
        inspect_model(str(tmp_path / "model.gguf"), ModelOptions())
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(folder)
    with pytest.raises(CompalignError, match="unsupported architecture 'gpt2'"):
        inspect_model(str(folder), ModelOptions())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CompalignError, match="no .safetensors weights"):
        inspect_model(str(empty), ModelOptions())


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CompalignError, match="could not be reached on the Hugging Face hub"):
        inspect_model("some-org/not-a-cached-model", ModelOptions())


def test_model_without_chat_template(tiny_dirs, tmp_path):
    import shutil

    folder = tmp_path / "no-template"
    shutil.copytree(tiny_dirs["llama"], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CompalignError, match="has no chat template"):
        inspect_model(str(folder), ModelOptions())
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    spec = inspect_model(str(folder), ModelOptions(chat_template=template))
    assert spec.tokenizer.chat_template == template


def test_writers_and_untie(tiny_dirs):
    loaded = load_model(str(tiny_dirs["llama"]), ModelOptions())
    kinds = [w.kind for w in residual_writers(loaded.model)]
    assert kinds.count("embed") == 1 and kinds.count("attn") == 3 and kinds.count("mlp") == 3
    assert untie_embeddings(loaded.model) is True
    assert untie_embeddings(loaded.model) is False
