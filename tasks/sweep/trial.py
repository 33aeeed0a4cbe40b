"""A sweep trial: what it varies, and the reversible edit it makes on one model.

A trial takes the difference-of-means direction of a (fractional) source layer and a token position and
either ablates it from the residual writers with a per-layer kernel (``ablate``), adds ``scale`` times
the difference of means to the residual entering the source layer (``add``; a negative scale removes),
or both (``ablate_add``). The edit is a set of forward hooks (``tasks.core.hooks.intervene``), so a worker
keeps one loaded model and applies each trial's edit only for the duration of its evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tasks.core.errors import CompalignError
from tasks.core.hooks import Ablation, Addition, intervene
from tasks.core.model import input_device
from tasks.directions.candidates import Candidates, interpolate_layer
from tasks.sweep.kernels import Kernel, first_active_layer, kernel_weights

CANDIDATES = "sweep.candidates"
"""Where a sweep worker keeps the candidate directions its trials are built from."""

INTERVENTIONS = ("ablate", "add", "ablate_add")


@dataclass(frozen=True)
class Trial:
    """One point of a sweep."""

    number: int
    layer: float
    """Source layer of the direction, 0..n_layers (0: embedding output); a fraction blends the two
    neighbouring layers' directions (and norms)."""
    position: int
    """Token position of the direction, negative from the end of the prompt (-1: last token)."""
    intervention: str = "ablate"
    """ablate, add or ablate_add."""
    scale: float = 1.0
    """add / ablate_add: multiple of the difference-of-means norm added along the direction entering
    layer round(layer); negative values push away from the behaviour."""
    attn: Kernel = field(default_factory=Kernel.flat)
    """ablate / ablate_add: weights of the removal from each layer's attention output."""
    mlp: Kernel = field(default_factory=Kernel.flat)
    """ablate / ablate_add: weights of the removal from each layer's MLP output."""
    embed_weight: float = 0.0
    """ablate / ablate_add: weight of the removal from the token embeddings."""

    def __post_init__(self) -> None:
        if self.intervention not in INTERVENTIONS:
            raise CompalignError(
                f"trial intervention must be one of {', '.join(INTERVENTIONS)}, got {self.intervention!r}"
            )
        if self.position >= 0:
            raise CompalignError(
                f"trial position counts from the end and must be negative, got {self.position}"
            )
        if not math.isfinite(self.layer) or not math.isfinite(self.scale):
            raise CompalignError(f"trial layer and scale must be finite, got {self.layer} and {self.scale}")

    @property
    def ablates(self) -> bool:
        return self.intervention in ("ablate", "ablate_add")

    @property
    def adds(self) -> bool:
        return self.intervention in ("add", "ablate_add")

    def params(self) -> dict[str, float | int | str]:
        """Flat parameters (MLflow params, table columns); ``from_params`` inverts it."""
        out: dict[str, float | int | str] = {
            "layer": self.layer,
            "position": self.position,
            "intervention": self.intervention,
            "scale": self.scale,
            "embed_weight": self.embed_weight,
        }
        for name, kernel in (("attn", self.attn), ("mlp", self.mlp)):
            out.update({f"{name}.{k}": v for k, v in kernel.as_dict().items()})
        return out

    @staticmethod
    def from_params(number: int, params: dict) -> Trial:
        def kernel(name: str) -> Kernel:
            return Kernel(**{k: float(params[f"{name}.{k}"]) for k in Kernel().as_dict()})

        return Trial(
            number=number,
            layer=float(params["layer"]),
            position=int(params["position"]),
            intervention=str(params["intervention"]),
            scale=float(params["scale"]),
            attn=kernel("attn"),
            mlp=kernel("mlp"),
            embed_weight=float(params["embed_weight"]),
        )


@dataclass
class TrialEdit:
    """A trial made concrete for one model: hooks to install and where their effect starts."""

    direction: torch.Tensor
    """(hidden,) unit direction (zero if the means coincide there)."""
    ablation: Ablation | None
    addition: Addition | None
    start_layer: int | None
    """First decoder layer whose input the edit changes (n_layers: only the final norm's); None when the
    edit changes nothing."""


def interpolate_norm(candidates: Candidates, layer: float, position: int) -> float:
    """Difference-of-means norm at a fractional source layer (linear between the neighbours)."""
    low = int(math.floor(layer))
    high = min(low + 1, candidates.n_layers - 1)
    idx = candidates.position_index(position)
    frac = layer - low
    return float((1 - frac) * candidates.norms[low, idx] + frac * candidates.norms[high, idx])


def build_edit(trial: Trial, candidates: Candidates) -> TrialEdit:
    """The hooks of ``trial`` for a model with ``candidates.n_layers - 1`` decoder layers."""
    n_layers = candidates.n_layers - 1
    direction = interpolate_layer(candidates, trial.layer, trial.position)
    starts: list[int] = []
    ablation = addition = None
    if trial.ablates:
        attn_w, mlp_w = kernel_weights(trial.attn, n_layers), kernel_weights(trial.mlp, n_layers)
        first = first_active_layer(attn_w, mlp_w)
        if trial.embed_weight != 0:
            first = 0
        if first is not None:
            ablation = Ablation(
                direction, attn_weights=attn_w, mlp_weights=mlp_w, embed_weight=trial.embed_weight
            )
            starts.append(first)
    if trial.adds and trial.scale != 0:
        at = min(max(int(math.floor(trial.layer + 0.5)), 0), n_layers)
        norm = interpolate_norm(candidates, trial.layer, trial.position)
        addition = Addition(vector=direction * norm * trial.scale, layer=at)
        starts.append(at)
    if not direction.abs().sum() > 0:
        ablation = addition = None
        starts = []
    return TrialEdit(direction, ablation, addition, min(starts) if starts else None)


@contextmanager
def applied(model: nn.Module, edit: TrialEdit | None) -> Iterator[None]:
    """The edit's hooks on ``model`` inside the block (nothing for None); removed on exit."""
    if edit is None:
        yield
        return
    with intervene(
        model, ablation=_on_device(edit.ablation, model), addition=_on_device(edit.addition, model)
    ):
        yield


def _on_device(item, model: nn.Module):
    if item is None:
        return None
    device = input_device(model)
    if isinstance(item, Ablation):
        return Ablation(item.direction.to(device), item.attn_weights, item.mlp_weights, item.embed_weight)
    return Addition(item.vector.to(device), item.layer)
