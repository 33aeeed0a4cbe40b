"""Candidate directions from activation means: difference of means per (layer, position), unit-normalised."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tasks.core.errors import CompalignError
from tasks.directions.collect import ActivationSums


@dataclass
class Candidates:
    """Every candidate direction, indexed [layer, position]."""

    directions: torch.Tensor
    """(layers + 1, positions, hidden) float32, unit norm (zero where the means coincide)."""
    norms: torch.Tensor
    """(layers + 1, positions) float32: norm of the (projected) difference of means, the natural scale for
    adding the direction back."""

    @property
    def n_layers(self) -> int:
        return self.directions.shape[0]

    @property
    def n_positions(self) -> int:
        return self.directions.shape[1]

    def position_index(self, position: int) -> int:
        """Index into the positions axis for a negative position (-1 = last token)."""
        if not -self.n_positions <= position < 0:
            raise CompalignError(f"position {position} is outside -{self.n_positions}..-1")
        return self.n_positions + position

    def get(self, layer: int, position: int) -> torch.Tensor:
        if not 0 <= layer < self.n_layers:
            raise CompalignError(
                f"layer {layer} is out of range: candidates exist for layers 0..{self.n_layers - 1}"
            )
        return self.directions[layer, self.position_index(position)]


def difference_of_means(
    target: ActivationSums, baseline: ActivationSums, projected: bool = False
) -> Candidates:
    """mean(target) - mean(baseline) at every (layer, position), unit-normalised.

    With ``projected``, the component along the baseline mean is removed first, so that ablating the
    direction does not also shrink what every prompt has in common."""
    diff = target.mean() - baseline.mean()
    if projected:
        base = baseline.mean()
        unit = base / base.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        diff = diff - (diff * unit).sum(-1, keepdim=True) * unit
    norms = diff.norm(dim=-1)
    directions = diff / norms.clamp_min(1e-12)[..., None]
    return Candidates(directions=directions.float(), norms=norms.float())


def interpolate_layer(candidates: Candidates, layer: float, position: int) -> torch.Tensor:
    """Direction at a fractional source layer: linear blend of the two neighbouring layers' directions,
    re-normalised. (hidden,) float32."""
    if math.isnan(layer) or not 0 <= layer <= candidates.n_layers - 1:
        raise CompalignError(f"layer {layer} is out of range 0..{candidates.n_layers - 1}")
    low = int(math.floor(layer))
    high = min(low + 1, candidates.n_layers - 1)
    frac = layer - low
    blend = (1 - frac) * candidates.get(low, position) + frac * candidates.get(high, position)
    return blend / blend.norm().clamp_min(1e-12)


def check_direction(direction: torch.Tensor, hidden: int) -> torch.Tensor:
    """A direction as a unit float32 vector of width ``hidden``; clear errors for wrong shape, NaN or zero."""
    if direction.dim() != 1 or direction.shape[0] != hidden:
        raise CompalignError(
            f"direction has shape {tuple(direction.shape)} but the model's hidden size is {hidden}"
        )
    if not torch.isfinite(direction).all():
        raise CompalignError("direction contains NaN or infinite values")
    norm = direction.float().norm()
    if norm == 0:
        raise CompalignError("direction is all zeros")
    return direction.float() / norm


def load_direction(uri: str, hidden: int) -> tuple[torch.Tensor, dict[str, str]]:
    """A unit direction and its metadata (layer, position, ...) from a .safetensors (tensor "direction"),
    .pt or .npy file; checked against the model's hidden size."""
    import io

    from safetensors.torch import load

    from tasks.core import storage

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise CompalignError(f"direction file {uri} does not exist") from exc
    metadata: dict[str, str] = {}
    try:
        if uri.endswith(".safetensors"):
            tensors = load(data)
            if "direction" not in tensors and len(tensors) != 1:
                raise CompalignError(f"{uri} holds tensors {sorted(tensors)}; expected one named 'direction'")
            tensor = tensors.get("direction", next(iter(tensors.values())))
            metadata = safetensors_metadata(data)
        elif uri.endswith(".pt"):
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        elif uri.endswith(".npy"):
            import numpy as np

            tensor = torch.from_numpy(np.load(io.BytesIO(data)))
        else:
            raise CompalignError(f"direction file {uri}: use .safetensors, .pt or .npy")
    except CompalignError:
        raise
    except Exception as exc:  # corrupt files raise library-specific errors
        raise CompalignError(f"cannot read direction file {uri}: {exc}") from exc
    if not isinstance(tensor, torch.Tensor):
        raise CompalignError(f"direction file {uri} does not hold a tensor")
    return check_direction(
        tensor.flatten() if tensor.dim() > 1 and tensor.shape[0] == 1 else tensor, hidden
    ), metadata


@dataclass
class LayerWeights:
    """Per-layer weights of a direction's removal (a sweep's ablation kernels), as ``orthogonalize_weights``
    and the hook ablation take them."""

    attn: torch.Tensor
    """(layers,) weight of the removal from each layer's attention output."""
    mlp: torch.Tensor
    """(layers,) weight of the removal from each layer's MLP output."""
    embed: float
    """Weight of the removal from the token embeddings."""


def load_layer_weights(uri: str, n_layers: int) -> LayerWeights | None:
    """The per-layer kernel weights a direction file carries (tensors ``attn_weights`` and ``mlp_weights``,
    metadata ``embed_weight``, as in a sweep's best_trial.safetensors), or None for a plain direction."""
    if not uri.endswith(".safetensors"):
        return None
    from safetensors.torch import load

    from tasks.core import storage

    data = storage.read_bytes(uri)
    tensors = load(data)
    present = {"attn_weights", "mlp_weights"} & tensors.keys()
    if not present:
        return None
    if len(present) == 1:
        raise CompalignError(f"{uri} has {present.pop()} but not the other one of attn_weights / mlp_weights")
    weights = {}
    for name in ("attn_weights", "mlp_weights"):
        tensor = tensors[name].float()
        if tensor.shape != (n_layers,):
            raise CompalignError(
                f"{uri}: {name} has shape {tuple(tensor.shape)} but the model has {n_layers} layers"
            )
        if not torch.isfinite(tensor).all():
            raise CompalignError(f"{uri}: {name} contains NaN or infinite values")
        weights[name] = tensor
    embed = safetensors_metadata(data).get("embed_weight", "1.0")
    try:
        embed_weight = float(embed)
    except ValueError as exc:
        raise CompalignError(f"{uri}: embed_weight metadata {embed!r} is not a number") from exc
    return LayerWeights(weights["attn_weights"], weights["mlp_weights"], embed_weight)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The free-form metadata of a safetensors file (its JSON header's __metadata__)."""
    import json
    import struct

    (size,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + size]).get("__metadata__") or {})
