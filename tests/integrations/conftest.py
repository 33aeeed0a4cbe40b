"""Real servers on loopback for the storage and tracking integrations: an S3 API (moto) and an MLflow
tracking server whose artifacts live in that S3. Nothing here reaches beyond 127.0.0.1."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "compalign-test"
# Fake keys for moto. The secret is distinctive so tests can assert it never shows up in a log or a run.
ACCESS_KEY = "AKIDCOMPALIGNTEST"
SECRET_KEY = "compalign-secret-canary-5b1f"
REGION = "us-east-1"
# Variables that could point boto at a real account or endpoint; removed for the session.
AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class S3:
    endpoint: str
    bucket: str

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def filesystem(self):
        """A fresh s3fs client (no listing cache) for reading back what the code under test wrote."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint, skip_instance_cache=True, use_listings_cache=False
        )


@pytest.fixture(scope="session")
def s3() -> S3:
    """moto's S3 server on a free 127.0.0.1 port, fake credentials and its endpoint in the environment
    (restored afterwards), and an empty bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in AWS_VARIABLES:
                patch.delenv(name, raising=False)
            patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            patch.setenv("AWS_DEFAULT_REGION", REGION)
            patch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
            # Without a config file botocore would still probe the instance metadata service on misses.
            patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield S3(endpoint, BUCKET)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_ray(s3):
    """The session's local Ray, started (or restarted) with the S3 environment, as on a cluster node
    whose processes all see the node's credentials. A Ray started earlier in the session has workers
    without them; restarting costs a few seconds once."""
    import ray

    if ray.is_initialized() and os.environ.get("AWS_ENDPOINT_URL_S3") != _ray_env(ray):
        ray.shutdown()
    if not ray.is_initialized():
        from tasks.core.config import RayConfig
        from tasks.runtime.cluster import init_ray

        init_ray(RayConfig(num_cpus=4, log_to_driver=False))  # as the flows start it
    return ray


def _ray_env(ray) -> str | None:
    @ray.remote(num_cpus=0)
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL_S3")

    return ray.get(endpoint.remote())


@dataclass
class MlflowServer:
    url: str
    artifacts: str
    """S3 URL where the server stores artifacts."""
    process: subprocess.Popen
    log: Path


@pytest.fixture(scope="session")
def mlflow_server_started(s3, tmp_path_factory):
    """`mlflow server` on a free 127.0.0.1 port, started but not yet answering (it takes seconds to come
    up, so fixtures set up meanwhile overlap with it): SQLite backend store, artifacts proxied to the
    moto bucket (clients upload and download through the server and need no S3 access themselves)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    artifacts = s3.url("mlartifacts")
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", artifacts,
        "--serve-artifacts",
    ]  # fmt: skip
    log = root / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    yield MlflowServer(f"http://127.0.0.1:{port}", artifacts, process, log)
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_started) -> MlflowServer:
    """The MLflow server of ``mlflow_server_started``, once it answers."""
    server = mlflow_server_started
    try:
        wait_for_http(f"{server.url}/health", timeout=90, process=server.process)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}\n{server.log.read_text(errors='replace')[-3000:]}") from None
    return server
