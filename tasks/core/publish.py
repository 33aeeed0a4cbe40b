"""Publishing a finished directory under its final name without ever losing or mixing versions.

Local: the staged directory is swapped with the old one in one atomic ``renameat2(RENAME_EXCHANGE)``
(Linux), so the name always holds one complete version; the old one is deleted only after the swap.
Where the exchange is unavailable, the old directory is renamed aside, the new one renamed in, and the old
one put back if that fails (the name is then briefly absent, never mixed).

S3 (any object store): a directory cannot be swapped, so each publish uploads a new immutable version under
``<uri>/versions/<id>/`` and only then moves a small pointer, ``<uri>/CURRENT`` (one PUT, atomic), to it.
A failed upload removes only its own version; the old version stays current and intact. Superseded
versions are deleted after the pointer moved: a version is deletable once its ``<id>.done`` marker exists
(written after its pointer write) and the pointer, read after listing the markers, names another version,
so a version being uploaded or just made current is never deleted, and the last publisher to finish
leaves exactly one version. ``resolve`` gives the directory a reader should open.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import posixpath
import shutil
import time
import uuid
from pathlib import Path

from tasks.core import storage

log = logging.getLogger(__name__)

POINTER = "CURRENT"
VERSIONS = "versions"
_SWAP_ATTEMPTS = 100


def staging_dir(uri: str) -> Path:
    """A fresh local directory to build an output in before ``publish_dir``: next to a local target (so the
    final rename stays on one filesystem), in the temp dir for a remote one."""
    if storage.is_remote(uri):
        import tempfile

        return Path(tempfile.mkdtemp(prefix="compalign-stage-"))
    target = storage.local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex}")
    stage.mkdir()
    return stage


def publish_dir(local_dir: Path, uri: str, overwrite: bool = False) -> str:
    """Move the finished ``local_dir`` to ``uri`` (local path or URL) so that a reader always finds one
    complete version there. Without ``overwrite`` an existing target is an error (FileExistsError).
    Concurrent publishers to one target end with one complete version (the last to swap) and no
    leftovers. Returns the location (local: absolute path)."""
    if storage.is_remote(uri):
        location = _publish_remote(Path(local_dir), uri, overwrite)
        _discard(local_dir)
        return location
    return _publish_local(Path(local_dir), storage.local_path(uri), overwrite)


def resolve(uri: str) -> str:
    """The directory holding the published files of ``uri``: its current version on an object store
    (``<uri>/versions/<id>``), or ``uri`` itself (a local directory, or a prefix written before versions)."""
    if not storage.is_remote(uri):
        return uri
    pointer = storage.join(uri, POINTER)
    try:
        version = storage.read_bytes(pointer).decode().strip()
    except FileNotFoundError:
        return uri.rstrip("/")
    return storage.join(uri, VERSIONS, version)


# --- local -------------------------------------------------------------------------------------------


def _publish_local(stage: Path, target: Path, overwrite: bool) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and target.exists():
        raise FileExistsError(f"{target} already exists")
    if not _same_device(stage, target.parent):  # a rename cannot cross filesystems
        near = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex}")
        try:
            shutil.copytree(stage, near)
        except BaseException:
            _discard(near)
            raise
        _discard(stage)
        stage = near
    try:
        old = _swap_in(stage, target, overwrite)
    except BaseException:
        _discard(stage)
        raise
    if old is not None:
        _discard(old)
    return str(target.absolute())


def _discard(path: Path) -> None:
    """Remove a stage or a replaced version; one already gone (or not removable) is not an error."""
    shutil.rmtree(path, ignore_errors=True)


def _same_device(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _swap_in(stage: Path, target: Path, overwrite: bool) -> Path | None:
    """Put ``stage`` at ``target``; returns the path now holding the replaced version (None if none)."""
    for _ in range(_SWAP_ATTEMPTS):
        try:
            os.rename(stage, target)  # no target yet (or an empty directory)
            return None
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise
            if not overwrite:
                raise FileExistsError(f"{target} already exists") from e
        if _exchange(stage, target):
            return stage  # the old version, swapped out
        aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        try:
            os.rename(target, aside)
        except FileNotFoundError:  # another publisher has it aside right now
            continue
        try:
            os.rename(stage, target)
            return aside
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                os.rename(aside, target)  # a real failure: the old version goes back in place
                raise
            # Another publisher's version went in first: the one we set aside is superseded by it, and
            # ours goes in over it on the next attempt.
            _discard(aside)
    raise OSError(f"could not publish to {target}: {_SWAP_ATTEMPTS} concurrent swaps lost")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_exchange_supported = True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    global _exchange_supported
    if not _exchange_supported:
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        _exchange_supported = False
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # this filesystem cannot exchange
        _exchange_supported = False
        return False
    if code == errno.ENOENT:  # the target was moved aside by a publisher without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


# --- object store ------------------------------------------------------------------------------------


def _publish_remote(stage: Path, uri: str, overwrite: bool) -> str:
    fs, path = storage.filesystem(uri)  # the path has no trailing slash
    if not overwrite and fs.exists(path):
        raise FileExistsError(f"{uri} already exists")
    version = f"{time.time_ns():020d}-{uuid.uuid4().hex}"
    versions = f"{path}/{VERSIONS}"
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    names = [p.relative_to(stage).as_posix() for p in files]
    try:
        # Files are listed explicitly: an object store has no directories, so a recursive put of a
        # "directory" is not reliable there.
        fs.put([str(p) for p in files], [f"{versions}/{version}/{n}" for n in names])
    except BaseException:
        _remove_quietly(fs, f"{versions}/{version}")
        raise
    fs.pipe_file(f"{path}/{POINTER}", version.encode())
    fs.pipe_file(f"{versions}/{version}.done", b"")
    _collect_superseded(fs, path)
    return uri.rstrip("/")


def _collect_superseded(fs, path: str) -> None:
    """Delete finished versions the pointer no longer names, and files of the layout before versions."""
    versions = f"{path}/{VERSIONS}"
    done = fs.glob(f"{versions}/*.done")  # listed before the pointer is read
    current = fs.cat_file(f"{path}/{POINTER}").decode().strip()
    for marker in done:
        version = posixpath.basename(marker).removesuffix(".done")
        if version != current:
            _remove_quietly(fs, f"{versions}/{version}")
            _remove_quietly(fs, marker)
    for entry in fs.glob(f"{path}/*"):
        if posixpath.basename(entry) not in (POINTER, VERSIONS):
            _remove_quietly(fs, entry)


def _remove_quietly(fs, path: str) -> None:
    """Best-effort delete: a leftover is logged, never raised over the error that is already leaving."""
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as e:  # noqa: BLE001
        log.warning("could not remove %s (%s); delete it by hand", path, e)
