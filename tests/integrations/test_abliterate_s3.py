"""Two abliterate runs on the tiny random llama with S3 (moto) for the activation cache and the checkpoint,
tracked on an `mlflow server` whose artifacts are in S3: the second run reads the cache back instead of
collecting, the checkpoint downloads and loads, and both runs read back through the MLflow client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from flows._common import to_config
from flows.abliterate import abliterate
from tasks.core import publish
from tasks.directions.config import AbliterateConfig
from tests.conftest import compose
from tests.integrations.conftest import ACCESS_KEY, SECRET_KEY

EXPERIMENT = "integration-s3"


def _overrides(model_dir, s3, server, cache_uri: str, output_uri: str) -> list[str]:
    return [
        f"model={model_dir}",
        "data=french",
        "data.target.limit=32",
        "data.baseline.limit=32",
        "collect.workers=2",
        "collect.batch_size=8",
        "score.screen_prompts=null",
        "select.kl_limit=1e9",
        "select.induce_min_gain=-1e9",
        "select.min_behaviour=0",
        "eval.max_new_tokens=4",
        "eval.perplexity_tokens=64",
        f"cache.uri={cache_uri}",
        f"output.uri={output_uri}",
        f"storage.s3_endpoint_url={s3.endpoint}",
        "storage.s3_region=us-east-1",
        f"mlflow.tracking_uri={server.url}",
        f"mlflow.experiment={EXPERIMENT}",
    ]


@pytest.fixture(scope="module")
def runs(tiny_dirs, s3, mlflow_server_started, s3_ray, mlflow_server):
    """(first result, second result, cache objects after the first run, cache and output URIs)."""
    cache_uri, output_uri = s3.url("cache"), s3.url("models", "tiny-french")
    overrides = _overrides(tiny_dirs["llama"], s3, mlflow_server, cache_uri, output_uri)
    results, after_first = [], None
    # The second run also packs its workers on one node and copies the S3 checkpoint into MLflow.
    for extra in ([], ["ray.pack_on_one_node=true", "mlflow.checkpoint=artifact"]):
        raw = compose("abliterate", overrides + extra)
        results.append(abliterate(to_config(raw, AbliterateConfig), raw))
        if after_first is None:
            fs = s3.filesystem()
            after_first = {p: fs.info(p)["ETag"] for p in fs.find(cache_uri.removeprefix("s3://"))}
    return results[0], results[1], after_first, cache_uri, output_uri


def test_second_run_reads_activation_cache_from_s3(runs, s3, mlflow_server):
    first, second, after_first, cache_uri, _ = runs
    client = MlflowClient(mlflow_server.url)
    assert client.get_run(first.run_id).data.tags["activation_cache"] == "miss"
    assert client.get_run(second.run_id).data.tags["activation_cache"] == "hit"
    # Target and baseline sums, written once by the first run and left untouched by the second.
    assert len(after_first) == 2 and all(p.endswith(".safetensors") for p in after_first)
    fs = s3.filesystem()
    assert {p: fs.info(p)["ETag"] for p in fs.find(cache_uri.removeprefix("s3://"))} == after_first
    # Same sums, so the same direction was chosen.
    chosen = [
        {k: v for k, v in client.get_run(r.run_id).data.params.items() if k.startswith("chosen.")}
        for r in (first, second)
    ]
    assert chosen[0] == chosen[1] and "chosen.layer" in chosen[0]


def test_checkpoint_on_s3_loads_and_is_edited(runs, s3, mlflow_server, tiny_dirs, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    _, second, _, _, output_uri = runs
    assert second.checkpoint == output_uri
    fs = s3.filesystem()
    root = publish.resolve(output_uri).removeprefix("s3://")  # the current version
    files = {p.removeprefix(root + "/") for p in fs.find(root)}
    assert {"config.json", "model.safetensors", "README.md", "direction.safetensors"} <= files
    # One version left after the overwrite, and no staging prefix.
    assert fs.ls(f"{output_uri.removeprefix('s3://')}/versions", detail=False) == [root, root + ".done"]
    assert not [p for p in fs.find(s3.url("models").removeprefix("s3://")) if ".partial-" in p]
    # The second run overwrote the first one's checkpoint: its card names the second run.
    assert second.run_id in fs.cat(f"{root}/README.md").decode()
    # ... and copied it into MLflow (mlflow.checkpoint=artifact), through the server into S3.
    tracked = {a.path for a in MlflowClient(mlflow_server.url).list_artifacts(second.run_id, "checkpoint")}
    assert {"checkpoint/model.safetensors", "checkpoint/direction.safetensors"} <= tracked

    fs.get(root + "/", str(tmp_path / "ckpt") + "/", recursive=True)
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    direction = load_file(tmp_path / "ckpt" / "direction.safetensors")["direction"].float()
    ids = tokenizer("Bonjour, comment ça va ?", return_tensors="pt").input_ids
    with torch.no_grad():
        # The direction is gone from every token embedding, which it was not before.
        assert (edited.get_input_embeddings().weight.float() @ direction).abs().max() < 1e-4
        assert (original.get_input_embeddings().weight.float() @ direction).abs().max() > 1e-2
        assert not torch.allclose(edited(ids).logits, original(ids).logits, atol=1e-4)


def test_runs_read_back_from_mlflow_server(runs, s3, mlflow_server, tmp_path):
    first, *_ = runs
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.name"] == "french"
    assert run.data.params["cache.uri"] == s3.url("cache")
    assert {"before.target_rate", "after.target_rate", "after.perplexity", "after.kl"} <= set(
        run.data.metrics
    )
    assert run.data.metrics["before.perplexity"] > 1
    assert run.data.tags["checkpoint_uri"] == s3.url("models", "tiny-french")
    # Artifacts go through the server into the S3 artifact root.
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    with open(local, encoding="utf-8") as handle:
        assert "s3_endpoint_url" in handle.read()
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint.json", "directions"} <= names
    stored = s3.filesystem().find(mlflow_server.artifacts.removeprefix("s3://"))
    assert any(p.endswith(f"{run.info.run_id}/artifacts/config.yaml") for p in stored)


def test_no_secret_reaches_mlflow(runs, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    for result in runs[:2]:
        run = client.get_run(result.run_id)
        config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
        logged = json.dumps([run.data.params, run.data.tags]) + config.read_text(encoding="utf-8")
        assert SECRET_KEY not in logged and ACCESS_KEY not in logged
