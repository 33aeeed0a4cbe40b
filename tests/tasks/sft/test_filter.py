"""SFT filters: the phrase list drops exactly the known boilerplate rows, the direction detector drops
the refusals of a small hand-made set, and the report accounts for both."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from tasks.core.errors import CompalignError
from tasks.core.prompts import bundled_path
from tasks.sft.config import SftDataConfig
from tasks.sft.data import Conversation, assistant_spans, fingerprint, load_conversations
from tasks.sft.filter import (
    DEFAULT_BOILERPLATE_PHRASES,
    answer_scores,
    apply_filters,
    load_refusal_direction,
    outlier_threshold,
    phrase_hits,
)

LAYER = 16


def _boilerplate_rows() -> set[int]:
    """The line numbers listed in tasks/data/sft/README.md."""
    text = (bundled_path("sft", "README", ".md")).read_text(encoding="utf-8")
    listed = text.split("## Boilerplate rows", 1)[1]
    return {int(n) for n in re.findall(r"\d+", listed.split("\n\n", 2)[2])}


def _calibration() -> list[int]:
    """Rows of refusal_teach that make the direction: its first 16 refusing and first 16 helpful rows."""
    rows = _teach()
    harmful = [i for i, r in enumerate(rows) if r["kind"] == "harmful"][:16]
    harmless = [i for i, r in enumerate(rows) if r["kind"] == "harmless"][:16]
    return harmful + harmless


def _teach() -> list[dict]:
    return [
        json.loads(x)
        for x in bundled_path("sft", "refusal_teach", ".jsonl").read_text(encoding="utf-8").splitlines()
    ]


def test_phrase_filter_drops_exactly_the_boilerplate_rows():
    boilerplate = _boilerplate_rows()
    assert len(boilerplate) == 12
    chat = load_conversations(SftDataConfig(name="c", source="bundled:chat_small"))
    kept, report = apply_filters(
        chat, ["phrases"], phrase_hits(chat, DEFAULT_BOILERPLATE_PHRASES), None, None, 5
    )
    dropped = {c.row for c in chat} - {c.row for c in kept}
    assert dropped == boilerplate
    assert report.dropped == {"phrases": 12} and (report.rows_before, report.rows_after) == (120, 108)
    assert report.fingerprint_before == fingerprint(chat) != report.fingerprint_after == fingerprint(kept)
    assert len(report.samples) == 5 and all(s["row"] in boilerplate for s in report.samples)
    assert sum(report.phrase_counts.values()) >= 12 and report.metrics()["filter.dropped.phrases"] == 12
    json.dumps(report.to_dict())  # logged as an MLflow artifact


def test_phrase_filter_keeps_helpful_answers_and_catches_refusals():
    alpaca = load_conversations(SftDataConfig(name="a", source="bundled:alpaca_small"))
    assert not any(phrase_hits(alpaca, DEFAULT_BOILERPLATE_PHRASES))
    teach = _teach()
    convs = [Conversation(messages=r["messages"], row=i) for i, r in enumerate(teach)]
    flagged = [bool(h) for h in phrase_hits(convs, DEFAULT_BOILERPLATE_PHRASES)]
    assert flagged == [r["kind"] == "harmful" for r in teach]
    # custom lists, case and curly apostrophes
    conv = Conversation(
        messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "I CAN’T do that"}],
        row=0,
    )
    assert phrase_hits([conv], ["i can't do"]) == [["i can't do"]]


def _answer_means(model, tokenizer, rows: list[dict], layer: int) -> torch.Tensor:
    """(rows, hidden) mean residual at ``layer`` over each row's answer tokens."""
    out = []
    with torch.inference_mode():
        for row in rows:
            text, spans = assistant_spans(tokenizer, row["messages"])
            lo, _ = spans[0]
            end = lo + len(row["messages"][-1]["content"])
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            idx = [j for j, (s, _) in enumerate(enc["offset_mapping"]) if lo <= s < end]
            hidden = model(
                input_ids=torch.tensor([enc["input_ids"]]), output_hidden_states=True
            ).hidden_states
            out.append(hidden[layer][0, idx].mean(0))
    return torch.stack(out)


@pytest.fixture(scope="module")
def refusal_direction(smollm2, tmp_path_factory) -> tuple[str, float]:
    """A refusal direction for SmolLM2 saved like an abliterate run's directions/chosen.safetensors:
    the difference of means of the residual over refusing and over helpful answers (16 + 16 rows of
    refusal_teach), with its layer and position in the metadata; and the projection of the midpoint of
    those two means on it (the threshold that calibration data gives)."""
    rows = _teach()
    calib = [rows[i] for i in _calibration()]
    model, tok = smollm2.model, smollm2.tokenizer
    refusing = _answer_means(model, tok, [r for r in calib if r["kind"] == "harmful"], LAYER).mean(0)
    helpful = _answer_means(model, tok, [r for r in calib if r["kind"] == "harmless"], LAYER).mean(0)
    direction = (refusing - helpful) / (refusing - helpful).norm()
    path = tmp_path_factory.mktemp("direction") / "chosen.safetensors"
    save_file({"direction": direction}, str(path), metadata={"layer": str(LAYER), "position": "-1"})
    return str(path), float((refusing + helpful) @ direction / 2)


def test_direction_filter_drops_the_refusals_of_a_hand_made_set(smollm2, refusal_direction):
    path, midpoint = refusal_direction
    used = set(_calibration())
    held_out = [r for i, r in enumerate(_teach()) if i not in used]  # none of these rows made the direction
    # A helpful answer that opens with an apology ("Sorry for arriving late ...") projects like a refusal:
    # the direction reads the refusal's opening, so such rows are left out of this clear-cut set.
    helpful = [
        r
        for r in held_out
        if r["kind"] == "harmless" and not r["messages"][-1]["content"].startswith("Sorry")
    ][:20]
    refusals = [r for r in held_out if r["kind"] == "harmful"][:3]
    rows = helpful[:10] + refusals[:2] + helpful[10:] + refusals[2:]
    convs = [Conversation(messages=r["messages"], row=i) for i, r in enumerate(rows)]
    expected = {i for i, r in enumerate(rows) if r["kind"] == "harmful"}

    direction = load_refusal_direction(path, 576, 30, None)
    assert direction.layer == LAYER
    scores = answer_scores(
        smollm2.model,
        smollm2.tokenizer,
        [c.messages for c in convs],
        direction.vector,
        direction.layer,
        None,
        8,
    )
    assert min(scores[i] for i in expected) > max(s for i, s in enumerate(scores) if i not in expected)
    threshold = midpoint
    kept, report = apply_filters(convs, ["direction"], None, scores, threshold, 10, direction.layer)
    assert {c.row for c in convs} - {c.row for c in kept} == expected
    assert report.dropped == {"direction": 3} and report.threshold == threshold and report.layer == LAYER
    assert all(s["rule"] == "direction" and "score" in s["reason"] for s in report.samples)
    # batching does not change scores
    one_by_one = answer_scores(
        smollm2.model, smollm2.tokenizer, [c.messages for c in convs[:3]], direction.vector, LAYER, None, 1
    )
    assert one_by_one == pytest.approx(scores[:3], abs=1e-4)


def test_both_rules_count_separately(smollm2, refusal_direction):
    chat = load_conversations(SftDataConfig(name="c", source="bundled:chat_small", limit=30))
    direction = load_refusal_direction(refusal_direction[0], 576, 30, None)
    scores = answer_scores(
        smollm2.model, smollm2.tokenizer, [c.messages for c in chat], direction.vector, LAYER, None, 16
    )
    hits = phrase_hits(chat, DEFAULT_BOILERPLATE_PHRASES)
    kept, report = apply_filters(chat, ["phrases", "direction"], hits, scores, max(scores) - 1e-6, 10, LAYER)
    top = max(range(len(chat)), key=lambda i: scores[i])
    assert report.dropped["direction"] == 1 and report.dropped["phrases"] == sum(map(bool, hits))
    assert top not in {c.row for c in kept} and report.rows_after == len(kept)


def test_direction_file_errors(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"direction": torch.ones(576)}, str(path))
    with pytest.raises(CompalignError, match="no layer in its metadata; set filter.layer"):
        load_refusal_direction(str(path), 576, 30, None)
    assert load_refusal_direction(str(path), 576, 30, 3).layer == 3
    with pytest.raises(CompalignError, match="outside the model's layers 0..30"):
        load_refusal_direction(str(path), 576, 30, 31)
    with pytest.raises(CompalignError, match="hidden size is 64"):
        load_refusal_direction(str(path), 64, 3, 1)


def test_outlier_threshold_is_median_plus_mad():
    assert outlier_threshold([0.0, 1.0, 2.0, 3.0, 100.0], 2.0) == pytest.approx(2.0 + 2.0 * 1.0)
    assert outlier_threshold([float("-inf"), 1.0, 1.0], 3.0) == pytest.approx(1.0 + 3.0 * 1e-6)
    with pytest.raises(CompalignError, match="no assistant answer"):
        outlier_threshold([float("-inf")], 3.0)
