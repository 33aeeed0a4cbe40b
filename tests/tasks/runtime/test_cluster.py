"""Cluster behaviour of tasks.runtime (pool and cluster) on local Ray: ray.pack_on_one_node places the WorkerPool's actors in
one STRICT_PACK placement group; the environment forwarded to workers never carries a secret."""

from __future__ import annotations

import json
import time

import pytest
import ray
from ray.util.placement_group import placement_group_table

from tasks.core.concept_config import CollectConfig
from tasks.core.config import ModelOptions, RayConfig
from tasks.directions.collect import ActivationSums, collect_part
from tasks.runtime.cluster import FORWARDED_ENV, forwarded_env
from tasks.runtime.pool import WorkerPool


def _group_cpus_free(pg_hex: str, timeout: float = 10.0) -> float:
    """Free CPUs of the group's bundles, once the resource view has caught up with the actors."""
    deadline = time.monotonic() + timeout
    while True:
        free = ray.available_resources().get(f"CPU_group_{pg_hex}", 0.0)
        if free == 0.0 or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


def test_pack_on_one_node_places_workers_in_one_strict_pack_group(ray_local, tiny_dirs):
    collect = CollectConfig(workers=2, cpus_per_worker=1, batch_size=4)
    pool = WorkerPool(str(tiny_dirs["llama"]), ModelOptions(), collect, RayConfig(pack_on_one_node=True))
    pg = pool._pg
    try:
        table = placement_group_table(pg)
        assert table["strategy"] == "STRICT_PACK"
        assert table["state"] == "CREATED"
        assert [b["CPU"] for b in table["bundles"].values()] == [1.0, 1.0]
        assert len(set(table["bundles_to_node_id"].values())) == 1
        # The workers hold the group's CPUs (not CPUs beside it), and work from inside it.
        assert ray.cluster_resources()[f"CPU_group_{pg.id.hex()}"] == 2.0
        assert _group_cpus_free(pg.id.hex()) == 0.0
        prompts = [f"prompt {i}" for i in range(6)]
        sums = ActivationSums.merge(pool.map(collect_part, prompts, 2, 4, stage="collect", unit="prompts"))
        assert sums.count == 6
    finally:
        pool.shutdown()
    assert placement_group_table(pg)["state"] == "REMOVED"


def test_forwarded_environment_names_no_secret():
    # Workers get credentials from their node (env, instance profile, service account), never from the
    # runtime_env, which Ray stores in its GCS and shows on the dashboard.
    secret_words = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "SESSION")
    assert not [name for name in FORWARDED_ENV if any(word in name for word in secret_words)]
    assert "AWS_ENDPOINT_URL_S3" in FORWARDED_ENV and "AWS_DEFAULT_REGION" in FORWARDED_ENV


def test_forwarded_env_leaves_the_jobs_own_variables_to_the_job(monkeypatch):
    for name in FORWARDED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-forwarded")
    assert forwarded_env() == {"AWS_ENDPOINT_URL_S3": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    # Inside `ray job submit --runtime-env-json '{"env_vars": {"AWS_DEFAULT_REGION": ...}}'`, Ray would refuse
    # a driver that sets the same variable again.
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"AWS_DEFAULT_REGION": "eu-west-1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert forwarded_env() == {"AWS_ENDPOINT_URL_S3": "http://minio:9000"}


@ray.remote(num_cpus=0)
class _StateProbe:
    def alive(self, actor_id: str):
        from ray.train.v2._internal.state.util import is_actor_alive

        return is_actor_alive(actor_id=actor_id, timeout=10)


def test_workers_reach_the_state_api_of_their_own_local_ray(ray_local):
    """Ray Train's placement-group cleaner asks the State API, from a worker, whether the training
    controller is alive: on the local Ray the flows start it must find the right cluster and get an
    answer (else it warns every second, or takes the controller for dead and removes its workers)."""
    probe = _StateProbe.remote()
    try:
        assert ray.get(probe.alive.remote(probe._actor_id.hex())) is True
    finally:
        ray.kill(probe)


def _ray_listening_addresses(ray_module) -> set[str]:
    """Addresses that processes of this session's Ray listen on."""
    import psutil

    session = ray_module._private.worker.global_worker.node.get_session_dir_path()
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if session in cmdline:
            pids.add(proc.info["pid"])
    return {
        c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


def test_local_ray_needs_its_token_since_it_listens_beyond_loopback(ray_local, tmp_path):
    """The local Ray's GCS and raylet listen on every interface (Ray ignores a loopback node address),
    so the flows keep token authentication on: a client without the token cannot join, one with it can,
    and the token file is readable by this user only."""
    import os
    import stat
    import subprocess
    import sys
    from pathlib import Path

    addresses = _ray_listening_addresses(ray_local)
    assert addresses, "found no listening socket of the local Ray"
    if addresses <= {"127.0.0.1", "::1"}:
        pytest.skip(f"this Ray listens on loopback only ({addresses})")
    assert os.environ["RAY_AUTH_MODE"] == "token"
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    gcs = ray_local.get_runtime_context().gcs_address
    join = f"import ray; ray.init(address={gcs!r}); print('joined', ray.cluster_resources()['CPU'])"

    def client(**env: str) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        return subprocess.run(
            [sys.executable, "-c", join], env={**base, **env}, capture_output=True, text=True, timeout=120
        )

    stranger = client(HOME=str(tmp_path), RAY_AUTH_MODE="disabled")
    assert stranger.returncode != 0 and "joined" not in stranger.stdout
    holder = client(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    assert holder.returncode == 0 and "joined" in holder.stdout, holder.stderr[-2000:]
