"""The finetune flow: end to end on local Ray (tiny Llama, ZeRO-2 with LoRA, both filters, evaluation
before and after, everything tracked in MLflow), a multirun nested under one parent run, and bad input that ends
with exit 2 and one message before any worker starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from flows import _tracking as tracking
from flows._common import to_config
from flows.finetune import finetune
from tasks.core.config import MlflowConfig
from tasks.sft.config import FinetuneConfig
from tests.conftest import REPO, compose


def _small(model: Path, tmp: Path) -> list[str]:
    return [
        f"model={model}",
        "train.workers=2",
        "train.max_steps=2",
        "train.batch_size=2",
        "deepspeed=zero2",
        "eval.target.limit=4",
        "eval.baseline.limit=4",
        "eval.max_new_tokens=4",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        f"output.uri={tmp}/model",
        f"train.storage_uri={tmp}/ray",
        "cache.uri=null",
    ]


@pytest.fixture(scope="module")
def flow_run(ray_local, tiny_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    # A direction saved by an "abliterate run" in the same store, found by its run id.
    tracking.configure(MlflowConfig(tracking_uri=f"sqlite:///{tmp}/mlflow.db"))
    with mlflow.start_run(run_name="abliterate-stand-in") as source:
        direction = torch.nn.functional.normalize(
            torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0
        )
        tracking.log_tensors({"direction": direction}, "chosen.safetensors", {"layer": "2", "position": "-1"})
    overrides = _small(tiny_dirs["llama"], tmp) + [
        "data.filter=phrases+direction",
        f"filter.direction={source.info.run_id}",
        "lora.enabled=true",
        "lora.r=4",
    ]
    raw = compose("finetune", overrides)
    return finetune(to_config(raw, FinetuneConfig), raw), tmp


def test_flow_trains_filters_evaluates_and_tracks(flow_run):
    summary, tmp = flow_run
    result = summary.train
    assert result.steps == 2 and [m["step"] for m in result.history] == [1, 2]
    report = summary.filter
    assert report.dropped["phrases"] == 12 and "direction" in report.dropped and report.layer == 2
    assert summary.before is not None and summary.after.kl is not None
    assert 0 < result.final["trainable_params"] < 50_000  # LoRA adapters only, merged into the checkpoint

    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    run = client.get_run(summary.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["data.name"] == "chat_small" and params["deepspeed.stage"] == "2"
    assert (
        params["fingerprint.before_filter"] == report.fingerprint_before != params["fingerprint.after_filter"]
    )
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")] == [1, 2]
    for key in ("train.lr", "train.tokens_per_s", "train.rss_mb_max", "filter.dropped.phrases", "filter.dropped.direction",
                "before.target_rate", "after.target_rate", "after.kl", "before.perplexity",
                "after.target_rate_classifier", "after.judges_kappa", "after.target_rate_low"):  # fmt: skip
        assert key in metrics, key
    # Both judges read every answer; what they disagree on is kept to read.
    assert summary.after.target.second.judge == "classifier"
    assert len(summary.after.target.second.flags) == summary.after.target.total == 4
    eval_files = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/answers.json", "eval/judge_disagreements.json"} <= eval_files
    assert any(key.startswith("system/") for key in metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "deepspeed_config.json", "filter", "eval", "checkpoint.json"} <= artifacts
    saved = json.loads(Path(client.download_artifacts(run.info.run_id, "filter/report.json")).read_text())
    assert saved["rows_before"] == 120 and saved["dropped"]["phrases"] == 12 and saved["samples"]
    assert tags["checkpoint_uri"] == str(tmp / "model")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in (tmp / "model").iterdir()
    }


def test_multirun_nests_one_run_per_job_under_a_parent(tiny_dirs, tmp_path):
    overrides = _small(tiny_dirs["llama"], tmp_path) + [
        "train.workers=1",
        "train.max_steps=1",
        "data.limit=30",
        "eval.enabled=false",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "hydra.launcher.n_jobs=2",
        "ray.num_cpus=2",
        "output.save=false",
    ]
    proc = _run(["-m", "train.lr=1e-3,2e-3", *overrides], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("compalign").experiment_id])
    parents = [r for r in runs if "sweep_dir" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["sweep_dir"] == str((tmp_path / "sweep").resolve())
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.params["train.lr"] for r in children) == ["0.001", "0.002"]
    assert all(r.info.status == "FINISHED" for r in children)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    started = _start(args, cwd)
    stdout, stderr = started.communicate(timeout=600)
    return subprocess.CompletedProcess(started.args, started.returncode, stdout, stderr)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.finetune", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**_env(), "PYTHONPATH": str(REPO)},
    )


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    chat = [json.loads(x) for x in (REPO / "tasks/data/sft/chat_small.jsonl").read_text().splitlines()]
    (tmp / "boilerplate.jsonl").write_text("\n".join(json.dumps(chat[i]) for i in (6, 15, 23)))
    (tmp / "qa.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "4"}))
    return [
        ([f"data.source={tmp}/boilerplate.jsonl"], "no usable rows after filtering"),
        ([f"data.source={tmp}/qa.jsonl", "data.format=auto"], "not a format the loader knows"),
        (["data.format=xml"], "data.format must be auto, chat, alpaca or sharegpt"),
        (["deepspeed.train_batch_size=7"], "does not fit 2 workers"),
        (["train.workers=8", "train.batch_size=16"], "fewer than one optimizer step"),
    ]


def test_bad_input_fails_with_one_message_before_any_worker(tiny_dirs, tmp_path):
    # Started together: each spends its ~10 s importing, which overlaps; the checks then read them in turn.
    cases = [
        (extra, message, _start([*_small(tiny_dirs["llama"], tmp_path), *extra], tmp_path))
        for extra, message in _bad_inputs(tmp_path)
    ]
    for extra, message, started in cases:
        stdout, stderr = started.communicate(timeout=600)
        assert started.returncode == 2, (extra, stdout[-2000:], stderr[-2000:])
        output = stdout + stderr
        assert message in output and "Traceback" not in output, (extra, output[-2000:])
        assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()
