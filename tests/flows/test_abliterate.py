"""The abliterate flow end to end on local Ray: the real French concept on SmolLM2, mechanics on a tiny model,
and bad input (one clear message, exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows._common import run_entry, to_config
from flows.abliterate import abliterate
from flows.compare import CompareConfig, compare
from tasks.core.concept_config import PromptSource, SplitConfig
from tasks.core.errors import CompalignError
from tasks.core.hooks import Ablation, intervene
from tasks.core.prompts import fingerprint, format_chat, load_prompts, split_prompts
from tasks.directions.config import AbliterateConfig
from tasks.evaluation.evaluate import generate
from tasks.evaluation.judges import LanguageJudge
from tests.conftest import REPO, compose, make_tiny_judge, tiny_flow_overrides

pytestmark = pytest.mark.usefixtures("ray_local")


def run_flow(overrides: list[str]):
    return run_entry(compose("abliterate", overrides), AbliterateConfig, abliterate)


@pytest.fixture(scope="module")
def french_run(tmp_path_factory, ray_local):
    """One run of the flow on defaults with the bundled french concept."""
    work = tmp_path_factory.mktemp("french")
    overrides = [
        "data=french",
        "eval.max_new_tokens=32",  # a language shows in a sentence; 128 tokens would add a minute to CI
        # The last position and 8 finalists pick the same edit as the defaults (layer 16, 1/20 French
        # answers left, measured) in two thirds of the time.
        "collect.positions=1",
        "score.finalists=8",
        "refine.steps=0",  # the default refinement was tuned on refusal; this checks the plain removal
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        f"output.uri={work}/model",
        f"cache.uri={work}/cache",
    ]
    return run_flow(overrides), work


@pytest.mark.slow
def test_french_direction_removes_french_answers(french_run, smollm2):
    result, work = french_run
    before, after = result.before, result.after
    assert before.target.total == after.target.total >= 16
    assert before.target.rate >= 0.5  # the unedited model answers French in French
    assert after.target.rate <= 2 / 16  # weight-orthogonalized model: at most 2 of 16
    assert after.baseline.flagged == 0  # English questions still get English answers
    # the full removal costs English text: +14% perplexity on the long multi-genre text (23.95 -> 27.31,
    # measured; the old single-topic paragraph showed +8.7%); this guards against gross damage only
    assert after.perplexity < 1.25 * before.perplexity
    assert 0 < after.kl < 1
    # the character-trigram judge, of another kind, reads the same answers nearly the same way
    assert before.target.second.judge == "trigram_fr" and after.target.second.flagged <= 3
    assert before.agreement() >= 0.6

    # the same direction through hooks on the unedited model does the same
    found = result.found
    french = [row["prompt"] for row in before.target.samples]
    with intervene(smollm2.model, ablation=Ablation(direction=found.direction)):
        answers = generate(smollm2.model, smollm2.tokenizer, french, 24, 16)
    assert sum(LanguageJudge("fr").judge(french, answers)) / len(french) <= 2 / 16


@pytest.mark.slow
def test_french_run_is_tracked_and_saved(french_run, smollm2):
    result, work = french_run
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.name"] == "french" and run.data.params["model"] == "packaged:smollm2"
    assert "fingerprint.target_train" in run.data.params and run.data.tags["git_commit"]
    assert run.data.metrics["after.target_rate"] <= 2 / 16
    assert {
        "before.perplexity",
        "after.kl",
        "chosen.kl",
        "val.clean_target_log_odds",
    } <= run.data.metrics.keys()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {
        a.path
        for d in ("directions", "eval", "environment")
        for a in client.list_artifacts(run.info.run_id, d)
    }
    assert {
        "config.yaml", "candidate_scores.csv", "candidate_scores.png",
        "directions/candidates.safetensors", "directions/chosen.safetensors", "eval/answers.json",
        "environment/packages.json", "checkpoint.json", "coverage.json",
    } <= artifacts  # fmt: skip
    assert run.data.tags["checkpoint_uri"] == result.checkpoint
    # the GGUF is read once into a safetensors cache, which the edit streams from; coverage: all 30 layers
    coverage = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/coverage.json")
    assert len(coverage["edited"]) == 1 + 2 * 30 and run.data.metrics["checkpoint.max_abs_logit_diff"] < 0.5
    assert coverage["left"]["model.layers.0.self_attn.q_proj.weight"].endswith("reads the stream")

    # the checkpoint: safetensors + config + tokenizer with chat template + model card; logits equal hooks
    folder = Path(result.checkpoint)
    assert (folder / "model.safetensors").exists() and (folder / "direction.safetensors").exists()
    assert result.run_id in (folder / "README.md").read_text()
    edited = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == smollm2.tokenizer.chat_template
    ids = tok(
        format_chat(tok, ["Quelle heure est-il ?"])[0], return_tensors="pt", add_special_tokens=False
    ).input_ids
    with torch.no_grad(), intervene(smollm2.model, ablation=Ablation(direction=result.found.direction)):
        hooked = smollm2.model(ids).logits
    with torch.no_grad():
        assert (edited(ids).logits - hooked).abs().max() < 1e-3


def test_tiny_model_search_then_given_direction(tiny_dirs, workdir):
    first = run_flow(tiny_flow_overrides(tiny_dirs["mixtral"], workdir))
    found = first.found
    assert found.source == "search" and found.table is not None
    assert found.table["stage"].tolist().count("full") == 3  # the screened finalists
    checkpoint = Path(first.checkpoint)
    assert checkpoint.parent == workdir / "checkpoints"  # default: checkpoints/<run id> in the working dir
    # A safetensors source is streamed shard by shard, checked against the edited model, and covered.
    run = MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_run(first.run_id)
    assert run.data.metrics["checkpoint.max_abs_logit_diff"] < 1e-4  # float32: the same weights
    coverage = json.loads((checkpoint / "coverage.json").read_text())
    experts = sum(n.endswith(".w2.weight") for n in coverage["edited"])
    assert experts == 3 * 4 and run.data.metrics["coverage.edited"] == len(coverage["edited"])
    card = (checkpoint / "README.md").read_text()
    assert "| `model.layers.*.block_sparse_moe.experts.*.w2.weight` | 12 | edited |" in card
    assert not list(checkpoint.glob(".*"))  # no shard records or partial files published

    second = run_flow(
        [
            *tiny_flow_overrides(tiny_dirs["mixtral"], workdir),
            f"direction.file={checkpoint}/direction.safetensors",
        ]
    )
    assert second.found.source == "file" and second.found.refined_steps == 0  # removed as given
    assert (second.found.layer, second.found.position) == (found.layer, found.position)
    assert torch.allclose(second.found.direction, found.direction)
    # the refined direction is renormalised when it is read back: float32 noise on a KL of ~2e-4
    assert second.after.kl == pytest.approx(first.after.kl, rel=1e-3)

    # the direction by MLflow run id: the run's logged directions/chosen.safetensors
    third = run_flow(
        [
            *tiny_flow_overrides(tiny_dirs["mixtral"], workdir),
            f"direction.file={first.run_id}",
            "output.save=false",
            "eval.split=val",
        ]
    )
    assert torch.allclose(third.found.direction, found.direction)
    assert third.found.layer == found.layer
    # eval.split=val judges the validation prompts, none of the test prompts the report reads
    prompts = [{row["prompt"] for row in run.before.target.samples} for run in (first, third)]
    assert prompts[1] and not prompts[0] & prompts[1]

    # refine.given=true refines the given direction too: it moves, and the run says so
    fourth = run_flow(
        [
            *tiny_flow_overrides(tiny_dirs["mixtral"], workdir),
            f"direction.file={first.run_id}",
            "refine.given=true",
            "refine.steps=2",
            "output.save=false",
            "eval.harness.tasks=[compalign_everyday]",  # capability through lm-evaluation-harness
            "eval.harness.limit=4",
            "eval.harness.bootstrap_iters=0",
        ]
    )
    assert fourth.found.refined_steps == 2
    assert not torch.allclose(fourth.found.direction, found.direction, atol=1e-4)
    accuracy = fourth.after.harness["compalign_everyday.acc"]
    assert accuracy in (0, 0.25, 0.5, 0.75, 1) and "compalign_everyday.acc" in fourth.before.harness
    logged = MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_run(fourth.run_id).data.metrics
    assert logged["after.harness.compalign_everyday.acc"] == accuracy

    # runs evaluated under one spec are compared side by side; the val-split run's spec differs: refused
    store = f"mlflow.tracking_uri=sqlite:///{workdir}/mlflow.db"
    runs = [first.run_id, second.run_id]
    compared = compare(
        to_config(compose("compare", [f"runs=[{','.join(runs)}]", store]), CompareConfig), None
    )
    assert compared.table.loc["after.kl", runs[1]] == pytest.approx(second.after.kl)
    assert compared.table.loc["before.target_rate", runs[0]] == first.before.target.rate
    mixed = to_config(compose("compare", [f"runs=[{runs[0]},{third.run_id}]", store]), CompareConfig)
    with pytest.raises(CompalignError, match=r"different specs, .*data\.target_val: .* != absent"):
        compare(mixed, None)


def test_given_direction_with_sweep_kernels_follows_them(tiny_dirs, workdir):
    """A sweep's best_trial.safetensors (direction, per-layer attention/MLP weights, embedding weight) is
    removed with those weights: the saved checkpoint equals the weighted hook ablation of the unedited model."""
    from safetensors.torch import load_file, save_file

    model_dir = tiny_dirs["llama"]
    unedited = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hidden, layers = unedited.config.hidden_size, unedited.config.num_hidden_layers
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(5))
    direction /= direction.norm()
    attn, mlp = torch.tensor([0.0, 0.5, 1.2]), torch.tensor([1.0, 0.25, 0.0])
    trial = workdir / "best_trial.safetensors"
    tensors = {"direction": direction, "attn_weights": attn, "mlp_weights": mlp}
    save_file(tensors, trial, {"layer": "1.5", "position": "-1", "embed_weight": "0.0"})

    result = run_flow([*tiny_flow_overrides(model_dir, workdir), f"direction.file={trial}"])
    found = result.found
    assert found.layer == 1.5 and found.position == -1 and found.weights is not None
    saved = load_file(Path(result.checkpoint) / "direction.safetensors")
    assert torch.equal(saved["attn_weights"], attn) and torch.equal(saved["mlp_weights"], mlp)

    ids = torch.randint(0, unedited.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    kernel = Ablation(direction=direction, attn_weights=attn, mlp_weights=mlp, embed_weight=0.0)
    with torch.no_grad():
        with intervene(unedited, ablation=kernel):
            hooked = unedited(ids).logits
        with intervene(unedited, ablation=Ablation(direction=direction)):
            full = unedited(ids).logits
        edited = AutoModelForCausalLM.from_pretrained(result.checkpoint)(ids).logits
    assert (edited - hooked).abs().max() < 1e-4
    assert (edited - full).abs().max() > 1e-3  # the kernel mattered: not the plain full removal

    lopsided = workdir / "lopsided.safetensors"
    save_file({"direction": direction, "attn_weights": attn, "mlp_weights": torch.ones(layers + 1)}, lopsided)
    with pytest.raises(SystemExit):
        run_flow([*tiny_flow_overrides(model_dir, workdir), f"direction.file={lopsided}"])


def test_refined_direction_is_removed_and_tracked(tiny_dirs, workdir, tokenizer):
    """refine.steps > 0: the chosen direction is refined before removal; the run keeps the unrefined one,
    the per-step loss, and the checkpoint equals the hook ablation of the refined direction. Selection
    reads validation prompts of another source, and a judge model (tiny, random) gives the second opinion."""
    from safetensors.torch import load_file

    model_dir = tiny_dirs["llama"]
    # Selected on prompts of another source than the 16 it is fitted on (here: later rows of the files).
    fr, en = (load_prompts(PromptSource(f"bundled:french_{lang}"))[40:46] for lang in ("fr", "en"))
    for name, rows in (("val_fr", fr), ("val_en", en)):
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    validation = [
        f"data.validation.target={workdir}/val_fr.jsonl",
        f"data.validation.baseline={workdir}/val_en.jsonl",
    ]
    judge = make_tiny_judge(workdir / "judge", tokenizer, ["en", "fr"], list(zip(fr, en, strict=True)))
    result = run_flow(
        [
            *tiny_flow_overrides(model_dir, workdir),
            *validation,
            f"data.judge.second=hub:{judge}",
            "refine.steps=4",
            "refine.batch_size=4",
        ]
    )
    found = result.found
    assert found.refined_steps == 4 and found.source == "search"
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    params = client.get_run(result.run_id).data.params
    assert params["fingerprint.target_val"] == fingerprint(fr)
    assert params["fingerprint.baseline_val"] == fingerprint(en)
    train_split = split_prompts(load_prompts(PromptSource("bundled:french_fr", limit=16)), SplitConfig())
    assert params["fingerprint.target_train"] == fingerprint(train_split.train + train_split.val)
    metrics = client.get_run(result.run_id).data.metrics
    assert 0 <= metrics["after.target_rate_hub"] <= 1 and "after.judges_kappa" in metrics
    spec = json.loads(Path(client.download_artifacts(result.run_id, "eval/spec.json")).read_text())
    assert spec["judges"]["hub"].startswith("local-")
    history = client.get_metric_history(result.run_id, "refine.loss")
    assert [m.step for m in history] == [0, 1, 2, 3]
    unrefined = load_file(client.download_artifacts(result.run_id, "directions/unrefined.safetensors"))
    cosine = float(unrefined["direction"] @ found.direction)
    assert cosine < 0.99999
    assert client.get_run(result.run_id).data.metrics["refine.cosine"] == pytest.approx(cosine, abs=1e-5)
    saved = load_file(Path(result.checkpoint) / "direction.safetensors")
    assert torch.equal(saved["direction"], found.direction)

    unedited = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, unedited.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with intervene(unedited, ablation=Ablation(direction=found.direction)):
            hooked = unedited(ids).logits
        edited = AutoModelForCausalLM.from_pretrained(result.checkpoint)(ids).logits
    assert (edited - hooked).abs().max() < 1e-4


def _bad(overrides: list[str], message: str, capsys_or_caplog, workdir: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_flow([f"mlflow.tracking_uri=sqlite:///{workdir}/mlflow.db", *overrides])
    assert exit_info.value.code == 2
    assert message in capsys_or_caplog.text
    assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=/no/such/model"], "model=/no/such/model is not a directory with a safetensors checkpoint"),
        (["collect.workers=100", "data=french"], "fewer than collect.workers=100"),
        (["select.layer_cutoff=1.5"], "select.layer_cutoff must be in (0, 1], got 1.5"),
        (["select.layer_cutoff=0"], "select.layer_cutoff must be in (0, 1], got 0"),
        (["collect.positions=7"], "collect.positions=7 but the chat template has only 6 tokens"),
        (["collect.batch_size=0"], "collect.batch_size must be > 0, got 0"),
        (["score.induce_scale=nan"], "score.induce_scale must be a finite number"),
        (["refine.steps=2", "refine.lr=0"], "refine.lr must be a positive number, got 0"),
        (["eval.split=train"], "eval.split must be test or val, got 'train'"),
    ],
)
def test_bad_input_is_one_clear_error(overrides, message, caplog, workdir):
    _bad(overrides, message, caplog, workdir)


def test_bad_prompt_files_and_direction(tmp_path, caplog, workdir, tiny_dirs):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    _bad([f"data.target.source={empty}"], "holds no prompts", caplog, workdir)
    _bad([f"data.baseline.source={bad}"], "line 2 is not valid JSON", caplog, workdir)
    from safetensors.torch import save_file

    save_file({"direction": torch.ones(100)}, tmp_path / "d.safetensors")
    _bad(
        [f"direction.file={tmp_path}/d.safetensors"],
        f"direction.file={tmp_path}/d.safetensors: direction has shape (100,) but the model's hidden size is 576",
        caplog,
        workdir,
    )


@pytest.mark.parametrize("key", ["output.uri", "cache.uri", "mlflow.tracking_uri"])
def test_unwritable_output_fails_before_any_worker(key, tmp_path, caplog, workdir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    where = f"sqlite:///{blocker}/mlflow.db" if key == "mlflow.tracking_uri" else str(blocker / "out")
    with pytest.raises(SystemExit) as exit_info:
        run_flow([f"mlflow.tracking_uri=sqlite:///{workdir}/mlflow.db", f"{key}={where}"])
    assert exit_info.value.code == 2
    assert f"{key}: cannot write to" in caplog.text and "change" in caplog.text
    assert "starting" not in caplog.text  # no worker was started and no run recorded
    assert not (workdir / "checkpoints").exists() and not (workdir / "mlflow.db").exists()


def test_entry_point_exits_nonzero_with_one_message(tmp_path, tiny_dirs):
    """The real command line: unsupported architecture, a model without a chat template, a bad value."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    no_template = tmp_path / "no-template"
    import shutil

    shutil.copytree(tiny_dirs["llama"], no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    cases = (
        (f"model={gpt2}", f"model={gpt2}: unsupported architecture 'gpt2'"),
        (f"model={no_template}", f"model={no_template} has no chat template"),
        ("collect.batch_size=0", "collect.batch_size must be > 0, got 0"),
    )
    for override, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.abliterate", override, f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"],
            cwd=tmp_path, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        output = proc.stdout + proc.stderr
        assert message in output and "Traceback" not in output
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "m.db").exists()
        assert not (tmp_path / "outputs").exists()  # a failed invocation leaves no output folder


def test_model_without_the_behaviour_stops_before_collecting(caplog, workdir):
    """The plain packaged model barely refuses: one line, exit 2, the MLflow run FAILED, nothing saved."""
    _bad(
        ["model=packaged:smollm2", "data=refusal", f"cache.uri={workdir}/cache"],
        "nothing to remove (try model=packaged:smollm2-refusal)",
        caplog,
        workdir,
    )
    assert "packaged:smollm2 refuses" in caplog.text
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"
    assert run.data.metrics.get("val.unedited_behaviour_rate") is None  # stopped before any later step
    assert not (workdir / "cache").exists()  # nothing collected
