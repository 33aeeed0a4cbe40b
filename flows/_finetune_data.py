"""The finetune flow's data steps: load and check every input, the memory plan included (step 1), then
filter, tokenize, split and plan the schedule (steps 2-3). Bad input fails here, before a training worker
starts; a memory plan that does not fit fails in step 1, before any Ray actor starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flows import _tracking as tracking
from tasks.core.config import RayConfig, Resources
from tasks.core.errors import CompalignError, keyed
from tasks.core.prompts import load_prompts, over_refusal_prompts, read_text_source
from tasks.runtime.pool import WorkerPool
from tasks.sft.config import FinetuneConfig, FinetuneEvalConfig, filter_rules
from tasks.sft.data import TokenizedSet, load_conversations, split_train_val, tokenize_set
from tasks.sft.filter import (
    DEFAULT_BOILERPLATE_PHRASES,
    FilterReport,
    answer_scores_part,
    apply_filters,
    load_cached_scores,
    load_refusal_direction,
    outlier_threshold,
    phrase_hits,
    scores_key,
    store_scores,
)
from tasks.sft.plan import GIB, FitPlan, check, plan_run
from tasks.sft.train import deepspeed_config, moe_warning, plan, resolve_precision

log = logging.getLogger("compalign.finetune")


@dataclass
class Inputs:
    """What step 1 loads and checks."""

    precision: str
    deepspeed: dict
    """The DeepSpeed config, checked against the workers."""
    conversations: list
    rules: list[str]
    """The filter rules of ``data.filter``."""
    direction: object
    """The direction filter's refusal direction (None without the direction rule)."""
    prompts: tuple | None
    """(target, baseline, perplexity text, XSTest) of the evaluation (None: eval.enabled=false)."""
    fit: FitPlan
    """Per-GPU (CPU workers: per-worker) and host memory of the run, checked to fit."""


@dataclass
class PreparedData:
    """Filtered, tokenized and split data with what the run logs about it."""

    report: FilterReport
    train_set: TokenizedSet
    val_set: TokenizedSet
    unusable: int
    steps_per_epoch: int
    total_steps: int


def load_inputs(cfg: FinetuneConfig, spec) -> Inputs:
    """1. Everything the run reads, checked: bad input fails here, before any worker starts."""
    precision = resolve_precision(cfg.train.precision, cfg.train.gpus_per_worker > 0)
    ds_config = deepspeed_config(cfg.deepspeed, cfg.train, precision)
    if warning := moe_warning(spec.config, cfg.train):
        log.warning("%s", warning)
    fit = memory_plan(cfg, spec, precision)
    rules = filter_rules(cfg.data.filter)
    direction = None
    if "direction" in rules:
        path = tracking.direction_source(cfg.filter.direction, cfg.mlflow, "filter.direction")
        with keyed("filter.direction", cfg.filter.direction):
            direction = load_refusal_direction(path, spec.hidden_size, spec.n_layers, cfg.filter.layer)
    prompts = _eval_prompts(cfg.eval) if cfg.eval.enabled else None
    return Inputs(precision, ds_config, load_conversations(cfg.data), rules, direction, prompts, fit)


def memory_plan(cfg: FinetuneConfig, spec, precision: str) -> FitPlan:
    """The run's memory plan, logged, and refused (CompalignError with the numbers) when it needs more
    than each GPU has (train.gpu_memory_gib, else torch.cuda's when the driver sees GPUs) or, with a local
    Ray, than this machine's memory whatever the batch; batches of data.max_length tokens that would not
    fit in this machine's memory are a warning (most sequences are shorter)."""
    import psutil
    import torch

    local = cfg.ray.address is None  # every worker runs on this machine
    fit = plan_run(cfg, spec.config, precision, local)
    for line in fit.lines():
        log.info("%s", line)
    gpu = cfg.train.gpu_memory_gib
    if gpu is None and fit.setup.on_gpu and torch.cuda.is_available():
        gpu = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
        gpu /= GIB
    if gpu is None and fit.setup.on_gpu:
        log.info("memory plan: GPU memory unknown here (set train.gpu_memory_gib to enforce the plan)")
    host = psutil.virtual_memory().total / GIB if local else None
    check(fit, gpu, host)
    if host is not None and fit.host_per_node > host:
        log.warning(
            "memory plan: %.1f GiB of host memory with batches of train.batch_size=%d x data.max_length=%d "
            "tokens, more than this machine's %.1f GiB: lower them if workers are killed",
            fit.host_per_node, cfg.train.batch_size, cfg.data.max_length, host,
        )  # fmt: skip
    return fit


def prepare(cfg: FinetuneConfig, spec, inputs: Inputs, ray_cfg: RayConfig) -> PreparedData:
    """2-3. Filter, split, tokenize and plan; raises CompalignError when nothing (or too little) is left."""
    conversations, rules, direction = inputs.conversations, inputs.rules, inputs.direction
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
    resources = Resources(
        min(cfg.filter.workers, len(conversations)), cfg.filter.cpus_per_worker, cfg.filter.gpus_per_worker
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
        parts = pool.map(answer_scores_part, messages, *args, stage="direction filter", unit="rows")
    finally:
        pool.shutdown()
    scores = [score for part in parts for score in part]
    if cfg.cache.uri:
        store_scores(cfg.cache.uri, key, scores)
    return scores


def _eval_prompts(cfg: FinetuneEvalConfig) -> tuple[list[str], list[str], str, list[str]]:
    xstest = over_refusal_prompts(cfg.judge.kind, cfg.xstest, cfg.xstest_limit)
    return load_prompts(cfg.target), load_prompts(cfg.baseline), read_text_source(cfg.perplexity_text), xstest
