"""MLflow settings for shared tracking: mlflow.artifact_location (a new experiment in a local store keeps its
artifacts directly in S3) and the tracking URI taken from MLFLOW_TRACKING_URI, as the cluster configs set it."""

from __future__ import annotations

import logging

import mlflow
from mlflow.tracking import MlflowClient

from flows import _tracking as tracking
from flows._common import to_config
from tasks.core.config import MlflowConfig
from tasks.directions.config import AbliterateConfig
from tests.conftest import compose


def test_new_experiment_artifacts_go_to_s3(s3, tmp_path, caplog):
    location = s3.url("mlruns-direct")
    cfg = MlflowConfig(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="direct-s3", artifact_location=location
    )
    with tracking.run(cfg, "artifact-location") as active:
        mlflow.log_text("hello from a run", "notes/hello.txt")
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name("direct-s3")
    assert experiment.artifact_location == location
    key = f"mlruns-direct/{active.info.run_id}/artifacts/notes/hello.txt"
    assert s3.filesystem().cat(f"{s3.bucket}/{key}") == b"hello from a run"

    # The experiment exists now: another location is not applied, and the run says so.
    moved = MlflowConfig(tracking_uri=cfg.tracking_uri, experiment="direct-s3", artifact_location=s3.url("x"))
    with caplog.at_level(logging.WARNING, "compalign"), tracking.run(moved, "again"):
        pass
    assert "only applies to new experiments" in caplog.text
    assert client.get_experiment_by_name("direct-s3").artifact_location == location


def test_tracking_uri_follows_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert to_config(compose("abliterate", []), AbliterateConfig).mlflow.tracking_uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lab:5000")
    assert (
        to_config(compose("abliterate", []), AbliterateConfig).mlflow.tracking_uri == "http://mlflow.lab:5000"
    )
    explicit = compose("abliterate", ["mlflow.tracking_uri=sqlite:///here.db"])
    assert to_config(explicit, AbliterateConfig).mlflow.tracking_uri == "sqlite:///here.db"
