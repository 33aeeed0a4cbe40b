"""The batched scorer equals the plain one-candidate-at-a-time loop; the scores' math."""

import math

import pytest
import torch

from tasks.core.contrast import behaviour_log_odds, behaviour_token_ids, kl_divergence, kl_mask
from tasks.directions.candidates import difference_of_means
from tasks.directions.collect import collect_activation_sums
from tasks.directions.score import CandidateScorer, build_candidates, reference_scores
from tests.conftest import make_tiny

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


def test_log_odds_and_kl_math():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]]))
    lo = behaviour_log_odds(logits, [1, 2])
    assert torch.allclose(lo, torch.tensor([0.0, math.log(0.1 / 0.9)]), atol=1e-5)
    logp = torch.log_softmax(logits, -1)
    assert torch.allclose(kl_divergence(logp, logits), torch.zeros(2), atol=1e-6)
    assert (kl_divergence(logp, logits.flip(0)) > 0).all()


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_batched_scorer_equals_reference_loop(kind, tokenizer):
    model = make_tiny(kind, tokenizer)
    sums_t = collect_activation_sums(model, tokenizer, TARGET, 4, 4)
    sums_b = collect_activation_sums(model, tokenizer, BASELINE, 4, 4)
    candidates = difference_of_means(sums_t, sums_b)
    ids = behaviour_token_ids(tokenizer, ["La", "Le", "Il"])
    cands = build_candidates(candidates, [1, 2, 3], [-1, -3], induce_scale=4.0)
    scorer = CandidateScorer(model, tokenizer, TARGET, BASELINE, ids, batch_size=3, candidates_per_pass=4)
    fast = scorer.score(cands)
    slow = reference_scores(model, tokenizer, TARGET, BASELINE, ids, cands, batch_size=2)
    for a, b in zip(fast, slow, strict=True):
        assert (a.layer, a.position) == (b.layer, b.position)
        assert a.bypass == pytest.approx(b.bypass, abs=1e-4)
        assert a.induce == pytest.approx(b.induce, abs=1e-4)
        assert a.kl == pytest.approx(b.kl, abs=1e-5)
    assert len({round(s.kl, 6) for s in fast}) > 1  # candidates differ


def test_kl_skips_baseline_prompts_that_already_show_the_behaviour(tokenizer):
    """A baseline prompt whose unedited greedy first token is a behaviour token (an over-refused harmless
    request) does not count for the KL by default; with kl_prompts=all it does. Both the batched scorer
    and the plain loop agree on either."""
    model = make_tiny("llama", tokenizer)
    candidates = difference_of_means(
        collect_activation_sums(model, tokenizer, TARGET, 4, 4),
        collect_activation_sums(model, tokenizer, BASELINE, 4, 4),
    )
    cands = build_candidates(candidates, [1, 2], [-1], induce_scale=4.0)
    probe = CandidateScorer(model, tokenizer, TARGET, BASELINE, [0], kl_prompts="all")
    first = int(probe.clean_logp[0].argmax())  # make the first baseline prompt "show the behaviour"
    ids = [first]
    shows = probe.clean_logp.argmax(-1) == first
    assert shows[0] and not shows.all()
    assert kl_mask(probe.clean_logp, ids, "without_behaviour").tolist() == (~shows).tolist()
    assert kl_mask(probe.clean_logp, ids, "all").all()

    kls = {}
    for mode in ("without_behaviour", "all"):
        fast = CandidateScorer(model, tokenizer, TARGET, BASELINE, ids, kl_prompts=mode).score(cands)
        slow = reference_scores(model, tokenizer, TARGET, BASELINE, ids, cands, kl_prompts=mode)
        assert [a.kl for a in fast] == pytest.approx([b.kl for b in slow], abs=1e-5)
        kls[mode] = [a.kl for a in fast]
    assert kls["without_behaviour"] != pytest.approx(kls["all"], abs=1e-6)

    with pytest.raises(Exception, match="kl_prompts must be without_behaviour or all"):
        kl_mask(probe.clean_logp, ids, "some")
