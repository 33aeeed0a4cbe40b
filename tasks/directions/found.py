"""The direction an edit removes, with where it came from: found by search, given as a file, or refined."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from tasks.directions.candidates import LayerWeights


@dataclass
class Found:
    """The direction to remove and where it came from."""

    direction: torch.Tensor
    """(hidden,) unit vector."""
    layer: int | float | None
    """Source layer (fractional for a sweep's blended direction)."""
    position: int | None
    n_positions: int | None = None
    table: pd.DataFrame | None = None
    """The ranked candidate table (when searched)."""
    source: str = "search"
    weights: LayerWeights | None = None
    """Per-layer weights of the removal (a sweep's kernels); None removes it fully everywhere."""
    refined_steps: int = 0
    """Gradient steps the direction was refined by after it was found (0: as found)."""

    @staticmethod
    def from_file(
        direction: torch.Tensor, metadata: dict[str, str], weights: LayerWeights | None = None
    ) -> Found:
        def number(key: str) -> int | float | None:
            try:
                value = float(metadata.get(key, ""))
            except ValueError:
                return None
            return int(value) if value.is_integer() else value

        layer, position = number("layer"), number("position")
        return Found(
            direction, layer, None if position is None else int(position), source="file", weights=weights
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """What is saved beside the checkpoint and in MLflow: the direction (and the kernel weights)."""
        out = {"direction": self.direction.contiguous()}
        if self.weights is not None:
            out.update(attn_weights=self.weights.attn.contiguous(), mlp_weights=self.weights.mlp.contiguous())
        return out

    def metadata(self) -> dict[str, str]:
        meta = {"layer": str(self.layer), "position": str(self.position), "source": self.source}
        if self.refined_steps:
            meta["refined_steps"] = str(self.refined_steps)
        if self.weights is not None:
            meta["embed_weight"] = str(self.weights.embed)
        return meta
