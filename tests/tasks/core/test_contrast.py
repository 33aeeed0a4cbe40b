"""The one KL and the behaviour readout against values worked out by hand: a KL with its arguments
swapped, or a log-odds off by the complement, gives other numbers."""

from __future__ import annotations

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
