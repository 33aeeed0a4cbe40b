"""Sweep: search source layer x position x intervention x scale x ablation kernels for the best trade-off
between removing a behaviour and leaving the rest of the model alone; trials fan out over Ray workers.

Local, on embedded defaults (packaged SmolLM2-135M-Instruct, the bundled French concept, 32 TPE trials
on 2 workers, MLflow store ./mlflow.db):

    python -m flows.sweep
    python -m flows.sweep search=grid sweep.layers=[4,8,12] sweep.interventions=[add] sweep.scales=[-0.5,-1,-2]
    python -m flows.sweep resume=<run-id>     # an interrupted sweep, same command: only the rest runs

On a Ray cluster (see cluster/README.md):

    ray job submit --working-dir . -- python -m flows.sweep model=<hub id> data=refusal \
        search=tpe search.trials=200 search.parallel=16 collect.gpus_per_worker=1 ray.address=auto \
        eval.xstest=s3://bucket/xstest_prompts.csv mlflow.tracking_uri=http://mlflow:5000

Steps (numbered as in ``sweep``): 1 inspect the model, load the prompts and make the space concrete,
2 collect activations (cached), 3 form candidates, 4 the unedited references on every worker, 5 search
(trials on Ray), 6 the Pareto front and the pick, 7 confirm the finalists with generation, 8 export
(optional), 9 summary. The sweep is one MLflow run; each trial is a run nested under it.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import mlflow
import pandas as pd
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from safetensors.torch import save

from flows import _resume
from flows import _tracking as tracking
from flows._common import run_entry
from flows._save import save_edited
from flows._steps import collect_sums, concept_eval_spec, load_concept
from tasks.core import storage
from tasks.core.checkpoint import model_card
from tasks.core.model import dtype_name, inspect_model
from tasks.core.progress import Progress
from tasks.directions.candidates import Candidates, difference_of_means
from tasks.directions.stream import Edit
from tasks.runtime import cluster
from tasks.runtime.pool import WorkerPool
from tasks.sweep.config import SearchConfig, SweepConfig
from tasks.sweep.confirm import Confirmation, confirm_trial
from tasks.sweep.front import finalists, pick, trials_table
from tasks.sweep.plot import pareto_plot
from tasks.sweep.search import (
    PoolTrialRunner,
    ResumedRunner,
    TrialRecord,
    dimensions,
    make_proposer,
    run_search,
)
from tasks.sweep.trial import Trial, build_edit
from tasks.sweep.trials import TrialScore, install_references, prepare_trials

log = logging.getLogger("compalign.sweep")


ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)


@dataclass
class SweepResult:
    """What a sweep tried, picked and confirmed."""

    run_id: str
    records: list[TrialRecord]
    """Every trial with its validation score, in the order they finished."""
    table: pd.DataFrame
    """The trials as rows (``pareto``: on the front; ``picked``: the chosen one)."""
    best: TrialRecord
    clean: TrialScore
    """The unedited model's validation score."""
    threshold: float
    confirmations: list[Confirmation]
    """The unedited model and the finalists on ``eval.split`` with generation (empty when off)."""
    checkpoint: str | None
    cached: bool
    """Whether the activation sums came from the cache."""
    timing: dict[str, float]


def sweep(cfg: SweepConfig, raw: DictConfig) -> SweepResult:
    started = time.monotonic()
    storage.configure(cfg.storage)

    # 1. Inspect the model, load the prompts, make the space concrete: every input is checked before a
    #    worker starts or a run is recorded. One model worker per trial in flight (``cfg.pool``).
    spec = inspect_model(cfg.model, cfg.model_options)
    concept = load_concept(cfg.data, spec.tokenizer, cfg.pool, cfg.eval)
    proposer = make_proposer(cfg.search, dimensions(cfg.sweep, spec.n_layers, concept.positions))
    dtype = dtype_name(cfg.model_options)
    tracking.check_outputs(cfg)
    done = (
        _resume.journal(cfg.mlflow, cfg.resume, raw, concept.fingerprints, spec.identity)
        if cfg.resume
        else {}
    )

    with tracking.run(
        cfg.mlflow, f"sweep-{cfg.data.name}", tags={"flow": "sweep"}, resume=cfg.resume
    ) as active:
        if not cfg.resume:  # a resumed run has its inputs logged, and equal to these (_resume.journal)
            tracking.log_run_inputs(
                raw, concept.fingerprints, spec.identity, concept=cfg.data.name, search=cfg.search.kind
            )
        pool = WorkerPool(cfg.model, cfg.model_options, cfg.pool, cfg.ray)
        try:
            # 2. Collect activation sums on the train split (from the cache when the inputs were seen).
            target_sums, baseline_sums, collected = collect_sums(
                pool, spec, concept, cfg.pool, cfg.cache.uri, dtype
            )
            cached = collected == 0
            # 3. Candidate directions per (layer, position); trials blend neighbouring layers.
            candidates = _candidates(cfg, target_sums, baseline_sums, collected)
            # 4. Every worker tokenizes the validation prompts and caches the unedited model's references.
            clean, threshold = prepare_references(pool, concept, cfg.search, candidates)
            # 5. Search: trials on the workers, at most search.parallel in flight, one nested run each.
            records, children, timing = _search(cfg, proposer, pool, started, done)
            # 6. The Pareto front (table and plot) and the trial the pick rule chooses.
            best, table = _pick(cfg, records, clean, candidates)
            # 7. Confirm the finalists with generation on eval.split (bootstrap intervals, XSTest).
            confirmations = _confirm(
                cfg, pool, concept, finalists(records, best, cfg.confirm.finalists), dtype
            )
            _log_confirmations(confirmations, children, best.trial.number, cfg.eval.split)
            # 8. Export the picked trial as an orthogonalized checkpoint (optional; ablation only).
            location = _export(cfg, pool, spec.path, best.trial, candidates, active.info.run_id)
        finally:
            pool.shutdown()

        # 9. Summary.
        result = SweepResult(
            active.info.run_id,
            records,
            table,
            best,
            clean,
            threshold,
            confirmations,
            location,
            cached,
            timing,
        )
        for line in summary_lines(cfg, result):
            log.info("%s", line)
        log.info("MLflow: %s", tracking.ui_hint(cfg.mlflow))
        return result


def _candidates(cfg: SweepConfig, target_sums, baseline_sums, collected: int) -> Candidates:
    mlflow.set_tag("activation_cache", "miss" if collected else "hit")
    mlflow.log_metric("collect.prompts_collected", collected)
    candidates = difference_of_means(target_sums, baseline_sums, projected=cfg.direction.projected)
    tracking.log_tensors(
        {"directions": candidates.directions, "norms": candidates.norms}, "candidates.safetensors"
    )
    return candidates


def prepare_references(
    pool: WorkerPool, concept, search: SearchConfig, candidates: Candidates
) -> tuple[TrialScore, float]:
    """4. Every worker tokenizes the validation prompts and computes its part of the unedited model's
    references (residuals entering every layer, logits); every worker then installs all the parts.
    Returns the unedited scores and the behaviour threshold (both logged)."""
    limit = search.max_prompts
    shared = cluster.share(candidates)
    args = (
        concept.target.val[:limit], concept.baseline.val[:limit], concept.token_ids, search.batch_size, shared,
        search.resume_from_layer, search.threshold, search.rate, search.kl_prompts,
    )  # fmt: skip
    parts = [pool.start(i, prepare_trials, *args, i, pool.size) for i in range(pool.size)]
    clean, threshold = pool.each(install_references, *parts)[0]
    mlflow.log_metrics({f"val.unedited.{k}": v for k, v in clean.metrics().items()})
    mlflow.log_metric("val.threshold", threshold)
    return clean, threshold


def _pick(
    cfg: SweepConfig, records: list[TrialRecord], clean, candidates
) -> tuple[TrialRecord, pd.DataFrame]:
    best, within = pick(records, cfg.pick)
    if not within:
        log.warning(
            "no trial meets pick.rule=%s's limit; took the closest: trial %d",
            cfg.pick.rule,
            best.trial.number,
        )
    table = trials_table(records, best.trial.number)
    _log_front(cfg, table, clean, best, within, candidates)
    return best, table


def _search(cfg: SweepConfig, proposer, pool: WorkerPool, started: float, done: dict):
    """5. The search; ``done``: the finished trials of the sweep being resumed (``_resume.journal``), taken
    as they are (their nested runs kept) instead of run again."""
    children = {number: child for number, (_, _, child) in done.items()}
    runner = ResumedRunner(PoolTrialRunner(pool), {n: (p, _score(n, m)) for n, (p, m, _) in done.items()})
    if done:
        log.info("resume: %d trials finished before, taken from run %s's nested runs", len(done), cfg.resume)
    first: list[float] = []
    search_start = time.monotonic()
    with Progress(f"{cfg.search.kind} trials", proposer.total, "trials") as bar:

        def on_result(record: TrialRecord) -> None:
            bar.update()
            if record.trial.number in runner.resumed:
                return
            if not first:
                first.append(time.monotonic() - started)
            metrics = {**record.score.metrics(), "time.seconds": record.score.seconds}
            children[record.trial.number] = tracking.log_child_run(
                f"trial-{record.trial.number}",
                record.trial.params(),
                metrics,
                {"trial": str(record.trial.number)},
            )
            log.debug("trial %d finished: %s", record.trial.number, record.score.metrics())

        records = run_search(proposer, runner, cfg.search.parallel, on_result)
    seconds = time.monotonic() - search_start
    timing = {
        "search.trials": float(len(records)),
        "time.first_trial_s": first[0] if first else math.nan,
        "time.search_s": seconds,
        "time.trials_per_hour": 3600 * len(records) / seconds if seconds > 0 else math.nan,
    }
    return records, children, timing


def _score(number: int, metrics: dict[str, float]) -> TrialScore:
    """A trial's score as its nested run logged it."""
    names = ("behaviour_rate", "mean_log_odds", "kl", "baseline_rate")
    return TrialScore(number, *(metrics[k] for k in names), seconds=metrics.get("time.seconds", 0.0))


def _log_front(cfg: SweepConfig, table, clean, best: TrialRecord, within: bool, candidates) -> None:
    tracking.log_table(table, "trials.csv")
    tracking.log_table(table[table["pareto"]], "pareto_front.csv")
    with tempfile.TemporaryDirectory() as tmp:
        title = f"{cfg.data.name} on {cfg.model}: {len(table)} trials ({cfg.search.kind}), front of {int(table['pareto'].sum())}"
        tracking.log_file(pareto_plot(table, Path(tmp) / "pareto_front.png", cfg.pick, clean, title))
    mlflow.log_metrics(
        {"search.front_size": float(table["pareto"].sum()), "best.number": float(best.trial.number)}
    )
    mlflow.log_params({f"best.{k}": v for k, v in best.trial.params().items()})
    mlflow.log_metrics({f"best.val.{k}": v for k, v in best.score.metrics().items()})
    mlflow.set_tag("pick", f"{cfg.pick.rule} {'met' if within else 'not met: closest trial taken'}")
    edit = build_edit(best.trial, candidates)
    tensors = {"direction": edit.direction}
    if edit.ablation is not None:
        tensors.update(attn_weights=edit.ablation.attn_weights, mlp_weights=edit.ablation.mlp_weights)
    if edit.addition is not None:
        tensors["add_vector"] = edit.addition.vector
    tracking.log_tensors(
        tensors, "best_trial.safetensors", {k: str(v) for k, v in best.trial.params().items()}
    )


def _confirm(
    cfg: SweepConfig, pool: WorkerPool, concept, chosen: list[TrialRecord], dtype: str
) -> list[Confirmation]:
    """The unedited model and each finalist, spread over the workers; KL against the unedited model.
    The evaluation's spec is logged beside them."""
    if not chosen:
        return []
    xstest = concept.over_refusal
    jobs: list[Trial | None] = [None, *(r.trial for r in chosen)]
    split = cfg.eval.split  # test for the report; val to compare search settings without reading test
    args = (
        cfg.data.judge, getattr(concept.target, split), getattr(concept.baseline, split), xstest,
        concept.perplexity_text, cfg.eval,
        cfg.confirm.resamples, cfg.confirm.confidence, cfg.confirm.seed,
    )  # fmt: skip
    pending = [
        pool.start(i % pool.size, confirm_trial, job, *args, anywhere=True) for i, job in enumerate(jobs)
    ]
    results = pool.gather(pending, f"confirm on the {split} split (generation)", unit="models")
    unedited = results[0]
    for conf in results[1:]:
        conf.result.compare(unedited.result)
    tracking.log_eval_spec(concept_eval_spec(concept, cfg.data, cfg.eval, dtype, xstest, cfg.confirm.seed))
    return results


def _log_confirmations(
    confirmations: list[Confirmation], children: dict[int, str], best: int, split: str
) -> None:
    if not confirmations:
        return
    samples = {}
    for conf in confirmations:
        name = "unedited" if conf.number is None else f"trial_{conf.number}"
        mlflow.log_metrics(conf.metrics(f"{split}.{name}"))
        if conf.number == best:
            mlflow.log_metrics(conf.metrics(f"{split}.best"))
        if conf.number is not None:
            tracking.log_metrics_to(children[conf.number], conf.metrics(split))
        samples[name] = conf.samples()
    mlflow.log_dict(samples, "eval/answers.json")


def _export(
    cfg: SweepConfig, pool: WorkerPool, source: str, trial: Trial, candidates: Candidates, run_id: str
) -> str | None:
    if not cfg.output.save:
        return None
    edit = build_edit(trial, candidates)
    if trial.adds:
        log.warning(
            "output.save: trial %d adds a vector at inference (%s), which is not a weight edit; nothing exported "
            "(its direction and vector are in the run's best_trial.safetensors)",
            trial.number,
            trial.intervention,
        )
        mlflow.set_tag("export", "skipped: the picked trial adds a vector")
        return None
    uri = cfg.output.uri or f"checkpoints/{run_id}"
    params = trial.params()
    card = model_card(
        cfg.model,
        {"concept": cfg.data.name, "trial": trial.number, **params, "mlflow_run": run_id},
        f"# {cfg.model} with the `{cfg.data.name}` direction removed by a kernel\n\n"
        f"Weight-orthogonalized by compalign's sweep: the direction of source layer {trial.layer:g}, position "
        f"{trial.position} was projected out of each layer's attention output and MLP down projections with the "
        f"per-layer weights of trial {trial.number}'s kernels (MLflow run `{run_id}`).",
    )
    metadata = {k: str(v) for k, v in params.items()}
    extra = {"direction.safetensors": save({"direction": edit.direction.contiguous()}, metadata)}
    a = edit.ablation
    weights = Edit(a.direction, a.attn_weights, a.mlp_weights, a.embed_weight)
    return save_edited(
        pool, 0, source, storage.absolute(uri), card, extra, weights, cfg.model_options,
        dtype_name(cfg.model_options), cfg.mlflow.checkpoint,
    )  # fmt: skip


def _rate_rule(cfg: SweepConfig, threshold: float) -> str:
    if cfg.search.rate == "top1":
        return "greedy first token is a behaviour token"
    return f"first-token log-odds > {threshold:.2f}"


def summary_lines(cfg: SweepConfig, result: SweepResult) -> list[str]:
    best, clean, table = result.best, result.clean, result.table
    t, timing = best.trial, result.timing
    front = table[table["pareto"]]
    points = ", ".join(f"{r.behaviour_rate:.2f}/{r.kl:.3f}" for r in front.head(6).itertuples())
    lines = [
        f"compalign sweep: concept {cfg.data.name!r} on {cfg.model} ({cfg.search.kind}, {len(table)} trials, "
        f"{cfg.search.parallel} workers, activation cache {'hit' if result.cached else 'miss'})",
        f"  unedited (val)   behaviour rate {clean.behaviour_rate:.0%} ({_rate_rule(cfg, result.threshold)}), "
        f"mean log-odds {clean.mean_log_odds:.2f}",
        f"  front (rate/KL)  {points}{' ...' if len(front) > 6 else ''}",
        f"  picked           trial {t.number}: layer {t.layer:.2f}, position {t.position}, {t.intervention}"
        + (f" x{t.scale:.2f}" if t.adds else "")
        + f"; val rate {best.score.behaviour_rate:.0%}, KL {best.score.kl:.4f}",
    ]
    for conf in result.confirmations:
        name = "unedited" if conf.number is None else f"trial {conf.number}"
        extra = f", xstest {conf.xstest}" if conf.xstest else ""
        kl = f", KL {conf.result.kl:.4f}" if conf.result.kl is not None else ""
        lines.append(
            f"  {cfg.eval.split} {name:<11} target {conf.target}, baseline {conf.baseline}{extra}, "
            f"perplexity {conf.result.perplexity:.2f}{kl}"
        )
    lines += [
        f"  speed            first trial {timing['time.first_trial_s']:.0f} s after start; "
        f"{len(table)} trials in {timing['time.search_s']:.0f} s ({timing['time.trials_per_hour']:.0f}/hour)",
        f"  checkpoint       {result.checkpoint or 'not exported (output.save=false)'}",
        f"  MLflow run       {result.run_id}",
    ]
    return lines


@hydra.main(config_path="../conf", config_name="sweep", version_base=None)
def main(raw: DictConfig) -> SweepResult:
    return run_entry(raw, SweepConfig, sweep)


if __name__ == "__main__":
    main()
