"""Compare: the evaluations of two or more MLflow runs (abliterate, sweep, finetune) side by side, but only
when they were made under one evaluation spec.

    python -m flows.compare 'runs=[<run id>,<run id>]'
    python -m flows.compare 'runs=[<run id>,<run id>]' mlflow.tracking_uri=http://mlflow:5000

Steps: read each run's evaluation spec (eval/spec.json: prompt fingerprints, judges and their versions,
generation settings, seeds, library versions) -> refuse, with one message naming every difference, runs
whose specs differ (exit 2) -> a table of their evaluation metrics, one column per run. Nothing is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import hydra
import mlflow
import pandas as pd
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from flows import _tracking as tracking
from flows._common import run_entry
from tasks.core.config import MlflowConfig
from tasks.core.errors import CompalignError, ConfigError
from tasks.evaluation.spec import EvalSpec, require_comparable

log = logging.getLogger("compalign.compare")

# Metric suffixes shown (after "before." / "after." / "test.best." ...), in this order.
SHOWN = (
    "target_rate", "target_rate_low", "target_rate_high", "target_rate_first32", "target_rate_classifier",
    "baseline_rate", "baseline_rate_low", "baseline_rate_high", "baseline_rate_classifier",
    "xstest_rate", "xstest_rate_low", "xstest_rate_high", "xstest_rate_classifier",
    "judges_kappa", "kl", "kl_without_behaviour", "perplexity",
)  # fmt: skip


@dataclass
class CompareConfig:
    runs: list[str] = field(default_factory=list)
    """MLflow run ids to compare (two or more), each of a run that logged an evaluation."""
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    """Where the runs are tracked."""

    def __post_init__(self) -> None:
        if len(self.runs) < 2 or len(set(self.runs)) < len(self.runs):
            raise ConfigError(
                f"runs must name two or more different MLflow runs, got {self.runs}: "
                "python -m flows.compare 'runs=[<run id>,<run id>]'"
            )
        bad = [r for r in self.runs if not tracking.RUN_ID.fullmatch(str(r))]
        if bad:
            raise ConfigError(f"runs must be 32-character MLflow run ids, got {', '.join(map(str, bad))}")


ConfigStore.instance().store(name="compare_schema", node=CompareConfig)


@dataclass
class Comparison:
    spec: EvalSpec
    """The one spec every run was evaluated under."""
    table: pd.DataFrame
    """One row per metric (before.target_rate, after.kl, ...), one column per run id."""


def compare(cfg: CompareConfig, raw: DictConfig) -> Comparison:
    tracking.configure(cfg.mlflow)
    # 1. Every run's evaluation spec; different specs are refused with every difference named.
    specs = {run_id: tracking.read_eval_spec(run_id) for run_id in cfg.runs}
    require_comparable(specs)
    # 2. Their evaluation metrics side by side.
    table = metrics_table({run_id: _metrics(run_id) for run_id in cfg.runs})
    log.info("runs evaluated under spec %s:\n%s", next(iter(specs.values())).digest(), table.to_string())
    return Comparison(spec=next(iter(specs.values())), table=table)


def metrics_table(metrics: dict[str, dict[str, float]]) -> pd.DataFrame:
    """The shown evaluation metrics of each run (rows: metric names any run has, in SHOWN order)."""
    names = sorted(
        {name for m in metrics.values() for name in m if name.rpartition(".")[2] in SHOWN},
        key=lambda n: (n.rpartition(".")[0], SHOWN.index(n.rpartition(".")[2])),
    )
    return pd.DataFrame(
        {run: [m.get(n, float("nan")) for n in names] for run, m in metrics.items()}, index=names
    )


def _metrics(run_id: str) -> dict[str, float]:
    try:
        return dict(mlflow.MlflowClient().get_run(run_id).data.metrics)
    except Exception as exc:  # MLflow raises several types for a missing run
        raise CompalignError(f"cannot read MLflow run {run_id}: {exc}") from exc


@hydra.main(config_path="../conf", config_name="compare", version_base=None)
def main(raw: DictConfig) -> Comparison:
    return run_entry(raw, CompareConfig, compare)


if __name__ == "__main__":
    main()
