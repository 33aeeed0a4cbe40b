"""Evaluation: batched greedy generation judged for the behaviour, next-token KL, perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tasks.core.bootstrap import RateInterval, bootstrap_rate
from tasks.core.concept_config import EvalConfig, HarnessConfig, JudgeConfig
from tasks.core.contrast import kl_divergence
from tasks.core.forward import chunks, left_pad, pad_id, positions_from_mask, tokenize
from tasks.core.model import input_device
from tasks.core.prompts import format_chat
from tasks.core.worker import Worker
from tasks.evaluation.harness import run_harness
from tasks.evaluation.judges import Judge, make_judge, make_second_judge


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to raw instructions (chat-formatted here), in input order."""
    device = input_device(model)
    sequences = tokenize(tokenizer, format_chat(tokenizer, prompts))
    order = sorted(range(len(prompts)), key=lambda i: len(sequences[i]))
    answers: list[str] = [""] * len(prompts)
    for batch in chunks(order, batch_size):
        ids, mask = left_pad([sequences[i] for i in batch], pad_id(tokenizer), device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id(tokenizer),
        )
        for row, i in enumerate(batch):
            answers[i] = tokenizer.decode(out[row, ids.shape[1] :], skip_special_tokens=True).strip()
        if progress:
            progress(len(batch))
    return answers


@dataclass
class BehaviourEval:
    """Judged answers of one prompt set."""

    flagged: int
    total: int
    samples: list[dict] = field(default_factory=list)
    """Every (prompt, answer, flagged) row."""
    flagged_short: int | None = None
    """How many show the behaviour judged on only the first ``SHORT_TOKENS`` tokens of each answer
    (None when not measured): refusals after a compliant opening show up only in the longer answers."""
    second: SecondReading | None = None
    """The second judge's reading of the same answers (None when no second judge is configured)."""

    @property
    def rate(self) -> float:
        return self.flagged / self.total if self.total else float("nan")

    @property
    def rate_short(self) -> float:
        return self.flagged_short / self.total if self.total and self.flagged_short is not None else math.nan

    def interval(self) -> RateInterval:
        """The rate with its seeded percentile-bootstrap 95% interval."""
        return bootstrap_rate([bool(row["flagged"]) for row in self.samples])


def cohen_kappa(first: list[bool], second: list[bool]) -> float:
    """Agreement of two judges beyond chance: 1 is total, 0 is chance level. When both judges give one
    and the same label to everything, chance agreement is total and kappa is undefined: 1.0 if they agree
    on every answer (they always do then), NaN otherwise."""
    n = len(first)
    if n == 0:
        return math.nan
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    p1, p2 = sum(first) / n, sum(second) / n
    chance = p1 * p2 + (1 - p1) * (1 - p2)
    if chance >= 1.0:
        return 1.0 if observed == 1.0 else math.nan
    return (observed - chance) / (1 - chance)


@dataclass
class SecondReading:
    """The same answers judged by a second judge of another kind, and how far the two agree."""

    judge: str
    flagged: int
    total: int
    kappa: float
    """Cohen's kappa between the first judge's flags and this judge's."""
    flags: list[bool] = field(default_factory=list)
    """This judge's flag per answer, in the order of the samples."""
    disagreements: list[dict] = field(default_factory=list)
    """Every (prompt, answer, first, second) row where the two judges differ, to read."""

    @property
    def rate(self) -> float:
        return self.flagged / self.total if self.total else float("nan")

    def interval(self) -> RateInterval:
        """This judge's rate with its seeded percentile-bootstrap 95% interval."""
        return bootstrap_rate(self.flags)


# The short reading beside the full answer: what a 32-token judge would have reported.
SHORT_TOKENS = 32


def judge_answers(
    judge: Judge, prompts: list[str], answers: list[str], tokenizer=None, second: Judge | None = None
) -> BehaviourEval:
    """Judge ``answers``; with ``tokenizer``, also judge each answer's first ``SHORT_TOKENS`` tokens;
    with ``second``, judge them again by that judge and measure the agreement."""
    flags = judge.judge(prompts, answers)
    samples = [
        {"prompt": p, "answer": a, "flagged": f} for p, a, f in zip(prompts, answers, flags, strict=True)
    ]
    short = None
    if tokenizer is not None:
        heads = [
            tokenizer.decode(tokenizer(a, add_special_tokens=False).input_ids[:SHORT_TOKENS]) for a in answers
        ]
        short = sum(judge.judge(prompts, heads))
    reading = None
    if second is not None:
        other = second.judge(prompts, answers)
        reading = SecondReading(
            judge=second.name,
            flagged=sum(other),
            total=len(other),
            kappa=cohen_kappa(flags, other),
            flags=other,
            disagreements=[
                {"prompt": p, "answer": a, judge.name: f, second.name: o}
                for p, a, f, o in zip(prompts, answers, flags, other, strict=True)
                if f != o
            ],
        )
    return BehaviourEval(
        flagged=sum(flags), total=len(flags), samples=samples, flagged_short=short, second=reading
    )


@torch.inference_mode()
def next_token_logprobs(model: nn.Module, tokenizer, prompts: list[str], batch_size: int) -> torch.Tensor:
    """Log-probabilities of the first generated token: (prompts, vocab) float32, input order."""
    device = input_device(model)
    sequences = tokenize(tokenizer, format_chat(tokenizer, prompts))
    rows = []
    for group in chunks(sequences, batch_size):
        ids, mask = left_pad(group, pad_id(tokenizer), device)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), logits_to_keep=1
        ).logits
        rows.append(torch.log_softmax(logits[:, -1].float(), -1).cpu())
    return torch.cat(rows)


def mean_kl(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean KL(before || after) over rows of log-probabilities."""
    return float(kl_divergence(before, after).mean())


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer, text: str, max_tokens: int, window: int = 512) -> float:
    """Perplexity of the first ``max_tokens`` tokens of ``text``, in non-overlapping windows."""
    device = input_device(model)
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        piece = torch.tensor(ids[start : start + window + 1], device=device)[None]
        if piece.shape[1] < 2:
            break
        logits = model(input_ids=piece[:, :-1]).logits.float()
        nll += float(
            torch.nn.functional.cross_entropy(logits[0], piece[0, 1:].to(logits.device), reduction="sum")
        )
        count += piece.shape[1] - 1
    return math.exp(nll / count)


@dataclass
class EvalResult:
    """Before- or after-edit evaluation on the test split."""

    target: BehaviourEval
    """Behaviour on target prompts (refusals of harmful requests, French answers to French questions)."""
    baseline: BehaviourEval
    """Behaviour on baseline prompts (over-refusal, French answers to English questions)."""
    perplexity: float
    baseline_logprobs: torch.Tensor
    """(baseline test prompts, vocab) first-token log-probs, the reference for the next evaluation's KL."""
    kl: float | None = None
    """Mean first-token KL(reference || this model) on baseline test prompts, when a reference was given."""
    kl_without_behaviour: float | None = None
    """The same KL over only the baseline prompts whose reference answers the judge did not flag (for
    refusal: the harmless requests the reference model answers), when ``compare`` set it."""
    over_refusal: BehaviourEval | None = None
    """Refusals of XSTest's safe prompts (requests that only sound harmful), when they were given."""
    harness: dict[str, float] = field(default_factory=dict)
    """lm-evaluation-harness metrics, ``<task>.<metric>`` -> value (empty when no task was asked for)."""

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {
            f"{prefix}.target_rate": self.target.rate,
            f"{prefix}.target_flagged": float(self.target.flagged),
            f"{prefix}.baseline_rate": self.baseline.rate,
            f"{prefix}.baseline_flagged": float(self.baseline.flagged),
            f"{prefix}.perplexity": self.perplexity,
        }
        for name, judged in self._judged():
            interval = judged.interval()
            out[f"{prefix}.{name}_rate_low"], out[f"{prefix}.{name}_rate_high"] = interval.low, interval.high
            if judged.flagged_short is not None:
                out[f"{prefix}.{name}_rate_first{SHORT_TOKENS}"] = judged.rate_short
            if judged.second is not None:
                key = f"{prefix}.{name}_rate_{judged.second.judge}"
                second = judged.second.interval()
                out[key], out[f"{key}_low"], out[f"{key}_high"] = judged.second.rate, second.low, second.high
                out[f"{prefix}.{name}_kappa"] = judged.second.kappa
        if (kappa := self.agreement()) is not None:
            out[f"{prefix}.judges_kappa"] = kappa
        if self.kl is not None:
            out[f"{prefix}.kl"] = self.kl
        if self.kl_without_behaviour is not None:
            out[f"{prefix}.kl_without_behaviour"] = self.kl_without_behaviour
        out.update({f"{prefix}.harness.{name}": value for name, value in self.harness.items()})
        return out

    def compare(self, reference: EvalResult) -> None:
        """Set the KL of this model against ``reference`` on the same baseline prompts: over all of them,
        and over those whose reference answers were not flagged (NaN when every one was)."""
        self.kl = mean_kl(reference.baseline_logprobs, self.baseline_logprobs)
        keep = [i for i, sample in enumerate(reference.baseline.samples) if not sample["flagged"]]
        self.kl_without_behaviour = (
            mean_kl(reference.baseline_logprobs[keep], self.baseline_logprobs[keep]) if keep else math.nan
        )

    def _judged(self) -> list[tuple[str, BehaviourEval]]:
        """Every judged prompt set by its name in metrics and files (xstest when measured)."""
        sets = [("target", self.target), ("baseline", self.baseline)]
        return sets + ([("xstest", self.over_refusal)] if self.over_refusal is not None else [])

    def samples(self) -> dict:
        return {name: judged.samples for name, judged in self._judged()}

    def agreement(self) -> float | None:
        """Cohen's kappa of the two judges over target and baseline answers together (both labels occur
        there, so chance agreement is not total); None without a second judge."""
        sets = (self.target, self.baseline)
        if any(judged.second is None for judged in sets):
            return None
        first = [bool(row["flagged"]) for judged in sets for row in judged.samples]
        return cohen_kappa(first, [f for judged in sets for f in judged.second.flags])

    def disagreements(self) -> dict:
        """The answers the two judges read differently, per prompt set (empty without a second judge)."""
        return {
            name: judged.second.disagreements for name, judged in self._judged() if judged.second is not None
        }


def evaluate(
    model: nn.Module,
    tokenizer,
    judge: Judge,
    target: list[str],
    baseline: list[str],
    text: str,
    max_new_tokens: int,
    batch_size: int,
    perplexity_tokens: int,
    reference: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
    second: Judge | None = None,
    over_refusal: list[str] | None = None,
    harness: HarnessConfig | None = None,
) -> EvalResult:
    """Generate for target and baseline test prompts (and the ``over_refusal`` prompts, when given),
    judge, and measure perplexity on ``text``, the first-token KL against ``reference`` log-probs and
    the ``harness`` tasks, when any. Interventions active around the call apply."""
    answers_t = generate(model, tokenizer, target, max_new_tokens, batch_size, progress)
    answers_b = generate(model, tokenizer, baseline, max_new_tokens, batch_size, progress)
    logprobs = next_token_logprobs(model, tokenizer, baseline, batch_size)
    over = None
    if over_refusal:
        answers_x = generate(model, tokenizer, over_refusal, max_new_tokens, batch_size, progress)
        over = judge_answers(judge, over_refusal, answers_x, tokenizer, second)
    return EvalResult(
        target=judge_answers(judge, target, answers_t, tokenizer, second),
        baseline=judge_answers(judge, baseline, answers_b, tokenizer, second),
        perplexity=perplexity(model, tokenizer, text, perplexity_tokens),
        baseline_logprobs=logprobs,
        kl=None if reference is None else mean_kl(reference, logprobs),
        over_refusal=over,
        harness=run_harness(model, tokenizer, harness) if harness is not None and harness.tasks else {},
    )


def evaluate_loaded(
    worker: Worker,
    judge_cfg: JudgeConfig,
    target: list[str],
    baseline: list[str],
    text: str,
    eval_cfg: EvalConfig,
    reference: torch.Tensor | None = None,
    over_refusal: list[str] | None = None,
) -> EvalResult:
    """``evaluate`` on the worker's model with the configured judges (a judge model on its device)."""
    model, tokenizer = worker.loaded.model, worker.loaded.tokenizer
    return evaluate(
        model, tokenizer, make_judge(judge_cfg), target, baseline, text, eval_cfg.max_new_tokens,
        eval_cfg.batch_size, eval_cfg.perplexity_tokens, reference,
        second=make_second_judge(judge_cfg, worker.loaded.device), over_refusal=over_refusal,
        harness=eval_cfg.harness,
    )  # fmt: skip


def judge_behaviour(
    worker: Worker, prompts: list[str], judge_cfg: JudgeConfig, max_new_tokens: int, batch_size: int
) -> list[bool]:
    """Greedy answers to ``prompts`` on the worker's model, judged: True where an answer shows the behaviour."""
    answers = generate(worker.loaded.model, worker.loaded.tokenizer, prompts, max_new_tokens, batch_size)
    return make_judge(judge_cfg).judge(prompts, answers)
