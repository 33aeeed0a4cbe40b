"""Atomic local writes, checkpoints that reload identically, and the activation cache."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.core import storage
from tasks.core.checkpoint import model_card, save_checkpoint
from tasks.core.config import StorageConfig
from tasks.core.errors import CompalignError
from tasks.directions.cache import cache_key, load_sums, store_sums
from tasks.directions.collect import ActivationSums
from tests.conftest import make_tiny


def test_write_bytes_is_atomic(tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"  # the folders above it are made
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


def test_paths_and_urls():
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b/k")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert (
        storage.local_path("file:///tmp/x") == Path("/tmp/x")
        and storage.local_path("~/x") == Path.home() / "x"
    )
    assert storage.absolute("s3://b/k") == "s3://b/k" and storage.absolute("rel") == str(Path.cwd() / "rel")
    assert storage.join("s3://b/k/", "a", "b") == "s3://b/k/a/b" and storage.join("/t", "a", "b") == "/t/a/b"
    fs, path = storage.filesystem("file:///tmp/x")
    assert fs.protocol[0] == "file" and path == "/tmp/x"
    assert storage.pyarrow_filesystem("rel/x") == (None, str((Path.cwd() / "rel/x").resolve()))


def test_s3_options_come_from_the_environment_never_credentials(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):  # what configure sets: restored after the test
        monkeypatch.setenv(name, "")
    assert storage._s3_options() == {"use_listings_cache": False}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert storage._s3_options() == {
        "use_listings_cache": False, "endpoint_url": "http://127.0.0.1:9", "client_kwargs": {"region_name": "eu-west-1"},
    }  # fmt: skip
    storage.configure(StorageConfig(s3_endpoint_url="http://127.0.0.1:8", s3_region="us-east-2"))
    options = storage._s3_options()  # the config's own endpoint and region win
    assert (
        options["endpoint_url"] == "http://127.0.0.1:8"
        and options["client_kwargs"]["region_name"] == "us-east-2"
    )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted")
    assert "planted" not in repr(storage._s3_options())


def test_exists_and_read_back(tmp_path):
    target = str(tmp_path / "x.bin")
    assert not storage.exists(target)
    storage.write_bytes(target, b"abc")
    assert storage.exists(target) and storage.read_bytes(target) == b"abc"
    storage.write_bytes(target, b"d")  # replaced whole
    assert storage.read_bytes(target) == b"d" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "out" / "x.bin"
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")
    assert list(target.parent.iterdir()) == []


def test_check_outputs_checks_each_used_location(tmp_path):
    (tmp_path / "f").write_text("x")
    storage.check_outputs({"cache.uri": None, "output.uri": str(tmp_path / "ok")})  # None: not used
    with pytest.raises(
        CompalignError,
        match=r"^cache\.uri: cannot write to .*/f/c: .*/f is a file, not a folder; change cache\.uri$",
    ):
        storage.check_outputs({"output.uri": str(tmp_path / "ok"), "cache.uri": str(tmp_path / "f" / "c")})
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):  # root writes anywhere: a folder that is a full device instead
            pytest.skip("running as root: permissions do not stop writes")
        with pytest.raises(
            CompalignError,
            match=r"^output\.uri: cannot write to .* \(PermissionError: .*; change output\.uri or its permissions$",
        ):
            storage.check_writable(str(read_only / "x"), "output.uri")
    finally:
        read_only.chmod(0o700)


def test_s3_urls_get_the_configured_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # no request is made
    for url in ("s3://bucket/key", "s3a://bucket/key"):
        fs, path = storage.filesystem(url)
        assert fs.protocol[0] in ("s3", "s3a") and path == "bucket/key"
        assert fs.endpoint_url == "http://127.0.0.1:9" and fs.storage_options["use_listings_cache"] is False
    pa_fs, path = storage.pyarrow_filesystem("s3://bucket/prefix/")
    assert path == "bucket/prefix" and pa_fs.type_name == "py::fsspec+('s3', 's3a')"
