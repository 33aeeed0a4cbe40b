"""The Pareto front of a sweep (behaviour rate against KL, both minimised), the trial the pick rule
chooses, the finalists beside it, and the front's plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from tasks.core.errors import CompalignError  # noqa: E402
from tasks.sweep.config import PickConfig  # noqa: E402
from tasks.sweep.search import TrialRecord  # noqa: E402
from tasks.sweep.trials import TrialScore  # noqa: E402


def pareto_mask(points: list[tuple[float, float]]) -> list[bool]:
    """True for points no other point dominates (both objectives minimised; equal points all stay)."""

    def dominates(a, b) -> bool:
        return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])

    return [not any(dominates(q, p) for q in points) for p in points]


def trials_table(records: list[TrialRecord], picked: int | None = None) -> pd.DataFrame:
    """One row per trial: number, parameters, scores, seconds, pareto, picked; front first (by rate, then
    KL), then the rest in trial order."""
    rows = [
        {"number": r.trial.number, **r.trial.params(), **r.score.metrics(), "seconds": r.score.seconds}
        for r in records
    ]
    table = pd.DataFrame(rows)
    table["pareto"] = pareto_mask(list(zip(table["behaviour_rate"], table["kl"], strict=True)))
    table["picked"] = table["number"] == picked
    front = table[table["pareto"]].sort_values(["behaviour_rate", "kl", "number"], kind="stable")
    rest = table[~table["pareto"]].sort_values("number", kind="stable")
    return pd.concat([front, rest]).reset_index(drop=True)


def pick(records: list[TrialRecord], cfg: PickConfig) -> tuple[TrialRecord, bool]:
    """(the trial the rule picks, whether it met the rule's limit)."""
    if not records:
        raise CompalignError("no trial finished; nothing to pick")

    def key_kl(r: TrialRecord):
        return (r.score.kl, r.score.behaviour_rate, r.score.mean_log_odds, r.trial.number)

    def key_rate(r: TrialRecord):
        return (r.score.behaviour_rate, r.score.kl, r.score.mean_log_odds, r.trial.number)

    if cfg.rule == "lowest_kl":
        ok = [r for r in records if r.score.behaviour_rate <= cfg.max_rate]
        return (min(ok, key=key_kl), True) if ok else (min(records, key=key_rate), False)
    ok = [r for r in records if r.score.kl <= cfg.max_kl]
    return (min(ok, key=key_rate), True) if ok else (min(records, key=key_kl), False)


def finalists(records: list[TrialRecord], picked: TrialRecord, count: int) -> list[TrialRecord]:
    """The picked trial, then its neighbours along the front (alternately lower and higher rate)."""
    mask = pareto_mask([(r.score.behaviour_rate, r.score.kl) for r in records])
    front = sorted(
        (r for r, m in zip(records, mask, strict=True) if m),
        key=lambda r: (r.score.behaviour_rate, r.score.kl, r.trial.number),
    )
    if picked not in front:
        front.append(picked)
    at = front.index(picked)
    order = [picked]
    for step in range(1, len(front)):
        for j in (at - step, at + step):
            if 0 <= j < len(front):
                order.append(front[j])
    return order[:count]


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
