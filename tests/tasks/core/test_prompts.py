"""Prompt sources, splits, fingerprints and chat-template positions."""

import json

import pytest

from tasks.core.concept_config import PromptSource, SplitConfig
from tasks.core.errors import CompalignError
from tasks.core.prompts import (
    fingerprint,
    format_chat,
    load_prompts,
    read_text_source,
    resolve_positions,
    split_prompts,
    suffix_positions,
    template_suffix,
    with_validation,
)


def test_bundled_sets_have_the_promised_sizes():
    assert len(load_prompts(PromptSource(source="bundled:refusal_harmful"))) >= 64
    assert len(load_prompts(PromptSource(source="bundled:refusal_harmless"))) >= 64
    fr = load_prompts(PromptSource(source="bundled:french_fr"))
    en = load_prompts(PromptSource(source="bundled:french_en"))
    assert len(fr) == len(en) >= 64
    assert "?" in fr[0] or "." in fr[0]
    assert len(read_text_source("bundled:english_heldout").split()) > 800
    assert len(read_text_source("bundled:capability_heldout").split()) > 3600  # ~5,900 SmolLM2 tokens


def test_file_formats(tmp_path):
    rows = ["first prompt", "second prompt", "third prompt"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": r}) for r in rows) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps([{"text": r} for r in rows]))
    (tmp_path / "a.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "a.csv").write_text("id,text\n" + "\n".join(f'{i},"{r}"' for i, r in enumerate(rows)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": rows}), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.txt", "a.csv", "a.parquet"):
        assert load_prompts(PromptSource(source=str(tmp_path / name), column="text")) == rows, name
    assert load_prompts(PromptSource(source=str(tmp_path / "a.jsonl"), column="text", limit=2)) == rows[:2]


@pytest.mark.parametrize(
    "content, column, message",
    [
        ("", "prompt", "holds no prompts"),
        ('{"prompt": "ok"}\n{"prompt": oops}\n', "prompt", "line 2 is not valid JSON"),
        ('{"text": "ok"}\n', "prompt", "has no column 'prompt'"),
        ('{"prompt": ""}\n', "prompt", "must be a non-empty string"),
        ('{"prompt": 3}\n', "prompt", "must be a non-empty string"),
        ("[1, 2]\n", "prompt", "expected an object"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, content, column, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CompalignError, match=message):
        load_prompts(PromptSource(source=str(path), column=column))


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(CompalignError, match="does not exist"):
        load_prompts(PromptSource(source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(CompalignError, match="bundled ones are"):
        load_prompts(PromptSource(source="bundled:nope"))
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(CompalignError, match="unknown prompt file format"):
        load_prompts(PromptSource(source=str(tmp_path / "x.xlsx")))


def test_split_is_seeded_disjoint_and_keeps_pairs():
    a = [f"a{i}" for i in range(64)]
    b = [f"b{i}" for i in range(64)]
    cfg = SplitConfig(val=0.25, test=0.25, seed=7)
    sa, sb = split_prompts(a, cfg), split_prompts(b, cfg)
    assert (len(sa.train), len(sa.val), len(sa.test)) == (32, 16, 16)
    assert set(sa.train) | set(sa.val) | set(sa.test) == set(a)
    assert not set(sa.train) & set(sa.test)
    assert [x[1:] for x in sa.test] == [x[1:] for x in sb.test]  # paired sets stay paired
    assert split_prompts(a, cfg).val == sa.val
    assert split_prompts(a, SplitConfig(seed=8)).val != sa.val
    with pytest.raises(CompalignError, match="too few"):
        split_prompts(["x", "y"], cfg)


def test_fingerprint_depends_on_content_and_order():
    assert fingerprint(["a", "b"]) == fingerprint(["a", "b"])
    assert fingerprint(["a", "b"]) != fingerprint(["b", "a"])
    assert fingerprint(["a", "b"]) != fingerprint(["a", "c"])


def test_positions_come_from_the_chat_template(tokenizer):
    assert template_suffix(tokenizer) == "<|im_end|>\n<|im_start|>assistant\n"
    n = suffix_positions(tokenizer)
    ids = tokenizer(format_chat(tokenizer, ["Hi there, how are you?"])[0], add_special_tokens=False).input_ids
    suffix_ids = tokenizer(template_suffix(tokenizer), add_special_tokens=False).input_ids
    assert ids[-n:] == suffix_ids
    assert resolve_positions(tokenizer, None) == n
    assert resolve_positions(tokenizer, 2) == 2
    with pytest.raises(CompalignError, match="only 6 tokens after the user's message"):
        resolve_positions(tokenizer, n + 1)


def test_validation_of_another_source_replaces_the_val_part():
    prompts = [f"train prompt {i}" for i in range(12)]
    split = split_prompts(prompts, SplitConfig(val=0.25, test=0.25, seed=3))
    other = [f"other source {i}" for i in range(5)]
    moved = with_validation(split, other, "data.validation.target x.jsonl")
    assert moved.val == other and moved.test == split.test
    assert moved.train == split.train + split.val  # nothing of the train source is lost or reported twice
    with pytest.raises(CompalignError, match=r"data.validation.target x.jsonl shares 1 prompts"):
        with_validation(split, [*other, split.test[0]], "data.validation.target x.jsonl")


def test_validation_sets_go_together():
    from tasks.core.concept_config import ValidationSets
    from tasks.core.errors import ConfigError

    assert ValidationSets().sources() is None
    target, baseline = ValidationSets(
        target="a.jsonl", baseline="b.csv", baseline_column="text", limit=4
    ).sources()
    assert (target.source, target.column, target.limit) == ("a.jsonl", "prompt", 4)
    assert (baseline.source, baseline.column) == ("b.csv", "text")
    with pytest.raises(ConfigError, match="data.validation.target and data.validation.baseline go together"):
        ValidationSets(target="a.jsonl")
