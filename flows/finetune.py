"""Finetune: supervised fine-tuning on refusal-filtered instruction data, DeepSpeed ZeRO on Ray Train.

Local, on embedded defaults (packaged SmolLM2-135M-Instruct, the bundled chat_small set filtered of
boilerplate, a few steps on CPU with 2 Ray Train workers, MLflow store ./mlflow.db):

    python -m flows.finetune
    python -m flows.finetune data=alpaca_small data.filter=none train.max_steps=20
    python -m flows.finetune data=refusal_teach data.filter=none lora.enabled=true

A sweep fans out one SFT job per combination (at most hydra.launcher.n_jobs at once), each its own
MLflow run nested under one parent run per sweep directory:

    python -m flows.finetune -m train.lr=1e-5,2e-5 data.filter=none,phrases hydra.launcher.n_jobs=2

On a Ray cluster (see cluster/README.md):

    python -m flows.finetune ray.address=auto model=<mixtral path> data=<sft set> deepspeed=zero3_offload \
        train.workers=16 train.gpus_per_worker=1 train.storage_uri=s3://bucket/ray output.uri=s3://bucket/sft

Steps: inspect model and data -> filter (phrases; direction on Ray actors) -> tokenize, split, plan
(every bad input fails here, before a training worker starts) -> evaluate before -> train (Ray Train +
DeepSpeed, metrics logged per step) -> evaluate after -> track checkpoint -> summary.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import mlflow
import ray
from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf

from flows import _tracking as tracking
from flows._common import run_entry
from flows._steps import harness_lines, log_eval, over_refusal_lines, second_judge_lines
from tasks.core import storage
from tasks.core.checkpoint import model_card
from tasks.core.config import (
    PACKAGED_MODEL,
    CacheConfig,
    CollectConfig,
    MlflowConfig,
    ModelOptions,
    OutputConfig,
    RayConfig,
    StorageConfig,
)
from tasks.core.errors import CompalignError, ConfigError
from tasks.core.model import dtype_name, inspect_model
from tasks.core.progress import Progress
from tasks.core.prompts import load_prompts, over_refusal_prompts, read_text_source
from tasks.evaluation.evaluate import EvalResult
from tasks.evaluation.judges import second_judge_kind
from tasks.evaluation.spec import EvalSpec, build_spec
from tasks.runtime.workers import WorkerPool, init_ray
from tasks.sft.config import (
    DeepSpeedSettings,
    FilterConfig,
    FinetuneEvalConfig,
    LoraSettings,
    SftDataConfig,
    TrainConfig,
    filter_rules,
)
from tasks.sft.data import load_conversations, split_train_val, tokenize_set
from tasks.sft.filter import (
    DEFAULT_BOILERPLATE_PHRASES,
    apply_filters,
    load_cached_scores,
    load_refusal_direction,
    outlier_threshold,
    phrase_hits,
    scores_key,
    store_scores,
)
from tasks.sft.job import TrainJob
from tasks.sft.train import (
    deepspeed_config,
    ensure_torch_extensions_dir,
    fit,
    moe_warning,
    plan,
    resolve_precision,
    worker_env,
)

log = logging.getLogger("compalign.finetune")
PARENT_RUN_ENV = "COMPALIGN_MLFLOW_PARENT_RUN"
SWEEP_RAY_ENV = "COMPALIGN_SWEEP_RAY_ADDRESS"


@dataclass
class FinetuneConfig:
    model: str = PACKAGED_MODEL
    """packaged:smollm2, a hub id, a directory with a safetensors checkpoint, or a .gguf file."""
    model_options: ModelOptions = field(default_factory=ModelOptions)
    data: SftDataConfig = MISSING
    """The instruction set (config group conf/data: chat_small, alpaca_small, refusal_teach)."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSettings = MISSING
    """ZeRO settings (config group conf/deepspeed: zero2, zero3, zero3_offload, zero2_offload)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Content-addressed store of the direction filter's answer scores (null: off)."""
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if "direction" in filter_rules(self.data.filter) and not self.filter.direction:
            raise ConfigError(
                f"data.filter={self.data.filter} needs filter.direction: the MLflow run id of an abliterate "
                "run, or a direction .safetensors file"
            )


ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)


@dataclass
class PreparedData:
    """Filtered, tokenized and split data with what the run logs about it."""

    report: object
    train_set: object
    val_set: object
    unusable: int
    steps_per_epoch: int
    total_steps: int


def finetune(cfg: FinetuneConfig, raw: DictConfig) -> dict:
    storage.configure(cfg.storage)
    ensure_torch_extensions_dir()
    ray_cfg = _ray_config(cfg.ray)

    # 1. Inspect the model (config and tokenizer, no weights), check the DeepSpeed config against the
    #    workers, load the data and the evaluation prompts: bad input fails before any worker starts.
    spec = inspect_model(cfg.model, cfg.model_options)
    precision = resolve_precision(cfg.train.precision, cfg.train.gpus_per_worker > 0)
    ds_config = deepspeed_config(cfg.deepspeed, cfg.train, precision)
    if warning := moe_warning(spec.config, cfg.train):
        log.warning("%s", warning)
    conversations = load_conversations(cfg.data)
    rules = filter_rules(cfg.data.filter)
    direction = None
    if "direction" in rules:
        path = tracking.direction_source(cfg.filter.direction, cfg.mlflow, "filter.direction")
        direction = load_refusal_direction(path, spec.hidden_size, spec.n_layers, cfg.filter.layer)
    prompts = _eval_prompts(cfg.eval) if cfg.eval.enabled else None

    # 2-3. Filter (phrases here; the direction detector on Ray actors), tokenize, split and plan the
    #      schedule; no usable rows, or too few for one step, is an error here.
    data = prepare(cfg, spec, conversations, rules, direction, ray_cfg)

    name = f"finetune-{cfg.data.name}"
    parent = os.environ.get(PARENT_RUN_ENV)
    tags = {"flow": "finetune", **({"mlflow.parentRunId": parent} if parent else {})}
    mlflow.enable_system_metrics_logging()  # CPU, memory (and GPU) of this driver, sampled every 10 s
    with tracking.run(cfg.mlflow, name, tags=tags) as active:
        mlflow.disable_system_metrics_logging()  # this run keeps its monitor; later runs are not affected
        run_id = active.info.run_id
        tracking.log_config(raw)
        mlflow.set_tags(
            {"model_identity": spec.identity, "dataset": cfg.data.name, "deepspeed": cfg.deepspeed.name}
        )
        mlflow.log_params(
            {
                "fingerprint.before_filter": data.report.fingerprint_before,
                "fingerprint.after_filter": data.report.fingerprint_after,
                "prepared.train_sequences": len(data.train_set),
                "prepared.val_sequences": len(data.val_set),
                "prepared.total_steps": data.total_steps,
                "prepared.precision": precision,
            }
        )
        mlflow.log_metrics({**data.report.metrics(), "filter.unusable": float(data.unusable)})
        mlflow.log_dict(data.report.to_dict(), "filter/report.json")
        mlflow.log_dict(ds_config, "deepspeed_config.json")

        # 4. Start (or join) Ray and evaluate the base model (refusal judge, perplexity, first-token
        #    log-probs for the KL).
        init_ray(ray_cfg)
        before = _evaluate(cfg.model, cfg, ray_cfg, prompts, None) if prompts else None

        # 5. Train on Ray Train with DeepSpeed; per-step metrics are logged as they arrive.
        output = (cfg.output.uri or f"checkpoints/{run_id}") if cfg.output.save else None
        job = TrainJob(
            model_path=spec.path,
            trust_remote_code=cfg.model_options.trust_remote_code,
            revision=cfg.model_options.revision,
            tokenizer=spec.tokenizer,
            train=cfg.train,
            lora=cfg.lora,
            deepspeed=ds_config,
            precision=precision,
            train_data=ray.put(data.train_set),
            val_data=ray.put(data.val_set) if len(data.val_set) else None,
            packed=cfg.data.packing,
            pad_id=spec.tokenizer.pad_token_id,
            total_steps=data.total_steps,
            steps_per_epoch=data.steps_per_epoch,
            output_uri=_absolute(output) if output else None,
            card=_card(cfg, run_id, data),
            env=worker_env(os.environ["TORCH_EXTENSIONS_DIR"]),
        )
        storage_uri = _absolute(cfg.train.storage_uri or "checkpoints/ray_train")
        with Progress("train", data.total_steps, "steps") as bar:
            result = fit(job, storage_uri, f"finetune-{run_id}", lambda event: _log_event(event, bar))
        mlflow.log_metrics(
            {"train.attempts": float(result.attempts), "train.restarts": float(result.attempts - 1)}
        )
        if result.resumable:
            mlflow.set_tag("resumable_checkpoint", result.resumable)

        # 6. Evaluate the fine-tuned model the same way; KL against the base model's log-probs.
        after = None
        if before is not None and result.checkpoint:
            if storage.is_remote(result.checkpoint):
                log.warning("evaluate after: %s is remote; evaluate it with a local copy", result.checkpoint)
            else:
                after = _evaluate(result.checkpoint, cfg, ray_cfg, prompts, before.baseline_logprobs)
        if after is not None:
            log_eval(before, after, _eval_spec(cfg, prompts))
        elif before is not None:
            mlflow.log_metrics(before.metrics("before"))

        # 7. Track the checkpoint.
        if result.checkpoint:
            tracking.log_checkpoint(cfg.mlflow.checkpoint, result.checkpoint)

        # 8. Summary.
        summary = {
            "run_id": run_id,
            "result": result,
            "before": before,
            "after": after,
            "filter": data.report,
        }
        for line in summary_lines(cfg, summary):
            log.info("%s", line)
        log.info("MLflow: %s", tracking.ui_hint(cfg.mlflow))
        return summary


def prepare(cfg: FinetuneConfig, spec, conversations, rules, direction, ray_cfg: RayConfig) -> PreparedData:
    """Filter, split, tokenize and plan; raises CompalignError when nothing (or too little) is left."""
    phrases = list(cfg.filter.phrases) or list(DEFAULT_BOILERPLATE_PHRASES)
    hits = (
        phrase_hits(conversations, phrases + list(cfg.filter.extra_phrases)) if "phrases" in rules else None
    )
    scores, threshold = None, None
    if direction is not None:
        scores = _direction_scores(cfg, spec, conversations, direction, ray_cfg)
        threshold = cfg.filter.threshold
        if threshold is None:
            threshold = outlier_threshold(scores, cfg.filter.mad_factor)
    layer = direction.layer if direction is not None else None
    kept, report = apply_filters(conversations, rules, hits, scores, threshold, cfg.filter.sample, layer)
    for rule, count in report.dropped.items():
        log.info("filter %s: dropped %d of %d rows", rule, count, report.rows_before)
    if not kept:
        raise CompalignError(
            f"no usable rows after filtering {cfg.data.source} with data.filter={cfg.data.filter}: all "
            f"{report.rows_before} rows were dropped ({report.dropped}); use another data set, "
            "data.filter=none, or a narrower filter (filter.phrases / filter.threshold)"
        )
    train_rows, val_rows = split_train_val(kept, cfg.data.val_fraction, cfg.data.seed)
    tokenizer = spec.tokenizer
    train_set, unusable = tokenize_set(tokenizer, train_rows, cfg.data.max_length, cfg.data.packing)
    val_set, unusable_val = tokenize_set(tokenizer, val_rows, cfg.data.max_length, cfg.data.packing)
    if len(train_set) == 0:
        raise CompalignError(
            f"no usable rows after filtering {cfg.data.source}: none of the {len(train_rows)} training rows has "
            f"an assistant answer within data.max_length={cfg.data.max_length} tokens"
        )
    per_epoch, total = plan(train_set, cfg.train)
    log.info(
        "data %s: %d rows -> %d after filters -> %d train / %d val sequences; %d steps (%d per epoch)",
        cfg.data.name,
        report.rows_before,
        report.rows_after,
        len(train_set),
        len(val_set),
        total,
        per_epoch,
    )
    return PreparedData(report, train_set, val_set, len(unusable) + len(unusable_val), per_epoch, total)


def _direction_scores(cfg, spec, conversations, direction, ray_cfg) -> list[float]:
    key = scores_key(spec.identity, direction, cfg.filter.tokens, cfg.data.max_length, conversations)
    cached = load_cached_scores(cfg.cache.uri, key) if cfg.cache.uri else None
    if cached is not None and len(cached) == len(conversations):
        log.info("direction filter: scores from the cache (key %s)", key[:12])
        return cached
    resources = CollectConfig(
        workers=min(cfg.filter.workers, len(conversations)),
        cpus_per_worker=cfg.filter.cpus_per_worker,
        gpus_per_worker=cfg.filter.gpus_per_worker,
    )
    pool = WorkerPool(cfg.model, cfg.model_options, resources, ray_cfg)
    try:
        messages = [c.messages for c in conversations]
        args = (
            direction.vector,
            direction.layer,
            cfg.filter.tokens,
            cfg.filter.batch_size,
            cfg.data.max_length,
        )
        scores = pool.score_answers(messages, *args)
    finally:
        pool.shutdown()
    if cfg.cache.uri:
        store_scores(cfg.cache.uri, key, scores)
    return scores


def _eval_prompts(cfg: FinetuneEvalConfig) -> tuple[list[str], list[str], str, list[str]]:
    xstest = over_refusal_prompts(cfg.judge.kind, cfg.xstest, cfg.xstest_limit)
    return load_prompts(cfg.target), load_prompts(cfg.baseline), read_text_source(cfg.perplexity_text), xstest


def _eval_spec(cfg: FinetuneConfig, prompts) -> EvalSpec:
    target, baseline, text, xstest = prompts
    dtype = dtype_name(cfg.model_options)
    sets = {"target": target, "baseline": baseline, "xstest": xstest}
    return build_spec(cfg.eval.judge, second_judge_kind(cfg.eval.judge), sets, text, cfg.eval, dtype, None)


def _evaluate(model: str, cfg: FinetuneConfig, ray_cfg: RayConfig, prompts, reference) -> EvalResult:
    resources = CollectConfig(
        workers=1, cpus_per_worker=cfg.eval.cpus_per_worker, gpus_per_worker=cfg.eval.gpus_per_worker
    )
    pool = WorkerPool(model, cfg.model_options, resources, ray_cfg)
    try:
        target, baseline, text, xstest = prompts
        return ray.get(
            pool.submit(0, "evaluate", cfg.eval.judge, target, baseline, text, cfg.eval, reference, xstest)
        )
    finally:
        pool.shutdown()


def _log_event(event: dict, bar: Progress) -> None:
    kind = event["type"]
    if kind == "step":
        step = event["step"]
        mlflow.log_metrics({f"train.{k}": v for k, v in event["metrics"].items() if k != "step"}, step=step)
        bar.done = step - 1  # a resumed run reports from its checkpoint on
        bar.update()
    elif kind == "eval":
        mlflow.log_metric("train.val_loss", event["val_loss"], step=event["step"])
    elif kind == "checkpoint":
        mlflow.log_metric("train.checkpoint_step", event["step"], step=event["step"])
    elif kind == "worker" and event["rank"] == 0 and event["resumed_from"]:
        log.warning("training restarted; resuming from the checkpoint of step %d", event["resumed_from"])
    elif kind == "final" and event.get("val_loss") is not None:
        mlflow.log_metric("train.val_loss", event["val_loss"], step=event["step"])


def _absolute(uri: str) -> str:
    """Local paths made absolute (Ray Train workers do not share the driver's working directory)."""
    return uri if storage.is_remote(uri) else str(storage.local_path(uri).resolve())


def _ray_config(cfg: RayConfig) -> RayConfig:
    """Jobs of a multirun join the Ray the sweep started (see SweepTracking) instead of starting one each."""
    address = os.environ.get(SWEEP_RAY_ENV)
    if cfg.address is None and address:
        return RayConfig(
            address=address, log_to_driver=cfg.log_to_driver, pack_on_one_node=cfg.pack_on_one_node
        )
    return cfg


def _card(cfg: FinetuneConfig, run_id: str, data: PreparedData) -> str:
    how = "LoRA adapters merged into the weights" if cfg.lora.enabled else "all weights"
    return model_card(
        cfg.model,
        {
            "dataset": cfg.data.source,
            "filter": cfg.data.filter,
            "rows_after_filter": data.report.rows_after,
            "steps": data.total_steps,
            "deepspeed": cfg.deepspeed.name,
            "mlflow_run": run_id,
        },
        f"# {cfg.model} fine-tuned on `{cfg.data.name}`\n\n"
        f"Supervised fine-tuning by compalign ({how}, DeepSpeed ZeRO-{cfg.deepspeed.stage} on Ray Train) on "
        f"{data.report.rows_after} of {data.report.rows_before} rows of {cfg.data.source} after the "
        f"`{cfg.data.filter}` filter, loss on assistant tokens only (MLflow run `{run_id}`, experiment "
        f"`{cfg.mlflow.experiment}`).",
    )


def summary_lines(cfg: FinetuneConfig, summary: dict) -> list[str]:
    result, report = summary["result"], summary["filter"]
    history = {m["step"]: m for m in result.history}
    first, last = history.get(min(history, default=0), {}), history.get(result.steps, {})
    lines = [
        f"compalign finetune: {cfg.model} on {cfg.data.name} (filter {cfg.data.filter}, {cfg.deepspeed.name})",
        f"  data             {report.rows_before} rows -> {report.rows_after} kept "
        f"({', '.join(f'{rule} dropped {n}' for rule, n in report.dropped.items()) or 'no filter'})",
        f"  train            {result.steps} steps, loss {first.get('loss', float('nan')):.3f} -> "
        f"{last.get('loss', float('nan')):.3f}, val loss {result.final.get('val_loss') or float('nan'):.3f}, "
        f"{last.get('tokens_per_s', 0):.0f} tokens/s, {result.attempts - 1} restart(s)",
    ]
    before, after = summary["before"], summary["after"]
    if before is not None and after is not None:
        lines += [
            f"  refusals         harmful {before.target.interval()} -> {after.target.interval()}; "
            f"harmless {before.baseline.interval()} -> {after.baseline.interval()}",
            *second_judge_lines(before, after),
            *over_refusal_lines(before, after),
            *harness_lines(before, after),
            f"  KL (harmless)    {after.kl:.4f} first-token KL, fine-tuned vs base",
            f"  perplexity       {before.perplexity:.2f} -> {after.perplexity:.2f} on held-out English text",
        ]
    lines += [
        f"  checkpoint       {result.checkpoint or 'not saved (output.save=false)'}",
        f"  MLflow run       {summary['run_id']}",
    ]
    return lines


class SweepTracking(Callback):
    """Hydra callback for multiruns: one parent MLflow run per sweep directory (each job's run is nested
    under it through the mlflow.parentRunId tag), and one local Ray shared by the jobs (the launcher's
    processes join it). Configured under hydra.callbacks in conf/finetune.yaml."""

    def __init__(self) -> None:
        self.parent: str | None = None
        self.started_ray = False

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        mlflow_cfg = MlflowConfig(**OmegaConf.to_container(config.mlflow, resolve=True))
        tracking.configure(mlflow_cfg)
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        experiment = mlflow.get_experiment_by_name(mlflow_cfg.experiment)
        run = mlflow.MlflowClient().create_run(
            experiment.experiment_id,
            run_name=f"finetune-sweep-{Path(sweep_dir).name}",
            tags={"flow": "finetune", "sweep_dir": sweep_dir, "sweep": " ".join(config.hydra.overrides.task)},
        )
        self.parent = run.info.run_id
        os.environ[PARENT_RUN_ENV] = self.parent
        if config.ray.address is None and not ray.is_initialized():
            init_ray(RayConfig(num_cpus=config.ray.num_cpus, log_to_driver=config.ray.log_to_driver))
            os.environ[SWEEP_RAY_ENV] = ray.get_runtime_context().gcs_address
            self.started_ray = True

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.parent:
            mlflow.MlflowClient().set_terminated(self.parent)
            os.environ.pop(PARENT_RUN_ENV, None)
        if self.started_ray:
            os.environ.pop(SWEEP_RAY_ENV, None)
            ray.shutdown()


# An absolute config path: the entry point below runs this function from the imported module, for
# which Hydra would otherwise look for the configs in a Python package.
@hydra.main(
    config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="finetune", version_base=None
)
def main(raw: DictConfig) -> dict:
    return run_entry(raw, FinetuneConfig, finetune)


if __name__ == "__main__":
    # Run the main of the importable module, not of __main__: the joblib launcher pickles the task and
    # its config for its worker processes, which must resolve flows.finetune.FinetuneConfig, the class
    # the config was built with.
    from flows.finetune import main as importable_main

    importable_main()
