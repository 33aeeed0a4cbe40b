"""The weights that write into the residual stream (what orthogonalization edits), found by name and shape.

One set of rules places every parameter of a supported architecture, in memory (``named_parameters``) and
on disk (the tensor names of a safetensors checkpoint, where transformers 5 saves fused expert tensors per
expert): as a residual writer (embeddings, attention output projections, MLP down projections of dense
MLPs, of every expert, fused or not, and of shared experts, and their biases) or as a tensor that writes
nothing into the stream, with the reason. A tensor no rule places is an error that names it: an edit never
silently skips a writer of an architecture it does not know."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from tasks.core.errors import CompalignError
from tasks.core.model import check_supported, decoder_layers, hidden_size

_MLP = r"\.(?:mlp|block_sparse_moe)\."
# (pattern, kind, hidden dim: an int, "last", or "fused" for (experts, hidden, inter) or transposed)
_WRITERS = [
    (r"(?:^|\.)embed_tokens\.weight$", "embed", 1),
    (r"\.self_attn\.o_proj\.weight$", "attn", 0),
    (r"\.self_attn\.o_proj\.bias$", "attn", 0),
    (_MLP + r"(?:.+\.)?(?:down_proj|w2)\.weight$", "mlp", 0),
    (_MLP + r"(?:.+\.)?(?:down_proj|w2)\.bias$", "mlp", "last"),
    (_MLP + r"experts\.down_proj$", "mlp", "fused"),
    (_MLP + r"experts\.down_proj_bias$", "mlp", "last"),
]
_READERS = [
    (r"\.self_attn\.(?:q|k|v|qkv)_proj\.(?:weight|bias)$", "attention input projection: reads the stream"),
    (
        _MLP + r"(?:.+\.)?(?:gate_proj|up_proj|gate_up_proj|w1|w3)\.(?:weight|bias)$",
        "MLP input: reads the stream",
    ),
    (_MLP + r"experts\.gate_up_proj(?:_bias)?$", "MLP input: reads the stream"),
    (_MLP + r"(?:gate|shared_expert_gate)\.weight$", "router: reads the stream"),
    (r"norm\.weight$", "normalization: scales what a reader sees, writes nothing"),
    (r"^lm_head\.weight$", "output head: reads the final stream"),
]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Placement:
    """Where one tensor stands: a residual writer (``kind`` embed, attn or mlp, with its layer and the dim
    that is the residual one) or a tensor that writes nothing into the stream (``kind`` None, ``reason``)."""

    name: str
    kind: str | None
    layer: int | None
    hidden_dim: int | None
    reason: str


def place(name: str, shape: tuple[int, ...], hidden: int, transposed: bool | None = None) -> Placement | None:
    """The placement of tensor ``name`` of ``shape`` in a model of residual width ``hidden``; None when no
    rule knows it. A fused 3-D expert tensor is (experts, hidden, inter), or (experts, inter, hidden) when
    ``transposed``; unknown (a file), the dim of size ``hidden`` decides, and the first when both are."""
    layer_match = _LAYER.search(name)
    layer = int(layer_match.group(1)) if layer_match else None
    for pattern, kind, dim in _WRITERS:
        if not re.search(pattern, name) or (kind != "embed" and layer is None):
            continue
        if dim == "last":
            dim = len(shape) - 1
        elif dim == "fused":
            if len(shape) != 3:
                return None
            dim = _fused_hidden_dim(shape, hidden, transposed)
        if dim >= len(shape) or shape[dim] != hidden:
            raise CompalignError(
                f"{name} has shape {tuple(shape)}; expected hidden size {hidden} at dim {dim}"
            )
        return Placement(name, kind, layer, dim, "writes the residual stream")
    for pattern, reason in _READERS:
        if re.search(pattern, name):
            return Placement(name, None, layer, None, reason)
    return None


def _fused_hidden_dim(shape: tuple[int, ...], hidden: int, transposed: bool | None) -> int:
    if transposed is not None:
        return 2 if transposed else 1
    return 2 if shape[2] == hidden and shape[1] != hidden else 1


def place_all(tensors: Iterable[tuple[str, tuple[int, ...]]], hidden: int, where: str) -> list[Placement]:
    """``place`` for every (name, shape); raises CompalignError naming each tensor no rule places."""
    return _placed([(name, place(name, tuple(shape), hidden)) for name, shape in tensors], where)


def _placed(found: list[tuple[str, Placement | None]], where: str) -> list[Placement]:
    unknown = [name for name, p in found if p is None]
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise CompalignError(
            f"{where}: cannot tell whether these tensors write into the residual stream, so an edit could "
            f"miss them: {shown}"
        )
    return [p for _, p in found]


def coverage(model: nn.Module) -> list[Placement]:
    """Every parameter of ``model`` placed (writers and the rest, with reasons), in parameter order; raises
    naming the parameters no rule places."""
    hidden = hidden_size(model)
    found = []
    for name, param in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        found.append((name, place(name, tuple(param.shape), hidden, getattr(owner, "is_transposed", None))))
    return _placed(found, getattr(model.config, "model_type", type(model).__name__))


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
    """Every parameter of ``model`` that adds into the residual stream (see the module docstring). Raises
    for an architecture it does not support or a parameter it cannot place."""
    check_supported(model.config)
    params = dict(model.named_parameters())
    writers = [
        Writer(p.name, params[p.name], p.hidden_dim, p.layer, p.kind) for p in coverage(model) if p.kind
    ]
    for index in range(len(decoder_layers(model))):
        if not any(w.layer == index and w.kind == "mlp" for w in writers):
            raise CompalignError(
                f"found no MLP down projection in layer {index} of {model.config.model_type}"
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


def coverage_report(placements: list[Placement], edited: list[str]) -> dict:
    """{"edited": [names], "left": {name: reason}}: every placed tensor, the writers not in ``edited`` left
    for their per-layer weight of 0."""
    done = set(edited)
    left = {}
    for p in placements:
        if p.name not in done:
            left[p.name] = p.reason if p.kind is None else f"per-layer weight 0 at layer {p.layer}"
    return {"edited": sorted(done), "left": dict(sorted(left.items()))}


def coverage_table(report: dict) -> str:
    """The report as a Markdown table, tensors grouped by name with layer and expert numbers as ``*``."""
    groups: dict[tuple[str, str], int] = {}
    rows = [(n, "edited") for n in report["edited"]] + [
        (n, f"left: {why}") for n, why in report["left"].items()
    ]
    for name, status in rows:
        key = (re.sub(r"\.\d+\.", ".*.", name), status)
        groups[key] = groups.get(key, 0) + 1
    lines = ["| tensors | count | status |", "|---|---|---|"]
    lines += [f"| `{pattern}` | {count} | {status} |" for (pattern, status), count in sorted(groups.items())]
    return "\n".join(lines)
