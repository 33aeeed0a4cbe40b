"""Gradient refinement of a direction: keep what its ablation removes, lose what it breaks.

A difference of means is where the behaviour's activations sit on average, not the direction whose
removal takes the behaviour away at the least cost. Starting from one, this adjusts the unit direction r
by gradient descent through the same ablation hooks the scorer and the orthogonalized weights use:

    loss(r) = mean_target softplus(log-odds of the behaviour tokens, r ablated)
              + kl_weight * mean_baseline KL(unedited || r ablated)     (first generated token)

softplus(log-odds) = -log(1 - p): large while the behaviour is likely, flat once it is gone, so the
KL term takes over on the prompts already freed. Each step draws a seeded mini-batch from each prompt set
(CPU runs are bitwise reproducible); the model's weights are never changed, only r, which is renormalised
after every step so that the orthogonalization still removes a unit direction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tasks.core.contrast import behaviour_log_odds, kl_divergence, kl_mask
from tasks.core.errors import CompalignError
from tasks.core.forward import last_logits, left_pad, pad_id, tokenize
from tasks.core.hooks import Ablation, intervene
from tasks.core.model import hidden_size, input_device
from tasks.core.prompts import format_chat
from tasks.core.worker import Worker, sets_up
from tasks.directions.candidates import LayerWeights, check_direction
from tasks.directions.config import RefineConfig
from tasks.evaluation.evaluate import next_token_logprobs

log = logging.getLogger(__name__)


@dataclass
class Refined:
    """The refined direction and how the objective moved."""

    direction: torch.Tensor
    """(hidden,) float32 unit vector."""
    cosine: float
    """Cosine between the refined and the starting direction."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per step: loss, bypass (mean softplus log-odds on the target mini-batch), kl (baseline mini-batch)."""


def _logits(model: nn.Module, sequences: list[list[int]], pad: int) -> torch.Tensor:
    """Next-token logits (batch, vocab) of already tokenized prompts, with gradients when enabled."""
    ids, mask = left_pad(sequences, pad, input_device(model))
    return last_logits(model, ids, mask)


class DirectionRefiner:
    """The optimisation state (direction, Adam moments, mini-batch generator) on one model, so that a driver
    can run it a few steps at a time and report progress; ``refine_direction`` runs it in one go."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        direction: torch.Tensor,
        target: list[str],
        baseline: list[str],
        token_ids: list[int],
        cfg: RefineConfig,
        weights: LayerWeights | None = None,
        kl_prompts: str = "without_behaviour",
    ) -> None:
        if not target or not baseline:
            raise CompalignError("refining a direction needs target and baseline prompts")
        self.model, self.token_ids = model, token_ids
        self.kl_weight, self.batch_size, self.weights = cfg.kl_weight, cfg.batch_size, weights
        self.start = check_direction(direction.detach().cpu(), hidden_size(model))
        device = input_device(model)
        # The unedited model's first-token distribution on the baseline prompts the KL counts, once.
        clean = next_token_logprobs(model, tokenizer, baseline, cfg.batch_size).to(device)
        counted = kl_mask(clean, token_ids, kl_prompts)
        # Tokenized once: each step only pads its mini-batch.
        self.target = tokenize(tokenizer, format_chat(tokenizer, target))
        kept = [p for p, keep in zip(baseline, counted.tolist(), strict=True) if keep]
        self.baseline = tokenize(tokenizer, format_chat(tokenizer, kept))
        self.pad = pad_id(tokenizer)
        self.clean = clean[counted.to(device)]
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.v = self.start.clone().to(device).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.v], lr=cfg.lr)
        self.history: list[dict[str, float]] = []

    def run(self, steps: int) -> None:
        """``steps`` more Adam steps; the model's weights are left exactly as they were."""
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:  # gradients for the direction only: no weight gradients computed or stored
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                for _ in range(steps):
                    self._step()
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _step(self) -> None:
        t_rows = torch.randperm(len(self.target), generator=self.generator)[: self.batch_size].tolist()
        b_rows = torch.randperm(len(self.baseline), generator=self.generator)[: self.batch_size].tolist()
        r = self.v / self.v.norm()
        with intervene(self.model, ablation=_ablation(r, self.weights)):
            target_logits = _logits(self.model, [self.target[i] for i in t_rows], self.pad)
            baseline_logits = _logits(self.model, [self.baseline[i] for i in b_rows], self.pad)
        bypass = F.softplus(behaviour_log_odds(target_logits, self.token_ids)).mean()
        kl = kl_divergence(self.clean[b_rows].to(baseline_logits.device), baseline_logits).mean()
        loss = bypass + self.kl_weight * kl
        if loss.requires_grad:  # not when every removal weight is 0: r then changes nothing
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.history.append({"loss": loss.item(), "bypass": bypass.item(), "kl": kl.item()})

    def result(self) -> Refined:
        refined = (self.v / self.v.norm()).detach().float().cpu()
        if not torch.isfinite(refined).all():
            raise CompalignError("refining the direction diverged (NaN); lower refine.lr")
        return Refined(direction=refined, cosine=float(refined @ self.start), history=list(self.history))


def refine_direction(
    model: nn.Module,
    tokenizer,
    direction: torch.Tensor,
    target: list[str],
    baseline: list[str],
    token_ids: list[int],
    cfg: RefineConfig,
    weights: LayerWeights | None = None,
    kl_prompts: str = "without_behaviour",
    progress: Callable[[int], None] | None = None,
) -> Refined:
    """Refine ``direction`` (hidden,) for ablation on ``target`` prompts (the behaviour should go) and
    ``baseline`` prompts (their next-token distribution should stay), ``cfg.steps`` Adam steps.

    ``weights``: per-layer weights of the removal (a sweep's kernels), as the orthogonalization will use
    them; None removes the direction fully from every residual writer. ``kl_prompts`` picks the
    baseline prompts the KL counts, as in scoring (``tasks.core.contrast.kl_mask``). ``cfg.batch_size`` prompts
    of each set per step. Returns the unit direction (hidden,) and the per-step history."""
    if cfg.steps == 0:
        return Refined(direction=check_direction(direction.detach().cpu(), hidden_size(model)), cosine=1.0)
    refiner = DirectionRefiner(
        model, tokenizer, direction, target, baseline, token_ids, cfg, weights, kl_prompts
    )
    for _ in range(cfg.steps):
        refiner.run(1)
        if progress:
            progress(1)
    return refiner.result()


def _ablation(r: torch.Tensor, weights: LayerWeights | None) -> Ablation:
    if weights is None:
        return Ablation(direction=r)
    return Ablation(
        direction=r, attn_weights=weights.attn, mlp_weights=weights.mlp, embed_weight=weights.embed
    )


REFINER = "refine.refiner"


@sets_up
def prepare_refine(
    worker: Worker,
    direction: torch.Tensor,
    target: list[str],
    baseline: list[str],
    token_ids: list[int],
    cfg: RefineConfig,
    kl_prompts: str,
    weights: LayerWeights | None = None,
) -> None:
    """Set up refinement of ``direction`` on this worker (``refine_steps`` runs it)."""
    loaded = worker.loaded
    refiner = DirectionRefiner(
        loaded.model, loaded.tokenizer, direction.to(loaded.device), target, baseline, token_ids, cfg,
        weights, kl_prompts,
    )  # fmt: skip
    worker.keep(REFINER, refiner)


@sets_up
def refine_steps(worker: Worker, steps: int) -> Refined:
    """Run ``steps`` more refinement steps; the state so far (the driver reports progress between calls)."""
    refiner = worker.held(REFINER, DirectionRefiner)
    refiner.run(steps)
    return refiner.result()
