"""Scoring candidate directions: bypass, induce and KL, batched across candidates.

For a candidate (layer l, position p, unit direction r, difference-of-means norm n):
  bypass  = mean behaviour log-odds on target prompts with r ablated everywhere (lower is better);
  induce  = mean behaviour log-odds on baseline prompts with n * scale * r added entering layer l;
  kl      = mean KL(clean || ablated) of the next-token distribution on baseline prompts.
The behaviour log-odds is log(p / (1 - p)) with p the probability mass of the concept's tokens at the
first generated position.

Work saved against the plain loop (``reference_scores``): several candidates share each forward pass
(their rows carry their own direction); bypass and KL come from one ablated pass over target and
baseline prompts together; the token prefix every prompt shares (system prompt, turn header) is run
once per candidate and reused through the KV cache; the induce pass starts at layer l from cached clean
activations; and only the last position goes through the LM head.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tasks.core.contrast import ContrastPrompts, behaviour_log_odds, kl_divergence, kl_mask
from tasks.core.forward import (
    chunks,
    last_logits,
    left_pad,
    pad_id,
    positions_from_mask,
    prefix_cache,
    run_from_layer,
    tokenize,
)
from tasks.core.hooks import Ablation, Addition, capture_residuals, intervene
from tasks.core.model import input_device
from tasks.core.prompts import format_chat
from tasks.core.worker import Worker, sets_up

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    layer: int
    position: int
    """Negative index from the end of the prompt (-1 = last token)."""
    direction: torch.Tensor
    """(hidden,) unit vector."""
    add_vector: torch.Tensor
    """(hidden,) what the induce score adds (direction * norm * scale)."""


@dataclass
class CandidateScore:
    layer: int
    position: int
    bypass: float
    induce: float
    kl: float

    def as_row(self) -> dict:
        return asdict(self)


class CandidateScorer:
    """Holds the tokenized validation prompts and the clean references; ``score`` takes any candidates."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        target_prompts: list[str],
        baseline_prompts: list[str],
        token_ids: list[int],
        batch_size: int = 16,
        candidates_per_pass: int = 4,
        kl_prompts: str = "without_behaviour",
    ) -> None:
        self.kl_prompts = kl_prompts
        self.model = model
        self.token_ids = token_ids
        self.batch_size = batch_size
        self.per_pass = candidates_per_pass
        self.device = input_device(model)
        prompts = ContrastPrompts(tokenizer, target_prompts, baseline_prompts, self.device, "scoring")
        self.prefix = prompts.prefix
        self.n_target, self.n_baseline = prompts.n_target, prompts.n_baseline
        self.all_batches = prompts.batches(batch_size)
        self.baseline_batches = prompts.batches(batch_size, prompts.baseline_indices)
        self._clean_references()

    @torch.inference_mode()
    def _clean_references(self) -> None:
        """Clean log-probs and log-odds of every prompt, and the clean residual entering every layer for the
        baseline batches (where the induce pass starts)."""
        target_lo = torch.empty(self.n_target)
        baseline_lo = torch.empty(self.n_baseline)
        logps = {}
        self.residuals: list[dict[int, torch.Tensor]] = []
        for batch in self.baseline_batches:
            sink: dict[int, torch.Tensor] = {}
            cache = prefix_cache(self.model, self.prefix, 1, batch.ids.shape[0])
            with capture_residuals(self.model, batch.ids.shape[1], sink):
                logits = last_logits(
                    self.model, batch.ids, batch.mask, prefix_cache=cache, prefix_len=len(self.prefix)
                )
            self.residuals.append(dict(sink))
            baseline_lo[batch.index] = behaviour_log_odds(logits, self.token_ids).cpu()
            for row, i in enumerate(batch.index.tolist()):
                logps[i] = torch.log_softmax(logits[row], -1)
        self.clean_logp = torch.stack([logps[i] for i in range(self.n_baseline)])
        self.kl_rows = kl_mask(self.clean_logp, self.token_ids, self.kl_prompts)
        """(baseline prompts,) bool: those the KL is averaged over."""
        for batch in self.all_batches:
            if not batch.is_target.any():
                continue
            cache = prefix_cache(self.model, self.prefix, 1, batch.ids.shape[0])
            logits = last_logits(
                self.model, batch.ids, batch.mask, prefix_cache=cache, prefix_len=len(self.prefix)
            )
            lo = behaviour_log_odds(logits, self.token_ids).cpu()
            target_lo[batch.index[batch.is_target]] = lo[batch.is_target]
        self.clean_target_log_odds = float(target_lo.mean())
        self.clean_baseline_log_odds = float(baseline_lo.mean())

    @torch.inference_mode()
    def score(
        self, candidates: list[Candidate], progress: Callable[[int], None] | None = None
    ) -> list[CandidateScore]:
        """Scores in the order of ``candidates``."""
        bypass: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(candidates))}
        kls: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(candidates))}
        induce: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(candidates))}
        for group in chunks(list(range(len(candidates))), self.per_pass):
            self._ablated_pass([candidates[i] for i in group], group, bypass, kls)
        by_layer: dict[int, list[int]] = {}
        for i, cand in enumerate(candidates):
            by_layer.setdefault(cand.layer, []).append(i)
        for layer, members in sorted(by_layer.items()):
            for group in chunks(members, self.per_pass):
                self._induce_pass(layer, [candidates[i] for i in group], group, induce)
                if progress:
                    progress(len(group))
        return [
            CandidateScore(
                layer=c.layer,
                position=c.position,
                bypass=float(torch.cat(bypass[i]).mean()),
                induce=float(torch.cat(induce[i]).mean()),
                kl=float(torch.cat(kls[i]).mean()),
            )
            for i, c in enumerate(candidates)
        ]

    def _ablated_pass(self, cands: list[Candidate], slots: list[int], bypass: dict, kls: dict) -> None:
        """Every prompt with each candidate's direction ablated at every layer; fills bypass and KL."""
        dirs = torch.stack([c.direction for c in cands]).to(self.device)
        n = len(cands)
        with intervene(self.model, ablation=Ablation(direction=dirs)):
            base_cache = prefix_cache(self.model, self.prefix, n, 1)
        for batch in self.all_batches:
            rows = batch.ids.shape[0]
            cache = copy.deepcopy(base_cache)
            cache.batch_repeat_interleave(rows)
            with intervene(self.model, ablation=Ablation(direction=dirs.repeat_interleave(rows, 0))):
                logits = last_logits(
                    self.model,
                    batch.ids.repeat(n, 1),
                    batch.mask.repeat(n, 1),
                    prefix_cache=cache,
                    prefix_len=len(self.prefix),
                )
            lo = behaviour_log_odds(logits, self.token_ids).cpu().view(n, rows)
            # baseline rows that count for the KL (self.kl_rows is indexed by baseline prompt)
            pairs = zip(batch.is_target.tolist(), batch.index.tolist(), strict=True)
            for_kl = torch.tensor([not t and bool(self.kl_rows[i]) for t, i in pairs])
            clean = self.clean_logp[batch.index[for_kl]].to(logits.device)  # the last layer's device
            for k, slot in enumerate(slots):
                bypass[slot].append(lo[k][batch.is_target])
                if for_kl.any():
                    part = logits[k * rows : (k + 1) * rows][for_kl.to(logits.device)]
                    kls[slot].append(kl_divergence(clean, part).cpu())

    def _induce_pass(self, layer: int, cands: list[Candidate], slots: list[int], induce: dict) -> None:
        """Baseline prompts with each candidate's vector added entering ``layer``, starting there from the
        cached clean residual; fills induce."""
        vecs = torch.stack([c.add_vector for c in cands]).to(self.device)
        n = len(cands)
        with intervene(self.model, addition=Addition(vector=vecs, layer=layer)):
            base_cache = prefix_cache(self.model, self.prefix, n, 1)
        for batch, resid in zip(self.baseline_batches, self.residuals, strict=True):
            rows = batch.ids.shape[0]
            cache = copy.deepcopy(base_cache)
            cache.batch_repeat_interleave(rows)
            hidden = resid[layer].repeat(n, 1, 1)
            add = Addition(vector=vecs.repeat_interleave(rows, 0), layer=layer)
            # intervene first: it hooks layer `layer` of the full list, which run_from_layer then starts at.
            with intervene(self.model, addition=add), run_from_layer(self.model, layer):
                logits = last_logits(
                    self.model,
                    None,
                    batch.mask.repeat(n, 1),
                    prefix_cache=cache,
                    prefix_len=len(self.prefix),
                    inputs_embeds=hidden,
                )
            lo = behaviour_log_odds(logits, self.token_ids).cpu().view(n, rows)
            for k, slot in enumerate(slots):
                induce[slot].append(lo[k])


@torch.inference_mode()
def reference_scores(
    model: nn.Module,
    tokenizer,
    target_prompts: list[str],
    baseline_prompts: list[str],
    token_ids: list[int],
    candidates: list[Candidate],
    batch_size: int = 16,
    kl_prompts: str = "without_behaviour",
) -> list[CandidateScore]:
    """The plain loop the scorer replaces: per candidate, three full forward passes (bypass on target,
    KL and induce on baseline), full-length logits, no sharing. Used by tests and the benchmark."""
    device = input_device(model)
    pad = pad_id(tokenizer)

    def logits_of(prompts: list[str]) -> torch.Tensor:
        out = []
        for group in chunks(tokenize(tokenizer, format_chat(tokenizer, prompts)), batch_size):
            ids, mask = left_pad(group, pad, device)
            out.append(
                model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
                .logits[:, -1]
                .float()
            )
        return torch.cat(out)

    clean_logp = torch.log_softmax(logits_of(baseline_prompts), -1)
    rows = kl_mask(clean_logp, token_ids, kl_prompts)
    scores = []
    for cand in candidates:
        with intervene(model, ablation=Ablation(direction=cand.direction.to(device))):
            bypass = behaviour_log_odds(logits_of(target_prompts), token_ids).mean()
            kl = kl_divergence(clean_logp, logits_of(baseline_prompts))[rows].mean()
        with intervene(model, addition=Addition(vector=cand.add_vector.to(device), layer=cand.layer)):
            induce = behaviour_log_odds(logits_of(baseline_prompts), token_ids).mean()
        scores.append(CandidateScore(cand.layer, cand.position, float(bypass), float(induce), float(kl)))
    return scores


def build_candidates(
    candidates_dirs, layers: list[int], positions: list[int], induce_scale: float
) -> list[Candidate]:
    """Candidate objects for the given layers x positions of a ``Candidates`` set."""
    out = []
    for layer in layers:
        for position in positions:
            idx = candidates_dirs.position_index(position)
            direction = candidates_dirs.directions[layer, idx]
            out.append(
                Candidate(
                    layer=layer,
                    position=position,
                    direction=direction,
                    add_vector=direction * candidates_dirs.norms[layer, idx] * induce_scale,
                )
            )
    return out


def scorable_layers(n_layers: int, layer_cutoff: float) -> list[int]:
    """Source layers 0..n_layers below the cut-off fraction of the depth (0 is the embedding output)."""
    return [layer for layer in range(n_layers + 1) if layer < layer_cutoff * n_layers]


SCORER = "score.scorer"


@sets_up
def prepare_scoring(
    worker: Worker,
    target: list[str],
    baseline: list[str],
    token_ids: list[int],
    batch_size: int,
    per_pass: int,
    kl_prompts: str,
) -> tuple[float, float]:
    """Tokenize the validation prompts and compute the clean references on this worker; the clean
    (target, baseline) behaviour log-odds."""
    loaded = worker.loaded
    scorer = CandidateScorer(
        loaded.model, loaded.tokenizer, target, baseline, token_ids, batch_size, per_pass, kl_prompts
    )
    worker.keep(SCORER, scorer)
    return scorer.clean_target_log_odds, scorer.clean_baseline_log_odds


def score_part(worker: Worker, candidates: list[Candidate]) -> list[CandidateScore]:
    """One shard of a pool's scoring, with the scorer ``prepare_scoring`` kept."""
    return worker.held(SCORER, CandidateScorer).score(candidates)
