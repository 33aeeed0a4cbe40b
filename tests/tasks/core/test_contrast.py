"""The one KL and the behaviour readout against values worked out by hand: a KL with its arguments
swapped, or a log-odds off by the complement, gives other numbers."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tasks.core.contrast import behaviour_log_odds, kl_divergence
from tasks.evaluation.evaluate import mean_kl

P = torch.tensor([[0.9, 0.1]])
Q = torch.tensor([[0.5, 0.5]])
KL_PQ = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # 0.368
KL_QP = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.511


def test_kl_divergence_matches_the_analytic_values_in_both_directions():
    assert pytest.approx(0.368, abs=1e-3) == KL_PQ and pytest.approx(0.511, abs=1e-3) == KL_QP
    # kl_divergence(clean log-probs, other logits): KL(clean || other); logits are any shift of log-probs.
    assert float(kl_divergence(P.log(), Q.log() + 3.0)) == pytest.approx(KL_PQ, rel=1e-5)
    assert float(kl_divergence(Q.log(), P.log() - 1.0)) == pytest.approx(KL_QP, rel=1e-5)


def test_mean_kl_of_the_evaluation_is_kl_before_to_after():
    before, after = torch.cat([P, Q]).log(), torch.cat([Q, P]).log()
    assert mean_kl(before, after) == pytest.approx((KL_PQ + KL_QP) / 2, rel=1e-5)
    assert mean_kl(before[:1], after[:1]) == pytest.approx(KL_PQ, rel=1e-5)


def test_behaviour_log_odds_of_the_token_mass():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    assert float(behaviour_log_odds(logits, [1, 2])) == pytest.approx(math.log(0.3 / 0.7), rel=1e-5)
    assert float(behaviour_log_odds(logits, [0])) == pytest.approx(math.log(0.7 / 0.3), rel=1e-5)


def test_log_odds_stay_finite_when_all_mass_is_on_the_behaviour():
    logits = torch.tensor([[30.0, -30.0, -30.0], [-30.0, 0.0, 0.0]])
    odds = behaviour_log_odds(logits, [0])
    assert torch.isfinite(odds).all()
    assert float(odds[0]) == pytest.approx(-math.log(1e-7), rel=1e-3)  # capped at p = 1 - 1e-7
    assert float(odds[1]) < -29


def test_kl_mask_keeps_prompts_without_the_behaviour_and_warns_when_none_are_left(caplog):
    from tasks.core.contrast import kl_mask

    clean = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])  # greedy tokens 0, 1, 2
    assert kl_mask(clean, [0], "without_behaviour").tolist() == [False, True, True]
    assert kl_mask(clean, [0], "all").tolist() == [True, True, True]
    assert not caplog.records
    assert kl_mask(clean, [0, 1, 2], "without_behaviour").tolist() == [True, True, True]
    assert [r.getMessage() for r in caplog.records] == [
        "every baseline prompt shows the behaviour unedited: the KL is taken over all of them"
    ]


def test_behaviour_token_ids_take_each_first_token_once(tokenizer, caplog):
    from tasks.core.contrast import behaviour_token_ids
    from tasks.core.errors import CompalignError

    caplog.set_level(logging.INFO, "tasks.core.contrast")
    ids = behaviour_token_ids(tokenizer, ["I", "I", " I"])
    assert ids == [
        tokenizer("I", add_special_tokens=False).input_ids[0],
        tokenizer(" I", add_special_tokens=False).input_ids[0],
    ]
    assert "tokens; only its first" not in caplog.text  # one token each: nothing to say
    long = " Malheureusement"
    first = tokenizer(long, add_special_tokens=False).input_ids
    assert len(first) > 2 and behaviour_token_ids(tokenizer, [long]) == first[:1]
    head = tokenizer.decode(first[:1])
    assert (
        caplog.records[-1].getMessage()
        == f"score token {long!r} is {len(first)} tokens; only its first, {head!r}, is scored"
    )
    with pytest.raises(CompalignError, match="^score token '' encodes to no tokens$"):
        behaviour_token_ids(tokenizer, [""])


def test_contrast_prompts_batch_by_length_and_index_each_list(tokenizer):
    from tasks.core.contrast import ContrastPrompts
    from tasks.core.errors import CompalignError

    target, baseline = ["Hi", "Tell me a long story about a dragon and a knight"], ["What is two plus two?"]
    prompts = ContrastPrompts(tokenizer, target, baseline, torch.device("cpu"), "scoring")
    order = prompts.by_length()
    assert [len(prompts.rest[i]) for i in order] == sorted(len(r) for r in prompts.rest) and order[0] == 0
    batches = prompts.batches(2)
    assert [b.ids.shape[0] for b in batches] == [2, 1]
    rows = [(bool(t), int(i)) for b in batches for t, i in zip(b.is_target, b.index, strict=True)]
    assert sorted(rows) == [(False, 0), (True, 0), (True, 1)]  # each row's place in its own list
    assert all(b.ids.device.type == "cpu" for b in batches)
    for empty in (([], baseline), (target, [])):
        with pytest.raises(
            CompalignError, match="^scoring needs at least one target and one baseline validation prompt$"
        ):
            ContrastPrompts(tokenizer, *empty, torch.device("cpu"), "scoring")
