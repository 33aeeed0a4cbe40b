"""Residual-stream activation sums over a prompt set, at the last post-instruction positions."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tasks.core.forward import (
    chunks,
    left_pad,
    pad_id,
    positions_from_mask,
    prefix_cache,
    split_shared_prefix,
    tokenize,
)
from tasks.core.hooks import capture_residuals
from tasks.core.model import hidden_size, input_device, num_layers
from tasks.core.prompts import format_chat
from tasks.core.worker import Worker


@dataclass
class ActivationSums:
    """Per-(layer, position) sums of residual activations and the number of prompts summed.

    Sums rather than activations, so memory does not grow with the prompt count and shards merge
    exactly (addition in float64)."""

    sums: torch.Tensor
    """(layers + 1, positions, hidden) float64: layer i is the stream entering decoder layer i, the last
    one the stream after the last layer; position j counts from the end (j = positions - 1 is the last token)."""
    count: int

    def mean(self) -> torch.Tensor:
        """(layers + 1, positions, hidden) float64."""
        return self.sums / self.count

    @staticmethod
    def merge(parts: list[ActivationSums]) -> ActivationSums:
        total = parts[0].sums.clone()
        for part in parts[1:]:
            total += part.sums
        return ActivationSums(sums=total, count=sum(p.count for p in parts))


@torch.inference_mode()
def collect_activation_sums(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    positions: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> ActivationSums:
    """Run ``prompts`` (raw instructions, chat-formatted here) in batches through the decoder stack and
    sum the residual stream at the last ``positions`` tokens. The LM head is skipped (not needed), and the
    token prefix every prompt shares (system prompt, turn header) runs once and is reused from the KV cache.

    Returns sums of shape (layers + 1, positions, hidden) in float64."""
    sums = torch.zeros((num_layers(model) + 1, positions, hidden_size(model)), dtype=torch.float64)
    device = input_device(model)
    split = split_shared_prefix(tokenize(tokenizer, format_chat(tokenizer, prompts)), keep=positions)
    shared = prefix_cache(model, split.prefix, 1, 1) if split.prefix_len else None
    # Similar lengths together: less padding, and the order is fixed, so results do not depend on input order.
    order = sorted(range(len(split.rest)), key=lambda i: (len(split.rest[i]), split.rest[i]))
    sink: dict[int, torch.Tensor] = {}
    with capture_residuals(model, positions, sink):
        for batch in chunks(order, batch_size):
            ids, mask = left_pad([split.rest[i] for i in batch], pad_id(tokenizer), device)
            cache, full_mask = None, mask
            if shared is not None:
                cache = copy.deepcopy(shared)
                cache.batch_repeat_interleave(len(batch))
                full_mask = torch.cat([mask.new_ones(len(batch), split.prefix_len), mask], dim=1)
            model.model(
                input_ids=ids,
                attention_mask=full_mask,
                position_ids=positions_from_mask(mask, offset=split.prefix_len),
                cache=cache,
                use_cache=cache is not None,
            )
            for layer, acts in sink.items():
                sums[layer] += acts.to(torch.float64).sum(0).cpu()
            if progress:
                progress(len(batch))
    return ActivationSums(sums=sums, count=len(prompts))


def collect_part(worker: Worker, prompts: list[str], positions: int, batch_size: int) -> ActivationSums:
    """One shard of a pool's collection: the sums over ``prompts`` on the worker's model."""
    return collect_activation_sums(
        worker.loaded.model, worker.loaded.tokenizer, prompts, positions, batch_size
    )
