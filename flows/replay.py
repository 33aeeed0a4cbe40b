"""Replay: re-run a logged abliterate or sweep run from its logged config and report whether its metrics
match the original's.

    python -m flows.replay run_id=<id>
    python -m flows.replay run_id=<id> mlflow.tracking_uri=http://mlflow:5000 'overrides=[cache.uri=null]'

Steps: fetch the run (its flow tag and config.yaml artifact) -> rebuild the typed config (plus any
overrides) -> run the flow again (a new MLflow run in the same experiment, tagged replay_of=<id>) ->
compare every metric of the run and of its nested runs (the sweep's trials), within rtol/atol, except
those matching ``ignore`` (timings, and how much was collected, which a warm activation cache changes).
Exits 1 when a metric differs.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import sys
from dataclasses import dataclass, field

import hydra
import mlflow
from hydra.core.config_store import ConfigStore
from mlflow.exceptions import MlflowException
from omegaconf import MISSING, DictConfig, OmegaConf

from flows._common import run_entry, to_config
from flows.abliterate import abliterate
from flows.sweep import sweep
from tasks.core.config import MlflowConfig
from tasks.core.errors import CompalignError, ConfigError
from tasks.core.redact import MASK
from tasks.directions.config import AbliterateConfig
from tasks.sweep.config import SweepConfig

log = logging.getLogger("compalign.replay")

FLOWS = {"abliterate": (AbliterateConfig, abliterate), "sweep": (SweepConfig, sweep)}


@dataclass
class ReplayConfig:
    run_id: str = MISSING
    """MLflow run id of the abliterate or sweep run to replay."""
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    """Where the run is tracked (tracking_uri); the replay is logged there too, in the run's experiment."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides of the logged config (e.g. cache.uri=null to collect again, ray.address=auto)."""
    rtol: float = 1e-6
    """Relative tolerance of a metric match (CPU runs reproduce bitwise; GPUs may differ in the last bits)."""
    atol: float = 1e-9
    """Absolute tolerance of a metric match."""
    ignore: list[str] = field(default_factory=lambda: ["time.*", "collect.prompts_collected"])
    """Metric name patterns (fnmatch) left out of the comparison."""

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ConfigError("run_id must name the MLflow run to replay: python -m flows.replay run_id=<id>")
        if self.rtol < 0 or self.atol < 0:
            raise ConfigError(f"rtol and atol must be >= 0, got {self.rtol} and {self.atol}")


ConfigStore.instance().store(name="replay_schema", node=ReplayConfig)


@dataclass
class ReplayResult:
    """The verdict of a replay: whether every logged metric came out the same."""

    match: bool
    rows: list[dict]
    """One per metric: metric, original, replay, match."""
    run_id: str
    """The new run."""
    original: str
    flow: str
    result: object
    """The replayed flow's own result (``AbliterateResult`` or ``SweepResult``)."""


def replay(cfg: ReplayConfig, raw: DictConfig) -> ReplayResult:
    # 1. Fetch the logged run: which flow made it, its config, its metrics and its nested runs' metrics.
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    try:
        original = client.get_run(cfg.run_id)
    except MlflowException as exc:
        raise CompalignError(f"no run {cfg.run_id!r} in {cfg.mlflow.tracking_uri}: {exc.message}") from exc
    flow = original.data.tags.get("flow")
    if flow not in FLOWS:
        raise CompalignError(f"run {cfg.run_id} has flow tag {flow!r}; replay knows {', '.join(FLOWS)}")
    try:
        logged = mlflow.artifacts.load_text(f"{original.info.artifact_uri}/config.yaml")
    except (MlflowException, OSError) as exc:
        raise CompalignError(f"run {cfg.run_id} has no config.yaml artifact to replay from: {exc}") from exc

    # 2. The typed config of the original run, with the overrides and this store's tracking URI.
    schema, body = FLOWS[flow]
    flow_raw = OmegaConf.merge(
        OmegaConf.structured(schema),
        OmegaConf.create(logged),
        OmegaConf.from_dotlist(list(cfg.overrides)),
        {"mlflow": {"tracking_uri": cfg.mlflow.tracking_uri, "run_name": f"replay-{cfg.run_id[:8]}"}},
        {"resume": None} if flow == "sweep" else {},  # a replay runs every trial again, in a new run
    )
    masked = masked_keys(OmegaConf.to_container(flow_raw))
    if masked:
        raise CompalignError(
            f"run {cfg.run_id} was logged with secrets masked at {', '.join(masked)}; give them again: "
            f"'overrides=[{masked[0]}=...]'"
        )
    flow_cfg = to_config(flow_raw, schema)

    # 3. Run the flow again.
    log.info(
        "replaying %s run %s (git %s)", flow, cfg.run_id, original.data.tags.get("git_commit", "unknown")
    )
    result = body(flow_cfg, flow_raw)
    new_id = result.run_id

    # 4. Compare the metrics of the run and of its nested runs, and record the verdict on the new run.
    rows = compare_metrics(
        _all_metrics(client, original),
        _all_metrics(client, client.get_run(new_id)),
        cfg.rtol,
        cfg.atol,
        cfg.ignore,
    )
    match = all(r["match"] for r in rows)
    client.set_tag(new_id, "replay_of", cfg.run_id)
    client.set_tag(new_id, "replay_match", str(match).lower())
    client.log_dict(new_id, {"replay_of": cfg.run_id, "match": match, "metrics": rows}, "replay.json")
    for line in report_lines(cfg.run_id, new_id, rows):
        log.info("%s", line)
    return ReplayResult(match, rows, new_id, cfg.run_id, flow, result)


def masked_keys(node, prefix: str = "") -> list[str]:
    """The dotted keys of a config tree whose values were masked by ``redact`` when it was logged."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in masked_keys(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in masked_keys(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if isinstance(node, str) and MASK in node else []


def _all_metrics(client: mlflow.MlflowClient, run) -> dict[str, float]:
    """The run's metrics, plus each nested run's as '<run name>/<metric>'."""
    metrics = dict(run.data.metrics)
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
        max_results=50000,
    )
    for child in children:
        name = child.data.tags.get("mlflow.runName", child.info.run_id)
        metrics.update({f"{name}/{k}": v for k, v in child.data.metrics.items()})
    return metrics


def compare_metrics(
    original: dict[str, float], replayed: dict[str, float], rtol: float, atol: float, ignore: list[str]
) -> list[dict]:
    """One row per metric name in either run (ignored names left out): original, replay, match."""
    rows = []
    for key in sorted(original.keys() | replayed.keys()):
        if any(fnmatch.fnmatch(key.rsplit("/", 1)[-1], pattern) for pattern in ignore):
            continue
        a, b = original.get(key), replayed.get(key)
        same = (
            a is not None
            and b is not None
            and ((math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=atol))
        )
        rows.append({"metric": key, "original": a, "replay": b, "match": bool(same)})
    return rows


def report_lines(original: str, new: str, rows: list[dict]) -> list[str]:
    bad = [r for r in rows if not r["match"]]
    lines = [
        f"compalign replay: run {original} -> {new}",
        f"  metrics          {len(rows) - len(bad)}/{len(rows)} match",
    ]
    for r in bad[:20]:
        lines.append(f"  differs          {r['metric']}: {r['original']} -> {r['replay']}")
    lines.append(f"  verdict          {'REPRODUCED' if not bad else 'NOT REPRODUCED'}")
    return lines


@hydra.main(config_path="../conf", config_name="replay", version_base=None)
def main(raw: DictConfig) -> ReplayResult:
    result = run_entry(raw, ReplayConfig, replay)
    if isinstance(result, ReplayResult) and not result.match:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
