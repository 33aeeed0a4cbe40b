"""Weight orthogonalization: bake a direction's ablation into the matrices that write the residual stream."""

from __future__ import annotations

import torch
from torch import nn

from tasks.core.errors import CompalignError
from tasks.core.model import hidden_size
from tasks.core.writers import residual_writers, untie_embeddings


def _weight_for(kind: str, layer: int | None, attn_weights, mlp_weights, embed_weight: float) -> float:
    if kind == "embed":
        return embed_weight
    weights = attn_weights if kind == "attn" else mlp_weights
    return 1.0 if weights is None else float(weights[layer])


@torch.no_grad()
def orthogonalize_weights(
    model: nn.Module,
    direction: torch.Tensor,
    attn_weights: torch.Tensor | None = None,
    mlp_weights: torch.Tensor | None = None,
    embed_weight: float = 1.0,
) -> list[str]:
    """W <- W - w r (r^T W) along the residual dimension of every residual writer (embeddings, attention
    output projections, MLP down projections including every MoE expert's and fused expert tensors, and
    their biases), in place. Ties between input and output embeddings are broken first so that the LM
    head keeps its weights.

    ``direction``: (hidden,) unit vector (a zero vector changes nothing). Per-layer ``attn_weights`` /
    ``mlp_weights`` (layers,) scale the removal as the hook ablation's weights do. Returns edited names."""
    hidden = hidden_size(model)
    if direction.dim() != 1 or direction.shape[0] != hidden:
        raise CompalignError(
            f"direction has shape {tuple(direction.shape)} but the model's hidden size is {hidden}"
        )
    if not torch.isfinite(direction).all():
        raise CompalignError("direction contains NaN or infinite values")
    untie_embeddings(model)
    edited = []
    for writer in residual_writers(model):
        weight = _weight_for(writer.kind, writer.layer, attn_weights, mlp_weights, embed_weight)
        if weight == 0:
            continue
        param = writer.param
        # float64 so that the edited weights carry no rounding beyond their own dtype's
        r = direction.to(device=param.device, dtype=torch.float64)
        moved = param.data.double().movedim(writer.hidden_dim, -1)  # (..., hidden)
        moved = moved - weight * (moved @ r)[..., None] * r
        param.data.copy_(moved.movedim(-1, writer.hidden_dim).to(param.dtype))
        edited.append(writer.name)
    return edited
