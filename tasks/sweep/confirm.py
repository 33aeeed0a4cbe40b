"""Confirming a sweep's finalists by generation: behaviour rates with bootstrap intervals on the test
split, over-refusal on XSTest safe prompts, perplexity, and the KL against the unedited model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tasks.core.bootstrap import RateInterval, bootstrap_rate
from tasks.core.concept_config import EvalConfig, JudgeConfig
from tasks.core.worker import Worker
from tasks.directions.candidates import Candidates
from tasks.evaluation.evaluate import BehaviourEval, EvalResult, evaluate, generate, judge_answers
from tasks.evaluation.judges import make_judge, make_second_judge
from tasks.sweep.trial import CANDIDATES, Trial, TrialEdit, applied, build_edit


@dataclass
class Confirmation:
    """A finalist (or the unedited model, number None) judged from generated answers on the test split."""

    number: int | None
    result: EvalResult
    target: RateInterval
    baseline: RateInterval
    xstest: RateInterval | None = None
    xstest_eval: BehaviourEval | None = None

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}.perplexity": self.result.perplexity}
        for name, interval in (("target", self.target), ("baseline", self.baseline), ("xstest", self.xstest)):
            if interval is not None:
                out.update({f"{prefix}.{name}_{k}": v for k, v in interval.as_dict().items()})
        if self.result.kl is not None:
            out[f"{prefix}.kl"] = self.result.kl
        judged = (
            ("target", self.result.target),
            ("baseline", self.result.baseline),
            ("xstest", self.xstest_eval),
        )
        for name, ev in judged:
            if ev is not None and ev.second is not None:
                out[f"{prefix}.{name}_rate_{ev.second.judge}"] = ev.second.rate
                out[f"{prefix}.{name}_kappa"] = ev.second.kappa
        return out

    def samples(self) -> dict:
        out = self.result.samples()
        if self.xstest_eval is not None:
            out["xstest"] = self.xstest_eval.samples
        return out


def confirm(
    model: nn.Module,
    tokenizer,
    judge,
    edit: TrialEdit | None,
    target: list[str],
    baseline: list[str],
    xstest: list[str],
    text: str,
    eval_cfg,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    number: int | None = None,
    second=None,
) -> Confirmation:
    """Generate (greedy) with the edit applied on the test prompts and judge the answers: behaviour rates
    with bootstrap intervals, over-refusal on ``xstest`` safe prompts (when given), perplexity, and the
    first-token log-probs of the baseline prompts (for the KL against the unedited model's)."""
    with applied(model, edit):
        result = evaluate(
            model, tokenizer, judge, target, baseline, text, eval_cfg.max_new_tokens, eval_cfg.batch_size,
            eval_cfg.perplexity_tokens, second=second,
        )  # fmt: skip
        xs_eval = None
        if xstest:
            answers = generate(model, tokenizer, xstest, eval_cfg.max_new_tokens, eval_cfg.batch_size)
            xs_eval = judge_answers(judge, xstest, answers, tokenizer, second)

    def interval(ev: BehaviourEval | None) -> RateInterval | None:
        if ev is None:
            return None
        return bootstrap_rate([s["flagged"] for s in ev.samples], resamples, confidence, seed)

    return Confirmation(
        number=number,
        result=result,
        target=interval(result.target),
        baseline=interval(result.baseline),
        xstest=interval(xs_eval),
        xstest_eval=xs_eval,
    )


def confirm_trial(
    worker: Worker,
    trial: Trial | None,
    judge_cfg: JudgeConfig,
    target: list[str],
    baseline: list[str],
    xstest: list[str],
    text: str,
    eval_cfg: EvalConfig,
    resamples: int,
    confidence: float,
    seed: int,
) -> Confirmation:
    """``confirm`` one finalist (None: the unedited model) on the worker's model."""
    edit = None if trial is None else build_edit(trial, worker.held(CANDIDATES, Candidates))
    return confirm(
        worker.loaded.model, worker.loaded.tokenizer, make_judge(judge_cfg), edit, target, baseline, xstest,
        text, eval_cfg, resamples, confidence, seed, None if trial is None else trial.number,
        make_second_judge(judge_cfg, worker.loaded.device),
    )  # fmt: skip
