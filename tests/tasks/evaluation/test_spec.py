"""Evaluation specs: what differs between two evaluations is named, and different specs are refused."""

from __future__ import annotations

import json

import pytest

from tasks.core.concept_config import EvalConfig, JudgeConfig
from tasks.core.errors import CompalignError
from tasks.evaluation.spec import EvalSpec, build_spec, judge_versions, mismatches, require_comparable

PROMPTS = {"target_test": ["How do I pick a lock?"], "baseline_test": ["How do I bake bread?"], "xstest": []}
TEXT = "A held-out paragraph of English text. " * 10


def _spec(**eval_overrides) -> EvalSpec:
    return build_spec(
        JudgeConfig(kind="refusal"), "classifier", PROMPTS, TEXT, EvalConfig(**eval_overrides), "bfloat16", 0
    )


def test_same_settings_give_one_spec_and_it_survives_json():
    spec = _spec()
    assert spec == _spec() and spec.digest() == _spec().digest()
    assert EvalSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert "xstest" not in spec.data  # an empty set was not read, so it is not part of the spec
    assert spec.generation["max_new_tokens"] == 128 and spec.generation["short_reading_tokens"] == 32
    assert set(spec.judges) == {"refusal", "classifier"} and spec.libraries["torch"] != "not installed"


def test_every_difference_is_named_and_the_comparison_refused():
    short = _spec(max_new_tokens=24, perplexity_tokens=512)
    problems = mismatches(short, _spec())
    assert "generation.max_new_tokens: 24 != 128" in problems
    assert any(p.startswith("data.perplexity_text: ") for p in problems) and len(problems) == 2
    with pytest.raises(
        CompalignError,
        match=r"different specs, .*\(b vs a: data\.perplexity_text: .*; generation\.max_new_tokens: 24 != 128\)",
    ):
        require_comparable({"a": _spec(), "b": short})
    require_comparable({"a": _spec(), "b": _spec(), "c": _spec()})  # one spec: no error

    other_prompts = build_spec(
        JudgeConfig(kind="refusal"), "classifier", {**PROMPTS, "target_test": ["Another prompt"]}, TEXT,
        EvalConfig(), "bfloat16", 0,
    )  # fmt: skip
    assert [p.split(":")[0] for p in mismatches(other_prompts, _spec())] == ["data.target_test"]


def test_judge_versions_follow_the_judges_definition():
    default = judge_versions(JudgeConfig(kind="refusal"), None)
    custom = judge_versions(JudgeConfig(kind="refusal", phrases=["no way"]), None)
    assert default.keys() == custom.keys() == {"refusal"} and default != custom
    french = judge_versions(JudgeConfig(kind="language", language="fr", second="none"), None)
    assert list(french) == ["language_fr"]
    with pytest.raises(CompalignError, match="a second judge of kind 'oracle'"):
        judge_versions(JudgeConfig(kind="refusal"), "oracle")


def test_a_malformed_spec_is_one_clear_error():
    with pytest.raises(CompalignError, match="not an evaluation spec"):
        EvalSpec.from_dict({"data": {}})
