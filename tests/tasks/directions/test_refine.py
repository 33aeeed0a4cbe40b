"""Gradient refinement of a direction: it lowers its own objective, touches nothing but the direction, and
is reproducible."""

import pytest
import torch

from tasks.core.contrast import behaviour_log_odds, behaviour_token_ids
from tasks.core.errors import CompalignError
from tasks.core.hooks import Ablation, intervene
from tasks.directions.candidates import LayerWeights, difference_of_means
from tasks.directions.collect import collect_activation_sums
from tasks.directions.config import RefineConfig
from tasks.directions.refine import refine_direction
from tasks.evaluation.evaluate import next_token_logprobs
from tests.conftest import make_tiny
from tests.tasks.directions.test_score import BASELINE, TARGET


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = make_tiny("llama", tokenizer)
    sums = [collect_activation_sums(model, tokenizer, prompts, 2, 4) for prompts in (TARGET, BASELINE)]
    start = difference_of_means(*sums).get(2, -1)
    ids = behaviour_token_ids(tokenizer, ["La", "Le", "Il"])
    return model, start, ids


def objective(model, tokenizer, direction, ids, kl_weight):
    """The refinement's loss over every prompt, computed here from the scoring primitives."""
    clean = next_token_logprobs(model, tokenizer, BASELINE, 8)
    with torch.no_grad(), intervene(model, ablation=Ablation(direction=direction)):
        target = next_token_logprobs(model, tokenizer, TARGET, 8)
        baseline = next_token_logprobs(model, tokenizer, BASELINE, 8)
    bypass = torch.nn.functional.softplus(behaviour_log_odds(target, ids)).mean()
    kl = (clean.exp() * (clean - baseline)).sum(-1).mean()
    return float(bypass + kl_weight * kl)


def cfg(steps: int, batch_size: int = 8, seed: int = 0) -> RefineConfig:
    return RefineConfig(steps=steps, lr=0.05, kl_weight=1.0, batch_size=batch_size, seed=seed)


def test_refinement_lowers_its_objective_and_changes_only_the_direction(setup, tokenizer):
    model, start, ids = setup
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    # Whole prompt sets per step, so the mini-batch objective is the full one.
    cfg = RefineConfig(steps=25, lr=0.05, kl_weight=1.0, batch_size=8)
    result = refine_direction(model, tokenizer, start, TARGET, BASELINE, ids, cfg, kl_prompts="all")
    assert len(result.history) == 25
    assert result.direction.norm() == pytest.approx(1.0, abs=1e-5)
    assert (
        result.cosine == pytest.approx(float(result.direction @ start), abs=1e-5) and result.cosine < 0.9999
    )
    first = objective(model, tokenizer, start, ids, 1.0)
    assert result.history[0]["loss"] == pytest.approx(first, rel=1e-4)
    assert objective(model, tokenizer, result.direction, ids, 1.0) < 0.9 * first
    for name, value in model.state_dict().items():
        assert torch.equal(value, before_state[name]), name
    assert all(p.requires_grad for p in model.parameters())  # the weights' flags are restored


def test_same_seed_same_direction_other_seed_other(setup, tokenizer):
    model, start, ids = setup
    runs = [
        refine_direction(model, tokenizer, start, TARGET, BASELINE, ids, cfg(6, batch_size=2, seed=seed))
        for seed in (3, 3, 4)
    ]
    assert torch.equal(runs[0].direction, runs[1].direction)
    assert not torch.equal(runs[0].direction, runs[2].direction)


def test_zero_steps_and_zero_weights_change_nothing(setup, tokenizer):
    model, start, ids = setup
    same = refine_direction(model, tokenizer, 3 * start, TARGET, BASELINE, ids, cfg(0))
    assert torch.allclose(same.direction, start, atol=1e-6) and same.cosine == 1.0 and not same.history
    # With every removal weight 0 the ablation does nothing, so the loss has no gradient along r.
    n = model.config.num_hidden_layers
    off = LayerWeights(attn=torch.zeros(n), mlp=torch.zeros(n), embed=0.0)
    still = refine_direction(model, tokenizer, start, TARGET, BASELINE, ids, cfg(3), off)
    assert torch.allclose(still.direction, start, atol=1e-6)
    assert still.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_bad_input(setup, tokenizer):
    model, start, ids = setup
    with pytest.raises(CompalignError, match="refine.steps must be >= 0"):
        cfg(-1)
    with pytest.raises(CompalignError, match="refine.lr must be a positive number"):
        RefineConfig(steps=2, lr=float("nan"))
    with pytest.raises(CompalignError, match="needs target and baseline prompts"):
        refine_direction(model, tokenizer, start, [], BASELINE, ids, cfg(2))
    with pytest.raises(CompalignError, match="hidden size"):
        refine_direction(model, tokenizer, start[:-1], TARGET, BASELINE, ids, cfg(2))
