"""Answer harmless instructions with the packaged model itself, for `tasks/data/sft/refusal_teach.jsonl`.

The fixture must go on answering ordinary requests; rows whose answers are in the base model's own words
teach that without moving its answers elsewhere. Run by hand (greedy, so the output is reproducible):

    python tests/bench/distill_answers.py prompts.txt rows.jsonl   # one instruction per line

Each answer is cut before its first repeated line or 5-word run (small models loop), then to whole
sentences or lines up to about 48 tokens, so that these rows do not outweigh the short refusals in the
token-averaged loss. Answers the phrase judge flags as refusals, or shorter than 25 characters, are dropped
(reported on stderr). The rows go to a file: libraries print to stdout.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tasks.core.config import ModelOptions  # noqa: E402
from tasks.core.model import load_model  # noqa: E402
from tasks.evaluation.evaluate import generate  # noqa: E402
from tasks.evaluation.judges import RefusalJudge  # noqa: E402

MAX_NEW_TOKENS = 96
KEEP_TOKENS = 48
MIN_CHARS = 25


def cut_loops(text: str) -> str:
    """The text before its first repeated line or repeated 5-word run."""
    lines, seen = [], set()
    for line in text.splitlines():
        key = line.strip().lower()
        if key and key in seen:
            break
        seen.add(key)
        lines.append(line)
    text = "\n".join(lines)
    words = text.split()
    grams: set[tuple[str, ...]] = set()
    for i in range(len(words) - 4):
        gram = tuple(w.lower() for w in words[i : i + 5])
        if gram in grams:
            cut = text.find(words[i], len(" ".join(words[:i])))
            return text[:cut].rstrip()
        grams.add(gram)
    return text


def whole_sentences(text: str, tokenizer, budget: int = KEEP_TOKENS) -> str:
    """The longest prefix made of whole sentences or lines within ``budget`` tokens (at least one)."""
    pieces = [p for p in re.split(r"(?<=[.!?])\s+|\n", text) if p.strip()]
    kept: list[str] = []
    for piece in pieces:
        trial = " ".join([*kept, piece.strip()])
        if kept and len(tokenizer(trial)["input_ids"]) > budget:
            break
        kept.append(piece.strip())
    return " ".join(kept)


def main() -> None:
    prompts = [line.strip() for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    loaded = load_model("packaged:smollm2", ModelOptions(dtype="bfloat16"))
    answers = generate(loaded.model, loaded.tokenizer, prompts, MAX_NEW_TOKENS, 16)
    judge, rows = RefusalJudge(), []
    for prompt, answer in zip(prompts, answers, strict=True):
        short = whole_sentences(cut_loops(answer), loaded.tokenizer)
        if judge.judge([prompt], [short])[0] or len(short) < MIN_CHARS:
            print(f"dropped: {prompt!r} -> {short!r}", file=sys.stderr)
            continue
        row = {"kind": "harmless", "messages": [{"role": "user", "content": prompt}]}
        row["messages"].append({"role": "assistant", "content": short})
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    Path(sys.argv[2]).write_text("".join(rows))


if __name__ == "__main__":
    main()
