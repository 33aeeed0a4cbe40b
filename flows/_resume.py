"""Continuing an interrupted sweep (``resume=<run id>``): its nested trial runs are its journal.

Each trial's nested run is written whole (params, scores, FINISHED) as the trial finishes, in the run's own
MLflow store, local or on a server, so a sweep stopped at any point (Ctrl-C, a killed driver, a lost node)
keeps every finished trial. The resumed sweep asks the same trials in the same order (the search is
seeded and told in trial order, tasks/sweep/search.py) and takes the finished ones from here."""

from __future__ import annotations

import logging

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from flows import _tracking as tracking
from tasks.core.config import MlflowConfig
from tasks.core.errors import CompalignError
from tasks.core.redact import redact_tree

log = logging.getLogger("compalign.sweep")

# What may differ between the interrupted run and its resumption: the resume key itself, and where and
# under which name the run is tracked (the same store, reached another way).
MAY_DIFFER = ("resume", "mlflow.tracking_uri", "mlflow.run_name")


def journal(
    cfg: MlflowConfig, run_id: str, raw: DictConfig, fingerprints: dict[str, str], identity: str
) -> dict[int, tuple[dict[str, str], dict[str, float], str]]:
    """The finished trials of sweep ``run_id``: trial number -> (params as logged, metrics, nested run id),
    once the run is checked to be a sweep of this very config, data and model that is not running now."""
    tracking.configure(cfg)
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise CompalignError(f"resume={run_id}: no such run in {cfg.tracking_uri} ({exc.message})") from exc
    if run.data.tags.get("flow") != "sweep":
        raise CompalignError(f"resume={run_id}: that run is not a sweep (flow {run.data.tags.get('flow')!r})")
    if run.info.status == "FINISHED":
        raise CompalignError(f"resume={run_id}: that sweep finished; there is nothing to resume")
    if run.info.status == "RUNNING" and tracking.driver_alive(run):
        raise CompalignError(
            f"resume={run_id}: that sweep is still running (pid {run.data.tags['driver.pid']} on this machine)"
        )
    if run.info.status == "RUNNING":
        log.warning(
            "resume: run %s is RUNNING; its driver on %s is taken to be gone",
            run_id,
            run.data.tags.get("driver.host"),
        )
    changed = _differences(run.data.params, raw, fingerprints)
    if run.data.tags.get("model_identity") != identity:
        changed.append(f"the model's weights ({run.data.tags.get('model_identity')} -> {identity})")
    if changed:
        raise CompalignError(
            f"resume={run_id}: this sweep differs from that one in {'; '.join(changed)}; resume it with the "
            "command that started it (plus resume=...)"
        )
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'FINISHED'"
    )
    finished = {}
    for child in children:
        if "trial" in child.data.tags:
            finished[int(child.data.tags["trial"])] = (
                child.data.params,
                child.data.metrics,
                child.info.run_id,
            )
    return finished


def _differences(logged: dict[str, str], raw: DictConfig, fingerprints: dict[str, str]) -> list[str]:
    """Keys whose value now differs from the one logged (as ``tracking.log_config`` logs them)."""
    current: dict[str, str] = {}
    tracking.flatten("", redact_tree(OmegaConf.to_container(raw, resolve=True)), current)
    current |= {f"fingerprint.{k}": v for k, v in fingerprints.items()}
    return [
        f"{key} ({logged[key]} -> {value})"
        for key, value in sorted(current.items())
        if key in logged and logged[key] != value and not key.startswith(MAY_DIFFER)
    ]
