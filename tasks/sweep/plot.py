"""The plot of a sweep's trials and Pareto front (pareto_front.png in the sweep's MLflow run)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from tasks.sweep.config import PickConfig  # noqa: E402
from tasks.sweep.trials import TrialScore  # noqa: E402


def pareto_plot(
    table: pd.DataFrame, path: Path, cfg: PickConfig, clean: TrialScore | None = None, title: str = ""
) -> Path:
    """Behaviour rate (x) against KL (y, log scale) of every trial, coloured by source layer; the front
    as a red staircase, the picked trial as a star, the rule's limit as a dashed line."""
    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    floor = 1e-5
    kl = table["kl"].clip(lower=floor)
    points = ax.scatter(table["behaviour_rate"], kl, c=table["layer"], cmap="viridis", s=28, alpha=0.85)
    fig.colorbar(points, ax=ax, label="source layer")
    front = table[table["pareto"]].sort_values(["behaviour_rate", "kl"])
    ax.step(
        front["behaviour_rate"],
        front["kl"].clip(lower=floor),
        where="post",
        color="red",
        lw=1.2,
        label="Pareto front",
    )
    chosen = table[table["picked"]]
    if not chosen.empty:
        ax.scatter(chosen["behaviour_rate"], chosen["kl"].clip(lower=floor), marker="*", s=260, c="red",
                   edgecolors="black", zorder=5, label=f"picked (trial {int(chosen['number'].iloc[0])})")  # fmt: skip
    if cfg.rule == "lowest_kl":
        ax.axvline(cfg.max_rate, ls="--", c="gray", lw=1, label=f"max_rate {cfg.max_rate:g}")
    else:
        ax.axhline(max(cfg.max_kl, floor), ls="--", c="gray", lw=1, label=f"max_kl {cfg.max_kl:g}")
    if clean is not None:
        ax.axvline(
            clean.behaviour_rate, ls=":", c="black", lw=1, label=f"unedited rate {clean.behaviour_rate:.2f}"
        )
    ax.set_yscale("log")
    ax.set_xlabel("behaviour rate on target validation prompts (first token; lower = behaviour removed)")
    ax.set_ylabel("first-token KL on baseline prompts (lower = less damage)")
    ax.set_title(title or f"{len(table)} trials, {int(table['pareto'].sum())} on the front", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
