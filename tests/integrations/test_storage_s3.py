"""tasks.core.storage, the activation cache, prompt files and texts against a real S3 API (moto on loopback)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from tasks.core import publish, storage
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


def _versions(fs, uri: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{uri.removeprefix('s3://')}/versions", detail=False))


def test_publish_dir_versions_overwrites_and_leaves_no_partial(s3, prefix, tmp_path):
    uri = storage.join(prefix, "ckpt")
    first = _stage(tmp_path, "one", {"model.safetensors": b"w1", "sub/tok.json": b"{}", "old.txt": b"x"})
    assert publish.publish_dir(first, uri) == uri
    assert not first.exists()
    fs = s3.filesystem()
    current = publish.resolve(uri).removeprefix("s3://")
    assert sorted(fs.find(current)) == [
        f"{current}/{n}" for n in ("model.safetensors", "old.txt", "sub/tok.json")
    ]

    second = _stage(tmp_path, "two", {"model.safetensors": b"w2"})
    with pytest.raises(FileExistsError):
        publish.publish_dir(second, uri)
    publish.publish_dir(second, uri, overwrite=True)
    # The new version replaces the old one whole: no file of the old version survives.
    now = publish.resolve(uri).removeprefix("s3://")
    assert now != current and fs.find(now) == [f"{now}/model.safetensors"]
    assert fs.cat(f"{now}/model.safetensors") == b"w2"
    name = now.rsplit("/", 1)[-1]
    assert _versions(fs, uri) == [name, f"{name}.done"]
    assert not [p for p in fs.find(prefix.removeprefix("s3://")) if ".partial-" in p]


def test_publish_over_a_prefix_written_before_versions(s3, prefix, tmp_path):
    uri = storage.join(prefix, "legacy")
    storage.write_bytes(storage.join(uri, "model.safetensors"), b"old")
    assert publish.resolve(uri) == uri  # no pointer: the prefix itself is the checkpoint
    publish.publish_dir(_stage(tmp_path, "new", {"model.safetensors": b"new"}), uri, overwrite=True)
    assert storage.read_bytes(storage.join(publish.resolve(uri), "model.safetensors")) == b"new"
    root = uri.removeprefix("s3://")
    assert sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in s3.filesystem().ls(root)) == [
        "CURRENT",
        "versions",
    ]


def test_failed_upload_keeps_the_old_version_current_and_intact(s3, prefix, tmp_path, monkeypatch):
    import s3fs

    uri = storage.join(prefix, "ckpt")
    publish.publish_dir(_stage(tmp_path, "one", {"a.bin": b"a1", "b.bin": b"b1"}), uri)
    before = publish.resolve(uri)
    real_put_file = s3fs.S3FileSystem._put_file
    calls, uploaded = [], []

    async def flaky_put_file(self, lpath, rpath, *args, **kwargs):
        calls.append(rpath)
        if len(calls) == 2:  # the second fails once the first is uploaded (so there is one to clean up)
            for _ in range(100):
                if uploaded:
                    break
                await asyncio.sleep(0.05)
            raise OSError("connection reset")
        result = await real_put_file(self, lpath, rpath, *args, **kwargs)
        uploaded.append(rpath)
        return result

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", flaky_put_file)
    with pytest.raises(OSError, match="connection reset"):
        publish.publish_dir(_stage(tmp_path, "two", {"a.bin": b"a2", "b.bin": b"b2"}), uri, overwrite=True)
    assert len(calls) == 2 and len(uploaded) == 1
    assert publish.resolve(uri) == before
    assert [storage.read_bytes(storage.join(before, n)) for n in ("a.bin", "b.bin")] == [b"a1", b"b1"]
    name = before.rsplit("/", 1)[-1]
    assert _versions(s3.filesystem(), uri) == [name, f"{name}.done"]  # the failed upload removed itself


def _s3_publisher(uri: str, tag: str, times: int, root: str) -> None:
    for i in range(times):
        stage = Path(root) / f"{tag}{i}"
        for n in ("a.bin", "b.bin", "c.bin"):
            (stage / n).parent.mkdir(parents=True, exist_ok=True)
            (stage / n).write_bytes(tag.encode() * 100)
        publish.publish_dir(stage, uri, overwrite=True)


def test_concurrent_publishers_to_one_prefix_end_with_one_version(s3, prefix, tmp_path):
    import multiprocessing

    uri = storage.join(prefix, "ckpt")
    ctx = multiprocessing.get_context("spawn")  # the environment carries the endpoint and credentials
    writers = [ctx.Process(target=_s3_publisher, args=(uri, t, 6, str(tmp_path))) for t in "xyz"]
    for w in writers:
        w.start()
    seen = set()
    while any(w.is_alive() for w in writers):
        # A reader that follows the pointer always finds a whole version (until it is superseded).
        try:
            current = publish.resolve(uri)
            data = {storage.read_bytes(storage.join(current, n)) for n in ("a.bin", "b.bin", "c.bin")}
        except FileNotFoundError:
            continue
        assert len(data) == 1, f"mixed or partial version at {current}"
        seen |= data
    assert [w.exitcode for w in writers] == [0, 0, 0]
    current = publish.resolve(uri)
    data = {storage.read_bytes(storage.join(current, n)) for n in ("a.bin", "b.bin", "c.bin")}
    assert len(data) == 1 and data.pop() in {t.encode() * 100 for t in "xyz"}
    name = current.rsplit("/", 1)[-1]
    fs = s3.filesystem()
    assert _versions(fs, uri) == [name, f"{name}.done"]  # every superseded version collected
    root = prefix.removeprefix("s3://")
    left = {p.removeprefix(root + "/") for p in fs.find(root)}
    assert left == {
        "ckpt/CURRENT",
        *(f"ckpt/versions/{name}/{n}" for n in ("a.bin", "b.bin", "c.bin")),
        f"ckpt/versions/{name}.done",
    }
    assert seen


def test_overwrite_spares_prefix_siblings(s3, prefix, tmp_path):
    publish.publish_dir(_stage(tmp_path, "a", {"f": b"a"}), storage.join(prefix, "run1"))
    publish.publish_dir(_stage(tmp_path, "b", {"f": b"b"}), storage.join(prefix, "run10"))
    publish.publish_dir(_stage(tmp_path, "c", {"f": b"c"}), storage.join(prefix, "run1"), overwrite=True)
    assert storage.read_bytes(storage.join(publish.resolve(storage.join(prefix, "run10")), "f")) == b"b"
    assert storage.read_bytes(storage.join(publish.resolve(storage.join(prefix, "run1")), "f")) == b"c"


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


def test_check_writable_on_s3(s3, prefix):
    storage.check_writable(storage.join(prefix, "out"), "output.uri")  # the probe is written and removed
    assert s3.filesystem().find(prefix.removeprefix("s3://")) == []
    with pytest.raises(
        CompalignError, match=r"cache.uri: cannot write to s3://no-such-bucket-x/c .*change cache.uri"
    ):
        storage.check_writable("s3://no-such-bucket-x/c", "cache.uri")


def test_a_trailing_slash_names_the_same_checkpoint(s3, prefix, tmp_path):
    uri = storage.join(prefix, "ckpt")
    assert publish.resolve(uri + "/") == uri  # nothing published yet: the prefix itself
    assert publish.publish_dir(_stage(tmp_path, "one", {"a.bin": b"1"}), uri + "/") == uri
    with pytest.raises(FileExistsError, match=f"^{uri}/ already exists$"):
        publish.publish_dir(_stage(tmp_path, "two", {"a.bin": b"2"}), uri + "/")
    current = publish.resolve(uri + "/")
    assert current.startswith(f"{uri}/versions/") and storage.read_bytes(f"{current}/a.bin") == b"1"
    root = uri.removeprefix("s3://")
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.filesystem().ls(f"{root}/versions", detail=False)) == [
        current.rsplit("/", 1)[-1], current.rsplit("/", 1)[-1] + ".done",
    ]  # fmt: skip
    assert s3.filesystem().cat(f"{root}/versions/{current.rsplit('/', 1)[-1]}.done") == b""
