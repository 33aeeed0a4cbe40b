"""Choosing one candidate from the scored table."""

from __future__ import annotations

import math

import pandas as pd

from tasks.core.errors import CompalignError
from tasks.directions.config import SelectConfig
from tasks.directions.score import CandidateScore


def _reasons(row, n_layers: int, cfg: SelectConfig, clean_baseline: float, slack: float = 1.0) -> list[str]:
    """Why a scored candidate fails the filters (empty: it passes). ``slack`` > 1 loosens KL and induce."""
    why = []
    if row.layer >= cfg.layer_cutoff * n_layers:
        why.append(f"layer >= {cfg.layer_cutoff} * {n_layers}")
    if cfg.layer is not None and row.layer != cfg.layer:
        why.append(f"layer != {cfg.layer}")
    if cfg.position is not None and row.position != cfg.position:
        why.append(f"position != {cfg.position}")
    if not math.isfinite(row.kl) or row.kl > cfg.kl_limit * slack:
        why.append(f"kl > {cfg.kl_limit}")
    if not math.isfinite(row.induce) or row.induce - clean_baseline < cfg.induce_min_gain / slack:
        why.append(f"induce gain < {cfg.induce_min_gain}")
    if not math.isfinite(row.bypass):
        why.append("bypass not finite")
    return why


def pick_finalists(
    screened: list[CandidateScore], n_layers: int, cfg: SelectConfig, clean_baseline: float, count: int
) -> list[int]:
    """Indices of the ``count`` screened candidates worth scoring in full: those passing loosened filters
    (twice the KL limit, half the induce gain; screening scores are noisier) first, lowest bypass first."""

    def key(i: int):
        s = screened[i]
        return (bool(_reasons(s, n_layers, cfg, clean_baseline, slack=2.0)), s.bypass)

    return sorted(sorted(range(len(screened)), key=key)[:count])


def rank_candidates(
    scores: list[CandidateScore],
    n_layers: int,
    cfg: SelectConfig,
    clean_baseline: float,
    screened: list[CandidateScore] = (),
) -> pd.DataFrame:
    """The whole table, ranked: candidates that pass every filter first (lowest bypass first), then the
    rest, then those only screened. Columns: layer, position, bypass, induce, induce_gain, kl, stage,
    passed, reason, rank. ``clean_baseline`` is the unedited baseline log-odds (for induce_gain);
    ``n_layers`` the decoder layer count (source layers run 0..n_layers)."""
    rows = []
    for stage, group in (("full", scores), ("screen", screened)):
        for s in group:
            reason = (
                "; ".join(_reasons(s, n_layers, cfg, clean_baseline)) if stage == "full" else "screened out"
            )
            rows.append(
                {**s.as_row(), "induce_gain": s.induce - clean_baseline, "stage": stage, "reason": reason}
            )
    table = pd.DataFrame(rows)
    table["passed"] = table["reason"] == ""
    table["full"] = table["stage"] == "full"
    table = table.sort_values(
        ["passed", "full", "bypass", "kl"], ascending=[False, False, True, True], kind="stable"
    )
    table = table.drop(columns="full")
    table["rank"] = range(1, len(table) + 1)
    return table.reset_index(drop=True)


def choose(table: pd.DataFrame, cfg: SelectConfig) -> tuple[int, int]:
    """(layer, position) of the best passing candidate; a clear error when none passes."""
    passed = table[table["passed"]]
    if passed.empty:
        closest = table[table["stage"] == "full"].sort_values("kl").head(3)
        closest = closest[["layer", "position", "bypass", "induce_gain", "kl"]]
        raise CompalignError(
            "no candidate passed the selection filters "
            f"(select.kl_limit={cfg.kl_limit}, select.induce_min_gain={cfg.induce_min_gain}, "
            f"select.layer_cutoff={cfg.layer_cutoff}); lowest-KL candidates:\n{closest.to_string(index=False)}\n"
            "relax the limits, try direction.projected=true, or choose select.layer / select.position"
        )
    best = passed.iloc[0]
    return int(best["layer"]), int(best["position"])
