"""Weight orthogonalization equals hook ablation; a zero direction changes nothing; ties are broken."""

import copy

import pytest
import torch

from tasks.core.errors import CompalignError
from tasks.core.hooks import Ablation, intervene
from tasks.core.writers import residual_writers
from tasks.directions.orthogonalize import orthogonalize_weights
from tests.conftest import make_tiny


def _unit(width: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(width, generator=g)
    return r / r.norm()


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "kind", ["llama", "llama_bias", "mixtral", "qwen2", "qwen2_moe", "qwen3_moe", "phi3"]
)
def test_orthogonalized_logits_equal_hook_ablation(kind, tokenizer):
    model = make_tiny(kind, tokenizer)
    r = _unit(model.config.hidden_size)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad(), intervene(model, ablation=Ablation(direction=r)):
        hooked = model(ids).logits
    edited = copy.deepcopy(model)
    names = orthogonalize_weights(edited, r)
    with torch.no_grad():
        baked = edited(ids).logits
        clean = model(ids).logits
    assert (hooked - baked).abs().max() < 1e-4
    assert (hooked - clean).abs().max() > 1e-2  # the ablation does something
    assert any("embed_tokens" in n for n in names) and any("o_proj" in n for n in names)
    writes_bias = {"llama_bias": ["o_proj.bias", "down_proj.bias"], "qwen2": []}.get(kind, [])
    for suffix in writes_bias:  # every residual-writing bias is edited (and this model's are not zero)
        assert sum(n.endswith(suffix) for n in names) == model.config.num_hidden_layers, (suffix, names)
    if kind == "qwen2_moe":  # the shared expert writes into the residual too
        assert sum("shared_expert.down_proj" in n for n in names) == model.config.num_hidden_layers


def test_residual_writing_biases_carry_no_component_along_the_direction(tokenizer):
    model = make_tiny("llama_bias", tokenizer)
    r = _unit(model.config.hidden_size)
    biases = [w for w in residual_writers(model) if w.name.endswith("bias")]
    assert len(biases) == 2 * model.config.num_hidden_layers
    assert all(abs(float(r @ w.param)) > 1e-3 for w in biases)  # random, not zero
    orthogonalize_weights(model, r)
    assert all(abs(float(r @ w.param)) < 1e-5 for w in biases)


def test_every_expert_is_edited(tokenizer):
    model = make_tiny("mixtral", tokenizer)
    writers = residual_writers(model)
    fused = [w for w in writers if w.param.dim() == 3]
    assert len(fused) == model.config.num_hidden_layers  # (experts, hidden, intermediate) per layer
    r = _unit(model.config.hidden_size)
    orthogonalize_weights(model, r)
    for w in fused:
        # every expert's output has no component along r
        assert torch.einsum("h,ehi->ei", r, w.param).abs().max() < 1e-5


def test_weighted_kernel_matches_weighted_hooks(tokenizer):
    model = make_tiny("llama", tokenizer)
    r = _unit(model.config.hidden_size)
    attn = torch.tensor([0.2, 1.0, 0.5])
    mlp = torch.tensor([0.0, 0.7, 1.0])
    ids = _ids(model.config.vocab_size)
    with torch.no_grad(), intervene(model, ablation=Ablation(r, attn, mlp, embed_weight=0.3)):
        hooked = model(ids).logits
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, r, attn, mlp, embed_weight=0.3)
    with torch.no_grad():
        assert (hooked - edited(ids).logits).abs().max() < 1e-4


def test_zero_direction_changes_nothing(tokenizer):
    model = make_tiny("mixtral", tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    orthogonalize_weights(model, torch.zeros(model.config.hidden_size))
    after = model.state_dict()
    assert before.keys() <= after.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def test_tied_embeddings_are_untied_and_head_kept(tokenizer):
    model = make_tiny("llama", tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    head = model.lm_head.weight.detach().clone()
    orthogonalize_weights(model, _unit(model.config.hidden_size))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, head)
    assert not model.config.tie_word_embeddings


def test_wrong_width_and_nan_are_clear_errors(tokenizer):
    model = make_tiny("llama", tokenizer)
    with pytest.raises(CompalignError, match="hidden size is 64"):
        orthogonalize_weights(model, torch.ones(63))
    with pytest.raises(CompalignError, match="NaN"):
        orthogonalize_weights(model, torch.full((64,), float("nan")))


def test_smollm2_orthogonalized_equals_hooks(smollm2):
    """fp32: next-token log-probs of the edited weights equal hook ablation's to 1e-4 at every position.
    Raw fp32 logits of this 30-layer model (magnitude ~25) already differ from the same model in fp64 by
    ~1.3e-4 with hooks alone, so the raw-logit check runs in fp64, where the two must agree exactly."""
    from tasks.core.prompts import format_chat

    model, tok = smollm2.model, smollm2.tokenizer
    r = _unit(model.config.hidden_size, seed=3)
    text = format_chat(tok, ["Quelle est la capitale de la France ?"])[0]
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids

    def compare(base):
        with torch.no_grad(), intervene(base, ablation=Ablation(direction=r)):
            hooked = base(ids).logits
        edited = copy.deepcopy(base)
        orthogonalize_weights(edited, r)
        with torch.no_grad():
            baked = edited(ids).logits
            clean = base(ids).logits
        assert (hooked - clean).abs().max() > 1.0  # the ablation does something
        return hooked, baked

    hooked, baked = compare(model)
    assert (hooked.log_softmax(-1) - baked.log_softmax(-1)).abs().max() < 1e-4
    assert (hooked - baked).abs().max() < 5e-4
    hooked64, baked64 = compare(copy.deepcopy(model).double())
    assert (hooked64 - baked64).abs().max() < 1e-9


@pytest.mark.gpu
def test_on_gpu_in_bfloat16(tokenizer):
    """On CUDA in bf16: weights and hooks agree to bf16 precision, and collection runs on the device."""
    from tasks.directions.collect import collect_activation_sums

    model = make_tiny("mixtral", tokenizer).to("cuda", torch.bfloat16)
    r = _unit(model.config.hidden_size).to("cuda")
    ids = _ids(model.config.vocab_size).to("cuda")
    with torch.no_grad(), intervene(model, ablation=Ablation(direction=r)):
        hooked = model(ids).logits.float()
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, r)
    with torch.no_grad():
        assert (hooked - edited(ids).logits.float()).abs().max() < 5e-2
    sums = collect_activation_sums(model, tokenizer, ["Hello there.", "How are you?"], 2, 2)
    assert torch.isfinite(sums.sums).all() and sums.sums.device.type == "cpu"


def test_an_in_memory_edit_is_reported_tensor_by_tensor(tokenizer):
    from tasks.core.writers import coverage, coverage_report

    model = make_tiny("llama", tokenizer, vocab=128)
    clean = copy.deepcopy(model.state_dict())
    attn, mlp = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 1.0])
    names = orthogonalize_weights(model, _unit(64), attn, mlp)
    assert len(names) == 1 + 2 + 2
    report = coverage_report(coverage(model), names)
    changed = sorted(n for n, t in model.state_dict().items() if not torch.equal(t, clean[n]))
    assert report["edited"] == changed and "model.layers.2.self_attn.o_proj.weight" in changed
    assert report["left"]["model.layers.1.self_attn.o_proj.weight"] == "per-layer weight 0 at layer 1"
    assert report["left"]["model.layers.0.mlp.down_proj.weight"] == "per-layer weight 0 at layer 0"
    assert report["left"]["lm_head.weight"] == "output head: reads the final stream"  # untied: its own now
    assert len(report["edited"]) + len(report["left"]) == len(list(model.named_parameters()))
