"""storage.pyarrow_filesystem, the (filesystem, path) Ray Train's RunConfig takes (S3 side:
tests/integrations/test_storage_s3.py)."""

from __future__ import annotations

import pyarrow.fs

from tasks.core import storage


def test_local_paths_are_absolute_without_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.pyarrow_filesystem("runs/train") == (None, str(tmp_path / "runs" / "train"))
    assert storage.pyarrow_filesystem(f"file://{tmp_path}/x") == (None, str(tmp_path / "x"))


def test_fsspec_urls_are_wrapped_for_pyarrow():
    fs, path = storage.pyarrow_filesystem("memory://bucket/train/")
    assert isinstance(fs, pyarrow.fs.PyFileSystem)
    assert path == "/bucket/train"
    with fs.open_output_stream(f"{path}/a.txt") as out:
        out.write(b"x")
    assert fs.get_file_info(f"{path}/a.txt").size == 1
