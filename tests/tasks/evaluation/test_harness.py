"""The lm-evaluation-harness integration: the bundled task scores the very model it is given (edits and
hooks included), and the packaged model knows everyday facts far above chance."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.core.concept_config import HarnessConfig
from tasks.core.errors import CompalignError
from tasks.core.hooks import Addition, intervene
from tasks.evaluation.harness import BUNDLED_TASKS, run_harness
from tests.conftest import make_tiny

pytest.importorskip("lm_eval")
ITEMS = [json.loads(line) for line in BUNDLED_TASKS["compalign_everyday"].open()]


@torch.inference_mode()
def _hand_accuracy(model, tokenizer, items) -> float:
    """The task by hand: the choice with the highest summed log-probability after the question wins."""
    right = 0
    for item in items:
        context = tokenizer(item["question"], add_special_tokens=False).input_ids
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(item["question"] + " " + choice, add_special_tokens=False).input_ids
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == item["answer"])
    return right / len(items)


def test_bundled_task_scores_the_given_model_with_its_hooks(tokenizer):
    model = make_tiny("llama", tokenizer)
    cfg = HarnessConfig(tasks=["compalign_everyday"], limit=12, bootstrap_iters=0)
    plain = run_harness(model, tokenizer, cfg)
    assert plain["compalign_everyday.acc"] == pytest.approx(_hand_accuracy(model, tokenizer, ITEMS[:12]))
    push = Addition(
        vector=torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 8, layer=1
    )
    with intervene(model, addition=push):
        hooked = run_harness(model, tokenizer, cfg)
        assert hooked["compalign_everyday.acc"] == pytest.approx(_hand_accuracy(model, tokenizer, ITEMS[:12]))
    assert set(plain) == {"compalign_everyday.acc", "compalign_everyday.acc_norm"}  # no stderr at 0 resamples


@pytest.mark.slow
def test_packaged_model_knows_everyday_facts(smollm2):
    scores = run_harness(smollm2.model, smollm2.tokenizer, HarnessConfig(tasks=["compalign_everyday"]))
    assert scores["compalign_everyday.acc"] >= 0.7  # chance is 1/3; measured 0.83 in bfloat16
    assert 0 < scores["compalign_everyday.acc_stderr"] < 0.1


def test_unknown_task_is_one_clear_error(tokenizer):
    with pytest.raises(CompalignError, match="unknown task.*no_such_task.*bundled: compalign_everyday"):
        run_harness(make_tiny("llama", tokenizer), tokenizer, HarnessConfig(tasks=["no_such_task"]))
