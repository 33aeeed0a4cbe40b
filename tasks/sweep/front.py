"""The Pareto front of a sweep (behaviour rate against KL, both minimised), the trial the pick rule
chooses and the finalists beside it (its plot: tasks/sweep/plot.py)."""

from __future__ import annotations

import pandas as pd

from tasks.core.errors import CompalignError
from tasks.sweep.config import PickConfig
from tasks.sweep.search import TrialRecord


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
