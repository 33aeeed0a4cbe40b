"""Publishing directories: an old version is never lost or mixed with a new one, concurrent publishers end
with one complete version and no leftovers, and a failed publish leaves what was there."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tasks.core import publish, storage
from tasks.core.checkpoint import publish_staged

FILES = ("model.safetensors", "config.json", "sub/tokenizer.json")


def _stage_version(uri: str, tag: str) -> Path:
    stage = publish.staging_dir(uri)
    for name in FILES:
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_text(tag * 1000)
    return stage


def _read_version(target: Path) -> str | None:
    """The tag of the version at ``target``, read through one directory handle so that every file comes
    from the same directory; None when that version was deleted while reading (it had been replaced)."""
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        tags = set()
        for name in FILES:
            try:
                with open(name, encoding="utf-8", opener=lambda p, flags: os.open(p, flags, dir_fd=fd)) as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            assert len(data) == 1000 * len(data[:1]) and len(set(data)) == 1, f"{name} is partial"
            tags.add(data[0])
        assert len(tags) == 1, f"mixed versions: {tags}"
        return tags.pop()
    finally:
        os.close(fd)


def test_publish_replaces_whole_and_refuses_without_overwrite(tmp_path):
    uri = str(tmp_path / "ckpt")
    stage = _stage_version(uri, "a")
    (stage / "old-only.txt").write_text("x")
    assert not Path(uri).exists()  # nothing under the final name until published
    assert publish.publish_dir(stage, uri) == uri and not stage.exists()
    with pytest.raises(FileExistsError):
        publish.publish_dir(_stage_version(uri, "b"), uri)
    publish.publish_dir(_stage_version(uri, "c"), uri, overwrite=True)
    assert _read_version(Path(uri)) == "c"
    assert not (Path(uri) / "old-only.txt").exists()  # no file of the old version survives
    # The refused stage is still the caller's to remove; apart from it, only the target is left.
    assert [p.name for p in tmp_path.iterdir() if ".partial-" not in p.name] == ["ckpt"]


def _publisher(uri: str, tag: str, times: int, exchange: bool) -> None:
    publish._exchange_supported = exchange
    for _ in range(times):
        publish.publish_dir(_stage_version(uri, tag), uri, overwrite=True)


def _reader(uri: str, stop, seen, exchange: bool) -> None:
    target = Path(uri)
    while not stop.is_set():
        try:
            tag = _read_version(target)
        except FileNotFoundError:
            # Only the fallback (no atomic exchange) may leave the name empty for an instant.
            assert not exchange, "the target was missing between two versions"
            continue
        if tag is not None:
            seen.append(tag)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_concurrent_publishers_end_with_one_complete_version(tmp_path, exchange):
    if exchange and not publish._exchange(tmp_path, tmp_path):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
    uri = str(tmp_path / "ckpt")
    publish.publish_dir(_stage_version(uri, "0"), uri)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        stop, seen = manager.Event(), manager.list()
        reader = ctx.Process(target=_reader, args=(uri, stop, seen, exchange))
        reader.start()
        writers = [ctx.Process(target=_publisher, args=(uri, t, 30, exchange)) for t in "abc"]
        for w in writers:
            w.start()
        for w in writers:
            w.join(120)
        time.sleep(0.2)
        stop.set()
        reader.join(30)
        seen = list(seen)
    assert [w.exitcode for w in writers] == [0, 0, 0], "a publish failed"
    assert reader.exitcode == 0, "the reader saw a missing, partial or mixed version"
    assert len(seen) > 10 and set(seen) <= set("0abc")
    assert _read_version(Path(uri)) in set("abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .partial or .old leftovers


def test_failed_write_or_swap_keeps_the_old_version(tmp_path, monkeypatch):
    uri = str(tmp_path / "ckpt")
    publish.publish_dir(_stage_version(uri, "a"), uri)

    def half_written(stage: Path) -> None:
        (stage / "model.safetensors").write_text("b" * 10)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_staged(uri, half_written)
    assert _read_version(Path(uri)) == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    real_rename = os.rename

    def failing_rename(src, dst):
        # The new version's rename fails once the old one is set aside (the fallback without exchange).
        if Path(dst) == Path(uri) and ".partial-" in str(src) and not Path(uri).exists():
            raise PermissionError(13, "Permission denied", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(publish, "_exchange_supported", False)
    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(PermissionError):
        publish.publish_dir(_stage_version(uri, "b"), uri, overwrite=True)
    assert _read_version(Path(uri)) == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_resolve_of_a_local_path_is_itself(tmp_path):
    assert publish.resolve(str(tmp_path / "x")) == str(tmp_path / "x")
    assert storage.is_remote("s3://b/x") and not storage.is_remote(str(tmp_path))


@pytest.fixture(params=[True, False], ids=["renameat2-exchange", "rename-aside"])
def swap_mode(request, tmp_path, monkeypatch):
    """Both ways of swapping a version in: the atomic exchange (where this filesystem has it) and the
    fallback that renames the old one aside."""
    if request.param and not publish._exchange(tmp_path, tmp_path):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
    monkeypatch.setattr(publish, "_exchange_supported", request.param)
    return request.param


def test_each_swap_replaces_whole_into_new_folders_and_leaves_nothing(tmp_path, swap_mode):
    target = tmp_path / "deep" / "er" / "ckpt"  # folders above it are made
    for tag in "abc":
        publish.publish_dir(_stage_version(str(target), tag), str(target), overwrite=True)
        assert _read_version(target) == tag
        assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt"]  # the old version is deleted
    with pytest.raises(FileExistsError, match=f"^{target} already exists$"):
        publish.publish_dir(_stage_version(str(target), "d"), str(target))
    assert _read_version(target) == "c"


def test_a_stage_on_another_filesystem_is_copied_beside_the_target(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem to stage on")
    target = tmp_path / "ckpt"
    publish.publish_dir(_stage_version(str(target), "a"), str(target))
    stage = Path(tempfile.mkdtemp(dir=shm))
    for name in FILES:
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_text("b" * 1000)
    publish.publish_dir(stage, str(target), overwrite=True)
    assert _read_version(target) == "b" and not stage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_copy_across_filesystems_keeps_the_old_version(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    publish.publish_dir(_stage_version(str(target), "a"), str(target))
    stage = _stage_version(str(target), "b")
    real_copy = shutil.copytree

    def copy_then_fail(src, dst, *args, **kwargs):
        monkeypatch.setattr(shutil, "copytree", real_copy)  # its own recursion copies for real
        real_copy(src, dst, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish, "_same_device", lambda a, b: False)  # as if the stage were elsewhere
    monkeypatch.setattr(shutil, "copytree", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        publish.publish_dir(stage, str(target), overwrite=True)
    assert _read_version(target) == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", stage.name])  # its copy is gone


def test_exchange_reports_what_it_cannot_do(tmp_path):
    if not publish._exchange(tmp_path, tmp_path):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    assert publish._exchange(a, b) and (b / "x").read_text() == "a" and not (a / "x").exists()
    assert publish._exchange(a, tmp_path / "missing") is False  # moved aside meanwhile: try again
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError) as info:
        publish._exchange(a, tmp_path / "file" / "x")
    assert info.value.filename == str(tmp_path / "file" / "x")
    assert publish._exchange_supported  # a one-off error does not turn the exchange off


def test_a_remote_target_stages_in_the_temp_folder():
    stage = publish.staging_dir("s3://bucket/ckpt")
    try:
        assert stage.is_dir() and stage.parent == Path(tempfile.gettempdir())
        assert stage.name.startswith("compalign-stage-")
    finally:
        stage.rmdir()
