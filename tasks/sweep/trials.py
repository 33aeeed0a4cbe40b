"""How a sweep trial is scored without generating, and the calls a sweep worker runs.

Scores on the validation prompts, from the first generated position only (one forward pass, no
generation): the behaviour rate (fraction of target prompts whose greedy first token is a behaviour
token, or whose behaviour log-odds exceed a threshold, 0 meaning probability > 0.5), the mean target
log-odds and the mean first-token KL(clean || edited) on baseline prompts. Work saved against a plain
forward pass per trial (``TrialEvaluator``): the token prefix every prompt shares is run once per trial
on one row and reused through the KV cache, only the last position goes through the LM head, and the
pass starts at the first layer the edit touches, from the clean residuals cached there (an edit that
starts at layer 15 of 30 costs half a pass).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from tasks.core.contrast import ContrastPrompts, behaviour_log_odds, kl_divergence, kl_mask
from tasks.core.errors import CompalignError, choice
from tasks.core.forward import chunks, last_logits, left_pad, prefix_cache, run_from_layer
from tasks.core.hooks import capture_residuals
from tasks.core.model import input_device
from tasks.core.worker import Worker, sets_up
from tasks.directions.candidates import Candidates
from tasks.sweep.config import BehaviourRate
from tasks.sweep.trial import CANDIDATES, Trial, TrialEdit, applied, build_edit

EVALUATOR = "sweep.evaluator"


@dataclass
class TrialScore:
    """Generation-free validation scores of one trial (number -1: the unedited model)."""

    number: int
    behaviour_rate: float
    """Fraction of target prompts that show the behaviour at the first generated token (see
    ``TrialEvaluator``: the greedy token is a behaviour token, or the log-odds exceed a threshold)."""
    mean_log_odds: float
    """Mean first-token behaviour log-odds over target prompts."""
    kl: float
    """Mean first-token KL(unedited || edited) over baseline prompts (those without the behaviour
    unedited, by default: ``TrialEvaluator``'s kl_prompts)."""
    baseline_rate: float
    """The same fraction on baseline prompts (first-token over-triggering)."""
    seconds: float = 0.0
    """Wall time of the evaluation on its worker."""

    def metrics(self) -> dict[str, float]:
        return {
            "behaviour_rate": self.behaviour_rate,
            "mean_log_odds": self.mean_log_odds,
            "kl": self.kl,
            "baseline_rate": self.baseline_rate,
        }


@dataclass
class _Readout:
    """Per-prompt first-token readings of one pass, in input order."""

    target_lo: torch.Tensor
    baseline_lo: torch.Tensor
    target_top: torch.Tensor
    """(target prompts,) bool: the greedy first token is a behaviour token."""
    baseline_top: torch.Tensor
    kls: torch.Tensor
    """(baseline prompts,) KL(unedited || this pass)."""


class TrialEvaluator:
    """Tokenized validation prompts, the unedited model's references and its residuals entering every
    layer; ``evaluate`` scores any edit. Memory: the cached residuals take (layers + 1) x tokens x hidden
    values of the model's dtype (about 200 MB for SmolLM2-135M on 139 prompts); ``resume=False`` keeps
    none and always runs from the embedding.

    When does a prompt show the behaviour (``rate``)? top1: the greedy first token is one of the
    behaviour tokens, what greedy generation starts with (on SmolLM2 and the French concept it tracks
    the judged generations: 85% / 10% / 5% of validation prompts for the unedited model and two
    trials whose generations are 90% / 5% / 25% French). threshold: the behaviour log-odds exceed
    ``threshold`` (0: probability above 0.5; None: halfway between the unedited model's mean target and
    mean baseline log-odds), which suits models that put most of their mass on the scored tokens."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        target_prompts: list[str],
        baseline_prompts: list[str],
        token_ids: list[int],
        batch_size: int = 32,
        resume: bool = True,
        threshold: float | None = 0.0,
        references: bool = True,
        rate: str = "top1",
        kl_prompts: str = "without_behaviour",
    ) -> None:
        rate = choice(BehaviourRate, rate, "search.rate")
        self.model, self.token_ids, self.resume = model, token_ids, resume
        self.threshold, self.rate, self.kl_prompts = threshold, rate, kl_prompts
        self.device = input_device(model)
        prompts = ContrastPrompts(
            tokenizer, target_prompts, baseline_prompts, self.device, "trial evaluation"
        )
        self.prefix, self.prefix_len = prompts.prefix, prompts.prefix_len
        self.n_target, self.n_baseline = prompts.n_target, prompts.n_baseline
        self._pad = prompts.pad
        self._full = [prompts.sequences[i] for i in prompts.by_length()]
        self.batches = prompts.batches(batch_size)
        if references:
            self.install_references(self.reference_part(0, 1))

    def _cache(self, rows: int, base):
        if base is None:
            return None
        cache = copy.deepcopy(base)
        cache.batch_repeat_interleave(rows)
        return cache

    @torch.inference_mode()
    def reference_part(
        self, part: int, parts: int
    ) -> list[tuple[int, dict[int, torch.Tensor], torch.Tensor]]:
        """The unedited model on batches part, part + parts, ...: (batch index, residual entering every
        layer {layer: (rows, seq, hidden)} (empty without resume), last-position logits (rows, vocab)).
        Workers each compute a part and all install every part (``install_references``)."""
        base = prefix_cache(self.model, self.prefix, 1, 1) if self.prefix_len else None
        out = []
        for index in range(part, len(self.batches), parts):
            sink: dict[int, torch.Tensor] = {}
            cache = self._cache(self.batches[index].ids.shape[0], base)
            if self.resume:
                with capture_residuals(self.model, self.batches[index].ids.shape[1], sink):
                    logits = self._logits(index, cache, None)
            else:
                logits = self._logits(index, cache, None)
            out.append((index, dict(sink), logits))
        return out

    def install_references(self, parts: list[tuple[int, dict[int, torch.Tensor], torch.Tensor]]) -> None:
        """Take the unedited references of every batch (from any workers) and score the unedited model."""
        by_index = {index: (resid, logits) for index, resid, logits in parts}
        if sorted(by_index) != list(range(len(self.batches))):
            raise CompalignError(f"references cover batches {sorted(by_index)} of {len(self.batches)}")
        self.residuals = [
            {layer: t.to(self.device) for layer, t in by_index[i][0].items()}
            for i in range(len(self.batches))
        ]
        logits_rows = [by_index[i][1].to(self.device) for i in range(len(self.batches))]
        baseline = torch.zeros(self.n_baseline, logits_rows[0].shape[-1])
        for batch, logits in zip(self.batches, logits_rows, strict=True):
            rows = ~batch.is_target
            baseline[batch.index[rows]] = torch.log_softmax(logits[rows.to(logits.device)], -1).cpu()
        self.clean_logp = baseline
        self.kl_rows = kl_mask(baseline, self.token_ids, self.kl_prompts)
        """(baseline prompts,) bool: those the KL is averaged over."""
        self._clean = self._readout(logits_rows)
        if self.threshold is None:
            self.threshold = float((self._clean.target_lo.mean() + self._clean.baseline_lo.mean()) / 2)
        self.set_threshold(self.threshold)

    def set_threshold(self, threshold: float) -> None:
        """Use ``threshold`` from now on (workers share the first worker's calibrated value)."""
        self.threshold = float(threshold)
        self.clean = self._rates(self._clean, -1, 0.0)

    def _logits(self, index: int, cache, start: int | None) -> torch.Tensor:
        """Last-position logits of batch ``index``: a full pass from the token ids (start None or 0, so
        that embedding hooks fire), else from the clean residual entering decoder layer ``start``."""
        batch = self.batches[index]
        if not start:
            return last_logits(
                self.model, batch.ids, batch.mask, prefix_cache=cache, prefix_len=self.prefix_len
            )
        with run_from_layer(self.model, start):
            return last_logits(
                self.model,
                None,
                batch.mask,
                prefix_cache=cache,
                prefix_len=self.prefix_len,
                inputs_embeds=self.residuals[index][start],
            )

    def _readout(self, logits_rows: list[torch.Tensor]) -> _Readout:
        ids = torch.tensor(self.token_ids)
        out = _Readout(
            torch.zeros(self.n_target), torch.zeros(self.n_baseline), torch.zeros(self.n_target, dtype=torch.bool),
            torch.zeros(self.n_baseline, dtype=torch.bool), torch.zeros(self.n_baseline),
        )  # fmt: skip
        for batch, logits in zip(self.batches, logits_rows, strict=True):
            lo = behaviour_log_odds(logits, self.token_ids).cpu()
            top = torch.isin(logits.argmax(-1).cpu(), ids)
            t, b = batch.is_target, ~batch.is_target
            out.target_lo[batch.index[t]], out.target_top[batch.index[t]] = lo[t], top[t]
            out.baseline_lo[batch.index[b]], out.baseline_top[batch.index[b]] = lo[b], top[b]
            if b.any():
                clean = self.clean_logp[batch.index[b]].to(logits.device)
                out.kls[batch.index[b]] = kl_divergence(clean, logits[b.to(logits.device)]).cpu()
        return out

    def _scores(self, logits_rows: list[torch.Tensor], number: int, seconds: float) -> TrialScore:
        return self._rates(self._readout(logits_rows), number, seconds)

    def _rates(self, r: _Readout, number: int, seconds: float) -> TrialScore:
        if self.rate == "top1":
            target, baseline = r.target_top, r.baseline_top
        else:
            target, baseline = r.target_lo > self.threshold, r.baseline_lo > self.threshold
        return TrialScore(
            number=number,
            behaviour_rate=float(target.float().mean()),
            mean_log_odds=float(r.target_lo.mean()),
            kl=float(r.kls[self.kl_rows].mean()),
            baseline_rate=float(baseline.float().mean()),
            seconds=seconds,
        )

    @torch.inference_mode()
    def evaluate(self, edit: TrialEdit, number: int = 0) -> TrialScore:
        """Scores of the model with ``edit`` applied (the model is unchanged afterwards)."""
        begin = time.perf_counter()
        if edit.start_layer is None:
            return TrialScore(
                number, **{**self.clean.metrics(), "kl": 0.0}, seconds=time.perf_counter() - begin
            )
        start = edit.start_layer if self.resume else 0
        with applied(self.model, edit):
            base = prefix_cache(self.model, self.prefix, 1, 1) if self.prefix_len else None
            logits_rows = [
                self._logits(i, self._cache(batch.ids.shape[0], base), start)
                for i, batch in enumerate(self.batches)
            ]
        return self._scores(logits_rows, number, time.perf_counter() - begin)

    @torch.inference_mode()
    def bare_forward_seconds(self, batch_size: int) -> float:
        """Wall time of one plain forward pass over the same prompts (whole prompts, no prefix reuse, only
        the last position through the LM head): the unit the benchmark measures a trial's cost in."""
        begin = time.perf_counter()
        for group in chunks(self._full, batch_size):
            ids, mask = left_pad(group, self._pad, self.device)
            last_logits(self.model, ids, mask)
        return time.perf_counter() - begin


@sets_up
def prepare_trials(
    worker: Worker,
    target: list[str],
    baseline: list[str],
    token_ids: list[int],
    batch_size: int,
    candidates: Candidates,
    resume: bool,
    threshold: float | None,
    rate: str,
    kl_prompts: str,
    part: int,
    parts: int,
) -> list:
    """Tokenize the validation prompts and compute this worker's part of the unedited references (moved
    to CPU for the others to fetch)."""
    worker.keep(CANDIDATES, candidates)
    loaded = worker.loaded
    evaluator = TrialEvaluator(
        loaded.model, loaded.tokenizer, target, baseline, token_ids, batch_size, resume, threshold, False,
        rate, kl_prompts,
    )  # fmt: skip
    worker.keep(EVALUATOR, evaluator)
    return [
        (i, {k: v.cpu() for k, v in resid.items()}, logits.cpu())
        for i, resid, logits in evaluator.reference_part(part, parts)
    ]


@sets_up
def install_references(worker: Worker, *parts: list) -> tuple[TrialScore, float]:
    """Give this worker every part of the unedited references; the unedited scores and the threshold."""
    evaluator = worker.held(EVALUATOR, TrialEvaluator)
    evaluator.install_references([item for part in parts for item in part])
    return evaluator.clean, evaluator.threshold


def run_trial(worker: Worker, trial: Trial) -> TrialScore:
    edit = build_edit(trial, worker.held(CANDIDATES, Candidates))
    return worker.held(EVALUATOR, TrialEvaluator).evaluate(edit, trial.number)


def bare_forward_seconds(worker: Worker, batch_size: int) -> float:
    return worker.held(EVALUATOR, TrialEvaluator).bare_forward_seconds(batch_size)
