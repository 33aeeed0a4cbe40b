"""Ray itself: start or join a cluster, share objects, and forward the environment workers need.

Only tasks/runtime/ imports ray. The rest of the code hands objects to workers through ``share`` and
reads them back with ``fetch``, and never sees a Ray type.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import ray

from tasks.core.config import RayConfig
from tasks.core.errors import CompalignError

log = logging.getLogger(__name__)

# What a Ray cluster raises when it loses a process or an object beyond what the pool's retries recover:
# an expected failure on a cluster (OOM kills, preempted nodes), reported as one message, not a bug.
LOST_CLUSTER_ERRORS = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OutOfMemoryError,
)

# Environment that workers on a cluster need to see like the driver does (never credentials: those
# come from the nodes' own environment or instance profile).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "COMPALIGN_MODEL_CACHE",
    "HF_HOME",
    "HF_HUB_OFFLINE",
)


def forwarded_env() -> dict[str, str]:
    """The FORWARDED_ENV variables this process has, less those the submitted job's runtime_env already
    sets: its workers get those anyway, and Ray refuses to start a driver that sets a job's variable again
    (`ray job submit --runtime-env-json '{"env_vars": {"AWS_DEFAULT_REGION": ...}}'`)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    from_job = (job.get("runtime_env") or {}).get("env_vars") or {}
    for key in sorted(env.keys() & from_job.keys()):
        if env[key] != from_job[key]:
            log.warning(
                "%s=%s comes from the job's runtime_env; workers use it, not %s", key, from_job[key], env[key]
            )
        del env[key]
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def private_token() -> Path | None:
    """Make sure the local Ray's authentication token exists and only this user can read it (Ray writes
    its own world-readable). Returns its file (None when RAY_AUTH_TOKEN gives the token itself)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def init_ray(cfg: RayConfig) -> None:
    """Start a local Ray (default) or join ``cfg.address``; quiet unless something goes wrong.

    A local Ray gets its dashboard on a port chosen here, and RAY_API_SERVER_ADDRESS names it in the
    environment its processes inherit: Ray Train's placement-group cleaner polls the State API every
    second, and without a dashboard it logs a warning each time; with a second local Ray on the same
    machine, its auto-detected address could even be the other cluster's, where our training controller
    is unknown and so taken for dead (the cleaner then removes our workers' placement group)."""
    if ray.is_initialized():
        return
    env = forwarded_env()
    kwargs = {
        "address": cfg.address,
        "log_to_driver": cfg.log_to_driver,
        "logging_level": logging.WARNING,
        "runtime_env": {"env_vars": env} if env else None,
    }
    if cfg.address is None:
        # Ray's GCS server and raylet listen on every interface even when started for this machine alone
        # (tests/tasks/runtime/test_cluster.py lists them): only a process holding the token may connect.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if os.environ["RAY_AUTH_MODE"] == "token":
            private_token()
            # Ray read its config (auth mode included) when it was imported; re-read it, as ray.init does
            # when it turns token mode on itself.
            from ray._raylet import Config

            Config.initialize("")
        # Ray Train's spot-preemption watcher has nothing to watch on one machine, and its start logs an
        # error-level line (restartable actor with arguments in the object store) into every local run.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs.update(
            num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port
        )
    handler = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise CompalignError(f"cannot reach a Ray cluster at ray.address={cfg.address}: {exc}") from exc
    if callable(handler) and threading.current_thread() is threading.main_thread():
        # ray.init puts its failure handler on SIGTERM, which prints a stack and aborts the driver: give it
        # back to the flow's handler, which ends the run as KILLED (flows/_common.py).
        signal.signal(signal.SIGTERM, handler)


def share(value: Any) -> Any:
    """Put ``value`` in the object store once; workers given the handle ``fetch`` it without a copy per call."""
    return ray.put(value)


def fetch(handle: Any) -> Any:
    """The value behind a ``share`` handle (or a finished remote call)."""
    return ray.get(handle)


def address() -> str:
    """The running Ray's GCS address (for processes that should join it)."""
    return ray.get_runtime_context().gcs_address


def is_running() -> bool:
    return ray.is_initialized()


def shutdown() -> None:
    ray.shutdown()
