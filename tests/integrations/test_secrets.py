"""Planted credentials never leave the process: the real command line, tracked on an `mlflow server` on
loopback through a URI with user info, and given a credentialed storage endpoint. Neither secret appears
in the run's params, tags, metrics or any of its artifacts, in its console output or in its log file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import REPO, tiny_flow_overrides

SECRETS = ("planted-secret-one", "planted-secret-two")


def test_planted_secrets_reach_no_run_field_artifact_or_log(tiny_dirs, mlflow_server, tmp_path):
    host = mlflow_server.url.removeprefix("http://")
    overrides = [
        o
        for o in tiny_flow_overrides(tiny_dirs["llama"], tmp_path)
        if not o.startswith("mlflow.tracking_uri")
    ]
    overrides += [
        f"mlflow.tracking_uri=http://planted-user:{SECRETS[0]}@{host}",  # the server ignores the basic auth
        f"storage.s3_endpoint_url=http://minio:{SECRETS[1]}@127.0.0.1:9",  # not used: every path is local
        "mlflow.experiment=secrets",
        "mlflow.checkpoint=artifact",  # the checkpoint's files are searched too
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.abliterate", *overrides],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    run_id = re.search(r"MLflow run\s+([0-9a-f]{32})", output)[1]

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    fields = json.dumps(
        [run.data.params, run.data.tags, list(run.data.metrics), run.info.to_proto().__str__()]
    )
    assert run.data.params["mlflow.tracking_uri"] == f"http://***@{host}"  # logged, masked
    artifacts = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert {"config.yaml", "checkpoint"} <= {p.relative_to(artifacts).parts[0] for p in files}
    logs = list((tmp_path / "outputs").rglob("*.log"))
    assert len(logs) == 1 and "MLflow: open http://***@" in logs[0].read_text()
    searched = {"run fields": fields.encode(), "console": output.encode()}
    searched |= {str(p): p.read_bytes() for p in [*files, *logs]}
    for secret in SECRETS:
        leaks = [where for where, data in searched.items() if secret.encode() in data]
        assert not leaks, f"{secret} found in {leaks}"
