"""Steps shared by the abliterate and sweep flows: each composes task functions with the Ray pool."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow

from flows import _tracking as tracking
from tasks.core.concept_config import CollectConfig, ConceptConfig, EvalConfig, SplitEvalConfig
from tasks.core.contrast import behaviour_token_ids
from tasks.core.errors import CompalignError
from tasks.core.model import ModelSpec
from tasks.core.prompts import (
    PromptSplit,
    fingerprint,
    load_prompts,
    over_refusal_prompts,
    read_text_source,
    resolve_positions,
    split_prompts,
    with_validation,
)
from tasks.directions import cache
from tasks.directions.candidates import Candidates
from tasks.directions.collect import ActivationSums, collect_part
from tasks.directions.config import ScoreConfig, SelectConfig
from tasks.directions.score import (
    Candidate,
    CandidateScore,
    build_candidates,
    prepare_scoring,
    scorable_layers,
    score_part,
)
from tasks.directions.select import pick_finalists
from tasks.directions.stream import Edit
from tasks.directions.verify import evaluate_hooked
from tasks.evaluation.evaluate import (
    SHORT_TOKENS,
    BehaviourEval,
    EvalResult,
    evaluate_loaded,
    judge_behaviour,
)
from tasks.evaluation.judges import second_judge_kind
from tasks.evaluation.spec import EvalSpec, build_spec
from tasks.runtime.pool import WorkerPool

log = logging.getLogger("compalign")


@dataclass
class ConceptData:
    """A concept's prompts, split, with what scoring needs."""

    target: PromptSplit
    baseline: PromptSplit
    fingerprints: dict[str, str]
    positions: int
    """How many post-instruction positions are collected."""
    token_ids: list[int]
    """Behaviour tokens at the first generated position."""
    perplexity_text: str
    over_refusal: list[str]
    """XSTest's safe prompts answered before and after (refusal concept only; empty when off)."""


def load_concept(data: ConceptConfig, tokenizer, collect: CollectConfig, eval_cfg: EvalConfig) -> ConceptData:
    """Load and split both prompt sets; fail early on anything that would fail later."""
    target = split_prompts(load_prompts(data.target), data.split, f"target set {data.target.source}")
    baseline = split_prompts(load_prompts(data.baseline), data.split, f"baseline set {data.baseline.source}")
    if (validation := data.validation.sources()) is not None:  # fit on one source, select on another
        target = with_validation(
            target, load_prompts(validation[0]), f"data.validation.target {validation[0].source}"
        )
        baseline = with_validation(
            baseline, load_prompts(validation[1]), f"data.validation.baseline {validation[1].source}"
        )
    for name, part in (("target", target), ("baseline", baseline)):
        if len(part.train) < collect.workers:
            raise CompalignError(
                f"the {name} train split has {len(part.train)} prompts, fewer than collect.workers={collect.workers}; "
                "give more prompts or use fewer workers"
            )
    fingerprints = {}
    for name, part in (("target", target), ("baseline", baseline)):
        for split in ("train", "val", "test"):
            fingerprints[f"{name}_{split}"] = fingerprint(getattr(part, split))
    return ConceptData(
        target=target,
        baseline=baseline,
        fingerprints=fingerprints,
        positions=resolve_positions(tokenizer, collect.positions),
        token_ids=behaviour_token_ids(tokenizer, data.score_tokens),
        perplexity_text=read_text_source(eval_cfg.perplexity_text),
        over_refusal=over_refusal_prompts(data.judge.kind, eval_cfg.xstest, eval_cfg.xstest_limit),
    )


def collect_sums(
    pool: WorkerPool,
    spec: ModelSpec,
    concept: ConceptData,
    collect: CollectConfig,
    cache_uri: str | None,
    dtype: str,
) -> tuple[ActivationSums, ActivationSums, int]:
    """Train-split sums for target and baseline, from the activation cache when the same inputs were
    collected before. Returns (target, baseline, prompts the workers ran: 0 when both came from the cache)."""
    out = []
    collected = 0
    for name, prompts in (("target", concept.target.train), ("baseline", concept.baseline.train)):
        key = cache.cache_key(
            spec.identity, fingerprint(prompts), spec.tokenizer.chat_template, concept.positions, dtype
        )
        sums = cache.load_sums(cache_uri, key) if cache_uri else None
        if sums is not None:
            log.info("collect %s: cache hit (%d prompts, key %s)", name, sums.count, key[:12])
        else:
            sums = collect_on_pool(pool, prompts, concept.positions, collect.batch_size, f"collect {name}")
            collected += sums.count
            if cache_uri:
                cache.store_sums(cache_uri, key, sums)
        out.append(sums)
    return out[0], out[1], collected


@dataclass
class ScoringResult:
    scores: list[CandidateScore]
    """Candidates scored on the whole validation split."""
    screened: list[CandidateScore]
    """Candidates only scored on the screening subset (not finalists)."""
    clean: tuple[float, float]
    """Unedited (target, baseline) behaviour log-odds on the whole validation split."""


def score_candidates_on_pool(
    pool: WorkerPool,
    concept: ConceptData,
    candidates: Candidates,
    n_layers: int,
    score_cfg: ScoreConfig,
    select_cfg: SelectConfig,
) -> ScoringResult:
    """Score every candidate below the layer cut-off (or only the forced layer/position) on the
    validation split, in two stages when ``score.screen_prompts`` is set: all candidates on a few
    prompts, then the ``score.finalists`` best on all. Zero directions (identical means, as at template
    tokens of the embedding output) are skipped."""
    limit = score_cfg.max_prompts
    target_val = concept.target.val[:limit] if limit else concept.target.val
    baseline_val = concept.baseline.val[:limit] if limit else concept.baseline.val
    layers = [x for x in scorable_layers(n_layers, select_cfg.layer_cutoff) if select_cfg.layer in (None, x)]
    positions = [p for p in range(-candidates.n_positions, 0) if select_cfg.position in (None, p)]
    if not layers or not positions:
        raise CompalignError(
            f"no candidate to score: select.layer={select_cfg.layer} / select.position={select_cfg.position} is "
            f"outside layers 0..{n_layers} below the cut-off or positions -{candidates.n_positions}..-1"
        )
    floor = 1e-6 * float(candidates.norms.max())
    todo = [
        c
        for c in build_candidates(candidates, layers, positions, score_cfg.induce_scale)
        if float(candidates.norms[c.layer, candidates.position_index(c.position)]) > floor
    ]
    args = (concept.token_ids, score_cfg.batch_size, score_cfg.candidates_per_pass, score_cfg.kl_prompts)
    screen = score_cfg.screen_prompts
    screened: list[CandidateScore] = []
    if screen and len(todo) > score_cfg.finalists and screen < min(len(target_val), len(baseline_val)):
        clean = pool.each(prepare_scoring, target_val[:screen], baseline_val[:screen], *args)[0]
        first = _score(pool, todo, "screen candidates")
        keep = pick_finalists(first, n_layers, select_cfg, clean[1], score_cfg.finalists)
        screened = [s for i, s in enumerate(first) if i not in set(keep)]
        todo = [todo[i] for i in keep]
    clean = pool.each(prepare_scoring, target_val, baseline_val, *args)[0]
    return ScoringResult(scores=_score(pool, todo, "score candidates"), screened=screened, clean=clean)


def _score(pool: WorkerPool, candidates: list[Candidate], stage: str) -> list[CandidateScore]:
    """Scores in candidate order. Shards are contiguous runs (candidates come layer by layer, and the
    induce pass batches candidates of one layer)."""
    parts = pool.map(score_part, candidates, stage=stage, unit="candidates")
    return [score for part in parts for score in part]


def collect_on_pool(
    pool: WorkerPool, prompts: list[str], positions: int, batch_size: int, stage: str
) -> ActivationSums:
    """Sums over all prompts, sharded over the workers (a few shards each so progress moves); exact merge."""
    if len(prompts) < pool.size:
        raise CompalignError(
            f"{stage}: {len(prompts)} prompts for {pool.size} workers; give more prompts or set "
            f"collect.workers <= {len(prompts)}"
        )
    return ActivationSums.merge(
        pool.map(collect_part, prompts, positions, batch_size, stage=stage, unit="prompts")
    )


def evaluate_edit(
    pool: WorkerPool, concept: ConceptData, judge_cfg, eval_cfg: SplitEvalConfig, edit: Edit
) -> tuple[EvalResult, EvalResult, int]:
    """Evaluate the unedited model on worker 0 and, at once on worker 1, the model as ``edit`` leaves it,
    through hooks equal to the edited weights (with one worker, one after the other): no worker is edited
    or holds a second copy. The KL of the edited model is taken against the unedited next-token
    distribution. Returns (before, after, index of the worker that evaluated the edit)."""
    editor = 1 if pool.size > 1 else 0
    target, baseline = (getattr(prompts, eval_cfg.split) for prompts in (concept.target, concept.baseline))
    args = (judge_cfg, target, baseline, concept.perplexity_text, eval_cfg, None, concept.over_refusal)
    pending = [pool.start(0, evaluate_loaded, *args), pool.start(editor, evaluate_hooked, edit, *args)]
    before, after = pool.gather(pending, "evaluate before/after", unit="models")
    after.compare(before)
    return before, after, editor


def concept_eval_spec(
    concept: ConceptData,
    data: ConceptConfig,
    eval_cfg: SplitEvalConfig,
    dtype: str,
    xstest: list[str] | None = None,
    bootstrap_seed: int = 0,
) -> EvalSpec:
    """The spec of an evaluation on the concept's ``eval.split`` prompts (XSTest: ``xstest`` when given,
    else the concept's)."""
    prompts = {
        f"target_{eval_cfg.split}": getattr(concept.target, eval_cfg.split),
        f"baseline_{eval_cfg.split}": getattr(concept.baseline, eval_cfg.split),
        "xstest": concept.over_refusal if xstest is None else xstest,
    }
    return build_spec(
        data.judge, second_judge_kind(data.judge), prompts, concept.perplexity_text, eval_cfg, dtype,
        data.split.seed, bootstrap_seed,
    )  # fmt: skip


def log_eval(before: EvalResult, after: EvalResult, spec: EvalSpec) -> None:
    """Metrics of both evaluations, their answers, the judges' disagreements and the evaluation spec."""
    tracking.log_eval_spec(spec)
    mlflow.log_metrics(before.metrics("before"))
    mlflow.log_metrics(after.metrics("after"))
    mlflow.log_dict({"before": before.samples(), "after": after.samples()}, "eval/answers.json")
    if before.agreement() is not None:
        disagreements = {"before": before.disagreements(), "after": after.disagreements()}
        mlflow.log_dict(disagreements, "eval/judge_disagreements.json")


def summary_lines(concept_name: str, model: str, result, split: str = "test") -> list[str]:
    """The abliterate flow's closing report of ``result`` (an ``AbliterateResult``)."""
    before: EvalResult = result.before
    after: EvalResult = result.after
    found = result.found
    rise = 100 * (after.perplexity / before.perplexity - 1)
    where = (
        f"layer {found.layer}, position {found.position} (of {found.n_positions} post-instruction positions)"
        if found.source == "search"
        else f"from file (layer {found.layer}, position {found.position}"
        + (", per-layer kernel weights)" if found.weights is not None else ")")
    )
    return [
        f"compalign abliterate: concept {concept_name!r} on {model}",
        f"  direction        {where}",
        f"  target {split:<10}{_rates(before.target, after.target)}",
        f"  baseline {split:<8}{_rates(before.baseline, after.baseline)}",
        f"  first {SHORT_TOKENS} tokens  target {_counts(before.target, after.target)}, "
        f"baseline {_counts(before.baseline, after.baseline)} (the same answers, judged on their opening)",
        *second_judge_lines(before, after),
        *over_refusal_lines(before, after),
        *harness_lines(before, after),
        f"  KL (baseline)    {after.kl:.4f} first-token KL, edited vs unedited "
        f"({after.kl_without_behaviour:.4f} on the baseline prompts answered without the behaviour)",
        f"  perplexity       {before.perplexity:.2f} -> {after.perplexity:.2f} ({rise:+.1f}%) on held-out English text",
        f"  checkpoint       {result.checkpoint or 'not saved (output.save=false)'}",
        f"  MLflow run       {result.run_id}",
    ]


def second_judge_lines(before: EvalResult, after: EvalResult) -> list[str]:
    """The second judge's counts and its agreement with the first (nothing without a second judge)."""
    if before.agreement() is None or after.agreement() is None:
        return []
    name = before.target.second.judge
    counts = ", ".join(
        f"{label} {b.second.flagged}/{b.total} -> {a.second.interval()}"
        for label, b, a in (
            ("target", before.target, after.target),
            ("baseline", before.baseline, after.baseline),
        )
    )
    return [
        f"  {name + ' judge':<17}{counts}; agreement with the first judge: kappa "
        f"{before.agreement():.2f} before, {after.agreement():.2f} after (disagreements in MLflow)"
    ]


def over_refusal_lines(before: EvalResult, after: EvalResult) -> list[str]:
    """Refusals of XSTest's safe prompts before -> after, by both judges (nothing when not measured)."""
    if before.over_refusal is None or after.over_refusal is None:
        return []
    b, a = before.over_refusal, after.over_refusal
    second = f"; {b.second.judge} {b.second.flagged} -> {a.second.flagged}" if b.second and a.second else ""
    return [f"  XSTest safe      {b.interval()} -> {a.interval()} refused (over-refusal{second})"]


def harness_lines(before: EvalResult, after: EvalResult) -> list[str]:
    """lm-evaluation-harness scores before -> after (stderr left to MLflow; nothing when not run)."""
    shown = [k for k in before.harness if "_stderr" not in k and k in after.harness]
    if not shown:
        return []
    scores = "; ".join(f"{k} {before.harness[k]:.3f} -> {after.harness[k]:.3f}" for k in shown)
    return [f"  lm-eval          {scores}"]


def _rates(before: BehaviourEval, after: BehaviourEval) -> str:
    return f"{before.interval()} -> {after.interval()} show the behaviour"


def _counts(before: BehaviourEval, after: BehaviourEval) -> str:
    return f"{before.flagged_short}/{before.total} -> {after.flagged_short}/{after.total}"


# Answers long enough for a refusal or a language to show, short enough to cost seconds.
BEHAVIOUR_CHECK_TOKENS = 32


def require_behaviour(
    pool: WorkerPool, model: str, concept: ConceptData, judge, min_share: float, batch_size: int
) -> tuple[int, int]:
    """How many validation target prompts the unedited model answers with the behaviour (flagged, total);
    raises CompalignError when that share is below ``min_share``: there is then nothing to remove."""
    prompts = concept.target.val
    parts = pool.map(
        judge_behaviour, prompts, judge, BEHAVIOUR_CHECK_TOKENS, batch_size,
        stage="behaviour check", unit="prompts", shards_per_worker=1,
    )  # fmt: skip
    flags = [flag for part in parts for flag in part]
    flagged, total = sum(flags), len(flags)
    log.info(
        "behaviour check: %s shows %r on %d of %d validation target prompts",
        model,
        str(judge.kind),
        flagged,
        total,
    )
    if total and flagged < min_share * total:
        what = "refuses" if judge.kind == "refusal" else f"shows the {judge.kind} behaviour on"
        hint = (
            " (try model=packaged:smollm2-refusal)"
            if model == "packaged:smollm2" and judge.kind == "refusal"
            else ""
        )
        raise CompalignError(
            f"{model} {what} {flagged} of {total} target prompts: nothing to remove{hint} "
            f"(select.min_behaviour={min_share:g})"
        )
    return flagged, total
