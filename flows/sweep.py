"""Sweep: search source layer x position x intervention x scale x ablation kernels for the best trade-off
between removing a behaviour and leaving the rest of the model alone; trials fan out over Ray workers.

Local, on embedded defaults (packaged SmolLM2-135M-Instruct, the bundled French concept, 32 TPE trials
on 2 workers, MLflow store ./mlflow.db):

    python -m flows.sweep
    python -m flows.sweep search=grid sweep.layers=[4,8,12] sweep.interventions=[add] sweep.scales=[-0.5,-1,-2]

On a Ray cluster (see cluster/README.md):

    ray job submit --working-dir . -- python -m flows.sweep model=<hub id> data=refusal \
        search=tpe search.trials=200 search.parallel=16 collect.gpus_per_worker=1 ray.address=auto \
        eval.xstest=s3://bucket/xstest_prompts.csv mlflow.tracking_uri=http://mlflow:5000

Steps: load -> workers -> collect (cached) -> candidates -> prepare -> search (Ray) -> front and pick ->
confirm finalists (generation, test split) -> export (optional) -> summary. The sweep is one MLflow run;
each trial is a run nested under it.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import hydra
import mlflow
import ray
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig
from safetensors.torch import save

from flows import _tracking as tracking
from flows._common import run_entry
from flows._steps import collect_sums, concept_eval_spec, load_concept
from tasks.core import storage
from tasks.core.checkpoint import model_card
from tasks.core.config import (
    CacheConfig,
    CollectConfig,
    ConceptConfig,
    DirectionConfig,
    MlflowConfig,
    ModelOptions,
    OutputConfig,
    RayConfig,
    SplitEvalConfig,
    StorageConfig,
    concept_model,
)
from tasks.core.errors import ConfigError
from tasks.core.model import dtype_name, inspect_model
from tasks.core.progress import Progress
from tasks.directions.candidates import difference_of_means
from tasks.runtime.workers import RayTrialRunner, WorkerPool
from tasks.sweep.search import (
    PickConfig,
    SearchConfig,
    SweepSpace,
    TrialRecord,
    dimensions,
    finalists,
    make_proposer,
    pareto_plot,
    pick,
    run_search,
    trials_table,
)
from tasks.sweep.trials import Confirmation, Trial, build_edit

log = logging.getLogger("compalign.sweep")


@dataclass
class ConfirmConfig:
    """Generation on the test split for the finalists (the search itself never generates)."""

    finalists: int = 2
    """Trials confirmed: the picked one, then its neighbours on the Pareto front (0: none)."""
    resamples: int = 2000
    """Bootstrap resamples for the rates' intervals."""
    confidence: float = 0.95
    """Coverage of the bootstrap intervals."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self) -> None:
        if self.finalists < 0:
            raise ConfigError(f"confirm.finalists must be >= 0, got {self.finalists}")
        if self.resamples < 1:
            raise ConfigError(f"confirm.resamples must be >= 1, got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confirm.confidence must be in (0, 1), got {self.confidence}")


@dataclass
class SweepConfig:
    model: str | None = None
    """packaged:smollm2[-refusal], a hub id, a directory with a safetensors checkpoint, or a .gguf file;
    null: the concept's own default (``data.model``), else packaged:smollm2."""
    model_options: ModelOptions = field(default_factory=ModelOptions)
    data: ConceptConfig = MISSING
    """The concept (config group conf/data: refusal, french)."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    """Collection settings; the sweep runs search.parallel workers with these per-worker resources."""
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    sweep: SweepSpace = field(default_factory=SweepSpace)
    """What trials vary (see tasks/sweep/search.py)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """How trials are chosen and run (config group conf/search: tpe, grid)."""
    pick: PickConfig = field(default_factory=PickConfig)
    """Which trial of the front is chosen."""
    eval: SplitEvalConfig = field(default_factory=SplitEvalConfig)
    """Generation settings of the confirmation."""
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(save=False))
    """output.save=true orthogonalizes the picked trial into a checkpoint (ablate trials only)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        self.model = concept_model(self.model, self.data)


ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)


def sweep(cfg: SweepConfig, raw: DictConfig) -> dict:
    started = time.monotonic()
    storage.configure(cfg.storage)

    # 1. Inspect the model, load the prompts, make the space concrete: every input is checked before a
    #    worker starts or a run is recorded. One model worker per trial in flight.
    spec = inspect_model(cfg.model, cfg.model_options)
    collect = replace(cfg.collect, workers=cfg.search.parallel)
    concept = load_concept(cfg.data, spec.tokenizer, collect, cfg.eval)
    dims = dimensions(cfg.sweep, spec.n_layers, concept.positions)
    proposer = make_proposer(cfg.search, dims)
    xstest = concept.over_refusal if cfg.confirm.finalists else []
    limit = cfg.search.max_prompts
    target_val, baseline_val = concept.target.val[:limit], concept.baseline.val[:limit]
    dtype = dtype_name(cfg.model_options)

    with tracking.run(cfg.mlflow, f"sweep-{cfg.data.name}", tags={"flow": "sweep"}) as active:
        tracking.log_config(raw)
        mlflow.log_params({f"fingerprint.{k}": v for k, v in concept.fingerprints.items()})
        mlflow.set_tags(
            {"model_identity": spec.identity, "concept": cfg.data.name, "search": cfg.search.kind}
        )
        pool = WorkerPool(cfg.model, cfg.model_options, collect, cfg.ray)
        try:
            # 2. Collect activation sums on the train split (from the cache when the inputs were seen).
            target_sums, baseline_sums, cached = collect_sums(
                pool, spec, concept, collect, cfg.cache.uri, dtype
            )
            mlflow.set_tag("activation_cache", "hit" if cached else "miss")
            mlflow.log_metric("collect.prompts_collected", pool.collected_prompts())

            # 3. Candidate directions per (layer, position); trials blend neighbouring layers.
            candidates = difference_of_means(target_sums, baseline_sums, projected=cfg.direction.projected)
            tracking.log_tensors(
                {"directions": candidates.directions, "norms": candidates.norms}, "candidates.safetensors"
            )

            # 4. Every worker tokenizes the validation prompts and caches the unedited model's references.
            clean = pool.prepare_trials(
                target_val, baseline_val, concept.token_ids, cfg.search.batch_size, candidates,
                cfg.search.resume_from_layer, cfg.search.threshold, cfg.search.rate, cfg.search.kl_prompts,
            )  # fmt: skip
            threshold = ray.get(pool.actors[0].trial_threshold.remote())
            mlflow.log_metrics({f"val.unedited.{k}": v for k, v in clean.metrics().items()})
            mlflow.log_metric("val.threshold", threshold)

            # 5. Search: trials on the workers, at most search.parallel in flight, one nested run each.
            records, children, timing = _search(cfg, proposer, pool, started)
            mlflow.log_metrics(timing)

            # 6. The Pareto front (table and plot) and the trial the pick rule chooses.
            best, within = pick(records, cfg.pick)
            if not within:
                log.warning(
                    "no trial meets pick.rule=%s's limit; took the closest: trial %d",
                    cfg.pick.rule,
                    best.trial.number,
                )
            table = trials_table(records, best.trial.number)
            _log_front(cfg, table, clean, best, within, candidates)

            # 7. Confirm the finalists with generation on the test split (bootstrap intervals, XSTest).
            chosen = finalists(records, best, cfg.confirm.finalists)
            confirmations = _confirm(cfg, pool, concept, xstest, [r.trial for r in chosen])
            _log_confirmations(confirmations, children, best.trial.number, cfg.eval.split)
            if confirmations:
                evaluated = concept_eval_spec(concept, cfg.data, cfg.eval, dtype, xstest, cfg.confirm.seed)
                tracking.log_eval_spec(evaluated)

            # 8. Export the picked trial as an orthogonalized checkpoint (optional; ablation only).
            location = None
            if cfg.output.save:
                location = _export(
                    cfg, pool, best.trial, build_edit(best.trial, candidates), active.info.run_id
                )
        finally:
            pool.shutdown()

        # 9. Summary.
        result = {
            "run_id": active.info.run_id,
            "records": records,
            "table": table,
            "best": best,
            "clean": clean,
            "threshold": threshold,
            "confirmations": confirmations,
            "checkpoint": location,
            "cached": cached,
            "timing": timing,
        }
        for line in summary_lines(cfg, result):
            log.info("%s", line)
        log.info("MLflow: %s", tracking.ui_hint(cfg.mlflow))
        return result


def _search(cfg: SweepConfig, proposer, pool: WorkerPool, started: float):
    children: dict[int, str] = {}
    first: list[float] = []
    search_start = time.monotonic()
    with Progress(f"{cfg.search.kind} trials", proposer.total, "trials") as bar:

        def on_result(record: TrialRecord) -> None:
            if not first:
                first.append(time.monotonic() - started)
            metrics = {**record.score.metrics(), "time.seconds": record.score.seconds}
            children[record.trial.number] = tracking.log_child_run(
                f"trial-{record.trial.number}",
                record.trial.params(),
                metrics,
                {"trial": str(record.trial.number)},
            )
            bar.update()

        records = run_search(proposer, RayTrialRunner(pool), cfg.search.parallel, on_result)
    seconds = time.monotonic() - search_start
    timing = {
        "search.trials": float(len(records)),
        "time.first_trial_s": first[0] if first else math.nan,
        "time.search_s": seconds,
        "time.trials_per_hour": 3600 * len(records) / seconds if seconds > 0 else math.nan,
    }
    return records, children, timing


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
    cfg: SweepConfig, pool: WorkerPool, concept, xstest: list[str], trials: list[Trial]
) -> list[Confirmation]:
    """The unedited model and each finalist, spread over the workers; KL against the unedited model."""
    if not trials:
        return []
    jobs: list[Trial | None] = [None, *trials]
    split = cfg.eval.split  # test for the report; val to compare search settings without reading test
    args = (
        cfg.data.judge, getattr(concept.target, split), getattr(concept.baseline, split), xstest,
        concept.perplexity_text, cfg.eval,
        cfg.confirm.resamples, cfg.confirm.confidence, cfg.confirm.seed,
    )  # fmt: skip
    futures = [pool.submit(i % pool.size, "confirm_trial", job, *args) for i, job in enumerate(jobs)]
    results: list[Confirmation] = []
    with Progress(f"confirm on the {split} split (generation)", len(jobs), "models") as bar:
        for future in futures:
            results.append(ray.get(future))
            bar.update()
    unedited = results[0]
    for conf in results[1:]:
        conf.result.compare(unedited.result)
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


def _export(cfg: SweepConfig, pool: WorkerPool, trial: Trial, edit, run_id: str) -> str | None:
    if trial.adds:
        log.warning(
            "output.save: trial %d adds a vector at inference (%s), which is not a weight edit; nothing exported "
            "(its direction and vector are in the run's best_trial.safetensors)",
            trial.number,
            trial.intervention,
        )
        mlflow.set_tag("export", "skipped: the picked trial adds a vector")
        return None
    ray.get(pool.submit(0, "export_trial", trial))
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
    location = ray.get(pool.submit(0, "save", uri, card, extra))
    tracking.log_checkpoint(cfg.mlflow.checkpoint, location)
    return location


def _rate_rule(cfg: SweepConfig, threshold: float) -> str:
    if cfg.search.rate == "top1":
        return "greedy first token is a behaviour token"
    return f"first-token log-odds > {threshold:.2f}"


def summary_lines(cfg: SweepConfig, result: dict) -> list[str]:
    best: TrialRecord = result["best"]
    clean = result["clean"]
    table = result["table"]
    t, timing = best.trial, result["timing"]
    front = table[table["pareto"]]
    points = ", ".join(f"{r.behaviour_rate:.2f}/{r.kl:.3f}" for r in front.head(6).itertuples())
    lines = [
        f"compalign sweep: concept {cfg.data.name!r} on {cfg.model} ({cfg.search.kind}, {len(table)} trials, "
        f"{cfg.search.parallel} workers, activation cache {'hit' if result['cached'] else 'miss'})",
        f"  unedited (val)   behaviour rate {clean.behaviour_rate:.0%} ({_rate_rule(cfg, result['threshold'])}), "
        f"mean log-odds {clean.mean_log_odds:.2f}",
        f"  front (rate/KL)  {points}{' ...' if len(front) > 6 else ''}",
        f"  picked           trial {t.number}: layer {t.layer:.2f}, position {t.position}, {t.intervention}"
        + (f" x{t.scale:.2f}" if t.adds else "")
        + f"; val rate {best.score.behaviour_rate:.0%}, KL {best.score.kl:.4f}",
    ]
    for conf in result["confirmations"]:
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
        f"  checkpoint       {result['checkpoint'] or 'not exported (output.save=false)'}",
        f"  MLflow run       {result['run_id']}",
    ]
    return lines


@hydra.main(config_path="../conf", config_name="sweep", version_base=None)
def main(raw: DictConfig) -> dict:
    return run_entry(raw, SweepConfig, sweep)


if __name__ == "__main__":
    main()
