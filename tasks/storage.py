"""Paths that may be local or fsspec URLs (s3://...), written atomically.

Credentials never pass through here: s3fs reads them from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, an instance profile, ...). The endpoint of an S3-compatible store comes from
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, which ``configure`` sets from the config so that Ray workers
started afterwards inherit it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import fsspec

from tasks.config import StorageConfig


def configure(cfg: StorageConfig) -> None:
    """Export the endpoint and region of the config to the environment botocore reads (never a secret)."""
    if cfg.s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = cfg.s3_endpoint_url
    if cfg.s3_region:
        os.environ["AWS_DEFAULT_REGION"] = cfg.s3_region


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *parts])
    return str(local_path(uri).joinpath(*parts))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or URL."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), str(local_path(uri))
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: a temporary name first, then a rename (a single PUT on S3, which is
    atomic by itself)."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        fs.pipe_file(path, data)
        return
    target = local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def publish_dir(local_dir: Path, uri: str, overwrite: bool = False) -> str:
    """Move a finished local directory to ``uri`` so that readers never see it half-written.

    Local: a rename. Remote: upload to ``<uri>.partial-<id>`` and move it into place; the final prefix
    then only appears after the upload completed (object stores copy on move, so it appears file by file
    within seconds, never with a file missing from an interrupted upload)."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        path = path.rstrip("/")
        if fs.exists(path):
            if not overwrite:
                raise FileExistsError(f"{uri} already exists")
            fs.rm(path, recursive=True)
        tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        try:
            fs.put(str(local_dir) + "/", tmp + "/", recursive=True)
            fs.mv(tmp, path, recursive=True)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp, recursive=True)
        shutil.rmtree(local_dir, ignore_errors=True)
        return uri
    target = local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists")
        shutil.rmtree(target)
    try:
        os.replace(local_dir, target)
    except OSError:  # another filesystem: copy next to the target, then rename there
        tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
        shutil.copytree(local_dir, tmp)
        os.replace(tmp, target)
        shutil.rmtree(local_dir, ignore_errors=True)
    return str(target)


def staging_dir(uri: str) -> Path:
    """A fresh local directory to build an output in before ``publish_dir``: next to a local target (so the
    final rename stays on one filesystem), in the temp dir for a remote one."""
    if is_remote(uri):
        import tempfile

        return Path(tempfile.mkdtemp(prefix="compalign-stage-"))
    target = local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    stage.mkdir()
    return stage
