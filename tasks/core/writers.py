"""The weights that write into the residual stream (what orthogonalization edits), found by architecture."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tasks.core.errors import CompalignError
from tasks.core.model import check_supported, decoder_layers, hidden_size


@dataclass
class Writer:
    """A weight that writes into the residual stream, and which of its dims is the residual (hidden) dim."""

    name: str
    param: nn.Parameter
    hidden_dim: int
    layer: int | None
    """Decoder layer index, None for the embedding."""
    kind: str
    """embed, attn or mlp."""


def residual_writers(model: nn.Module) -> list[Writer]:
    """Every parameter that adds into the residual stream: token embeddings, attention output projections
    (weight and bias), MLP down projections, each MoE expert's (fused 3-D tensors included) and shared
    experts'. Raises for an architecture it does not know."""
    check_supported(model.config)
    hidden = hidden_size(model)
    embed = model.model.embed_tokens.weight
    writers = [Writer("model.embed_tokens.weight", embed, 1, None, "embed")]
    for index, layer in enumerate(decoder_layers(model)):
        prefix = f"model.layers.{index}"
        o_proj = layer.self_attn.o_proj
        writers.append(Writer(f"{prefix}.self_attn.o_proj.weight", o_proj.weight, 0, index, "attn"))
        if o_proj.bias is not None:
            writers.append(Writer(f"{prefix}.self_attn.o_proj.bias", o_proj.bias, 0, index, "attn"))
        for pname, param in layer.mlp.named_parameters():
            full = f"{prefix}.mlp.{pname}"
            leaf = pname.rsplit(".", 1)[-1]
            owner = layer.mlp.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else layer.mlp
            if pname.endswith(("down_proj.weight", "w2.weight")):
                writers.append(Writer(full, param, 0, index, "mlp"))
            elif pname.endswith(("down_proj.bias", "w2.bias")) or leaf == "down_proj_bias":
                writers.append(Writer(full, param, param.dim() - 1, index, "mlp"))
            elif leaf == "down_proj" and param.dim() == 3:
                # Fused experts: (experts, hidden, intermediate), or (experts, intermediate, hidden) if transposed.
                dim = 2 if getattr(owner, "is_transposed", False) else 1
                writers.append(Writer(full, param, dim, index, "mlp"))
        if not any(w.layer == index and w.kind == "mlp" for w in writers):
            raise CompalignError(
                f"found no MLP down projection in layer {index} of {model.config.model_type}"
            )
    for w in writers:
        if w.param.shape[w.hidden_dim] != hidden:
            raise CompalignError(
                f"{w.name} has shape {tuple(w.param.shape)}; expected hidden size {hidden} at dim {w.hidden_dim}"
            )
    return writers


def untie_embeddings(model: nn.Module) -> bool:
    """Give the LM head its own copy of tied input embeddings (editing one must not edit the other).
    Returns True when it untied."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
        model.config.tie_word_embeddings = False
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {}
    return True
