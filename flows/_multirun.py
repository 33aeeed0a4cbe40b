"""Hydra multirun (``python -m flows.finetune -m ...``) tracking: one parent MLflow run per sweep
directory, under which each job's run is nested, and one local Ray that the jobs share.

Not to be confused with ``flows.sweep``, the search over edits: this is Hydra's fan-out of whole flow
runs over config values. ``MultirunTracking`` is named under hydra.callbacks in conf/finetune.yaml; a
job reads what it set up with ``parent_run`` and ``job_ray_config``.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flows import _tracking as tracking
from tasks.core.config import MlflowConfig, RayConfig
from tasks.core.redact import redact
from tasks.runtime import cluster

PARENT_RUN_ENV = "COMPALIGN_MLFLOW_PARENT_RUN"
SWEEP_RAY_ENV = "COMPALIGN_SWEEP_RAY_ADDRESS"


def parent_run() -> str | None:
    """The multirun's parent MLflow run id, inside one of its jobs (None outside a multirun)."""
    return os.environ.get(PARENT_RUN_ENV)


def job_ray_config(cfg: RayConfig) -> RayConfig:
    """Jobs of a multirun join the Ray the multirun started instead of starting one each."""
    address = os.environ.get(SWEEP_RAY_ENV)
    if cfg.address is None and address:
        return RayConfig(
            address=address, log_to_driver=cfg.log_to_driver, pack_on_one_node=cfg.pack_on_one_node
        )
    return cfg


class MultirunTracking(Callback):
    """Hydra callback: the parent run and the shared Ray, from the multirun's start to its end."""

    def __init__(self) -> None:
        self.parent: str | None = None
        self.started_ray = False

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        mlflow_cfg = MlflowConfig(**OmegaConf.to_container(config.mlflow, resolve=True))
        tracking.configure(mlflow_cfg)
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        experiment = mlflow.get_experiment_by_name(mlflow_cfg.experiment)
        run = mlflow.MlflowClient().create_run(
            experiment.experiment_id,
            run_name=f"finetune-sweep-{Path(sweep_dir).name}",
            tags={
                "flow": "finetune",
                "sweep_dir": sweep_dir,
                "sweep": redact(" ".join(config.hydra.overrides.task)),
            },
        )
        self.parent = run.info.run_id
        os.environ[PARENT_RUN_ENV] = self.parent
        if config.ray.address is None and not cluster.is_running():
            cluster.init_ray(RayConfig(num_cpus=config.ray.num_cpus, log_to_driver=config.ray.log_to_driver))
            os.environ[SWEEP_RAY_ENV] = cluster.address()
            self.started_ray = True

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.parent:
            mlflow.MlflowClient().set_terminated(self.parent)
            os.environ.pop(PARENT_RUN_ENV, None)
        if self.started_ray:
            os.environ.pop(SWEEP_RAY_ENV, None)
            cluster.shutdown()
