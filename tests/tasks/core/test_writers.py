"""Placing every tensor of an architecture: the residual writers with their residual dim, the rest with
the reason they are left, and an error naming any tensor no rule knows."""

from __future__ import annotations

import pytest

from tasks.core.errors import CompalignError
from tasks.core.writers import coverage, coverage_report, coverage_table, place, place_all, residual_writers
from tests.conftest import make_tiny

H = 64


@pytest.mark.parametrize(
    ("name", "shape", "kind", "layer", "dim"),
    [
        ("model.embed_tokens.weight", (100, H), "embed", None, 1),
        ("model.layers.3.self_attn.o_proj.weight", (H, 32), "attn", 3, 0),
        ("model.layers.3.self_attn.o_proj.bias", (H,), "attn", 3, 0),
        ("model.layers.12.mlp.down_proj.weight", (H, 128), "mlp", 12, 0),
        ("model.layers.0.mlp.down_proj.bias", (H,), "mlp", 0, 0),
        ("model.layers.1.block_sparse_moe.experts.7.w2.weight", (H, 96), "mlp", 1, 0),
        ("model.layers.1.mlp.experts.3.down_proj.weight", (H, 48), "mlp", 1, 0),
        ("model.layers.1.mlp.shared_expert.down_proj.weight", (H, 48), "mlp", 1, 0),
        ("model.layers.2.mlp.experts.down_proj", (4, H, 96), "mlp", 2, 1),  # fused, transformers 5 in memory
        ("model.layers.2.mlp.experts.down_proj", (4, 96, H), "mlp", 2, 2),  # fused, transposed (gpt-oss)
        ("model.layers.2.mlp.experts.down_proj_bias", (4, H), "mlp", 2, 1),
    ],
)
def test_writers_are_placed_with_their_residual_dim(name, shape, kind, layer, dim):
    p = place(name, shape, H)
    assert (p.kind, p.layer, p.hidden_dim) == (kind, layer, dim)


def test_a_fused_tensor_square_in_hidden_and_inter_follows_the_module():
    assert place("model.layers.0.mlp.experts.down_proj", (4, H, H), H).hidden_dim == 1
    assert place("model.layers.0.mlp.experts.down_proj", (4, H, H), H, transposed=True).hidden_dim == 2


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("model.layers.0.self_attn.q_proj.weight", "attention input projection: reads the stream"),
        ("model.layers.0.self_attn.qkv_proj.weight", "attention input projection: reads the stream"),
        ("model.layers.0.self_attn.v_proj.bias", "attention input projection: reads the stream"),
        ("model.layers.0.mlp.gate_up_proj.weight", "MLP input: reads the stream"),
        ("model.layers.0.block_sparse_moe.experts.1.w3.weight", "MLP input: reads the stream"),
        ("model.layers.0.mlp.experts.gate_up_proj", "MLP input: reads the stream"),
        ("model.layers.0.block_sparse_moe.gate.weight", "router: reads the stream"),
        ("model.layers.0.mlp.shared_expert_gate.weight", "router: reads the stream"),
        (
            "model.layers.0.self_attn.q_norm.weight",
            "normalization: scales what a reader sees, writes nothing",
        ),
        ("model.norm.weight", "normalization: scales what a reader sees, writes nothing"),
        ("lm_head.weight", "output head: reads the final stream"),
    ],
)
def test_tensors_that_write_nothing_carry_the_reason(name, reason):
    p = place(name, (H, H), H)
    assert p.kind is None and p.reason == reason


def test_a_writer_of_the_wrong_width_and_unknown_tensors_are_errors():
    with pytest.raises(
        CompalignError, match=r"o_proj.weight has shape \(32, 32\); expected hidden size 64 at dim 0"
    ):
        place("model.layers.0.self_attn.o_proj.weight", (32, 32), H)
    assert place("model.layers.0.mlp.experts.down_proj", (H, 96), H) is None  # fused needs 3 dims
    assert place("model.layers.0.self_attn.o_proj.weight.extra", (H, H), H) is None
    names = [("model.layers.0.mlp.c_proj.weight", (H, H)), ("model.layers.0.ln_2.bias", (H,))]
    with pytest.raises(
        CompalignError, match=r"^gpt2: cannot tell .* miss them: model.layers.0.mlp.c_proj.weight, "
    ):
        place_all([("model.embed_tokens.weight", (10, H)), *names], H, "gpt2")


@pytest.mark.parametrize("kind", ["llama_bias", "mixtral", "qwen2_moe", "qwen3_moe", "phi3"])
def test_every_parameter_of_each_architecture_is_placed(kind, tokenizer):
    model = make_tiny(kind, tokenizer, vocab=128)
    placed = coverage(model)
    assert [p.name for p in placed] == [n for n, _ in model.named_parameters()]
    writers = {w.name for w in residual_writers(model)}
    assert writers == {p.name for p in placed if p.kind}
    layers = model.config.num_hidden_layers
    assert sum(p.kind == "attn" for p in placed) == layers * (2 if kind == "llama_bias" else 1)
    if kind == "qwen2_moe":
        assert sum("shared_expert.down_proj" in p.name for p in placed if p.kind) == layers


def test_an_unknown_parameter_in_a_supported_model_is_named(tokenizer):
    import torch

    model = make_tiny("llama", tokenizer, vocab=128)
    model.model.layers[1].mlp.register_parameter("adapter", torch.nn.Parameter(torch.zeros(H)))
    with pytest.raises(CompalignError, match=r"^llama: .* miss them: model.layers.1.mlp.adapter$"):
        residual_writers(model)


def test_the_report_and_its_table_group_layers_and_experts(tokenizer):
    model = make_tiny("mixtral", tokenizer, vocab=128)
    placed = coverage(model)
    edited = [p.name for p in placed if p.kind and p.layer != 1]  # as with a per-layer weight 0 at layer 1
    report = coverage_report(placed, edited)
    assert report["left"]["model.layers.1.mlp.experts.down_proj"] == "per-layer weight 0 at layer 1"
    table = coverage_table(report)
    assert "| `model.layers.*.mlp.experts.down_proj` | 2 | edited |" in table
    assert "| `model.layers.*.mlp.experts.down_proj` | 1 | left: per-layer weight 0 at layer 1 |" in table
    assert "| `model.layers.*.mlp.gate.weight` | 3 | left: router: reads the stream |" in table


@pytest.mark.parametrize(("count", "tail"), [(20, ""), (21, " and 1 more"), (25, " and 5 more")])
def test_unknown_tensors_are_named_up_to_twenty(count, tail):
    names = [f"model.layers.0.mlp.mystery{i:02d}.weight" for i in range(count)]
    with pytest.raises(CompalignError) as err:
        place_all([(n, (8, 8)) for n in names], 8, "ckpt/shard-1")
    shown = ", ".join(names[:20])
    assert str(err.value) == (
        "ckpt/shard-1: cannot tell whether these tensors write into the residual stream, so an edit could "
        f"miss them: {shown}{tail}"
    )
