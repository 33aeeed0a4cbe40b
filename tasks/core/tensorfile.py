"""Reading and writing safetensors files one tensor at a time, so that memory holds at most one tensor
(never a whole shard): the format is an 8-byte little-endian header length, a JSON header of names,
dtypes, shapes and byte ranges, and the raw little-endian data."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_COPY_CHUNK = 64 * 1024**2


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: its dtype code, shape and byte range in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    entries: list[Entry]
    """In file order (by start offset)."""
    metadata: dict[str, str]
    data_start: int
    """Offset of the data section in the file."""


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100 * 1024**2:
            raise ValueError(f"{path} is not a safetensors file (header of {size} bytes)")
        raw = json.loads(f.read(size))
    metadata = raw.pop("__metadata__", None) or {}
    entries = [
        Entry(name, v["dtype"], tuple(v["shape"]), v["data_offsets"][0], v["data_offsets"][1])
        for name, v in raw.items()
    ]
    return Header(sorted(entries, key=lambda e: e.start), metadata, 8 + size)


def read_tensor(path: Path, header: Header, entry: Entry) -> torch.Tensor:
    """The tensor ``entry`` of ``path`` as a writable CPU tensor owning its memory (read, not mapped)."""
    buf = bytearray(entry.end - entry.start)
    with open(path, "rb") as f:
        f.seek(header.data_start + entry.start)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"{path} is truncated at {entry.name}")
    if not buf:
        return torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
    return torch.frombuffer(buf, dtype=DTYPES[entry.dtype]).reshape(entry.shape)


@dataclass(frozen=True)
class Output:
    """A tensor to write: its dtype code, shape and a function producing it (called once, when written),
    or ``copy_from``: (source file, its header, entry) whose bytes are copied without being parsed."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor] | None = None
    copy_from: tuple[Path, Header, Entry] | None = None


def write_file(path: Path, outputs: Iterable[Output], metadata: dict[str, str] | None = None) -> None:
    """Write ``outputs`` as a safetensors file at ``path`` (a file being written is not one yet: the caller
    renames it into place), holding one tensor in memory at a time."""
    outputs = list(outputs)
    header, offset = {}, 0
    for out in outputs:
        size = _numel(out.shape) * torch.empty((), dtype=DTYPES[out.dtype]).element_size()
        header[out.name] = {
            "dtype": out.dtype,
            "shape": list(out.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for out in outputs:
            expected = header[out.name]["data_offsets"][1] - header[out.name]["data_offsets"][0]
            if out.copy_from is not None:
                written = _copy_bytes(f, *out.copy_from)
            else:
                tensor = out.produce()
                if tensor.dtype != DTYPES[out.dtype] or tuple(tensor.shape) != out.shape:
                    raise ValueError(f"{out.name}: produced {tensor.dtype} {tuple(tensor.shape)}")
                written = f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
                del tensor
            if written != expected:
                raise ValueError(f"{out.name}: wrote {written} bytes, expected {expected}")
        f.flush()
        os.fsync(f.fileno())


def _copy_bytes(f, source: Path, header: Header, entry: Entry) -> int:
    written, left = 0, entry.end - entry.start
    with open(source, "rb") as src:
        src.seek(header.data_start + entry.start)
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise ValueError(f"{source} is truncated at {entry.name}")
            written += f.write(chunk)
            left -= len(chunk)
    return written


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
