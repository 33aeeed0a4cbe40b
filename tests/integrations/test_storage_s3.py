"""tasks.core.storage, the activation cache, prompt files and texts against a real S3 API (moto on loopback)."""

from __future__ import annotations

import json
import uuid

import pyarrow.fs
import pytest
import torch

from tasks.core import storage
from tasks.core.concept_config import PromptSource
from tasks.core.config import StorageConfig
from tasks.core.errors import CompalignError
from tasks.core.prompts import load_prompts, read_text_source
from tasks.directions import cache
from tasks.directions.collect import ActivationSums


@pytest.fixture
def prefix(s3) -> str:
    """A fresh prefix per test (the bucket is shared by the session)."""
    return s3.url(f"t-{uuid.uuid4().hex[:8]}")


def test_endpoint_from_config_reaches_s3fs(s3, prefix, monkeypatch):
    # Only the config names the endpoint: configure() must export it where botocore/s3fs read it.
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    storage.configure(StorageConfig(s3_endpoint_url=s3.endpoint, s3_region="us-east-1"))
    storage.write_bytes(storage.join(prefix, "a.txt"), b"hello")
    assert s3.filesystem().cat(storage.join(prefix, "a.txt").removeprefix("s3://")) == b"hello"


def test_bytes_round_trip_and_missing(prefix):
    uri = storage.join(prefix, "deep", "er", "x.bin")  # no "directory" exists on S3 beforehand
    storage.write_bytes(uri, b"\x00\x01")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"\x00\x01"
    storage.write_bytes(uri, b"v2")  # overwrite in place
    assert storage.read_bytes(uri) == b"v2"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(prefix, "nope.bin"))


def _stage(tmp_path, name: str, files: dict[str, bytes]):
    folder = tmp_path / name
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def test_publish_dir_uploads_overwrites_and_leaves_no_partial(s3, prefix, tmp_path):
    uri = storage.join(prefix, "ckpt")
    first = _stage(tmp_path, "one", {"model.safetensors": b"w1", "sub/tok.json": b"{}", "old.txt": b"x"})
    assert storage.publish_dir(first, uri) == uri
    assert not first.exists()
    fs = s3.filesystem()
    root = uri.removeprefix("s3://")
    assert sorted(fs.find(root)) == [f"{root}/model.safetensors", f"{root}/old.txt", f"{root}/sub/tok.json"]

    second = _stage(tmp_path, "two", {"model.safetensors": b"w2"})
    with pytest.raises(FileExistsError):
        storage.publish_dir(second, uri)
    storage.publish_dir(second, uri, overwrite=True)
    # The new version replaces the old one whole: no file of the old version survives.
    assert fs.find(root) == [f"{root}/model.safetensors"]
    assert fs.cat(f"{root}/model.safetensors") == b"w2"
    # A sibling whose name starts like the target (the staging prefix) must neither linger nor be removed.
    leftovers = [p for p in fs.find(prefix.removeprefix("s3://")) if ".partial-" in p]
    assert leftovers == []


def test_overwrite_spares_prefix_siblings(s3, prefix, tmp_path):
    storage.publish_dir(_stage(tmp_path, "a", {"f": b"a"}), storage.join(prefix, "run1"))
    storage.publish_dir(_stage(tmp_path, "b", {"f": b"b"}), storage.join(prefix, "run10"))
    storage.publish_dir(_stage(tmp_path, "c", {"f": b"c"}), storage.join(prefix, "run1"), overwrite=True)
    assert storage.read_bytes(storage.join(prefix, "run10", "f")) == b"b"
    assert storage.read_bytes(storage.join(prefix, "run1", "f")) == b"c"


def test_pyarrow_filesystem_for_ray_train(s3, prefix):
    fs, path = storage.pyarrow_filesystem(prefix + "/train/")
    assert isinstance(fs, pyarrow.fs.PyFileSystem)
    assert path == prefix.removeprefix("s3://") + "/train"
    # What Ray Train does with it: create the experiment directory, write and list files.
    fs.create_dir(f"{path}/exp/checkpoint_000000")
    with fs.open_output_stream(f"{path}/exp/checkpoint_000000/state.bin") as out:
        out.write(b"state")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/exp", recursive=True))
    assert f"{path}/exp/checkpoint_000000/state.bin" in {i.path for i in infos}
    assert s3.filesystem().cat(f"{path}/exp/checkpoint_000000/state.bin") == b"state"


def test_activation_cache_on_s3(prefix):
    sums = ActivationSums(sums=torch.randn(4, 2, 8), count=7)
    key = cache.cache_key("model@abc", "prompts", "{{ template }}", 2, "float32")
    assert cache.load_sums(prefix, key) is None
    entry = cache.store_sums(prefix, key, sums)
    assert entry.startswith(prefix)
    back = cache.load_sums(prefix, key)
    assert back.count == 7
    torch.testing.assert_close(back.sums, sums.sums)


def test_prompts_and_text_from_s3(prefix):
    rows = [{"instruction": f"question {i}"} for i in range(5)]
    storage.write_bytes(storage.join(prefix, "p.jsonl"), "\n".join(json.dumps(r) for r in rows).encode())
    storage.write_bytes(storage.join(prefix, "p.csv"), b"instruction\nfirst\nsecond\n")
    storage.write_bytes(storage.join(prefix, "heldout.txt"), b"Some English text.")
    got = load_prompts(PromptSource(source=storage.join(prefix, "p.jsonl"), column="instruction", limit=3))
    assert got == ["question 0", "question 1", "question 2"]
    assert load_prompts(PromptSource(source=storage.join(prefix, "p.csv"), column="instruction")) == [
        "first",
        "second",
    ]
    assert read_text_source(storage.join(prefix, "heldout.txt")) == "Some English text."
    with pytest.raises(CompalignError, match="does not exist"):
        load_prompts(PromptSource(source=storage.join(prefix, "missing.jsonl")))
