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

Steps (numbered as in README and in ``finetune``): 1 inspect the model, the DeepSpeed config, its memory
plan (per-GPU memory from the model's config, refused when it does not fit: tasks/sft/plan.py) and the
data, 2 filter (phrases; the direction detector on Ray actors), 3 tokenize, split and plan (every bad
input fails by here, before a training worker starts), 4 evaluate before, 5 train (Ray Train + DeepSpeed,
metrics logged per step), 6 evaluate after, 7 track the checkpoint, 8 summary. Multirun tracking (one
parent run per ``-m`` sweep) is in flows/_multirun.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import hydra
import mlflow
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from flows import _tracking as tracking
from flows._common import run_entry
from flows._finetune_data import Inputs, PreparedData, load_inputs, prepare
from flows._multirun import job_ray_config, parent_run
from flows._steps import harness_lines, log_eval, over_refusal_lines, second_judge_lines
from tasks.core import storage
from tasks.core.checkpoint import model_card
from tasks.core.config import RayConfig, Resources
from tasks.core.model import dtype_name, inspect_model
from tasks.core.progress import Progress
from tasks.evaluation.evaluate import EvalResult, evaluate_loaded
from tasks.evaluation.judges import second_judge_kind
from tasks.evaluation.spec import EvalSpec, build_spec
from tasks.runtime import cluster
from tasks.runtime.pool import WorkerPool
from tasks.sft.config import FinetuneConfig
from tasks.sft.filter import (
    FilterReport,
)
from tasks.sft.job import TrainJob, TrainResult
from tasks.sft.train import (
    ensure_torch_extensions_dir,
    fit,
    worker_env,
)

log = logging.getLogger("compalign.finetune")
ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)


@dataclass
class FinetuneResult:
    """What a finetune run kept, trained and measured."""

    run_id: str
    train: TrainResult
    before: EvalResult | None
    """The base model (None: eval.enabled=false)."""
    after: EvalResult | None
    """The fine-tuned model, KL against the base (None when not evaluated)."""
    filter: FilterReport


def finetune(cfg: FinetuneConfig, raw: DictConfig) -> FinetuneResult:
    storage.configure(cfg.storage)
    ensure_torch_extensions_dir()
    ray_cfg = job_ray_config(cfg.ray)

    # 1. Inspect the model (config and tokenizer, no weights), check the DeepSpeed config against the
    #    workers and its memory plan against the GPUs (or this machine), load the data, the filter's
    #    direction and the evaluation prompts; check that every output location is writable.
    spec = inspect_model(cfg.model, cfg.model_options)
    inputs = load_inputs(cfg, spec)
    tracking.check_outputs(cfg, {"train.storage_uri": cfg.train.storage_uri or "checkpoints/ray_train"})

    # 2-3. Filter (phrases here; the direction detector on Ray actors), tokenize, split and plan the
    #      schedule; no usable rows, or too few for one step, is an error here.
    data = prepare(cfg, spec, inputs, ray_cfg)

    tags = {"flow": "finetune", **({"mlflow.parentRunId": parent} if (parent := parent_run()) else {})}
    mlflow.enable_system_metrics_logging()  # CPU, memory (and GPU) of this driver, sampled every 10 s
    with tracking.run(cfg.mlflow, f"finetune-{cfg.data.name}", tags=tags) as active:
        mlflow.disable_system_metrics_logging()  # this run keeps its monitor; later runs are not affected
        run_id = active.info.run_id
        log_inputs(cfg, raw, spec, inputs, data)

        # 4. Start (or join) Ray and evaluate the base model (judges, perplexity, first-token log-probs).
        cluster.init_ray(ray_cfg)
        before = _evaluate(cfg.model, cfg, ray_cfg, inputs.prompts, None) if inputs.prompts else None

        # 5. Train on Ray Train with DeepSpeed; per-step metrics are logged as they arrive.
        result = train(cfg, spec, inputs, data, run_id)

        # 6. Evaluate the fine-tuned model the same way; KL against the base model's log-probs.
        after = evaluate_after(cfg, ray_cfg, inputs.prompts, before, result.checkpoint)

        # 7. Track the checkpoint.
        if result.checkpoint:
            tracking.log_checkpoint(cfg.mlflow.checkpoint, result.checkpoint)

        # 8. Summary.
        summary = FinetuneResult(run_id, result, before, after, data.report)
        for line in summary_lines(cfg, summary):
            log.info("%s", line)
        log.info("MLflow: %s", tracking.ui_hint(cfg.mlflow))
        return summary


def log_inputs(cfg: FinetuneConfig, raw: DictConfig, spec, inputs: Inputs, data: PreparedData) -> None:
    """The config, the data before and after the filter, the schedule, the DeepSpeed config and its
    memory plan (``plan.*`` metrics, memory_plan.txt)."""
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
            "prepared.precision": inputs.precision,
        }
    )
    mlflow.log_metrics(
        {**data.report.metrics(), "filter.unusable": float(data.unusable), **inputs.fit.metrics()}
    )
    mlflow.log_text("\n".join(inputs.fit.lines()) + "\n", "memory_plan.txt")
    mlflow.log_dict(data.report.to_dict(), "filter/report.json")
    mlflow.log_dict(inputs.deepspeed, "deepspeed_config.json")


def train(cfg: FinetuneConfig, spec, inputs: Inputs, data: PreparedData, run_id: str) -> TrainResult:
    """5. The training job on Ray Train; metrics and events are logged to the run as they arrive."""
    output = (cfg.output.uri or f"checkpoints/{run_id}") if cfg.output.save else None
    job = TrainJob(
        model_path=spec.path,
        trust_remote_code=cfg.model_options.trust_remote_code,
        revision=cfg.model_options.revision,
        tokenizer=spec.tokenizer,
        train=cfg.train,
        lora=cfg.lora,
        deepspeed=inputs.deepspeed,
        precision=inputs.precision,
        train_data=cluster.share(data.train_set),
        val_data=cluster.share(data.val_set) if len(data.val_set) else None,
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
    return result


def evaluate_after(
    cfg: FinetuneConfig, ray_cfg: RayConfig, prompts, before: EvalResult | None, checkpoint: str | None
) -> EvalResult | None:
    """6. The fine-tuned checkpoint evaluated as the base was (None when there is nothing to compare)."""
    after = None
    if before is not None and checkpoint:
        if storage.is_remote(checkpoint):
            log.warning("evaluate after: %s is remote; evaluate it with a local copy", checkpoint)
        else:
            after = _evaluate(checkpoint, cfg, ray_cfg, prompts, before.baseline_logprobs)
    if after is not None:
        log_eval(before, after, _eval_spec(cfg, prompts))
    elif before is not None:
        mlflow.log_metrics(before.metrics("before"))
    return after


def _eval_spec(cfg: FinetuneConfig, prompts) -> EvalSpec:
    target, baseline, text, xstest = prompts
    dtype = dtype_name(cfg.model_options)
    sets = {"target": target, "baseline": baseline, "xstest": xstest}
    return build_spec(cfg.eval.judge, second_judge_kind(cfg.eval.judge), sets, text, cfg.eval, dtype, None)


def _evaluate(model: str, cfg: FinetuneConfig, ray_cfg: RayConfig, prompts, reference) -> EvalResult:
    resources = Resources(1, cfg.eval.cpus_per_worker, cfg.eval.gpus_per_worker)
    pool = WorkerPool(model, cfg.model_options, resources, ray_cfg)
    try:
        target, baseline, text, xstest = prompts
        return pool.call(
            0, evaluate_loaded, cfg.eval.judge, target, baseline, text, cfg.eval, reference, xstest
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


def summary_lines(cfg: FinetuneConfig, summary: FinetuneResult) -> list[str]:
    result, report = summary.train, summary.filter
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
    before, after = summary.before, summary.after
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
        f"  MLflow run       {summary.run_id}",
    ]
    return lines


# An absolute config path: the entry point below runs this function from the imported module, for
# which Hydra would otherwise look for the configs in a Python package.
@hydra.main(
    config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="finetune", version_base=None
)
def main(raw: DictConfig) -> FinetuneResult:
    return run_entry(raw, FinetuneConfig, finetune)


if __name__ == "__main__":
    # Run the main of the importable module, not of __main__: the joblib launcher pickles the task and
    # its config for its worker processes, which must resolve flows.finetune.FinetuneConfig, the class
    # the config was built with.
    from flows.finetune import main as importable_main

    importable_main()
