"""Plots saved as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def score_heatmaps(table: pd.DataFrame, path: Path, chosen: tuple[int, int] | None = None) -> Path:
    """Bypass, induce and KL over source layer (x) and position (y), one panel each; the chosen candidate
    is marked. ``table`` has columns layer, position, bypass, induce, kl."""
    layers = sorted(table["layer"].unique())
    positions = sorted(table["position"].unique())
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.32 * len(layers) + 2), 7.5), constrained_layout=True)
    for ax, metric, cmap, label in (
        (axes[0], "bypass", "viridis", "bypass: target log-odds, ablated (lower = stronger)"),
        (axes[1], "induce", "magma", "induce: baseline log-odds, added (higher = stronger)"),
        (axes[2], "kl", "cividis", "KL on baseline, ablated (lower = gentler)"),
    ):
        grid = np.full((len(positions), len(layers)), np.nan)
        for row in table.itertuples():
            grid[positions.index(row.position), layers.index(row.layer)] = getattr(row, metric)
        image = ax.imshow(grid, aspect="auto", cmap=cmap, origin="lower")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_yticks(range(len(positions)), [str(p) for p in positions], fontsize=7)
        ax.set_ylabel("position")
        ax.set_title(label, fontsize=9)
        fig.colorbar(image, ax=ax)
        if chosen is not None and chosen[0] in layers and chosen[1] in positions:
            ax.scatter([layers.index(chosen[0])], [positions.index(chosen[1])], marker="*", s=160, c="red")
    axes[2].set_xlabel("source layer")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
