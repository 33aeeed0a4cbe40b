"""The sweep flow on local Ray with a tiny model: a grid on 2 workers with nested MLflow runs, confirmation
and export; a seeded TPE sweep that reproduces its trials, front and directions (bitwise); the activation
cache (a replay with the same inputs never collects, a changed prompt file misses); bad input."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flows._common import run_entry
from flows.replay import ReplayConfig, replay
from flows.sweep import sweep
from tasks.core.concept_config import PromptSource
from tasks.core.config import MlflowConfig
from tasks.core.prompts import load_prompts
from tasks.directions.candidates import Candidates
from tasks.sweep.config import SweepConfig
from tasks.sweep.trial import applied, build_edit
from tests.conftest import SHARED_DATA, compose

pytestmark = pytest.mark.usefixtures("ray_local")
XSTEST = SHARED_DATA / "xstest_prompts.csv"


def _write(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dirs, ray_local):
    """A store, a cache and small refusal prompt files shared by the module's runs."""
    work = tmp_path_factory.mktemp("sweep")
    harmful = load_prompts(PromptSource(source="bundled:refusal_harmful"))[:24]
    harmless = load_prompts(PromptSource(source="bundled:refusal_harmless"))[:24]
    common = [
        f"model={tiny_dirs['llama']}",
        "data=refusal",
        f"data.target.source={_write(work / 'harmful.jsonl', harmful)}",
        f"data.baseline.source={_write(work / 'harmless.jsonl', harmless)}",
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        "mlflow.experiment=sweep-tests",
        f"cache.uri={work}/cache",
        "eval.max_new_tokens=3",
        "eval.batch_size=8",
        "eval.perplexity_tokens=64",
        "search.batch_size=8",
    ]
    return {"work": work, "common": common, "harmful": harmful, "harmless": harmless}


def run_sweep(env, overrides: list[str]) -> dict:
    return run_entry(compose("sweep", [*env["common"], *overrides]), SweepConfig, sweep)


def _client(env) -> MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{env['work']}/mlflow.db")
    return MlflowClient()


def _children(client: MlflowClient, run_id: str) -> list:
    run = client.get_run(run_id)
    runs = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return sorted(runs, key=lambda r: int(r.data.tags["trial"]))


def _candidates(client: MlflowClient, run_id: str, dst: Path) -> dict[str, torch.Tensor]:
    path = client.download_artifacts(run_id, "directions/candidates.safetensors", str(dst))
    return load_file(path)


GRID = [
    "search=grid",
    "search.parallel=2",
    "sweep.layers=[1,2]",
    "sweep.attn_falloff=[0.34,1.0]",
    "confirm.finalists=1",
    "output.save=true",
]


@pytest.fixture(scope="module")
def grid_run(env):
    overrides = [*GRID, f"output.uri={env['work']}/exported"]
    if XSTEST.exists():
        overrides += [f"eval.xstest={XSTEST}", "eval.xstest_limit=3"]
    return run_sweep(env, overrides)


def test_grid_sweep_on_two_workers_with_nested_runs(env, grid_run, tmp_path):
    records = grid_run.records
    assert len(records) == 4
    assert {(r.trial.layer, round(r.trial.attn.falloff, 6)) for r in records} == {
        (1, 1.02),
        (1, 3),
        (2, 1.02),
        (2, 3),
    }
    client = _client(env)
    parent = client.get_run(grid_run.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["flow"] == "sweep"
    assert parent.data.tags["activation_cache"] == "miss"
    assert parent.data.metrics["collect.prompts_collected"] == 24  # 12 + 12 train prompts
    children = _children(client, grid_run.run_id)
    assert [c.data.tags["mlflow.runName"] for c in children] == [f"trial-{i}" for i in range(4)]
    for child, record in zip(children, records, strict=True):
        assert child.info.status == "FINISHED"
        assert float(child.data.params["layer"]) == record.trial.layer
        assert child.data.params["intervention"] == "ablate"
        assert child.data.metrics["kl"] == pytest.approx(record.score.kl)
        assert {
            "behaviour_rate",
            "mean_log_odds",
            "baseline_rate",
            "time.seconds",
        } <= child.data.metrics.keys()
    artifacts = {a.path for a in client.list_artifacts(grid_run.run_id)}
    assert {"config.yaml", "trials.csv", "pareto_front.csv", "pareto_front.png", "directions"} <= artifacts
    best = grid_run.best
    assert parent.data.metrics["best.number"] == best.trial.number
    assert (grid_run.table["number"] == best.trial.number).sum() == 1
    saved = load_file(
        client.download_artifacts(grid_run.run_id, "directions/best_trial.safetensors", str(tmp_path))
    )
    assert {"direction", "attn_weights", "mlp_weights"} <= saved.keys()


def test_finalists_confirmed_with_generation_and_intervals(env, grid_run):
    confirmations = grid_run.confirmations
    assert [c.number for c in confirmations] == [None, grid_run.best.trial.number]
    unedited, best = confirmations
    assert unedited.target.total == 6 and unedited.baseline.total == 6  # the test split
    assert unedited.target.low <= unedited.target.rate <= unedited.target.high
    assert best.result.kl is not None and best.result.kl >= 0
    metrics = _client(env).get_run(grid_run.run_id).data.metrics
    assert {
        "test.unedited.target_rate",
        "test.best.target_low",
        "test.best.target_high",
        "test.best.kl",
    } <= metrics.keys()
    if XSTEST.exists():
        assert best.xstest.total == 3 and "test.best.xstest_rate" in metrics


def test_exported_checkpoint_equals_the_trial_through_hooks(env, grid_run, tiny_dirs, tmp_path):
    """The orthogonalized checkpoint of the picked trial computes what its hooks compute."""
    location = grid_run.checkpoint
    assert location == str(env["work"] / "exported")
    saved = _candidates(_client(env), grid_run.run_id, tmp_path)
    candidates = Candidates(directions=saved["directions"], norms=saved["norms"])
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    edited = AutoModelForCausalLM.from_pretrained(location).eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), applied(base, build_edit(grid_run.best.trial, candidates)):
        hooked = base(ids).logits
    with torch.no_grad():
        assert (edited(ids).logits - hooked).abs().max() < 1e-4
        assert (base(ids).logits - hooked).abs().max() > 1e-4


def test_replay_hits_the_cache_and_reproduces_the_metrics(env, grid_run):
    cfg = ReplayConfig(
        run_id=grid_run.run_id, mlflow=MlflowConfig(tracking_uri=f"sqlite:///{env['work']}/mlflow.db")
    )
    out = replay(cfg, compose("replay", [f"run_id={grid_run.run_id}"]))
    assert out.flow == "sweep" and out.match, [r for r in out.rows if not r["match"]]
    compared = {r["metric"] for r in out.rows}
    assert "best.val.kl" in compared and "trial-3/kl" in compared and "test.best.target_rate" in compared
    new = _client(env).get_run(out.run_id)
    assert new.data.tags["activation_cache"] == "hit" and new.data.tags["replay_of"] == grid_run.run_id
    assert new.data.metrics["collect.prompts_collected"] == 0  # the workers never collected


def test_changed_prompt_file_misses_the_cache(env, grid_run):
    changed = _write(env["work"] / "harmful2.jsonl", [p + " Answer briefly." for p in env["harmful"]])
    out = run_sweep(
        env,
        [f"data.target.source={changed}", "search=grid", "sweep.layers=[1]", "search.parallel=1",
         "confirm.finalists=0"],
    )  # fmt: skip
    run = _client(env).get_run(out.run_id)
    assert run.data.tags["activation_cache"] == "miss" and not out.cached
    # only the changed set is collected again: the baseline sums are still addressed by the same content
    assert run.data.metrics["collect.prompts_collected"] == 12
    assert out.confirmations == [] and len(out.records) == 1


TPE = [
    "search=tpe",
    "search.trials=6",
    "search.parallel=2",
    "search.seed=3",
    "search.startup_trials=3",
    "sweep.layers=[0.5,2.5]",  # TPE searches the span: fractional layers blend directions
    "sweep.interventions=[ablate,add,ablate_add]",
    "sweep.scales=[-2.0,1.0]",
    "confirm.finalists=0",
    "cache.uri=null",  # both runs collect: their directions must agree bitwise
]


def test_tpe_with_a_fixed_seed_reproduces_trials_front_and_directions(env, tmp_path):
    first, second = run_sweep(env, TPE), run_sweep(env, TPE)
    trials = [r.trial for r in first.records]
    assert len(trials) == 6 and trials == [r.trial for r in second.records]
    assert len({t.intervention for t in trials}) > 1 and len({t.layer for t in trials}) == 6
    assert [r.score for r in first.records] != [] and all(
        (a.score.behaviour_rate, a.score.kl, a.score.mean_log_odds)
        == (b.score.behaviour_rate, b.score.kl, b.score.mean_log_odds)
        for a, b in zip(first.records, second.records, strict=True)
    )
    cols = ["number", "behaviour_rate", "kl", "pareto", "picked"]
    assert first.table[cols].equals(second.table[cols])
    client = _client(env)
    a = _candidates(client, first.run_id, tmp_path / "a")
    b = _candidates(client, second.run_id, tmp_path / "b")
    assert torch.equal(a["directions"], b["directions"]) and torch.equal(a["norms"], b["norms"])
    assert all(client.get_run(r.run_id).data.tags["activation_cache"] == "miss" for r in (first, second))


def test_bad_sweep_input_is_one_clear_error(env, caplog):
    for overrides, message in (
        (["search=grid", "sweep.layers=[1,9]"], "sweep.layers [9.0] are outside 0..3"),
        (["search=grid", "sweep.positions=[-9]"], "sweep.positions [-9] are outside"),
        (["search.parallel=0"], "search.parallel must be > 0"),
        (
            [
                "search=grid",
                "sweep.layers=[1,2,3]",
                "sweep.scales=[1,2]",
                "sweep.interventions=[add]",
                "search.trials=4",
            ],
            "the grid has 6 combinations",
        ),  # fmt: skip
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_sweep(env, overrides)
        assert exit_info.value.code == 2 and message in caplog.text


class AfterTrials(logging.Handler):
    """Acts once ``trials`` trials of the sweep have finished and been logged (its debug lines)."""

    def __init__(self, trials: int) -> None:
        super().__init__(logging.DEBUG)
        self.trials, self.seen, self.done = trials, 0, False

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("trial ") and " finished: " in record.getMessage():
            self.seen += 1
            if self.seen == self.trials:
                self.done = True  # first: act() may raise (an interrupt)
                self.act()

    def act(self) -> None:
        raise NotImplementedError


class KillWorker(AfterTrials):
    """SIGKILL the newest model worker, as the OOM killer or a lost node would."""

    killed: int | None = None

    def act(self) -> None:
        actors = [
            p
            for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [""])[0].startswith("ray::ModelActor")
        ]
        self.killed = max(actors, key=lambda p: p.create_time()).pid
        os.kill(self.killed, signal.SIGKILL)


class Interrupt(AfterTrials):
    """Ctrl-C for this process (a real SIGINT), as a user would press it mid-search."""

    def act(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)


@contextmanager
def watching(handler: logging.Handler):
    """``handler`` on the sweep's logger, its trial lines (debug) included, for the block."""
    logger = logging.getLogger("compalign.sweep")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_sweep_survives_a_worker_killed_mid_search(env, grid_run, caplog):
    """One of the two workers killed after the first trial: its trial in flight runs again elsewhere, the
    worker comes back, and every trial's score and the front equal the undisturbed grid run's."""
    overrides = [o for o in GRID if not o.startswith(("confirm.", "output."))] + ["confirm.finalists=0"]
    with watching(KillWorker(trials=1)) as killer:
        out = run_sweep(env, overrides)
    assert killer.killed is not None and not psutil.pid_exists(killer.killed)
    assert "run_trial lost worker" in caplog.text  # a trial was lost with it and ran again
    assert [r.trial for r in out.records] == [r.trial for r in grid_run.records]
    assert [r.score.metrics() for r in out.records] == [r.score.metrics() for r in grid_run.records]
    cols = ["number", "behaviour_rate", "kl", "pareto", "picked"]
    assert out.table[cols].equals(grid_run.table[cols])


def test_interrupted_sweep_resumed_gives_the_same_trials_and_front(env):
    overrides = [o for o in TPE if not o.startswith("cache.uri")] + ["search.trials=10"]
    since = int(time.time() * 1000)
    with watching(Interrupt(trials=3)) as watcher, pytest.raises(SystemExit) as exit_info:
        run_sweep(env, overrides)
    assert watcher.done and exit_info.value.code == 130
    client = _client(env)
    experiment = client.get_experiment_by_name("sweep-tests").experiment_id
    query = f"attributes.status = 'KILLED' and tags.flow = 'sweep' and attributes.start_time >= {since}"
    (killed,) = client.search_runs([experiment], query)
    kept = [c for c in _children(client, killed.info.run_id) if c.info.status == "FINISHED"]
    assert [int(c.data.tags["trial"]) for c in kept] == [0, 1, 2]

    resumed = run_sweep(env, [*overrides, f"resume={killed.info.run_id}"])
    whole = run_sweep(env, overrides)
    assert resumed.run_id == killed.info.run_id  # the same run, continued
    assert [r.trial for r in resumed.records] == [r.trial for r in whole.records]
    assert [r.score.metrics() for r in resumed.records] == [r.score.metrics() for r in whole.records]
    cols = ["number", "behaviour_rate", "kl", "pareto", "picked"]
    assert resumed.table[cols].equals(whole.table[cols])
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    children = _children(client, resumed.run_id)
    assert [int(c.data.tags["trial"]) for c in children if c.info.status == "FINISHED"] == list(range(10))
    assert {c.info.run_id for c in kept} <= {
        c.info.run_id for c in children
    }  # finished trials kept, not rerun

    with pytest.raises(SystemExit) as exit_info:  # a finished sweep has nothing to resume
        run_sweep(env, [*overrides, f"resume={resumed.run_id}"])
    assert exit_info.value.code == 2


def test_resume_refuses_another_config(env, caplog):
    overrides = [o for o in TPE if not o.startswith("cache.uri")] + ["search.trials=2"]
    client = _client(env)
    first = run_sweep(env, overrides)
    client.set_terminated(first.run_id, "KILLED")  # as if interrupted after its last trial
    with pytest.raises(SystemExit) as exit_info:
        run_sweep(env, [*overrides, "search.seed=4", f"resume={first.run_id}"])
    assert exit_info.value.code == 2
    assert f"resume={first.run_id}: this sweep differs from that one in search.seed (3 -> 4)" in caplog.text
