"""Prompt sets: loading (bundled, file, URL, hub dataset), seeded splits, fingerprints and chat formatting."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from tasks import DATA
from tasks.core import storage
from tasks.core.concept_config import PromptSource, SplitConfig
from tasks.core.errors import CompalignError

log = logging.getLogger("compalign")
SENTINEL = "\x1fCOMPALIGN_USER_MESSAGE\x1f"


def bundled_path(kind: str, name: str, suffix: str) -> Path:
    """Path of a file shipped in tasks/data/<kind>/<name><suffix> (kind may be '')."""
    root = DATA
    path = Path(str(root / kind / f"{name}{suffix}")) if kind else Path(str(root / f"{name}{suffix}"))
    if not path.is_file():
        folder = path.parent
        known = sorted(p.stem for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []
        raise CompalignError(
            f"no bundled {kind or 'data'} set {name!r}; bundled ones are: {', '.join(known)}"
        )
    return path


def read_text_source(source: str) -> str:
    """Text of bundled:<name> (tasks/data/<name>.txt), a local file or an fsspec URL."""
    if source.startswith("bundled:"):
        return bundled_path("", source.removeprefix("bundled:"), ".txt").read_text(encoding="utf-8")
    try:
        return storage.read_bytes(source).decode("utf-8")
    except FileNotFoundError as exc:
        raise CompalignError(f"text file {source} does not exist") from exc


def _rows_from_bytes(data: bytes, fmt: str, where: str) -> list:
    """Rows (dicts, or strings for txt) of a jsonl/json/csv/txt/parquet file."""
    if fmt == ".txt":
        return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    if fmt == ".jsonl":
        rows = []
        for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CompalignError(f"{where} line {number} is not valid JSON: {exc.msg}") from exc
        return rows
    if fmt == ".json":
        try:
            rows = json.loads(data.decode("utf-8"))
        except json.JSONDecodeError as exc:
            raise CompalignError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(rows, list):
            raise CompalignError(f"{where} must hold a JSON list of rows")
        return rows
    if fmt == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
        except csv.Error as exc:
            raise CompalignError(f"{where} is not valid CSV: {exc}") from exc
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as exc:  # pyarrow raises its own error types for corrupt files
            raise CompalignError(f"{where} is not a readable parquet file: {exc}") from exc
    raise CompalignError(
        f"{where}: unknown prompt file format {fmt!r} (use .jsonl, .json, .csv, .txt or .parquet)"
    )


def read_rows(source: str, split: str = "train") -> list:
    """Rows of bundled:<name>, hf:<dataset> or a file/URL, before any column is picked."""
    if source.startswith("bundled:"):
        path = bundled_path("prompts", source.removeprefix("bundled:"), ".jsonl")
        return _rows_from_bytes(path.read_bytes(), ".jsonl", str(path))
    if source.startswith("hf:"):
        import datasets

        try:
            return list(datasets.load_dataset(source.removeprefix("hf:"), split=split))
        except Exception as exc:  # datasets raises many types for missing/offline sets
            raise CompalignError(f"cannot load hub dataset {source!r} split {split!r}: {exc}") from exc
    try:
        data = storage.read_bytes(source)
    except FileNotFoundError as exc:
        raise CompalignError(f"prompt file {source} does not exist") from exc
    return _rows_from_bytes(data, Path(source).suffix.lower(), source)


def load_prompts(src: PromptSource) -> list[str]:
    """The prompt strings of a source, in file order. Raises CompalignError when empty or malformed."""
    rows = read_rows(src.source, src.split)
    prompts = []
    for number, row in enumerate(rows, 1):
        if isinstance(row, str):
            text = row
        elif isinstance(row, dict):
            if src.column not in row:
                raise CompalignError(
                    f"{src.source} row {number} has no column {src.column!r} (columns: {', '.join(map(str, row))}); "
                    "set the source's column"
                )
            text = row[src.column]
        else:
            raise CompalignError(f"{src.source} row {number} is a {type(row).__name__}, expected an object")
        if not isinstance(text, str) or not text.strip():
            raise CompalignError(
                f"{src.source} row {number}: {src.column!r} must be a non-empty string, got {text!r}"
            )
        prompts.append(text.strip())
    if not prompts:
        raise CompalignError(f"prompt source {src.source} holds no prompts")
    return prompts[: src.limit] if src.limit else prompts


def fingerprint(prompts: list[str]) -> str:
    """sha256 of the prompt list (order matters), short enough for an MLflow param."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()[:32]


@dataclass
class PromptSplit:
    train: list[str]
    val: list[str]
    test: list[str]


def split_prompts(prompts: list[str], cfg: SplitConfig, what: str = "prompt set") -> PromptSplit:
    """Seeded shuffle, then test, val and train slices. Lists of equal length get the same permutation."""
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    shuffled = [prompts[i] for i in order]
    n_test = round(len(prompts) * cfg.test)
    n_val = round(len(prompts) * cfg.val)
    if min(n_test, n_val, len(prompts) - n_test - n_val) < 1:
        raise CompalignError(
            f"{what} has {len(prompts)} prompts, too few for a train/val/test split of "
            f"{1 - cfg.val - cfg.test:.2f}/{cfg.val}/{cfg.test}; give at least {_min_size(cfg)} prompts"
        )
    return PromptSplit(
        test=shuffled[:n_test], val=shuffled[n_test : n_test + n_val], train=shuffled[n_test + n_val :]
    )


def with_validation(split: PromptSplit, val: list[str], what: str) -> PromptSplit:
    """The split with ``val`` as its validation part, its own validation part joining train (to fit on
    one source and select on another). A validation prompt that is also a train or test prompt is
    refused: selection would read it twice."""
    overlap = set(val) & set(split.train + split.val + split.test)
    if overlap:
        raise CompalignError(
            f"{what} shares {len(overlap)} prompts with the set it validates (first: {sorted(overlap)[0][:60]!r}); "
            "give validation prompts of another source"
        )
    return PromptSplit(train=split.train + split.val, val=list(val), test=split.test)


def _min_size(cfg: SplitConfig) -> int:
    n = 3
    while min(round(n * cfg.test), round(n * cfg.val), n - round(n * cfg.test) - round(n * cfg.val)) < 1:
        n += 1
    return n


# ----------------------------------------------------------------------------- chat template


def format_chat(tokenizer, instructions: list[str]) -> list[str]:
    """Each instruction as a one-turn user message with the generation prompt appended."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        for text in instructions
    ]


def template_suffix(tokenizer) -> str:
    """The text the chat template puts after the user's message (end of turn, assistant header)."""
    rendered = format_chat(tokenizer, [SENTINEL])[0]
    if SENTINEL not in rendered:
        raise CompalignError(
            "the chat template does not contain the user's message verbatim; cannot find positions"
        )
    return rendered.split(SENTINEL, 1)[1]


def suffix_positions(tokenizer) -> int:
    """How many tokens follow the user's message in a formatted prompt (the post-instruction positions)."""
    probe = "Hello there"
    full = tokenizer(format_chat(tokenizer, [probe])[0], add_special_tokens=False).input_ids
    prefix_text = format_chat(tokenizer, [probe])[0].split(probe, 1)[0] + probe
    prefix = tokenizer(prefix_text, add_special_tokens=False).input_ids
    count = len(full) - len(prefix)
    if count < 1:
        raise CompalignError(
            "the chat template puts no tokens after the user's message; cannot collect positions"
        )
    return count


def resolve_positions(tokenizer, requested: int | None) -> int:
    available = suffix_positions(tokenizer)
    if requested is None:
        return available
    if requested > available:
        raise CompalignError(
            f"collect.positions={requested} but the chat template has only {available} tokens after the user's "
            f"message ({template_suffix(tokenizer)!r}); use collect.positions <= {available}"
        )
    return requested


# Where a local copy of XSTest is looked for when eval.xstest is auto (the project does not ship it).
XSTEST_ENV = "COMPALIGN_XSTEST"
XSTEST_BESIDE_PROJECT = DATA.parents[2] / "shared" / "data" / "xstest_prompts.csv"


def resolve_xstest(source: str | None) -> str | None:
    """The XSTest source to read: ``source`` itself, or for ``auto`` the file named by $COMPALIGN_XSTEST,
    else ../shared/data/xstest_prompts.csv beside the project; None when off or no local copy exists."""
    if source != "auto":
        return source
    named = os.environ.get(XSTEST_ENV)
    if named:
        return named
    return str(XSTEST_BESIDE_PROJECT) if XSTEST_BESIDE_PROJECT.is_file() else None


def load_safe_prompts(source: str, limit: int | None = None, split: str = "test") -> list[str]:
    """The prompts labelled safe in an XSTest-style set (columns prompt and label: safe / unsafe), or
    ``limit`` of them spread evenly over the file: XSTest lists its prompts type by type, so the first N
    would cover only a few types."""
    rows = read_rows(source, split)
    if not rows or not isinstance(rows[0], dict) or not {"prompt", "label"} <= set(rows[0]):
        raise CompalignError(f"{source} must have columns 'prompt' and 'label' (XSTest's format)")
    safe = [str(r["prompt"]).strip() for r in rows if str(r["label"]).strip().lower() == "safe"]
    if not safe:
        raise CompalignError(f"{source} has no rows labelled safe")
    if not limit or limit >= len(safe):
        return safe
    return [safe[i * len(safe) // limit] for i in range(limit)]


def over_refusal_prompts(judge_kind: str, source: str | None, limit: int | None) -> list[str]:
    """XSTest's safe prompts (``eval.xstest``, ``eval.xstest_limit``) for the refusal judge; [] for other
    judges, when off, or (auto) when there is no local copy, with a note saying how to set one."""
    if judge_kind != "refusal" or source is None:
        return []
    resolved = resolve_xstest(source)
    if resolved is None:
        log.info(
            "over-refusal on XSTest skipped: no local copy ($%s or %s); set eval.xstest=<path, URL or "
            "hf:dataset of XSTest> to measure it",
            XSTEST_ENV,
            XSTEST_BESIDE_PROJECT,
        )
        return []
    return load_safe_prompts(resolved, limit)
