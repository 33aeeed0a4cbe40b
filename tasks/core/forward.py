"""Batched forward passes: left-padded encoding, a token prefix shared by every prompt, partial forwards.

Left padding makes the last positions line up across a batch; position ids are derived from the
attention mask so that a padded prompt computes the same numbers as the prompt alone, whatever batch
it lands in (which is what makes sharded collection match a single process).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def positions_from_mask(mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Position ids that skip padding: (batch, seq) -> (batch, seq), starting at ``offset``."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0) + offset


def left_pad(
    sequences: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (batch, longest), padding on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of already chat-formatted texts (the template carries its own special tokens)."""
    return tokenizer(texts, add_special_tokens=False).input_ids


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class PrefixedPrompts:
    """Prompts split into the token prefix they all share (system prompt, turn header) and the rest."""

    prefix: torch.Tensor
    """(prefix_len,) token ids common to every prompt."""
    rest: list[list[int]]
    """Per prompt, the ids after the prefix (never empty)."""

    @property
    def prefix_len(self) -> int:
        return int(self.prefix.numel())


def split_shared_prefix(sequences: list[list[int]], keep: int = 1) -> PrefixedPrompts:
    """Longest common token prefix of all sequences, leaving at least ``keep`` tokens in each."""
    limit = min(len(s) for s in sequences) - keep
    length = 0
    while length < limit and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return PrefixedPrompts(
        prefix=torch.tensor(sequences[0][:length], dtype=torch.long), rest=[s[length:] for s in sequences]
    )


@contextmanager
def run_from_layer(model: nn.Module, start: int) -> Iterator[None]:
    """Make the model's forward start at decoder layer ``start``: pass the residual entering that layer
    as ``inputs_embeds`` (the embedding is skipped when inputs_embeds is given).

    The model's own forward keeps doing masks, rotary embeddings and the cache; only its layer list (and
    the per-layer attention types some models index by position in that list) is cut for the block.
    Attention modules keep their own layer_idx, so a cache filled by a full pass stays valid."""
    base = model.model
    layers = base.layers
    layer_types = getattr(base.config, "layer_types", None)
    try:
        base.layers = nn.ModuleList(list(layers)[start:])
        if layer_types is not None:
            base.config.layer_types = list(layer_types)[start:]
        yield
    finally:
        base.layers = layers
        if layer_types is not None:
            base.config.layer_types = layer_types


def last_logits(
    model: nn.Module,
    ids: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    prefix_cache=None,
    prefix_len: int = 0,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token logits at the last position, (batch, vocab), in float32.

    ``mask`` covers only ``ids``/``inputs_embeds``; with a ``prefix_cache`` of ``prefix_len`` tokens
    (batch rows already matching) the prefix is prepended to the mask and positions continue after it."""
    positions = positions_from_mask(mask, offset=prefix_len)
    full_mask = mask
    if prefix_cache is not None:
        full_mask = torch.cat([mask.new_ones(mask.shape[0], prefix_len), mask], dim=1)
    out = model(
        input_ids=ids,
        inputs_embeds=inputs_embeds,
        attention_mask=full_mask,
        position_ids=positions,
        cache=prefix_cache,
        use_cache=prefix_cache is not None,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :].float()


def prefix_cache(model: nn.Module, prefix: torch.Tensor, rows: int, repeat: int):
    """KV cache of ``prefix`` run as ``rows`` identical rows (each may carry its own intervention through
    per-row hooks), each row then repeated ``repeat`` times: batch rows * repeat, row-major."""
    ids = prefix.to(model.device)[None, :].expand(rows, -1)
    mask = torch.ones_like(ids)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    if repeat > 1:
        cache.batch_repeat_interleave(repeat)
    return cache
