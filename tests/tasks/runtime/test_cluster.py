"""Cluster behaviour of tasks.runtime (pool and cluster) on local Ray: ray.pack_on_one_node places the WorkerPool's actors in
one STRICT_PACK placement group; the environment forwarded to workers never carries a secret."""

from __future__ import annotations

import json
import time

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
