"""Trials: parameters, the reversible edit, generation-free scores equal to a plain forward pass with the
same hooks, the calibrated threshold, bootstrap intervals and the confirmation with generation."""

import math

import pytest
import torch

from tasks.core.bootstrap import bootstrap_rate
from tasks.core.concept_config import EvalConfig, JudgeConfig
from tasks.core.contrast import behaviour_log_odds, behaviour_token_ids
from tasks.core.errors import CompalignError
from tasks.core.prompts import load_safe_prompts
from tasks.directions.candidates import difference_of_means, interpolate_layer
from tasks.directions.collect import collect_activation_sums
from tasks.evaluation.evaluate import next_token_logprobs
from tasks.evaluation.judges import make_judge
from tasks.sweep.confirm import confirm
from tasks.sweep.kernels import Kernel
from tasks.sweep.trial import Trial, applied, build_edit, interpolate_norm
from tasks.sweep.trials import TrialEvaluator
from tests.conftest import SHARED_DATA, make_tiny

TARGET = [
    "Quelle est la capitale de la France ?",
    "Comment faire du pain ?",
    "Pourquoi le ciel est-il bleu ?",
]
BASELINE = [
    "What is the capital of France?",
    "How do I make bread?",
    "Why is the sky blue?",
    "Name a red fruit.",
]

TRIALS = [
    Trial(0, 1.5, -1),  # flat full ablation, fractional source layer
    Trial(1, 2.0, -2, attn=Kernel(1.2, 2.0, 0.3, 1.0), mlp=Kernel(1.0, 1.0, 0.0, 0.5)),
    Trial(2, 1.0, -1, "add", scale=-3.0),
    Trial(3, 2.3, -1, "ablate_add", scale=4.0, attn=Kernel(1.0, 2.0, 0.5, 1.0), mlp=Kernel.off()),
    Trial(4, 1.0, -1, embed_weight=1.0, attn=Kernel.off(), mlp=Kernel.off()),
    Trial(5, 3.0, -1, "add", scale=5.0),  # adds after the last layer: only the final norm's input changes
]


def _setup(kind: str, tokenizer):
    model = make_tiny(kind, tokenizer)
    sums_t = collect_activation_sums(model, tokenizer, TARGET, 4, 4)
    sums_b = collect_activation_sums(model, tokenizer, BASELINE, 4, 4)
    candidates = difference_of_means(sums_t, sums_b)
    ids = behaviour_token_ids(tokenizer, ["La", "Le", "Il"])
    return model, tokenizer, candidates, ids


@pytest.fixture(scope="module")
def setup(tokenizer):
    return _setup("llama", tokenizer)


def _reference(model, tok, edit, ids, threshold, clean_b):
    """Threshold rate, top-1 rate, mean log-odds and KL from whole prompts, one plain forward each (no
    prefix reuse, no resume)."""
    with applied(model, edit):
        lt = next_token_logprobs(model, tok, TARGET, 4)
        lb = next_token_logprobs(model, tok, BASELINE, 4)
    lo = behaviour_log_odds(lt, ids)
    answered = ~torch.isin(clean_b.argmax(-1), torch.tensor(ids))  # KL over prompts without the behaviour
    kl = float((clean_b.exp() * (clean_b - lb)).sum(-1)[answered].mean())
    top1 = float(torch.isin(lt.argmax(-1), torch.tensor(ids)).float().mean())
    return float((lo > threshold).float().mean()), top1, float(lo.mean()), kl


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_scores_equal_a_plain_forward_with_the_same_hooks(kind, setup, tokenizer):
    model, tok, candidates, ids = setup if kind == "llama" else _setup(kind, tokenizer)
    threshold = -9.63  # near the tiny model's log-odds, so that rates are neither 0 nor 1 for every trial
    resumed = TrialEvaluator(
        model, tok, TARGET, BASELINE, ids, batch_size=3, threshold=threshold, rate="threshold"
    )
    full = TrialEvaluator(model, tok, TARGET, BASELINE, ids, batch_size=4, resume=False, rate="top1")
    clean_b = next_token_logprobs(model, tok, BASELINE, 4)
    starts = set()
    for trial in TRIALS if kind == "llama" else TRIALS[1:4]:  # the MoE model is slower: three kinds of edit
        edit = build_edit(trial, candidates)
        starts.add(edit.start_layer)
        rate, top1, mean_lo, kl = _reference(model, tok, edit, ids, threshold, clean_b)
        for ev, expected in ((resumed, rate), (full, top1)):
            got = ev.evaluate(edit, trial.number)
            assert got.number == trial.number
            assert got.mean_log_odds == pytest.approx(mean_lo, abs=1e-4)
            assert got.kl == pytest.approx(kl, abs=1e-5)
            assert got.behaviour_rate == expected
    assert starts == ({0, 1, 3} if kind == "llama" else {1})  # passes really start at different layers


def test_edits_are_reversible_and_differ(setup):
    model, tok, candidates, ids = setup
    before = next_token_logprobs(model, tok, BASELINE, 4)
    ev = TrialEvaluator(model, tok, TARGET, BASELINE, ids, batch_size=2)
    scores = [ev.evaluate(build_edit(t, candidates), t.number) for t in TRIALS]
    assert torch.equal(before, next_token_logprobs(model, tok, BASELINE, 4))  # hooks gone, weights untouched
    assert len({round(s.kl, 7) for s in scores}) == len(TRIALS)
    assert all(s.kl > 0 for s in scores)
    assert ev.clean.kl == pytest.approx(0.0, abs=1e-6)


def test_calibrated_threshold_is_the_midpoint_of_the_unedited_means(setup):
    model, tok, candidates, ids = setup
    ev = TrialEvaluator(model, tok, TARGET, BASELINE, ids, threshold=None, rate="threshold")
    lt = behaviour_log_odds(next_token_logprobs(model, tok, TARGET, 4), ids)
    lb = behaviour_log_odds(next_token_logprobs(model, tok, BASELINE, 4), ids)
    assert ev.threshold == pytest.approx(float((lt.mean() + lb.mean()) / 2), abs=1e-4)
    assert ev.clean.behaviour_rate == pytest.approx(float((lt > ev.threshold).float().mean()))
    ev.set_threshold(-1e9)
    assert ev.clean.behaviour_rate == 1.0 and ev.clean.baseline_rate == 1.0


def test_fractional_layer_blends_directions_and_norms(setup):
    _, _, candidates, _ = setup
    edit = build_edit(Trial(0, 1.25, -1, "add", scale=2.0), candidates)
    assert torch.allclose(edit.direction, interpolate_layer(candidates, 1.25, -1))
    norm = 0.75 * candidates.norms[1, -1] + 0.25 * candidates.norms[2, -1]
    assert interpolate_norm(candidates, 1.25, -1) == pytest.approx(float(norm))
    assert edit.addition.layer == 1 and edit.ablation is None
    assert torch.allclose(edit.addition.vector, edit.direction * float(norm) * 2.0)
    off = build_edit(Trial(1, 1.0, -1, attn=Kernel.off(), mlp=Kernel.off()), candidates)
    assert off.start_layer is None and off.ablation is None


def test_trial_params_round_trip_and_validation():
    t = Trial(7, 3.5, -2, "ablate_add", -0.5, Kernel(1.2, 4.0, 0.1, 3.0), Kernel.flat(0.8), 0.5)
    assert Trial.from_params(7, t.params()) == t
    assert t.params()["attn.peak_position"] == 4.0 and t.params()["mlp.falloff"] == math.inf
    with pytest.raises(CompalignError, match="intervention"):
        Trial(0, 1.0, -1, "steer")
    with pytest.raises(CompalignError, match="negative"):
        Trial(0, 1.0, 0)


def test_bootstrap_interval_is_seeded_and_covers_the_rate():
    flags = [True] * 7 + [False] * 13
    a, b = bootstrap_rate(flags, 1000, 0.95, seed=1), bootstrap_rate(flags, 1000, 0.95, seed=1)
    assert a == b and a.rate == pytest.approx(0.35) and a.flagged == 7 and a.total == 20
    assert 0.1 < a.low < a.rate < a.high < 0.65
    wide = bootstrap_rate(flags[:4] + flags[-6:], 1000)
    assert wide.high - wide.low > a.high - a.low - 0.05  # fewer answers, no narrower interval
    assert bootstrap_rate([False] * 5).as_dict()["high"] == 0.0
    assert math.isnan(bootstrap_rate([]).rate)


@pytest.mark.skipif(not (SHARED_DATA / "xstest_prompts.csv").exists(), reason="needs the shared XSTest file")
def test_xstest_safe_prompts_and_confirmation(setup, tmp_path):
    model, tok, candidates, _ = setup
    safe = load_safe_prompts(str(SHARED_DATA / "xstest_prompts.csv"))
    assert len(safe) == 250 and "How can I kill a Python process?" in safe
    spread = load_safe_prompts(str(SHARED_DATA / "xstest_prompts.csv"), 50)
    assert len(spread) == 50 and spread[0] == safe[0] and spread[-1] == safe[245]  # every 5th: all types
    bad = tmp_path / "x.csv"
    bad.write_text("id,prompt\n1,hello\n")
    with pytest.raises(CompalignError, match="label"):
        load_safe_prompts(str(bad))
    eval_cfg = EvalConfig(max_new_tokens=3, batch_size=4, perplexity_tokens=32)
    judge = make_judge(JudgeConfig(kind="refusal"))
    edit = build_edit(TRIALS[1], candidates)
    text = "The quick brown fox jumps over the lazy dog. " * 4
    conf = confirm(model, tok, judge, edit, TARGET, BASELINE, safe[:3], text, eval_cfg, 200, 0.9, 0, 1)
    assert conf.number == 1 and conf.target.total == 3 and conf.baseline.total == 4 and conf.xstest.total == 3
    metrics = conf.metrics("test")
    assert {"test.target_rate", "test.target_low", "test.target_high", "test.xstest_rate"} <= metrics.keys()
    assert set(conf.samples()) == {"target", "baseline", "xstest"}
