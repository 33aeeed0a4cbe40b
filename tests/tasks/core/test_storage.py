"""Atomic local writes, checkpoints that reload identically, and the activation cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.core import storage
from tasks.core.checkpoint import model_card, save_checkpoint
from tasks.core.errors import CompalignError
from tasks.directions.cache import cache_key, load_sums, store_sums
from tasks.directions.collect import ActivationSums
from tests.conftest import make_tiny


def test_write_bytes_is_atomic(tmp_path):
    target = tmp_path / "a" / "file.bin"
    storage.write_bytes(str(target), b"hello")
    assert target.read_bytes() == b"hello"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_checkpoint_round_trip_and_failed_save_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    model = make_tiny("mixtral", tokenizer)
    card = model_card("tiny", {"layer": 1}, "# tiny")
    location = save_checkpoint(
        model, tokenizer, str(tmp_path / "ckpt"), card, {"direction.safetensors": b"x"}
    )
    reloaded = AutoModelForCausalLM.from_pretrained(location)
    ids = torch.tensor([[1, 5, 9, 11]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert AutoTokenizer.from_pretrained(location).chat_template == tokenizer.chat_template
    assert "# tiny" in (tmp_path / "ckpt" / "README.md").read_text()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tokenizer, str(tmp_path / "ckpt2"), card)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial directory left


def test_activation_cache_round_trip_and_keys(tmp_path):
    sums = ActivationSums(sums=torch.randn(3, 2, 4, dtype=torch.float64), count=7)
    key = cache_key("model-a", "prompts-1", "template", 2, "float32")
    assert load_sums(str(tmp_path), key) is None
    store_sums(str(tmp_path), key, sums)
    back = load_sums(str(tmp_path), key)
    assert torch.equal(back.sums, sums.sums) and back.count == 7
    others = {
        cache_key("model-b", "prompts-1", "template", 2, "float32"),
        cache_key("model-a", "prompts-2", "template", 2, "float32"),
        cache_key("model-a", "prompts-1", "other", 2, "float32"),
        cache_key("model-a", "prompts-1", "template", 3, "float32"),
        cache_key("model-a", "prompts-1", "template", 2, "bfloat16"),
    }
    assert key not in others and len(others) == 5
    entry = next(tmp_path.rglob("*.safetensors"))
    entry.write_bytes(b"garbage")
    assert load_sums(str(tmp_path), key) is None  # a damaged entry is ignored, not fatal


def test_check_writable_creates_nothing(tmp_path):
    storage.check_writable(str(tmp_path / "deep" / "out"), "output.uri")
    assert list(tmp_path.iterdir()) == []  # the probe went into the nearest existing folder and is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(CompalignError, match="output.uri: cannot write to .* is a file, not a folder"):
        storage.check_writable(str(tmp_path / "f" / "out"), "output.uri")
