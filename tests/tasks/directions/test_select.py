"""Selection filters, ranking and the no-candidate error."""

import pytest

from tasks.core.errors import CompalignError
from tasks.directions.config import SelectConfig
from tasks.directions.score import CandidateScore
from tasks.directions.select import choose, pick_finalists, rank_candidates

SCORES = [
    CandidateScore(2, -1, bypass=-3.0, induce=0.5, kl=0.05),
    CandidateScore(3, -1, bypass=-5.0, induce=0.5, kl=0.5),  # too much KL
    CandidateScore(4, -2, bypass=-4.0, induce=-2.5, kl=0.05),  # induces too little
    CandidateScore(9, -1, bypass=-9.0, induce=1.0, kl=0.01),  # past the cut-off (10 layers * 0.8)
    CandidateScore(5, -2, bypass=-3.5, induce=0.0, kl=0.1),  # best passing
]


def test_filters_and_ranking():
    table = rank_candidates(SCORES, 10, SelectConfig(kl_limit=0.2, induce_min_gain=1.0), clean_baseline=-2.0)
    assert list(table.columns[:5]) == ["layer", "position", "bypass", "induce", "kl"]
    assert table.loc[0, ["layer", "position"]].tolist() == [5, -2]
    reasons = dict(zip(table.layer, table.reason, strict=True))
    assert (
        reasons[3] == "kl > 0.2" and reasons[4] == "induce gain < 1.0" and reasons[9].startswith("layer >=")
    )
    assert table.passed.tolist() == [True, True, False, False, False]
    assert choose(table, SelectConfig()) == (5, -2)


def test_forced_layer_and_no_candidate_error():
    table = rank_candidates(SCORES, 10, SelectConfig(layer=2), clean_baseline=-2.0)
    assert choose(table, SelectConfig(layer=2)) == (2, -1)
    strict = SelectConfig(kl_limit=0.001)
    with pytest.raises(CompalignError, match="no candidate passed"):
        choose(rank_candidates(SCORES, 10, strict, clean_baseline=-2.0), strict)


def test_screening_keeps_plausible_candidates_first():
    picked = pick_finalists(SCORES, 10, SelectConfig(kl_limit=0.2), clean_baseline=-2.0, count=2)
    assert [SCORES[i].layer for i in picked] == [2, 5]
