"""SFT data: loading every format and source, assistant-only loss masks, packing that keeps
conversations apart, seeded splits and the per-rank batch order."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import torch

from tasks.core.errors import CompalignError
from tasks.sft.config import SftDataConfig
from tasks.sft.data import (
    collate,
    fingerprint,
    load_conversations,
    micro_batches,
    split_train_val,
    steps_per_epoch,
    tokenize_conversation,
    tokenize_set,
)
from tests.conftest import make_tiny


def _cfg(source: str, **kw) -> SftDataConfig:
    return SftDataConfig(name="t", source=source, **kw)


def test_bundled_chat_and_alpaca_sets_load_as_conversations():
    chat = load_conversations(_cfg("bundled:chat_small"))
    assert len(chat) == 120
    assert sum(len(c.messages) == 4 for c in chat) == 15
    assert all(c.messages[-1]["role"] == "assistant" for c in chat)
    alpaca = load_conversations(_cfg("bundled:alpaca_small"))
    assert len(alpaca) == 40
    first = alpaca[0].messages
    assert first[0]["content"].endswith("\n\nPenguin") and first[1] == {
        "role": "assistant",
        "content": "Bird.",
    }
    with_empty_input = next(c for c in alpaca if "\n\n" not in c.messages[0]["content"])
    assert with_empty_input.messages[0]["content"].strip() == with_empty_input.messages[0]["content"]


def test_local_files_urls_and_hub_datasets_give_the_same_rows(tmp_path):
    import pandas as pd

    rows = [
        json.loads(line) for line in Path(_bundled("alpaca_small")).read_text(encoding="utf-8").splitlines()
    ][:10]
    expected = load_conversations(_cfg("bundled:alpaca_small", limit=10))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    with fsspec.open("memory://compalign-test/rows.jsonl", "w") as handle:
        handle.write("\n".join(json.dumps(r) for r in rows))
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    sources = [
        str(tmp_path / "rows.jsonl"),
        str(tmp_path / "rows.json"),
        str(tmp_path / "rows.parquet"),
        "memory://compalign-test/rows.jsonl",
        f"hf:{hub}",
    ]
    for source in sources:
        got = load_conversations(_cfg(source))
        assert [c.messages for c in got] == [c.messages for c in expected], source
    assert fingerprint(expected) == fingerprint(load_conversations(_cfg(sources[0])))


def test_sharegpt_rows_and_system_prompt(tmp_path):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    (tmp_path / "s.jsonl").write_text(json.dumps(row), encoding="utf-8")
    conv = load_conversations(_cfg(str(tmp_path / "s.jsonl"), system_prompt="Be brief."))[0]
    assert conv.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_unknown_formats_are_clear_errors(tmp_path):
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}), encoding="utf-8")
    with pytest.raises(CompalignError, match="has columns question, answer: not a format the loader knows"):
        load_conversations(_cfg(str(tmp_path / "qa.jsonl")))
    (tmp_path / "rows.xml").write_text("<rows/>", encoding="utf-8")
    with pytest.raises(CompalignError, match="unknown file format '.xml'"):
        load_conversations(_cfg(str(tmp_path / "rows.xml")))
    with pytest.raises(CompalignError, match="does not exist"):
        load_conversations(_cfg(str(tmp_path / "missing.jsonl")))
    bad_role = {"messages": [{"role": "robot", "content": "x"}]}
    (tmp_path / "r.jsonl").write_text(json.dumps(bad_role), encoding="utf-8")
    with pytest.raises(CompalignError, match="role 'robot'"):
        load_conversations(_cfg(str(tmp_path / "r.jsonl")))


def test_loss_is_on_assistant_tokens_only(tokenizer):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6."},
    ]
    ids, mask = tokenize_conversation(tokenizer, messages, 512)
    learned = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert learned == "It is 4.<|im_end|>\nIt is 6.<|im_end|>\n"
    ignored = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "What is 2+2?" in ignored and "And 3+3?" in ignored and "It is" not in ignored


def test_rows_without_answer_tokens_are_unusable(tokenizer):
    convs = load_conversations(_cfg("bundled:chat_small", limit=4))
    convs[1].messages[-1]["content"] = "   "
    data, unusable = tokenize_set(tokenizer, convs, 512, packing=False)
    assert len(data) == 3 and [c.row for c in unusable] == [1]
    # cut before the first answer: nothing left to learn from
    _, unusable = tokenize_set(tokenizer, convs, 8, packing=False)
    assert len(unusable) == 4


def test_packing_keeps_conversations_apart(tokenizer):
    convs = load_conversations(_cfg("bundled:chat_small", limit=6))
    plain, _ = tokenize_set(tokenizer, convs, 256, packing=False)
    packed, _ = tokenize_set(tokenizer, convs, 256, packing=True)
    assert len(packed) < len(plain) and packed.conversations == len(plain)
    assert packed.loss_tokens == plain.loss_tokens and len(packed.tokens) == len(plain.tokens)
    batch = collate(packed, [0], tokenizer.pad_token_id, packed=True)
    assert "attention_mask" not in batch and (batch["position_ids"][0] == 0).sum() > 1
    model = make_tiny("llama", tokenizer)
    with torch.no_grad():
        together = model(**batch_inputs(batch), use_cache=False).logits[0]
        start = 0
        for i in range(len(plain)):
            ids, _, _ = plain.sequence(i)
            if start + len(ids) > batch["input_ids"].shape[1]:
                break
            alone = model(input_ids=torch.tensor([ids.tolist()])).logits[0]
            torch.testing.assert_close(together[start : start + len(ids)], alone, atol=1e-4, rtol=1e-4)
            start += len(ids)
    assert start > 0


def test_collate_pads_right_and_masks_labels(tokenizer):
    convs = load_conversations(_cfg("bundled:chat_small", limit=3))
    data, _ = tokenize_set(tokenizer, convs, 256, packing=False)
    batch = collate(data, [0, 1, 2], tokenizer.pad_token_id, packed=False)
    lengths = batch["attention_mask"].sum(1)
    for row in range(3):
        n = int(lengths[row])
        assert (batch["labels"][row, n:] == -100).all()
        tokens, loss, _ = data.sequence(row)
        assert batch["input_ids"][row, :n].tolist() == tokens.tolist()
        assert ((batch["labels"][row, :n] != -100).numpy() == loss).all()


def test_split_is_seeded_and_disjoint():
    convs = load_conversations(_cfg("bundled:chat_small"))
    train, val = split_train_val(convs, 0.1, 0)
    assert len(val) == 12 and len(train) == 108
    assert {c.row for c in train}.isdisjoint(c.row for c in val)
    again, _ = split_train_val(convs, 0.1, 0)
    other, _ = split_train_val(convs, 0.1, 1)
    assert [c.row for c in again] == [c.row for c in train] != [c.row for c in other]
    assert split_train_val(convs, 0.0, 0)[1] == []


def test_micro_batches_give_each_rank_different_rows_and_equal_counts():
    n, batch, world, accum = 50, 4, 3, 2
    assert steps_per_epoch(n, batch, world, accum) == 2
    ranks = [micro_batches(n, batch, world, r, accum, epoch=0, seed=0) for r in range(world)]
    assert {len(r) for r in ranks} == {4}
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen)) == 48
    assert micro_batches(n, batch, world, 0, accum, 0, 0) == ranks[0]
    assert micro_batches(n, batch, world, 0, accum, 1, 0) != ranks[0]


def batch_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _bundled(name: str) -> str:
    from tasks.core.prompts import bundled_path

    return str(bundled_path("sft", name, ".jsonl"))
