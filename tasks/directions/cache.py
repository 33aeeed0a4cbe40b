"""Content-addressed cache of activation sums, in a local directory or under an fsspec URL.

The key covers everything the sums depend on: the model's weight identity (hash of its files, or hub
id @ commit), the prompt list's fingerprint, how the prompts were formatted (chat template), the
positions recorded and the dtype. Same inputs, same key: a second run never collects again; a changed
prompt file or model misses. Entries are written whole (temp name + rename, or one PUT), so flows
sharing a cache never read a torn entry.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from safetensors.torch import load, save

from tasks.core import storage
from tasks.directions.collect import ActivationSums

log = logging.getLogger(__name__)


def cache_key(
    model_identity: str, prompts_fingerprint: str, chat_template: str, positions: int, dtype: str
) -> str:
    """sha256 over the inputs the sums depend on."""
    payload = json.dumps(
        {
            "model": model_identity,
            "prompts": prompts_fingerprint,
            "template": hashlib.sha256(chat_template.encode()).hexdigest(),
            "positions": positions,
            "dtype": dtype,
            "format": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _entry(uri: str, key: str) -> str:
    return storage.join(uri, key[:2], f"{key}.safetensors")


def load_sums(uri: str, key: str) -> ActivationSums | None:
    """The cached sums, or None on a miss (or an unreadable entry, which is then ignored)."""
    entry = _entry(uri, key)
    try:
        data = storage.read_bytes(entry)
    except FileNotFoundError:
        return None
    try:
        tensors = load(data)
        return ActivationSums(sums=tensors["sums"], count=int(tensors["count"].item()))
    except Exception as exc:  # a foreign or damaged file must not stop the run: collect again
        log.warning("ignoring unreadable cache entry %s: %s", entry, exc)
        return None


def store_sums(uri: str, key: str, sums: ActivationSums) -> str:
    entry = _entry(uri, key)
    data = save({"sums": sums.sums.contiguous(), "count": torch.tensor([sums.count], dtype=torch.int64)})
    storage.write_bytes(entry, data)
    return entry
