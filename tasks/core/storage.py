"""Paths that may be local or fsspec URLs (s3://...), written atomically.

Credentials never pass through here: s3fs reads them from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, an instance profile, ...). The endpoint of an S3-compatible store comes from
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, which ``configure`` sets from the config so that Ray workers
started afterwards inherit it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec

from tasks.core.config import StorageConfig
from tasks.core.errors import CompalignError

if TYPE_CHECKING:
    import pyarrow.fs


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


def absolute(uri: str) -> str:
    """A URL unchanged, a local path made absolute against this process's working directory (before it
    is handed to a Ray worker, whose working directory differs)."""
    return uri if is_remote(uri) else str(local_path(uri).absolute())


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *parts])
    return str(local_path(uri).joinpath(*parts))


def _s3_options() -> dict:
    """s3fs options from the environment ``configure`` exported (endpoint, region; never credentials).

    botocore reads AWS_ENDPOINT_URL_S3 itself, but passing it explicitly also makes it part of fsspec's
    instance-cache key, so a changed endpoint never reuses a client bound to the old one. Listings are not
    cached: other processes (Ray workers) write the same prefixes, and a stale listing would hide their
    files."""
    options: dict = {"use_listings_cache": False}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or URL."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), str(local_path(uri))
    options = _s3_options() if uri.startswith(("s3://", "s3a://")) else {}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def pyarrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """(filesystem, path within it) in the form Ray Train's ``RunConfig(storage_path=path,
    storage_filesystem=filesystem)`` takes: for a URL, the same fsspec filesystem (s3fs, with the endpoint
    and region of ``configure``) wrapped for pyarrow; for a local path, (None, its absolute path)."""
    if not is_remote(uri):
        return None, str(local_path(uri).resolve())
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri)
    return PyFileSystem(FSSpecHandler(fs)), path.rstrip("/")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """The whole file in one read (one GET on S3: a snapshot even while another process replaces it,
    where a buffered handle could mix two versions or fail on the changed ETag)."""
    fs, path = filesystem(uri)
    return fs.cat_file(path)


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


def check_writable(uri: str, key: str) -> None:
    """Fail now, with one message naming the config ``key``, when nothing can be written at ``uri``: a
    probe file is written and deleted there (local: in the nearest existing folder, so that no folder is
    created for an output that may never come)."""
    probe_name = f".compalign-write-check-{uuid.uuid4().hex[:8]}"
    if is_remote(uri):
        probe = join(uri, probe_name)
    else:
        folder = local_path(uri).absolute()
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise CompalignError(
                f"{key}: cannot write to {uri}: {folder} is a file, not a folder; change {key}"
            )
        probe = str(folder / probe_name)
    try:
        write_bytes(probe, b"")
        fs, path = filesystem(probe)
        fs.rm(path)
    except Exception as e:  # noqa: BLE001 - any storage error means the same to the user
        raise CompalignError(
            f"{key}: cannot write to {uri} ({type(e).__name__}: {e}); change {key} or its permissions"
        ) from e


def check_outputs(locations: dict[str, str | None]) -> None:
    """``check_writable`` for each config key's location (None: not used by this run)."""
    for key, uri in locations.items():
        if uri:
            check_writable(uri, key)
