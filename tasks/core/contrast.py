"""The one engine of edited forward passes on contrastive prompts, shared by candidate scoring
(tasks/directions/score.py), sweep trials (tasks/sweep/trials.py) and refinement
(tasks/directions/refine.py): the batch type, the behaviour readout and the KL.

Target and baseline prompts are tokenized together through the chat template, split into the token
prefix they all share (run once, reused through the KV cache) and the rest, and batched by length with
each row remembering which set and which prompt it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

import torch

from tasks.core.errors import CompalignError, choice
from tasks.core.forward import chunks, left_pad, pad_id, split_shared_prefix, tokenize
from tasks.core.prompts import format_chat

log = logging.getLogger(__name__)


class KlPrompts(StrEnum):
    """Which baseline prompts the KL is averaged over: those on which the unedited model does not show
    the behaviour (its greedy first token is not a behaviour token), or all of them."""

    without_behaviour = "without_behaviour"
    all = "all"


def kl_divergence(clean_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) per row from clean log-probs and the other's logits (or log-probs):
    (batch, vocab) -> (batch,). The one KL of the project."""
    other = torch.log_softmax(logits.float(), dim=-1)
    return (clean_logp.exp() * (clean_logp - other)).sum(-1)


def behaviour_log_odds(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """log(p / (1 - p)) with p the softmax mass on ``token_ids``: (batch, vocab) -> (batch,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mass = torch.logsumexp(logp[:, token_ids], dim=-1).clamp(max=-1e-7)
    return mass - torch.log(-torch.expm1(mass))


def kl_mask(clean_logits: torch.Tensor, token_ids: list[int], kl_prompts: KlPrompts | str) -> torch.Tensor:
    """(baseline prompts,) bool: the prompts the KL is averaged over. A baseline prompt the unedited model
    already meets with the behaviour (a fine-tuned model refusing a harmless request) is expected to
    change when the behaviour is removed; counting it as damage would push the search away from
    directions that work. When every prompt shows the behaviour, all are kept."""
    kl_prompts = choice(KlPrompts, kl_prompts, "kl_prompts")
    if kl_prompts is KlPrompts.all:
        return torch.ones(clean_logits.shape[0], dtype=torch.bool)
    keep = ~torch.isin(clean_logits.argmax(-1).cpu(), torch.tensor(token_ids))
    if not keep.any():
        log.warning("every baseline prompt shows the behaviour unedited: the KL is taken over all of them")
        return torch.ones_like(keep)
    return keep


def behaviour_token_ids(tokenizer, strings: list[str]) -> list[int]:
    """First token id of each string (deduplicated, order kept)."""
    ids: list[int] = []
    for text in strings:
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        if not tokens:
            raise CompalignError(f"score token {text!r} encodes to no tokens")
        if len(tokens) > 1:
            log.info(
                "score token %r is %d tokens; only its first, %r, is scored",
                text,
                len(tokens),
                tokenizer.decode(tokens[:1]),
            )
        if tokens[0] not in ids:
            ids.append(tokens[0])
    return ids


@dataclass
class ContrastBatch:
    """One batch of prompts after the shared prefix."""

    ids: torch.Tensor
    """(rows, seq) left-padded ids."""
    mask: torch.Tensor
    is_target: torch.Tensor
    """(rows,) bool."""
    index: torch.Tensor
    """(rows,) position of each row in its own prompt list."""


class ContrastPrompts:
    """Target and baseline prompts tokenized together; ``batches`` groups any of them by length."""

    def __init__(self, tokenizer, target: list[str], baseline: list[str], device: torch.device, what: str):
        if not target or not baseline:
            raise CompalignError(f"{what} needs at least one target and one baseline validation prompt")
        self.sequences = tokenize(tokenizer, format_chat(tokenizer, target + baseline))
        split = split_shared_prefix(self.sequences)
        self.prefix, self.prefix_len, self.rest = split.prefix, split.prefix_len, split.rest
        self.n_target, self.n_baseline = len(target), len(baseline)
        self.pad, self.device = pad_id(tokenizer), device

    def by_length(self, indices: list[int] | None = None) -> list[int]:
        """``indices`` (default: every prompt, target first) sorted by length after the prefix."""
        indices = range(len(self.sequences)) if indices is None else indices
        return sorted(indices, key=lambda i: len(self.rest[i]))

    def batches(self, batch_size: int, indices: list[int] | None = None) -> list[ContrastBatch]:
        out = []
        for group in chunks(self.by_length(indices), batch_size):
            ids, mask = left_pad([self.rest[i] for i in group], self.pad, self.device)
            is_target = torch.tensor([i < self.n_target for i in group])
            index = torch.tensor([i if i < self.n_target else i - self.n_target for i in group])
            out.append(ContrastBatch(ids, mask, is_target, index))
        return out

    @property
    def baseline_indices(self) -> list[int]:
        return list(range(self.n_target, len(self.sequences)))
