"""Generation, perplexity and KL on real models."""

import math

import torch

from tasks.evaluation.evaluate import evaluate, generate, mean_kl, next_token_logprobs, perplexity
from tasks.evaluation.judges import LanguageJudge
from tests.conftest import make_tiny


def test_generation_is_batched_greedy_and_order_preserving(tokenizer):
    model = make_tiny("llama", tokenizer)
    prompts = ["Say hi.", "Tell me a long story about a dragon and a knight.", "Count to three."]
    batched = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_perplexity_matches_manual_cross_entropy(tokenizer):
    model = make_tiny("llama", tokenizer)
    text = "The quick brown fox jumps over the lazy dog. " * 5
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)[None]
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    manual = math.exp(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item())
    assert perplexity(model, tokenizer, text, max_tokens=10_000) == pytest_approx(manual)
    # windows do not change much for a model that barely uses context
    assert perplexity(model, tokenizer, text, max_tokens=10_000, window=16) > 1


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-4)


def test_smollm2_answers_french_in_french(smollm2):
    fr = ["Quelle est la capitale de l'Italie ?", "Quel est le plus grand océan du monde ?"]
    en = ["How many legs does a spider have?", "What is the largest ocean in the world?"]
    logp = next_token_logprobs(smollm2.model, smollm2.tokenizer, en, 4)
    result = evaluate(
        smollm2.model,
        smollm2.tokenizer,
        LanguageJudge("fr"),
        fr,
        en,
        "The cat sat on the mat. " * 20,
        16,
        4,
        200,
        logp,
    )
    assert result.target.flagged == 2 and result.baseline.flagged == 0
    assert result.kl == 0.0 or abs(result.kl) < 1e-6
    assert mean_kl(logp, logp) == 0.0
    assert 1 < result.perplexity < 50
    assert result.metrics("before")["before.target_rate"] == 1.0


def test_a_refusal_after_a_compliant_opening_shows_only_in_the_long_reading(tokenizer):
    from tasks.evaluation.evaluate import SHORT_TOKENS, judge_answers
    from tasks.evaluation.judges import RefusalJudge

    opening = "Sure. Here is some general background on how locks work, " * 6
    late = opening + "However, I'm sorry, but I can't help with picking this one."
    assert len(tokenizer(opening, add_special_tokens=False).input_ids) > SHORT_TOKENS
    early = "I'm sorry, but I can't help with that."
    answers = [late, early, early + " " + opening, opening]  # the third refuses first, then goes on
    judged = judge_answers(RefusalJudge(), ["a", "b", "c", "d"], answers, tokenizer)
    assert (judged.flagged, judged.flagged_short, judged.total) == (3, 2, 4)
    interval = judged.interval()
    assert interval.low < judged.rate == 3 / 4 < interval.high
    assert judge_answers(RefusalJudge(), ["a"], [late]).flagged_short is None  # no tokenizer: not measured


def test_second_judge_agreement_is_measured_over_both_sets():
    from tasks.evaluation.evaluate import EvalResult, cohen_kappa, judge_answers
    from tasks.evaluation.judges import RefusalJudge

    first, second = RefusalJudge(["sorry"]), RefusalJudge(["sorry", "won't"])
    second.name = "wider"
    target = judge_answers(first, ["a", "b"], ["Sorry, no.", "I won't."], second=second)
    baseline = judge_answers(first, ["c", "d"], ["Paris.", "Sorry, here it is."], second=second)
    result = EvalResult(target, baseline, 10.0, torch.zeros(2, 3))
    assert result.agreement() == cohen_kappa([True, False, False, True], [True, True, False, True])
    metrics = result.metrics("after")
    assert metrics["after.target_rate_wider"] == 1.0 and metrics["after.baseline_rate_wider"] == 0.5
    # the second judge's rates carry their bootstrap interval too
    assert metrics["after.target_rate_wider_low"] == metrics["after.target_rate_wider_high"] == 1.0
    assert (
        0 <= metrics["after.baseline_rate_wider_low"] < 0.5 < metrics["after.baseline_rate_wider_high"] <= 1
    )
    assert str(baseline.second.interval()).startswith("1/2 (50%, 95% CI")
    assert metrics["after.judges_kappa"] == result.agreement() and metrics["after.baseline_kappa"] == 1.0
    assert result.disagreements() == {
        "target": [{"prompt": "b", "answer": "I won't.", "refusal": False, "wider": True}],
        "baseline": [],
    }
    plain = EvalResult(judge_answers(first, ["a"], ["x"]), judge_answers(first, ["b"], ["y"]), 1.0, None)
    assert plain.agreement() is None and plain.disagreements() == {}
    assert not any("kappa" in key for key in plain.metrics("before"))
