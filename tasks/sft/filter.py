"""Refusal and boilerplate filters for instruction data (the recipe behind the "uncensored" WizardLM
and Dolphin models): a phrase list, and a detector that reads each answer's residual stream and
scores its projection on a refusal direction found by the abliterate flow.

Both return per-row decisions; ``apply_filters`` turns them into the kept rows and a report (per-rule
drop counts, a sample of dropped rows, fingerprints before and after).
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from tasks.core.errors import CompalignError
from tasks.core.forward import chunks, pad_id
from tasks.core.hooks import residual_input_module
from tasks.core.model import input_device, num_layers
from tasks.core.worker import Worker
from tasks.directions.candidates import load_direction
from tasks.sft.data import Conversation, assistant_spans, fingerprint

# Refusal and moralising openings of instruction-tuned models (the "As an AI language model", "I'm sorry,
# but I cannot" family). Matched case-insensitively in every assistant turn. Kept to phrases that
# helpful answers do not use, so that the filter removes boilerplate rather than topics.
DEFAULT_BOILERPLATE_PHRASES = (
    "as an ai",
    "as a language model",
    "as a large language model",
    "i'm an ai",
    "i am an ai",
    "i'm just an ai",
    "i'm sorry, but",
    "i am sorry, but",
    "i apologize, but",
    "sorry, but i can",
    "sorry, i can't",
    "sorry, i cannot",
    "i cannot fulfill",
    "i can't fulfill",
    "i cannot provide",
    "i can't provide",
    "i cannot assist",
    "i can't assist",
    "i cannot help with",
    "i can't help with",
    "i cannot comply",
    "i can't comply",
    "i cannot write",
    "i can't write",
    "i cannot create",
    "i can't create",
    "i cannot engage",
    "i can't engage",
    "i'm unable to",
    "i am unable to",
    "i'm not able to",
    "i am not able to",
    "i must decline",
    "i won't be able to",
    "i will not be able to",
    "i won't help",
    "i will not help",
    "i won't provide",
    "i will not provide",
    "it is not appropriate",
    "it's not appropriate",
    "it would be inappropriate",
    "it would not be appropriate",
    "not be appropriate for me",
    "i must emphasize",
    "i must stress",
    "i must remind",
    "it is important to remember that",
    "it's important to remember that",
    "ethical implications",
    "ethical considerations",
    "ethical guidelines",
    "ethical principles",
    "against my programming",
    "my guidelines",
    "responsible ai",
    "not within the scope of my",
    "i do not have personal",
    "i don't have personal",
    "i do not have opinions",
    "i don't have opinions",
    "i do not have feelings",
    "i don't have feelings",
)

_APOSTROPHES = re.compile("[\u2018\u2019\u02bc]")


def _normalise(text: str) -> str:
    return _APOSTROPHES.sub("'", text).lower()


def phrase_hits(conversations: list[Conversation], phrases: list[str] | tuple[str, ...]) -> list[list[str]]:
    """Per conversation, the phrases found in any of its assistant turns (empty: keep)."""
    wanted = [(p, _normalise(p)) for p in phrases if p.strip()]
    out = []
    for conv in conversations:
        answers = [_normalise(a) for a in conv.answers()]
        out.append([p for p, q in wanted if any(q in a for a in answers)])
    return out


# ----------------------------------------------------------------------------- direction detector


@dataclass
class RefusalDirection:
    """A unit direction and the residual layer it is read at."""

    vector: torch.Tensor
    """(hidden,) float32, unit norm."""
    layer: int
    """Residual stream entering decoder layer ``layer`` (n_layers: after the last layer)."""
    source: str


def load_refusal_direction(path: str, hidden: int, n_layers: int, layer: int | None) -> RefusalDirection:
    """The direction in a .safetensors/.pt/.npy file (an abliterate run's directions/chosen.safetensors
    carries its layer in the metadata); ``layer`` overrides it and is required when the file has none."""
    vector, metadata = load_direction(path, hidden)
    if layer is None:
        if "layer" not in metadata:
            raise CompalignError(
                f"direction {path} has no layer in its metadata; set filter.layer (0..{n_layers})"
            )
        layer = int(metadata["layer"])
    if not 0 <= layer <= n_layers:
        raise CompalignError(f"filter.layer={layer} is outside the model's layers 0..{n_layers}")
    return RefusalDirection(vector=vector, layer=layer, source=path)


class _Stop(Exception):
    """Raised by the capture hook: nothing past the read layer is needed."""


@torch.inference_mode()
def answer_scores(
    model: nn.Module,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    direction: torch.Tensor,
    layer: int,
    tokens: int | None,
    batch_size: int,
    max_length: int = 1024,
) -> list[float]:
    """Per conversation, the highest over its assistant turns of the mean projection, on the unit
    ``direction``, of the residual stream at ``layer`` over the turn's answer tokens (the first
    ``tokens`` of them; None: all). Conversations without an answer score -inf."""
    device = input_device(model)
    unit = (direction / direction.norm()).to(device=device, dtype=torch.float32)
    encoded = []
    for messages in conversations:
        if not any(m["role"] == "assistant" for m in messages):
            encoded.append(None)
            continue
        text, spans = assistant_spans(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][:max_length], enc["offset_mapping"][:max_length]
        turns = []
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        for (lo, hi), answer in zip(spans, answers, strict=True):
            end = min(hi, lo + len(answer))  # the answer itself, not the end-of-turn marker
            picked = [j for j, (start, _) in enumerate(offsets) if lo <= start < end][:tokens]
            if picked:
                turns.append(picked)
        encoded.append((ids, turns) if turns else None)
    scores = [float("-inf")] * len(conversations)
    todo = [i for i, e in enumerate(encoded) if e is not None]
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).float()
        raise _Stop

    handle = residual_input_module(model, min(layer, num_layers(model))).register_forward_pre_hook(
        hook, with_kwargs=True
    )
    try:
        for batch in chunks(todo, batch_size):
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            with contextlib.suppress(_Stop):
                model.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            proj = captured["h"] @ unit  # (batch, width)
            for row, i in enumerate(batch):
                scores[i] = max(float(proj[row, turn].mean()) for turn in encoded[i][1])
    finally:
        handle.remove()
    return scores


def answer_scores_part(
    worker: Worker,
    conversations: list[list[dict[str, str]]],
    direction: torch.Tensor,
    layer: int,
    tokens: int | None,
    batch_size: int,
    max_length: int,
) -> list[float]:
    """One shard of a pool's direction filter: ``answer_scores`` on the worker's model."""
    loaded = worker.loaded
    return answer_scores(
        loaded.model, loaded.tokenizer, conversations, direction, layer, tokens, batch_size, max_length
    )


def outlier_threshold(scores: list[float], mad_factor: float) -> float:
    """median + mad_factor x MAD of the finite scores (a robust cut: refusals are a minority that
    projects far above the rest)."""
    values = torch.tensor([s for s in scores if s != float("-inf")], dtype=torch.float64)
    if values.numel() == 0:
        raise CompalignError("the direction filter found no assistant answer to score")
    median = values.median()
    mad = (values - median).abs().median().clamp_min(1e-6)
    return float(median + mad_factor * mad)


# ----------------------------------------------------------------------------- report


@dataclass
class FilterReport:
    """What the filters did, for MLflow."""

    rules: list[str]
    rows_before: int
    rows_after: int
    dropped: dict[str, int]
    """Rows each rule dropped (a row both rules match counts for each)."""
    phrase_counts: dict[str, int]
    """Rows matched per phrase."""
    fingerprint_before: str
    fingerprint_after: str
    threshold: float | None = None
    """The direction filter's cut (explicit or from the outlier rule)."""
    layer: int | None = None
    samples: list[dict] = field(default_factory=list)
    """Dropped rows (up to filter.sample per rule): row, rule, reason, first answer."""

    def metrics(self) -> dict[str, float]:
        out = {"filter.rows_before": float(self.rows_before), "filter.rows_after": float(self.rows_after)}
        out.update({f"filter.dropped.{rule}": float(n) for rule, n in self.dropped.items()})
        if self.threshold is not None:
            out["filter.direction_threshold"] = self.threshold
        return out

    def to_dict(self) -> dict:
        return {
            "rules": self.rules,
            "rows_before": self.rows_before,
            "rows_after": self.rows_after,
            "dropped": self.dropped,
            "phrase_counts": self.phrase_counts,
            "fingerprint_before": self.fingerprint_before,
            "fingerprint_after": self.fingerprint_after,
            "direction_threshold": self.threshold,
            "direction_layer": self.layer,
            "samples": self.samples,
        }


def apply_filters(
    conversations: list[Conversation],
    rules: list[str],
    hits: list[list[str]] | None,
    scores: list[float] | None,
    threshold: float | None,
    sample: int,
    layer: int | None = None,
) -> tuple[list[Conversation], FilterReport]:
    """Keep the rows no active rule flags. ``hits`` (from ``phrase_hits``) is needed for the phrases rule,
    ``scores`` (from ``answer_scores``) and ``threshold`` for the direction rule."""
    if "phrases" in rules and hits is None:
        raise ValueError("the phrases rule needs phrase hits")
    if "direction" in rules and (scores is None or threshold is None):
        raise ValueError("the direction rule needs scores and a threshold")
    kept, samples = [], []
    dropped = dict.fromkeys(rules, 0)
    phrase_counts: Counter = Counter()
    for i, conv in enumerate(conversations):
        reasons = []
        if "phrases" in rules and hits[i]:
            reasons.append(("phrases", ", ".join(hits[i])))
            phrase_counts.update(hits[i])
        if "direction" in rules and scores[i] > threshold:
            reasons.append(("direction", f"score {scores[i]:.3f} > {threshold:.3f}"))
        for rule, reason in reasons:
            dropped[rule] += 1
            if sum(s["rule"] == rule for s in samples) < sample:
                answer = (conv.answers() or [""])[0]
                samples.append({"row": conv.row, "rule": rule, "reason": reason, "answer": answer[:300]})
        if not reasons:
            kept.append(conv)
    report = FilterReport(
        rules=rules,
        rows_before=len(conversations),
        rows_after=len(kept),
        dropped=dropped,
        phrase_counts=dict(phrase_counts.most_common()),
        fingerprint_before=fingerprint(conversations),
        fingerprint_after=fingerprint(kept),
        threshold=threshold if "direction" in rules else None,
        layer=layer if "direction" in rules else None,
        samples=samples,
    )
    return kept, report


# ----------------------------------------------------------------------------- score cache


def scores_key(
    identity: str,
    direction: RefusalDirection,
    tokens: int,
    max_length: int,
    conversations: list[Conversation],
) -> str:
    """Content address of the direction filter's scores: model weights, direction, read layer, token
    count, cut length and the rows."""
    import hashlib

    digest = hashlib.sha256()
    for part in (identity, str(direction.layer), str(tokens), str(max_length), fingerprint(conversations)):
        digest.update(part.encode() + b"\0")
    digest.update(direction.vector.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_cached_scores(uri: str, key: str) -> list[float] | None:
    import json

    from tasks.core import storage

    path = storage.join(uri, "sft_scores", f"{key}.json")
    if not storage.exists(path):
        return None
    return [float(x) for x in json.loads(storage.read_bytes(path))]


def store_scores(uri: str, key: str, scores: list[float]) -> None:
    import json

    from tasks.core import storage

    storage.write_bytes(storage.join(uri, "sft_scores", f"{key}.json"), json.dumps(scores).encode())
