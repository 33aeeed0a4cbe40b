"""Instruction data for SFT: loading (bundled, file, URL, hub dataset; chat, alpaca and sharegpt rows),
chat-template tokenization with a loss on assistant tokens only, optional packing, seeded split, and
the per-rank batch order the training loop uses.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}`` turns. Tokenized
sets are flat numpy arrays (cheap to ship to Ray Train workers through the object store).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.core import storage
from tasks.core.errors import CompalignError
from tasks.core.prompts import bundled_path, read_rows
from tasks.sft.config import SftDataConfig

FILE_FORMATS = (".jsonl", ".json", ".parquet", ".csv")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
IGNORE = -100


@dataclass
class Conversation:
    """One row of the data set as chat turns."""

    messages: list[dict[str, str]]
    row: int
    """0-based row number in the source (after ``data.limit``), for reports."""

    def answers(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]


# ----------------------------------------------------------------------------- loading


def read_sft_rows(source: str, split: str = "train") -> list:
    """Rows of bundled:<name> (tasks/data/sft/<name>.jsonl), hf:<dataset>, or a .jsonl/.json/.parquet/.csv
    file or fsspec URL."""
    if source.startswith("bundled:"):
        return read_rows(str(bundled_path("sft", source.removeprefix("bundled:"), ".jsonl")))
    if source.startswith("hf:"):
        return read_rows(source, split)
    suffix = Path(source.split("?", 1)[0]).suffix.lower()
    if suffix not in FILE_FORMATS:
        raise CompalignError(
            f"data.source {source}: unknown file format {suffix or '(no suffix)'!r}; "
            f"use {', '.join(FILE_FORMATS)}, bundled:<name> or hf:<dataset>"
        )
    if not storage.exists(source):
        raise CompalignError(f"data file {source} does not exist")
    return read_rows(source, split)


def detect_format(row: dict, messages_column: str) -> str | None:
    if messages_column in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def _chat_turns(turns, where: str, sharegpt: bool) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise CompalignError(f"{where}: the turns must be a non-empty list, got {type(turns).__name__}")
    out = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise CompalignError(f"{where} turn {number} is a {type(turn).__name__}, expected an object")
        if sharegpt:
            role, content = SHAREGPT_ROLES.get(str(turn.get("from"))), turn.get("value")
        else:
            role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise CompalignError(
                f"{where} turn {number} has role {turn.get('from' if sharegpt else 'role')!r}; "
                f"expected {', '.join(SHAREGPT_ROLES if sharegpt else ROLES)}"
            )
        if not isinstance(content, str):
            raise CompalignError(f"{where} turn {number}: content must be a string, got {content!r}")
        out.append({"role": role, "content": content})
    return out


def to_messages(row, fmt: str, messages_column: str, where: str) -> list[dict[str, str]]:
    """One row as chat turns. ``fmt`` is chat, alpaca, sharegpt or auto (detected per row)."""
    if not isinstance(row, dict):
        raise CompalignError(f"{where} is a {type(row).__name__}, expected an object")
    kind = detect_format(row, messages_column) if fmt == "auto" else fmt
    if kind is None:
        raise CompalignError(
            f"{where} has columns {', '.join(map(str, row)) or '(none)'}: not a format the loader knows; "
            f"expected chat ({messages_column!r}: list of role/content turns), sharegpt ('conversations') or "
            "alpaca (instruction, input, output); set data.format and data.messages_column"
        )
    if kind == "alpaca":
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise CompalignError(f"{where}: alpaca rows need string {' and '.join(missing)}")
        extra = row.get("input") or ""
        user = row["instruction"] + (f"\n\n{extra}" if str(extra).strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    column = messages_column if kind == "chat" else "conversations"
    if column not in row:
        raise CompalignError(
            f"{where} has no column {column!r} for data.format={kind} (columns: {', '.join(map(str, row))}); "
            "set data.format (auto, chat, alpaca or sharegpt) or data.messages_column"
        )
    return _chat_turns(row[column], where, sharegpt=kind == "sharegpt")


def load_conversations(cfg: SftDataConfig) -> list[Conversation]:
    """Every row of the source as a conversation (``data.limit`` applied, system prompt added). Rows
    without a non-empty assistant turn are kept here and dropped as unusable by ``tokenize_set``."""
    rows = read_sft_rows(cfg.source, cfg.split)
    if cfg.limit:
        rows = rows[: cfg.limit]
    if not rows:
        raise CompalignError(f"data.source {cfg.source} holds no rows")
    out = []
    for number, row in enumerate(rows):
        messages = to_messages(row, cfg.format, cfg.messages_column, f"{cfg.source} row {number}")
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        out.append(Conversation(messages=messages, row=number))
    return out


def fingerprint(conversations: list[Conversation]) -> str:
    """sha256 of the conversations' turns in order (32 hex chars, fits an MLflow param)."""
    digest = hashlib.sha256()
    for conv in conversations:
        digest.update(json.dumps(conv.messages, ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def split_train_val(
    conversations: list[Conversation], val_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Seeded shuffle, then (train, validation); at least one validation row when val_fraction > 0."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction)) if val_fraction > 0 and len(order) > 1 else 0
    shuffled = [conversations[i] for i in order]
    return shuffled[n_val:], shuffled[:n_val]


# ----------------------------------------------------------------------------- tokenization


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (its content and the
    template's end-of-turn marker), found by rendering each prefix of the conversation."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        end = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (end.startswith(start) and text.startswith(end)):
            raise CompalignError(
                "the chat template renders a conversation differently from its prefixes, so the assistant "
                "tokens cannot be located; set model_options.chat_template to a prefix-consistent template"
            )
        spans.append((len(start), len(end)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], max_length: int):
    """(input_ids, loss_mask) of one conversation, cut to ``max_length`` tokens; None when no assistant
    token is left to learn from (no answer, an empty one, or all of it past the cut)."""
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    offsets = enc["offset_mapping"][: len(ids)]
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in offsets]
    if not any(mask):
        return None
    return ids, mask


@dataclass
class TokenizedSet:
    """Training sequences as flat arrays: sequence i is tokens[starts[i]:starts[i + 1]]."""

    tokens: np.ndarray
    """(total,) int32 token ids."""
    loss_mask: np.ndarray
    """(total,) bool: True on tokens the loss is taken on (assistant turns)."""
    positions: np.ndarray
    """(total,) int32 position ids (restart at every conversation inside a packed sequence)."""
    starts: np.ndarray
    """(sequences + 1,) int64 offsets."""
    conversations: int
    """Conversations in the set (packed sequences hold several)."""

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = self.starts[i], self.starts[i + 1]
        return self.tokens[lo:hi], self.loss_mask[lo:hi], self.positions[lo:hi]


def _build(pieces: list[tuple[list[int], list[bool], list[int]]], conversations: int) -> TokenizedSet:
    lengths = [len(p[0]) for p in pieces]
    return TokenizedSet(
        tokens=np.array([t for p in pieces for t in p[0]], dtype=np.int32),
        loss_mask=np.array([m for p in pieces for m in p[1]], dtype=bool),
        positions=np.array([q for p in pieces for q in p[2]], dtype=np.int32),
        starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        conversations=conversations,
    )


def tokenize_set(
    tokenizer, conversations: list[Conversation], max_length: int, packing: bool
) -> tuple[TokenizedSet, list[Conversation]]:
    """Tokenize every conversation (in order; packed greedily into sequences of at most ``max_length``
    when ``packing``). Returns the set and the conversations dropped as unusable."""
    examples, unusable = [], []
    for conv in conversations:
        out = tokenize_conversation(tokenizer, conv.messages, max_length)
        if out is None:
            unusable.append(conv)
        else:
            examples.append(out)
    if not packing:
        pieces = [(ids, mask, list(range(len(ids)))) for ids, mask in examples]
        return _build(pieces, len(examples)), unusable
    pieces, current = [], ([], [], [])
    for ids, mask in examples:
        if current[0] and len(current[0]) + len(ids) > max_length:
            pieces.append(current)
            current = ([], [], [])
        current[0].extend(ids)
        current[1].extend(mask)
        current[2].extend(range(len(ids)))
    if current[0]:
        pieces.append(current)
    return _build(pieces, len(examples)), unusable


def collate(data: TokenizedSet, indices: list[int], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids and labels (batch, longest) with labels -100 off the assistant
    tokens. Unpacked batches carry an attention_mask; packed ones position_ids instead (the model then
    keeps attention inside each packed conversation; padding forms a sequence of its own)."""
    rows = [data.sequence(i) for i in indices]
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (tokens, loss, pos) in enumerate(rows):
        n = len(tokens)
        ids[row, :n] = torch.from_numpy(tokens.astype(np.int64))
        labels[row, :n] = torch.where(torch.tensor(loss), ids[row, :n], IGNORE)
        positions[row, :n] = torch.from_numpy(pos.astype(np.int64))
        positions[row, n:] = torch.arange(width - n)
        mask[row, :n] = 1
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ----------------------------------------------------------------------------- batch order


def steps_per_epoch(n_sequences: int, batch_size: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass (the remainder that does not fill a global batch is skipped)."""
    return n_sequences // (batch_size * world_size * grad_accum)


def micro_batches(
    n_sequences: int, batch_size: int, world_size: int, rank: int, grad_accum: int, epoch: int, seed: int
) -> list[list[int]]:
    """This rank's micro-batches (sequence indices) for one epoch, in order: a seeded permutation per
    epoch, dealt round-robin so every rank sees different sequences and the same number of batches."""
    order = list(range(n_sequences))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    count = steps_per_epoch(n_sequences, batch_size, world_size, grad_accum) * grad_accum
    out = []
    for k in range(count):
        start = (k * world_size + rank) * batch_size
        out.append(order[start : start + batch_size])
    return out
