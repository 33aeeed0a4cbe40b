"""Publishing directories: an old version is never lost or mixed with a new one, concurrent publishers end
with one complete version and no leftovers, and a failed publish leaves what was there."""

from __future__ import annotations

import ctypes
import errno
import logging
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
    assert info.value.strerror == os.strerror(errno.ENOTDIR)
    assert publish._exchange_supported  # a one-off error does not turn the exchange off


def test_a_remote_target_stages_in_the_temp_folder():
    stage = publish.staging_dir("s3://bucket/ckpt")
    try:
        assert stage.is_dir() and stage.parent == Path(tempfile.gettempdir())
        assert stage.name.startswith("compalign-stage-")
    finally:
        stage.rmdir()


# --- races, replayed one at a time (the concurrent test above meets them only by chance) ---------------


def _rename_with(monkeypatch, hook):
    """os.rename that first calls ``hook(src, dst, real_rename)``, which may raise (as if another publisher
    had just moved the target) or act as a rival publisher; the exchange is off so every swap renames."""
    real_rename = os.rename

    def rename(src, dst):
        hook(Path(src), Path(dst), real_rename)
        return real_rename(src, dst)

    monkeypatch.setattr(publish, "_exchange_supported", False)
    monkeypatch.setattr(os, "rename", rename)


def test_a_target_another_publisher_has_aside_is_tried_again(tmp_path, monkeypatch):
    uri = str(tmp_path / "ckpt")
    publish.publish_dir(_stage_version(uri, "a"), uri)
    misses = []

    def gone_once(src, dst, real_rename):
        if ".old-" in dst.name and not misses:
            misses.append(dst)
            raise FileNotFoundError(2, "No such file or directory", str(src))

    _rename_with(monkeypatch, gone_once)
    publish.publish_dir(_stage_version(uri, "b"), uri, overwrite=True)
    assert len(misses) == 1 and _read_version(Path(uri)) == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_rival_version_that_went_in_first_is_replaced_and_nothing_is_left(tmp_path, monkeypatch):
    uri = str(tmp_path / "ckpt")
    publish.publish_dir(_stage_version(uri, "a"), uri)
    rivals = []

    def rival_swaps_in(src, dst, real_rename):
        # Right after ours set the old version aside, a rival's version takes the name.
        if dst == Path(uri) and not dst.exists() and not rivals:
            rivals.append(_stage_version(uri, "z"))
            real_rename(rivals[0], dst)

    _rename_with(monkeypatch, rival_swaps_in)
    publish.publish_dir(_stage_version(uri, "b"), uri, overwrite=True)
    assert len(rivals) == 1 and _read_version(Path(uri)) == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # neither "a" nor "z" is left aside


def test_swaps_lost_every_time_give_up_and_keep_the_old_version(tmp_path, monkeypatch):
    uri = str(tmp_path / "ckpt")
    publish.publish_dir(_stage_version(uri, "a"), uri)
    tries = []

    def always_gone(src, dst, real_rename):
        if ".old-" in dst.name:
            tries.append(dst)
            raise FileNotFoundError(2, "No such file or directory", str(src))

    _rename_with(monkeypatch, always_gone)
    monkeypatch.setattr(publish, "_SWAP_ATTEMPTS", 3)
    with pytest.raises(OSError, match=f"^could not publish to {uri}: 3 concurrent swaps lost$"):
        publish.publish_dir(_stage_version(uri, "b"), uri, overwrite=True)
    assert len(tries) == 3 and _read_version(Path(uri)) == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the stage is removed


def test_a_stage_made_elsewhere_goes_into_new_folders(tmp_path):
    stage = Path(tempfile.mkdtemp(dir=tmp_path))
    (stage / "f").write_text("x")
    target = tmp_path / "new" / "deeper" / "ckpt"
    assert publish.publish_dir(stage, str(target)) == str(target)
    assert (target / "f").read_text() == "x" and not stage.exists()


def test_a_lost_name_race_without_overwrite_is_refused_by_name(tmp_path):
    target, stage = tmp_path / "ckpt", tmp_path / "stage"
    for d in (target, stage):
        d.mkdir()
        (d / "f").write_text(d.name)
    with pytest.raises(FileExistsError, match=f"^{target} already exists$"):
        publish._swap_in(stage, target, overwrite=False)  # another publisher took the name after the check
    assert (target / "f").read_text() == "ckpt"


def test_discarding_what_is_already_gone_is_no_error(tmp_path):
    publish._discard(tmp_path / "missing")
    (tmp_path / "d" / "e").mkdir(parents=True)
    publish._discard(tmp_path / "d")
    assert not (tmp_path / "d").exists()


class _NoRenameat2:
    pass


class _Renameat2Failing:
    """A libc whose renameat2 fails with ``code`` (as an old kernel or a filesystem without it does)."""

    def __init__(self, code: int) -> None:
        self.code = code

    @property
    def renameat2(self):
        def call(*args):
            ctypes.set_errno(self.code)
            return -1

        return call


@pytest.mark.parametrize(
    "libc", [_NoRenameat2(), _Renameat2Failing(errno.ENOSYS), _Renameat2Failing(errno.EINVAL)]
)
def test_without_renameat2_exchange_turns_itself_off(tmp_path, monkeypatch, libc):
    monkeypatch.setattr(publish, "_exchange_supported", True)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: libc)
    assert publish._exchange(tmp_path, tmp_path) is False
    assert publish._exchange_supported is False
    uri = str(tmp_path / "ckpt")  # publishing still works, by renaming aside
    for tag in "ab":
        publish.publish_dir(_stage_version(uri, tag), uri, overwrite=True)
    assert _read_version(Path(uri)) == "b"


def test_a_leftover_that_cannot_be_removed_is_logged_not_raised(caplog):
    class Stuck:
        def exists(self, path):
            return True

        def rm(self, path, recursive=False):
            raise PermissionError("access denied")

    class Gone:
        def exists(self, path):
            return False

        def rm(self, path, recursive=False):
            raise AssertionError("nothing to remove")

    with caplog.at_level(logging.WARNING, logger=publish.__name__):
        publish._remove_quietly(Stuck(), "bucket/ckpt/versions/1")
        publish._remove_quietly(Gone(), "bucket/ckpt/versions/2")
    assert [r.getMessage() for r in caplog.records] == [
        "could not remove bucket/ckpt/versions/1 (access denied); delete it by hand"
    ]
