"""Sweep trials: what a trial varies, the reversible edit it makes, and how it is scored without generating.

A trial takes the difference-of-means direction of a (fractional) source layer and a token position and
either ablates it from the residual writers with a per-layer kernel (``ablate``), adds ``scale`` times
the difference of means to the residual entering the source layer (``add``; a negative scale removes),
or both (``ablate_add``). The edit is a set of forward hooks (``tasks.core.hooks.intervene``), so a worker
keeps one loaded model and applies each trial's edit only for the duration of its evaluation.

Scores on the validation prompts, from the first generated position only (one forward pass, no
generation): the behaviour rate (fraction of target prompts whose greedy first token is a behaviour
token, or whose behaviour log-odds exceed a threshold, 0 meaning probability > 0.5), the mean target
log-odds and the mean first-token KL(clean || edited) on baseline prompts. Work saved against a plain forward pass per trial (``TrialEvaluator``): the token prefix every
prompt shares is run once per trial on one row and reused through the KV cache, only the last position
goes through the LM head, and the pass starts at the first layer the edit touches, from the clean
residuals cached there (an edit that starts at layer 15 of 30 costs half a pass).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tasks.core.bootstrap import RateInterval, bootstrap_rate
from tasks.core.errors import CompalignError
from tasks.core.forward import (
    chunks,
    last_logits,
    left_pad,
    pad_id,
    prefix_cache,
    run_from_layer,
    split_shared_prefix,
    tokenize,
)
from tasks.core.hooks import Ablation, Addition, capture_residuals, intervene
from tasks.core.prompts import format_chat
from tasks.directions.candidates import Candidates, interpolate_layer
from tasks.directions.score import behaviour_log_odds, kl_divergence, kl_mask
from tasks.evaluation.evaluate import BehaviourEval, EvalResult, evaluate, generate, judge_answers
from tasks.sweep.kernels import Kernel, first_active_layer, kernel_weights

INTERVENTIONS = ("ablate", "add", "ablate_add")


@dataclass(frozen=True)
class Trial:
    """One point of a sweep."""

    number: int
    layer: float
    """Source layer of the direction, 0..n_layers (0: embedding output); a fraction blends the two
    neighbouring layers' directions (and norms)."""
    position: int
    """Token position of the direction, negative from the end of the prompt (-1: last token)."""
    intervention: str = "ablate"
    """ablate, add or ablate_add."""
    scale: float = 1.0
    """add / ablate_add: multiple of the difference-of-means norm added along the direction entering
    layer round(layer); negative values push away from the behaviour."""
    attn: Kernel = field(default_factory=Kernel.flat)
    """ablate / ablate_add: weights of the removal from each layer's attention output."""
    mlp: Kernel = field(default_factory=Kernel.flat)
    """ablate / ablate_add: weights of the removal from each layer's MLP output."""
    embed_weight: float = 0.0
    """ablate / ablate_add: weight of the removal from the token embeddings."""

    def __post_init__(self) -> None:
        if self.intervention not in INTERVENTIONS:
            raise CompalignError(
                f"trial intervention must be one of {', '.join(INTERVENTIONS)}, got {self.intervention!r}"
            )
        if self.position >= 0:
            raise CompalignError(
                f"trial position counts from the end and must be negative, got {self.position}"
            )
        if not math.isfinite(self.layer) or not math.isfinite(self.scale):
            raise CompalignError(f"trial layer and scale must be finite, got {self.layer} and {self.scale}")

    @property
    def ablates(self) -> bool:
        return self.intervention in ("ablate", "ablate_add")

    @property
    def adds(self) -> bool:
        return self.intervention in ("add", "ablate_add")

    def params(self) -> dict[str, float | int | str]:
        """Flat parameters (MLflow params, table columns); ``from_params`` inverts it."""
        out: dict[str, float | int | str] = {
            "layer": self.layer,
            "position": self.position,
            "intervention": self.intervention,
            "scale": self.scale,
            "embed_weight": self.embed_weight,
        }
        for name, kernel in (("attn", self.attn), ("mlp", self.mlp)):
            out.update({f"{name}.{k}": v for k, v in kernel.as_dict().items()})
        return out

    @staticmethod
    def from_params(number: int, params: dict) -> Trial:
        def kernel(name: str) -> Kernel:
            return Kernel(**{k: float(params[f"{name}.{k}"]) for k in Kernel().as_dict()})

        return Trial(
            number=number,
            layer=float(params["layer"]),
            position=int(params["position"]),
            intervention=str(params["intervention"]),
            scale=float(params["scale"]),
            attn=kernel("attn"),
            mlp=kernel("mlp"),
            embed_weight=float(params["embed_weight"]),
        )


@dataclass
class TrialEdit:
    """A trial made concrete for one model: hooks to install and where their effect starts."""

    direction: torch.Tensor
    """(hidden,) unit direction (zero if the means coincide there)."""
    ablation: Ablation | None
    addition: Addition | None
    start_layer: int | None
    """First decoder layer whose input the edit changes (n_layers: only the final norm's); None when the
    edit changes nothing."""


def interpolate_norm(candidates: Candidates, layer: float, position: int) -> float:
    """Difference-of-means norm at a fractional source layer (linear between the neighbours)."""
    low = int(math.floor(layer))
    high = min(low + 1, candidates.n_layers - 1)
    idx = candidates.position_index(position)
    frac = layer - low
    return float((1 - frac) * candidates.norms[low, idx] + frac * candidates.norms[high, idx])


def build_edit(trial: Trial, candidates: Candidates) -> TrialEdit:
    """The hooks of ``trial`` for a model with ``candidates.n_layers - 1`` decoder layers."""
    n_layers = candidates.n_layers - 1
    direction = interpolate_layer(candidates, trial.layer, trial.position)
    starts: list[int] = []
    ablation = addition = None
    if trial.ablates:
        attn_w, mlp_w = kernel_weights(trial.attn, n_layers), kernel_weights(trial.mlp, n_layers)
        first = first_active_layer(attn_w, mlp_w)
        if trial.embed_weight != 0:
            first = 0
        if first is not None:
            ablation = Ablation(
                direction, attn_weights=attn_w, mlp_weights=mlp_w, embed_weight=trial.embed_weight
            )
            starts.append(first)
    if trial.adds and trial.scale != 0:
        at = min(max(int(math.floor(trial.layer + 0.5)), 0), n_layers)
        norm = interpolate_norm(candidates, trial.layer, trial.position)
        addition = Addition(vector=direction * norm * trial.scale, layer=at)
        starts.append(at)
    if not direction.abs().sum() > 0:
        ablation = addition = None
        starts = []
    return TrialEdit(direction, ablation, addition, min(starts) if starts else None)


@contextmanager
def applied(model: nn.Module, edit: TrialEdit | None) -> Iterator[None]:
    """The edit's hooks on ``model`` inside the block (nothing for None); removed on exit."""
    if edit is None:
        yield
        return
    with intervene(
        model, ablation=_on_device(edit.ablation, model), addition=_on_device(edit.addition, model)
    ):
        yield


def _on_device(item, model: nn.Module):
    if item is None:
        return None
    device = next(model.parameters()).device
    if isinstance(item, Ablation):
        return Ablation(item.direction.to(device), item.attn_weights, item.mlp_weights, item.embed_weight)
    return Addition(item.vector.to(device), item.layer)


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
class _Batch:
    ids: torch.Tensor
    """(rows, seq) left-padded ids after the shared prefix."""
    mask: torch.Tensor
    is_target: torch.Tensor
    """(rows,) bool."""
    index: torch.Tensor
    """(rows,) position of each row in its own prompt list."""


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
        if not target_prompts or not baseline_prompts:
            raise CompalignError(
                "trial evaluation needs at least one target and one baseline validation prompt"
            )
        if rate not in ("top1", "threshold"):
            raise CompalignError(f"behaviour rate must be top1 or threshold, got {rate!r}")
        self.model, self.token_ids, self.resume = model, token_ids, resume
        self.threshold, self.rate, self.kl_prompts = threshold, rate, kl_prompts
        self.device = next(model.parameters()).device
        seqs = tokenize(tokenizer, format_chat(tokenizer, target_prompts + baseline_prompts))
        split = split_shared_prefix(seqs)
        self.prefix, self.prefix_len = split.prefix, split.prefix_len
        self.n_target, self.n_baseline = len(target_prompts), len(baseline_prompts)
        pad = self._pad = pad_id(tokenizer)
        order = sorted(range(len(seqs)), key=lambda i: len(split.rest[i]))
        self._full = [seqs[i] for i in order]
        self.batches = []
        for group in chunks(order, batch_size):
            ids, mask = left_pad([split.rest[i] for i in group], pad, self.device)
            is_target = torch.tensor([i < self.n_target for i in group])
            index = torch.tensor([i if i < self.n_target else i - self.n_target for i in group])
            self.batches.append(_Batch(ids, mask, is_target, index))
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


# ----------------------------------------------------------------------------- confirmation


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
