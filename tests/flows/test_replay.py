"""Plain Hydra multirun of the abliterate flow lands every job in one MLflow experiment; a replay of one
of those runs reproduces its metrics; the metric comparison catches a difference; bad run ids fail
with one message."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows._common import run_entry
from flows.replay import ReplayConfig, compare_metrics, replay
from tests.conftest import REPO, compose

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def multirun(tmp_path_factory, tiny_dirs, ray_local):
    """`python -m flows.abliterate -m select.layer=1,2 ...` on the command line (Hydra's basic launcher runs
    the jobs one after another), joining the session's Ray; returns the working directory."""
    work = tmp_path_factory.mktemp("multirun")
    argv = [
        sys.executable,
        "-m",
        "flows.abliterate",
        "-m",
        f"model={tiny_dirs['llama']}",
        "data=french",
        "data.target.limit=16",
        "data.baseline.limit=16",
        "select.layer=1,2",
        "collect.workers=1",
        "score.screen_prompts=null",
        "select.kl_limit=1e9",
        "select.induce_min_gain=-1e9",
        "select.min_behaviour=0",
        "eval.max_new_tokens=3",
        "eval.perplexity_tokens=64",
        "output.save=false",
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        "mlflow.experiment=multirun-tests",
        f"cache.uri={work}/cache",
        f"hydra.sweep.dir={work}/multirun",
        f"ray.address={ray_local.get_runtime_context().gcs_address}",
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def _runs(work):
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    return MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("multirun-tests").experiment_id],
        order_by=["attributes.start_time ASC"],
    )


def test_multirun_lands_every_job_in_one_experiment(multirun):
    runs = _runs(multirun)
    assert len(runs) == 2
    assert [r.data.params["select.layer"] for r in runs] == ["1", "2"]
    assert [r.data.params["chosen.layer"] for r in runs] == ["1", "2"]
    assert all(r.info.status == "FINISHED" and r.data.tags["flow"] == "abliterate" for r in runs)
    # the second job used the first one's cached activations (same model, prompts, positions, dtype)
    assert [r.data.tags["activation_cache"] for r in runs] == ["miss", "hit"]
    assert (multirun / "multirun" / "0").is_dir() and (multirun / "multirun" / "1").is_dir()


def test_replay_of_an_abliterate_run_reproduces_its_metrics(multirun):
    original = _runs(multirun)[1]
    overrides = [f"run_id={original.info.run_id}", f"mlflow.tracking_uri=sqlite:///{multirun}/mlflow.db"]
    out = run_entry(compose("replay", overrides), ReplayConfig, replay)
    assert out.flow == "abliterate"
    assert out.match, [r for r in out.rows if not r["match"]]
    compared = {r["metric"] for r in out.rows}
    assert {"after.kl", "after.perplexity", "chosen.kl", "before.target_rate"} <= compared
    new = MlflowClient().get_run(out.run_id)
    assert new.data.tags["replay_of"] == original.info.run_id and new.data.tags["replay_match"] == "true"
    assert new.data.params["select.layer"] == "2" and new.info.experiment_id == original.info.experiment_id
    assert {a.path for a in MlflowClient().list_artifacts(out.run_id)} >= {"replay.json", "config.yaml"}


def test_compare_metrics_catches_differences():
    rows = compare_metrics(
        {"kl": 0.1, "rate": 0.5, "time.search_s": 3.0, "trial-1/kl": 0.2, "gone": 1.0},
        {"kl": 0.1 + 1e-12, "rate": 0.55, "time.search_s": 9.0, "trial-1/kl": 0.2, "new": 2.0},
        rtol=1e-6,
        atol=1e-9,
        ignore=["time.*"],
    )
    verdict = {r["metric"]: r["match"] for r in rows}
    assert verdict == {"kl": True, "rate": False, "trial-1/kl": True, "gone": False, "new": False}


def test_unknown_run_is_one_clear_error(multirun, caplog):
    overrides = ["run_id=0123456789abcdef", f"mlflow.tracking_uri=sqlite:///{multirun}/mlflow.db"]
    with pytest.raises(SystemExit) as exit_info:
        run_entry(compose("replay", overrides), ReplayConfig, replay)
    assert exit_info.value.code == 2 and "no run '0123456789abcdef'" in caplog.text


def test_masked_secrets_are_named_for_the_replay():
    from flows.replay import masked_keys

    logged = {"mlflow": {"tracking_uri": "http://***@host"}, "data": {"sources": ["a", "hf:x?token=***"]}}
    assert masked_keys(logged) == ["mlflow.tracking_uri", "data.sources.1"]
    assert masked_keys({"eval": {"max_new_tokens": 128}, "model": "org/name"}) == []
