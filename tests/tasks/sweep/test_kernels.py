"""Heretic-like ablation kernels: the weight formula, its edge cases, and that hooks and weight
orthogonalization apply the same per-layer weights."""

import copy
import math

import pytest
import torch

from tasks.core.errors import CompalignError
from tasks.core.hooks import Ablation, intervene
from tasks.directions.orthogonalize import orthogonalize_weights
from tasks.sweep.kernels import Kernel, falloff_layers, first_active_layer, kernel_weights, peak_position_at
from tests.conftest import make_tiny


def test_triangular_kernel_matches_the_formula():
    k = Kernel(peak_weight=1.5, peak_position=4.0, min_weight=0.5, falloff=2.0)
    w = kernel_weights(k, 8)
    expected = [0, 0, 0.5, 1.0, 1.5, 1.0, 0.5, 0]  # linear to min_weight at distance 2, zero beyond
    assert torch.allclose(w, torch.tensor(expected))
    assert w.dtype == torch.float32 and w.shape == (8,)


def test_fractional_peak_and_edges():
    w = kernel_weights(Kernel(peak_weight=1.0, peak_position=2.5, min_weight=0.0, falloff=1.0), 6)
    assert torch.allclose(w, torch.tensor([0, 0, 0.5, 0.5, 0, 0]))
    # a zero fall-off is a single layer (only when the peak sits exactly on it)
    assert kernel_weights(Kernel(1.0, 3.0, 0.2, 0.0), 5).tolist() == [0, 0, 0, 1, 0]
    assert kernel_weights(Kernel(1.0, 2.5, 0.2, 0.0), 5).sum() == 0


def test_flat_and_off_kernels():
    assert kernel_weights(Kernel.flat(), 4).tolist() == [1, 1, 1, 1]
    assert kernel_weights(Kernel.flat(0.7), 3).tolist() == pytest.approx([0.7] * 3)
    assert kernel_weights(Kernel.off(), 3).tolist() == [0, 0, 0]
    # an infinite fall-off keeps the peak weight everywhere, whatever min_weight says
    assert kernel_weights(Kernel(1.2, 0.0, 0.0, math.inf), 3).tolist() == pytest.approx([1.2] * 3)


def test_first_active_layer():
    a = kernel_weights(Kernel(1.0, 6.0, 0.1, 2.0), 10)
    m = kernel_weights(Kernel(1.0, 8.0, 0.1, 1.0), 10)
    assert first_active_layer(a, m) == 4
    assert first_active_layer(m) == 7
    assert first_active_layer(kernel_weights(Kernel.off(), 4)) is None


def test_fractions_of_the_depth_become_layers():
    assert peak_position_at(0.5, n_layers=31) == pytest.approx(15.0)
    assert falloff_layers(0.25, n_layers=31) == pytest.approx(7.75)


def test_bad_kernels_are_rejected():
    with pytest.raises(CompalignError, match="falloff"):
        Kernel(falloff=-1.0)
    with pytest.raises(CompalignError, match="peak_weight"):
        Kernel(peak_weight=float("nan"))
    with pytest.raises(CompalignError, match="at least one layer"):
        kernel_weights(Kernel(), 0)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_hook_ablation_with_kernels_equals_orthogonalized_weights(kind, tokenizer):
    model = make_tiny(kind, tokenizer)
    n = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(3)
    r = torch.randn(model.config.hidden_size, generator=g)
    r = r / r.norm()
    attn = kernel_weights(Kernel(1.3, 1.0, 0.4, 1.0), n)
    mlp = kernel_weights(Kernel(0.9, 2.0, 0.0, 1.5), n)
    assert len(set(attn.tolist())) > 1 and len(set(mlp.tolist())) > 1  # really per-layer weights
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    ablation = Ablation(direction=r, attn_weights=attn, mlp_weights=mlp, embed_weight=0.0)
    with torch.no_grad(), intervene(model, ablation=ablation):
        hooked = model(ids).logits
    edited = copy.deepcopy(model)
    names = orthogonalize_weights(edited, r, attn_weights=attn, mlp_weights=mlp, embed_weight=0.0)
    with torch.no_grad():
        baked = edited(ids).logits
        clean = model(ids).logits
    assert (hooked - baked).abs().max() < 1e-4
    assert (hooked - clean).abs().max() > 1e-3
    assert not any("embed_tokens" in name for name in names)
