"""Reversible interventions on the residual stream through forward hooks.

Ablation projects a unit direction r out of everything that writes into the residual stream
(embedding output, every attention output, every MLP/MoE output): x <- x - w (x . r) r. With all
weights 1 this is exactly what weight orthogonalization bakes into the matrices. Addition adds a
vector to the residual entering one layer. Directions may be one per batch row, shape (rows, hidden),
so that several candidates share one forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tasks.core.model import decoder_layers, num_layers


@dataclass
class Ablation:
    """Project ``direction`` out of the residual writers; weights per layer in [0, 1] (default all 1)."""

    direction: torch.Tensor
    """(hidden,) or (rows, hidden), unit norm per row."""
    attn_weights: torch.Tensor | None = None
    """(layers,) weight of the ablation on each layer's attention output."""
    mlp_weights: torch.Tensor | None = None
    """(layers,) weight on each layer's MLP output."""
    embed_weight: float = 1.0


@dataclass
class Addition:
    """Add ``vector`` to the residual stream entering decoder layer ``layer`` (layer == n_layers: after the last)."""

    vector: torch.Tensor
    """(hidden,) or (rows, hidden), already scaled."""
    layer: int


def _rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcastable (rows, 1, hidden) or (hidden,) version of a direction for a (rows, seq, hidden) tensor."""
    t = t.to(device=like.device, dtype=like.dtype)
    return t[:, None, :] if t.dim() == 2 else t


def project_out(x: torch.Tensor, direction: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """x - weight * (x . r) r, with r (hidden,) or (rows, hidden) for x (rows, seq, hidden).

    The dot product is a matrix product and the update one fused multiply-add: this runs after every
    residual writer of every candidate's forward pass, so elementwise temporaries add up."""
    r = _rows(direction, x)
    coef = (x @ r)[..., None] if r.dim() == 1 else x @ r.transpose(-1, -2)  # (rows, seq, 1)
    return torch.addcmul(x, coef, r, value=-weight)


def _replace_first(output, value):
    if isinstance(output, tuple):
        return (value, *output[1:])
    return value


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _hidden_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, value):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def residual_input_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose input is the residual stream entering decoder layer ``layer``; layer == n_layers
    is the final norm (the stream after the last layer)."""
    if layer == num_layers(model):
        return model.model.norm
    return decoder_layers(model)[layer]


@contextmanager
def intervene(
    model: nn.Module, ablation: Ablation | None = None, addition: Addition | None = None
) -> Iterator[None]:
    """Apply the interventions to every forward pass inside the block; hooks are removed on exit."""
    handles = []
    try:
        if ablation is not None:
            handles += _ablation_hooks(model, ablation)
        if addition is not None:
            vec = addition.vector

            def add(_module, args, kwargs):
                hidden = _hidden_arg(args, kwargs)
                return _with_hidden(args, kwargs, hidden + _rows(vec, hidden))

            target = residual_input_module(model, addition.layer)
            handles.append(target.register_forward_pre_hook(add, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _ablation_hooks(model: nn.Module, ab: Ablation) -> list:
    def make(weight):
        def hook(_module, _args, output):
            return _replace_first(output, project_out(_first(output), ab.direction, weight))

        return hook

    handles = []
    if ab.embed_weight != 0:
        handles.append(model.model.embed_tokens.register_forward_hook(make(ab.embed_weight)))
    for index, layer in enumerate(decoder_layers(model)):
        attn_w = 1.0 if ab.attn_weights is None else float(ab.attn_weights[index])
        mlp_w = 1.0 if ab.mlp_weights is None else float(ab.mlp_weights[index])
        if attn_w != 0:
            handles.append(layer.self_attn.register_forward_hook(make(attn_w)))
        if mlp_w != 0:
            handles.append(layer.mlp.register_forward_hook(make(mlp_w)))
    return handles


@contextmanager
def capture_residuals(model: nn.Module, positions: int, sink: dict[int, torch.Tensor]) -> Iterator[None]:
    """Record the residual stream entering every decoder layer and after the last: on each forward,
    ``sink[layer]`` is set to the last ``positions`` positions, shape (batch, positions, hidden).
    layer runs over 0..n_layers."""
    handles = []

    def make(layer):
        def hook(_module, args, kwargs):
            sink[layer] = _hidden_arg(args, kwargs)[:, -positions:, :].detach()

        return hook

    try:
        for layer in range(num_layers(model) + 1):
            module = residual_input_module(model, layer)
            handles.append(module.register_forward_pre_hook(make(layer), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
