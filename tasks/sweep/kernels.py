"""Ablation weight kernels across layers, after Heretic's: how strongly each layer's residual writers have
the direction removed.

A kernel has a peak weight at a (fractional) peak layer, falls off linearly with the distance from it
to ``min_weight`` at ``falloff`` layers away, and is zero beyond that:

    d = |layer - peak_position|
    w(layer) = peak_weight + (d / falloff) * (min_weight - peak_weight)   if d <= falloff
             = 0                                                           otherwise

Attention and MLP writers get separate kernels (MLP edits tend to cost more KL than attention edits).
``kernel_weights`` gives the (layers,) tensors that ``tasks.core.hooks.Ablation(attn_weights=, mlp_weights=)``
and ``tasks.directions.orthogonalize.orthogonalize_weights(attn_weights=, mlp_weights=)`` take; both apply the same
weights, so a trial scored through hooks is the checkpoint that orthogonalization exports.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from tasks.core.errors import CompalignError


@dataclass(frozen=True)
class Kernel:
    """One writer kind's ablation weights across decoder layers."""

    peak_weight: float = 1.0
    """Weight at the peak (1 removes the direction fully; above 1 over-removes, as Heretic allows)."""
    peak_position: float = 0.0
    """Decoder layer (fractional) where the weight peaks."""
    min_weight: float = 1.0
    """Weight ``falloff`` layers away from the peak; layers farther away get 0."""
    falloff: float = math.inf
    """Distance in layers over which the weight goes from the peak to ``min_weight`` (inf: every layer
    is within reach)."""

    def __post_init__(self) -> None:
        for name in ("peak_weight", "peak_position", "min_weight"):
            if not math.isfinite(getattr(self, name)):
                raise CompalignError(f"kernel {name} must be a finite number, got {getattr(self, name)}")
        if math.isnan(self.falloff) or self.falloff < 0:
            raise CompalignError(f"kernel falloff must be >= 0, got {self.falloff}")

    @staticmethod
    def flat(weight: float = 1.0) -> Kernel:
        """The same weight on every layer (weight 1: the full ablation of the abliterate flow)."""
        return Kernel(peak_weight=weight, peak_position=0.0, min_weight=weight, falloff=math.inf)

    @staticmethod
    def off() -> Kernel:
        """No ablation on any layer."""
        return Kernel.flat(0.0)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def kernel_weights(kernel: Kernel, n_layers: int) -> torch.Tensor:
    """(n_layers,) float32 weights, one per decoder layer."""
    if n_layers <= 0:
        raise CompalignError(f"a kernel needs at least one layer, got n_layers={n_layers}")
    layers = torch.arange(n_layers, dtype=torch.float64)
    distance = (layers - kernel.peak_position).abs()
    if kernel.falloff == 0:
        weights = torch.where(distance == 0, kernel.peak_weight, 0.0).double()
    else:  # an infinite fall-off divides to 0: the peak weight on every layer
        ramp = kernel.peak_weight + (distance / kernel.falloff) * (kernel.min_weight - kernel.peak_weight)
        weights = torch.where(distance <= kernel.falloff, ramp, torch.zeros_like(ramp))
    return weights.float()


def first_active_layer(*weights: torch.Tensor) -> int | None:
    """Index of the first layer where any of the (layers,) weight tensors is non-zero; None if none is."""
    active = torch.zeros_like(weights[0], dtype=torch.bool)
    for w in weights:
        active |= w != 0
    hits = torch.nonzero(active).flatten()
    return int(hits[0]) if hits.numel() else None


def peak_position_at(fraction: float, n_layers: int) -> float:
    """A peak position given as a fraction of the last layer index, in layers."""
    return float(fraction) * max(n_layers - 1, 0)


def falloff_layers(fraction: float, n_layers: int) -> float:
    """A fall-off distance given as a fraction of the layer count, in layers."""
    return float(fraction) * n_layers
