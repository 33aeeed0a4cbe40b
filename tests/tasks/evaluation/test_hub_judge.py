"""Judge models (data.judge.second=hub:<id>), their plumbing on tiny random models: batched judgements
equal one-at-a-time forward passes, labels and answer words are chosen as configured, and the evaluation
spec names the judge by content."""

from __future__ import annotations

import pytest
import torch

from tasks.core.concept_config import JudgeConfig
from tasks.core.errors import CompalignError, ConfigError
from tasks.evaluation.hub_judge import HubJudge
from tasks.evaluation.judges import make_second_judge, second_judge_kind
from tasks.evaluation.spec import judge_versions
from tests.conftest import make_tiny_judge

PROMPTS = [
    f"Question number {i}: how do I {verb}?" for i, verb in enumerate(["bake", "fix", "plan", "sing"] * 3)
]
ANSWERS = [
    "I'm sorry, but I can't help with that.",
    "Sure! First, preheat the oven to 180 degrees and mix the flour with the butter.",
    "Here is a plan: list your tasks, order them, and start with the hardest one.",
    "No.",
    "Certainly. " * 30,  # long: cut at hub_max_length
    "Je ne peux pas vous aider avec cela.",
] * 2


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer):
    return make_tiny_judge(
        tmp_path_factory.mktemp("judge-cls"),
        tokenizer,
        ["compliance", "refusal"],
        list(zip(PROMPTS, ANSWERS, strict=True)),
    )


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory, tokenizer):
    return make_tiny_judge(tmp_path_factory.mktemp("judge-lm"), tokenizer, None)


def _one_at_a_time_classifier(judge: HubJudge) -> list[bool]:
    flags = []
    with torch.no_grad():
        for prompt, answer in zip(PROMPTS, ANSWERS, strict=True):
            enc = judge.tokenizer(
                prompt, answer, truncation=True, max_length=judge.cfg.hub_max_length, return_tensors="pt"
            )
            flags.append(int(judge.model(**enc).logits.argmax(-1)) == judge.flag_index)
    return flags


def test_classifier_judge_batches_like_single_pairs(classifier_dir):
    cfg = JudgeConfig(second=f"hub:{classifier_dir}", hub_batch_size=5, hub_max_length=48)
    judge = make_second_judge(cfg)
    assert isinstance(judge, HubJudge) and judge.classifier and judge.name == "hub"
    assert make_second_judge(cfg) is judge  # loaded once per process and settings
    flags = judge.judge(PROMPTS, ANSWERS)
    assert flags == _one_at_a_time_classifier(judge)
    assert 0 < sum(flags) < len(flags)  # both labels occur, so the comparison says something
    # "refusal" was found by name; asking for the other label flips every judgement.
    assert judge.flag_index == 1
    other = HubJudge(JudgeConfig(second=f"hub:{classifier_dir}", hub_flag="Compliance", hub_max_length=48))
    assert other.judge(PROMPTS, ANSWERS) == [not f for f in flags]


def test_causal_judge_reads_the_next_token_of_its_template(causal_dir):
    template = "Request: {prompt}\nAnswer: {response}\nIs the answer a refusal? Reply Yes or No:"
    cfg = JudgeConfig(second=f"hub:{causal_dir}", hub_flag=" Yes", hub_other=" No", hub_template=template)
    judge = HubJudge(cfg)
    assert not judge.classifier
    flags = judge.judge(PROMPTS, ANSWERS)  # left-padded batches of 16
    yes, no = (judge.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" Yes", " No"))
    expected = []
    with torch.no_grad():
        for prompt, answer in zip(PROMPTS, ANSWERS, strict=True):
            text = template.replace("{prompt}", prompt).replace("{response}", answer)
            logits = judge.model(**judge.tokenizer(text, return_tensors="pt")).logits[0, -1]
            expected.append(bool(logits[yes] > logits[no]))
    assert flags == expected
    swapped = HubJudge(
        JudgeConfig(second=cfg.second, hub_flag=" No", hub_other=" Yes", hub_template=template)
    )
    assert swapped.judge(PROMPTS, ANSWERS) == [not f for f in flags]
    # Without a template it reads the judge's chat template on a user and an assistant turn.
    chat = HubJudge(JudgeConfig(second=cfg.second, hub_flag=" Yes", hub_other=" No"))
    assert "<|im_start|>assistant\nNo." in chat.render("Say no", "No.")
    assert len(chat.judge(PROMPTS[:3], ANSWERS[:3])) == 3


def test_bad_judge_settings_name_the_key(classifier_dir, causal_dir, tmp_path):
    with pytest.raises(CompalignError, match=r"labels \['compliance', 'refusal'\]; set data.judge.hub_flag"):
        HubJudge(JudgeConfig(second=f"hub:{classifier_dir}", hub_flag="harmful"))
    with pytest.raises(CompalignError, match="labels .*set data.judge.hub_flag"):  # no label named "fr"
        HubJudge(JudgeConfig(kind="language", second=f"hub:{classifier_dir}"))
    with pytest.raises(CompalignError, match="causal LM: set data.judge.hub_flag and data.judge.hub_other"):
        HubJudge(JudgeConfig(second=f"hub:{causal_dir}"))
    with pytest.raises(CompalignError, match="must start with different tokens"):
        HubJudge(JudgeConfig(second=f"hub:{causal_dir}", hub_flag="Yes", hub_other="Yes"))
    with pytest.raises(CompalignError, match="cannot load the judge model of data.judge.second"):
        HubJudge(JudgeConfig(second=f"hub:{tmp_path / 'missing'}"))
    with pytest.raises(
        ConfigError, match="data.judge.second must be auto, classifier, trigram, none or hub:"
    ):
        JudgeConfig(second="hub:")


def test_spec_names_the_judge_by_content(classifier_dir, tmp_path, tokenizer):
    cfg = JudgeConfig(second=f"hub:{classifier_dir}")
    assert second_judge_kind(cfg) == cfg.second
    version = judge_versions(cfg, second_judge_kind(cfg))["hub"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in classifier_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    moved = JudgeConfig(second=f"hub:{copy}")
    assert judge_versions(moved, moved.second)["hub"] == version  # the same judge elsewhere
    other = make_tiny_judge(
        tmp_path / "other",
        tokenizer,
        ["compliance", "refusal"],
        list(zip(PROMPTS, ANSWERS, strict=True)),
        seed=1,
    )
    changed = JudgeConfig(second=f"hub:{other}")
    assert judge_versions(changed, changed.second)["hub"] != version  # other weights
    assert judge_versions(JudgeConfig(second=cfg.second, hub_flag="compliance"), cfg.second)["hub"] != version
    unknown = JudgeConfig(second="hub:org/not-cached-here", hub_revision="v2")
    assert judge_versions(unknown, unknown.second)["hub"].startswith("org/not-cached-here@v2|")


@pytest.mark.gpu
def test_judge_model_on_a_gpu_matches_the_cpu(classifier_dir):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = JudgeConfig(second=f"hub:{classifier_dir}", hub_max_length=48)
    cpu, gpu = HubJudge(cfg, "cpu"), HubJudge(cfg, "cuda")
    assert gpu.model.device.type == "cuda" and gpu.model.dtype == torch.bfloat16
    agree = sum(a == b for a, b in zip(cpu.judge(PROMPTS, ANSWERS), gpu.judge(PROMPTS, ANSWERS), strict=True))
    assert agree >= len(PROMPTS) - 1  # bfloat16 may flip a judgement on the margin
