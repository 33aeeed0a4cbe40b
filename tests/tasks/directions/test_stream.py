"""The streamed, shard-by-shard edit of a safetensors checkpoint equals the in-memory edit, loads with
transformers, resumes after a crash with identical files, and reports every residual writer."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from tasks.core.errors import CompalignError
from tasks.core.tensorfile import read_header
from tasks.directions.orthogonalize import orthogonalize_weights
from tasks.directions.stream import Edit, in_process, remove_along, stream_checkpoint
from tests.conftest import make_tiny

VOCAB = 256


def _unit(width: int, seed: int = 3) -> torch.Tensor:
    r = torch.randn(width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (r / r.norm()).float()


def _saved(kind: str, folder: Path, tokenizer) -> torch.nn.Module:
    """A tiny random ``kind`` saved by transformers in many shards (each tensor about its own)."""
    model = make_tiny(kind, tokenizer, vocab=VOCAB)
    model.save_pretrained(folder, max_shard_size="40KB")
    tokenizer.save_pretrained(folder)
    return model


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _files(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.mark.parametrize("kind", ["llama_bias", "mixtral", "qwen2_moe", "phi3"])
def test_streamed_edit_equals_the_in_memory_edit_and_loads(kind, tmp_path, tokenizer):
    model = _saved(kind, tmp_path / "src", tokenizer)
    assert len(_shards(tmp_path / "src")) >= 8
    r = _unit(model.config.hidden_size)
    done = stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), Edit(r), "# card\n")
    assert done.shards == len(_shards(tmp_path / "src")) and done.skipped == 0
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    edited = copy.deepcopy(model)
    names = orthogonalize_weights(edited, r)
    expected = edited.state_dict()
    got = streamed.state_dict()
    assert set(got) == set(expected)
    worst = max(float((got[n] - expected[n]).abs().max()) for n in expected)
    assert worst < 1e-6, worst
    changed = [n for n in expected if not torch.equal(expected[n], model.state_dict()[n])]
    assert sorted(changed) == sorted(names)  # the comparison sees the edit: it is not two unedited models
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (streamed(ids).logits - edited(ids).logits).abs().max() < 1e-4
    assert not streamed.config.tie_word_embeddings
    assert torch.equal(streamed.lm_head.weight, model.lm_head.weight)  # the head keeps its weights
    assert (tmp_path / "out" / "README.md").read_text() == "# card\n"
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no stage left


def test_per_layer_weights_scale_the_removal_as_in_memory(tmp_path, tokenizer):
    model = _saved("llama", tmp_path / "src", tokenizer)
    r = _unit(model.config.hidden_size)
    attn, mlp = torch.tensor([1.0, 0.0, 0.4]), torch.tensor([0.25, 1.0, 0.0])
    done = stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), Edit(r, attn, mlp, 0.5), "")
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, r, attn, mlp, 0.5)
    for name, value in edited.state_dict().items():
        assert (streamed[name] - value).abs().max() < 1e-6, name
    assert done.coverage["left"]["model.layers.1.self_attn.o_proj.weight"] == "per-layer weight 0 at layer 1"
    assert "model.layers.1.mlp.down_proj.weight" in done.coverage["edited"]


def test_fused_expert_tensors_on_disk_are_edited_whole(tmp_path, tokenizer):
    """A checkpoint that stores Mixtral's experts fused, as transformers 5 holds them in memory
    (experts.down_proj: (experts, hidden, inter)), in 10 shards written by hand."""
    model = make_tiny("mixtral", tokenizer, vocab=VOCAB)
    state = {n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"}
    src = tmp_path / "src"
    src.mkdir()
    names = sorted(state)
    groups = [names[i::10] for i in range(10)]
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"model-{i:05d}-of-00010.safetensors"
        save_file({n: state[n] for n in group}, str(src / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(src)
    r = _unit(model.config.hidden_size)
    done = stream_checkpoint(str(src), str(tmp_path / "out"), Edit(r), "")
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, r)
    out = {}
    for shard in _shards(tmp_path / "out"):
        from safetensors.torch import load_file

        out.update(load_file(shard))
    for name, value in edited.state_dict().items():
        assert (out[name] - value).abs().max() < 1e-6, name
    fused = [n for n in done.coverage["edited"] if n.endswith("experts.down_proj")]
    assert len(fused) == model.config.num_hidden_layers


def test_a_crash_after_half_the_shards_resumes_with_identical_files(tmp_path, tokenizer):
    model = _saved("mixtral", tmp_path / "src", tokenizer)
    r = _unit(model.config.hidden_size)
    shards = len(_shards(tmp_path / "src"))
    stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "whole"), Edit(r), "card")

    def crash_halfway(fn, calls):
        for i, args in enumerate(calls):
            if i == shards // 2:
                raise RuntimeError("worker lost")
            fn(*args)

    with pytest.raises(RuntimeError, match="worker lost"):
        stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), Edit(r), "card", run=crash_halfway)
    assert not (tmp_path / "out").exists()  # nothing published
    stage = next(tmp_path.glob(".out.partial-*"))
    first = next(p for p in sorted(stage.glob("*.safetensors")))
    first.write_bytes(first.read_bytes()[:-4] + b"\0\0\0\0")  # one finished shard damaged: written again
    done = stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), Edit(r), "card", run=in_process)
    assert done.skipped == shards // 2 - 1 and done.shards == shards
    assert _files(tmp_path / "out") == _files(tmp_path / "whole")
    other = stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), Edit(_unit(64, seed=9)), "card")
    assert other.skipped == 0  # another direction never reuses a shard


def test_coverage_lists_every_writer_with_reasons_for_the_rest(tmp_path, tokenizer):
    model = _saved("qwen2_moe", tmp_path / "src", tokenizer)
    done = stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), Edit(_unit(64)), "")
    layers, experts = model.config.num_hidden_layers, model.config.num_experts
    edited = done.coverage["edited"]
    assert sum(".mlp.experts." in n and n.endswith("down_proj.weight") for n in edited) == layers * experts
    assert sum("shared_expert.down_proj" in n for n in edited) == layers
    assert sum("o_proj.weight" in n for n in edited) == layers and "model.embed_tokens.weight" in edited
    left = done.coverage["left"]
    assert left["model.layers.0.mlp.gate.weight"] == "router: reads the stream"
    assert left["model.layers.0.self_attn.q_proj.bias"] == "attention input projection: reads the stream"
    assert left["model.norm.weight"].startswith("normalization")
    on_disk = {n for shard in _shards(tmp_path / "src") for n in (e.name for e in read_header(shard).entries)}
    assert set(edited) | set(left) == on_disk | {"lm_head.weight"}  # every tensor placed, none skipped
    assert json.loads((tmp_path / "out" / "coverage.json").read_text()) == done.coverage


def test_a_tensor_of_unknown_role_fails_with_its_name(tmp_path, tokenizer):
    _saved("llama", tmp_path / "src", tokenizer)
    shard = _shards(tmp_path / "src")[0]
    save_file(
        {"model.layers.0.mlp.mystery.weight": torch.zeros(64, 64)}, str(shard), metadata={"format": "pt"}
    )
    with pytest.raises(CompalignError, match=r"could miss them: model\.layers\.0\.mlp\.mystery\.weight$"):
        stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), Edit(_unit(64)), "")
    assert not (tmp_path / "out").exists()


def test_a_direction_of_the_wrong_width_is_refused(tmp_path, tokenizer):
    _saved("llama", tmp_path / "src", tokenizer)
    with pytest.raises(CompalignError, match=r"direction has shape \(32,\) but .* has hidden size 64"):
        stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), Edit(_unit(32)), "")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_removal_equals_the_whole_tensor_formula(dtype, monkeypatch):
    from tasks.directions import stream

    monkeypatch.setattr(stream, "_CHUNK_ELEMENTS", 7 * 16)  # many small blocks, a ragged last one
    g = torch.Generator().manual_seed(0)
    r = _unit(16).double()
    for shape, dim in [((16, 30), 0), ((30, 16), 1), ((3, 16, 5), 1), ((3, 5, 16), 2), ((16,), 0)]:
        t = torch.randn(shape, generator=g).to(dtype)
        moved = t.double().movedim(dim, -1)
        expected = (moved - 0.7 * (moved @ r)[..., None] * r).movedim(-1, dim).to(dtype)
        remove_along(t, dim, r, 0.7)
        assert torch.equal(t, expected), (shape, dim)


def test_a_non_finite_edit_is_refused_before_anything_is_written(tmp_path):
    r = torch.zeros(8)
    r[3] = float("nan")
    with pytest.raises(CompalignError, match="holds NaN or inf"):
        Edit(r)
    with pytest.raises(CompalignError, match="holds NaN or inf"):
        Edit(torch.ones(8) / 8**0.5, attn=torch.tensor([1.0, float("inf")]))
    assert not any(tmp_path.iterdir())


def _checkpoint(folder: Path, config: dict, shards: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """A hand-made checkpoint: config.json, shards with an index (or one model.safetensors), side files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    shards = shards or {"model.safetensors": {"model.embed_tokens.weight": torch.ones(4, 8)}}
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    if len(shards) > 1:
        weight_map = {t: name for name, tensors in shards.items() for t in tensors}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name in ("README.md", "tokenizer.json", "generation_config.json"):
        (folder / name).write_text("{}")
    return folder


def test_plan_reads_shards_side_files_width_and_tying(tmp_path):
    from tasks.directions.stream import plan

    r = _unit(8)
    two = {
        "a.safetensors": {"model.embed_tokens.weight": torch.ones(4, 8)},
        "b.safetensors": {"lm_head.weight": torch.ones(4, 8)},
    }
    p = plan(
        str(_checkpoint(tmp_path / "m", {"hidden_size": 8, "tie_word_embeddings": True}, two)) + "/", Edit(r)
    )
    assert p.shards == ["a.safetensors", "b.safetensors"] and p.source == str(tmp_path / "m")
    assert p.other_files == ["generation_config.json", "tokenizer.json"]  # the card is written anew
    assert not p.tied and p.hidden == 8  # the head has its own tensor: nothing to untie
    single = _checkpoint(tmp_path / "s", {"text_config": {"hidden_size": 8}, "tie_word_embeddings": True})
    p1 = plan(str(single), Edit(r))
    assert p1.shards == ["model.safetensors"] and p1.tied and p1.hidden == 8 and p1.weight_map == {}
    assert not plan(str(_checkpoint(tmp_path / "u", {"hidden_size": 8})), Edit(r)).tied


def test_plan_key_follows_the_content_and_the_edit(tmp_path):
    from tasks.directions.stream import plan

    r = _unit(8)
    a = _checkpoint(tmp_path / "a", {"hidden_size": 8, "x": 1, "y": 2})
    b = _checkpoint(tmp_path / "b", {"y": 2, "x": 1, "hidden_size": 8})  # the same config, keys reordered
    assert plan(str(a), Edit(r)).key == plan(str(b), Edit(r)).key
    assert plan(str(a), Edit(r)).key != plan(str(a), Edit(_unit(8, seed=4))).key
    c = _checkpoint(tmp_path / "c", {"hidden_size": 8, "x": 1, "y": 3})
    assert plan(str(c), Edit(r)).key != plan(str(a), Edit(r)).key
    d = _checkpoint(
        tmp_path / "d", {"hidden_size": 8, "x": 1, "y": 2}, {"model.safetensors": {"w": torch.ones(5, 8)}}
    )
    assert plan(str(d), Edit(r)).key != plan(str(a), Edit(r)).key  # another shard size


def test_plan_refuses_missing_shards_and_a_config_without_width(tmp_path):
    from tasks.directions.stream import plan

    two = {"a.safetensors": {"e": torch.ones(2, 8)}, "b.safetensors": {"h": torch.ones(2, 8)}}
    folder = _checkpoint(tmp_path / "m", {"hidden_size": 8}, two)
    (folder / "b.safetensors").unlink()
    with pytest.raises(CompalignError, match=r"the index names shards that are not there: b.safetensors$"):
        plan(str(folder), Edit(_unit(8)))
    with pytest.raises(CompalignError, match=r"config.json has no hidden_size"):
        plan(str(_checkpoint(tmp_path / "n", {"vocab_size": 4})), Edit(_unit(8)))


def test_the_published_folder_holds_index_card_extras_and_pt_shards(tmp_path):
    """A single-file checkpoint without metadata, a tied head, a nested new target, a card made from the
    coverage, extra files, and a check that sees the finished stage."""
    src = _checkpoint(
        tmp_path / "src",
        {"hidden_size": 8, "tie_word_embeddings": True, "model_type": "llama"},
        {
            "model.safetensors": {
                "model.embed_tokens.weight": torch.randn(4, 8),
                "model.norm.weight": torch.ones(8),
            }
        },
    )
    seen = []

    def check(stage: Path) -> None:
        seen.append(sorted(p.name for p in stage.iterdir() if not p.name.startswith(".")))

    target = tmp_path / "new" / "deeper" / "out"
    done = stream_checkpoint(
        str(src), str(target), Edit(_unit(8)), lambda report: f"edited {len(report['edited'])}",
        extra_files={"direction.safetensors": b"raw bytes"}, check=check,
    )  # fmt: skip
    files = {p.name for p in target.iterdir()}
    assert seen == [sorted(files)] and "model.safetensors.index.json" in files
    assert (target / "README.md").read_text(encoding="utf-8") == "edited 1"
    assert (target / "direction.safetensors").read_bytes() == b"raw bytes"
    assert (target / "tokenizer.json").read_text() == "{}" and not any(
        n.endswith(".done.json") for n in files
    )
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == (target / "model.safetensors").stat().st_size
    assert set(index["weight_map"]) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert read_header(target / "model.safetensors").metadata == {"format": "pt"}  # what transformers expects
    assert json.loads((target / "config.json").read_text())["tie_word_embeddings"] is False
    assert (
        done.coverage["left"]["lm_head.weight"]
        == "output head: reads the final stream (untied from the embedding)"
    )
    assert json.loads((target / "coverage.json").read_text()) == done.coverage


def test_a_shard_whose_file_is_gone_is_written_again_despite_its_record(tmp_path, tokenizer):
    model = _saved("llama", tmp_path / "src", tokenizer)
    r = _unit(model.config.hidden_size)
    whole = stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "whole"), Edit(r), "card")

    def crash_at_the_end(fn, calls):
        for args in calls:
            fn(*args)
        raise RuntimeError("driver lost")

    with pytest.raises(RuntimeError, match="driver lost"):
        stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), Edit(r), "card", run=crash_at_the_end)
    stage = next(tmp_path.glob(".out.partial-*"))
    gone = sorted(stage.glob("*.safetensors"))[0]
    gone.unlink()  # its .done.json record stays
    done = stream_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), Edit(r), "card")
    assert done.skipped == whole.shards - 1
    assert _files(tmp_path / "out") == _files(tmp_path / "whole")
