"""The abliterate flow's config: candidate scoring (``score``), selection (``select``) and refinement
(``refine``) on top of a concept run's sections."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tasks.core.concept_config import ConceptRunConfig, check_fraction
from tasks.core.contrast import KlPrompts
from tasks.core.errors import choice, require


@dataclass
class RefineConfig:
    """Gradient refinement of the chosen (or given) direction before it is removed (tasks/directions/refine.py):
    its ablation should take the behaviour away on the target prompts while moving the baseline prompts'
    next-token distribution as little as possible. Runs on the train split, so validation and test stay
    unseen. Worth it when no difference of means meets the KL limit (a fine-tuned behaviour)."""

    steps: int = 0
    """Adam steps on the direction (0: off, the difference of means is removed as found)."""
    lr: float = 0.02
    """Adam learning rate on the (renormalised) direction."""
    kl_weight: float = 10.0
    """Weight of the baseline KL against the behaviour term; higher keeps the model closer to unedited."""
    batch_size: int = 32
    """Prompts of each set per step (drawn with a seeded generator)."""
    seed: int = 0
    given: bool = False
    """Also refine a direction given by ``direction.file``. Off: a given direction is removed exactly as
    given, so that an edit found elsewhere composes unchanged; refinement applies to searched ones."""

    def __post_init__(self) -> None:
        require(self.steps >= 0, f"refine.steps must be >= 0, got {self.steps}")
        require(math.isfinite(self.lr) and self.lr > 0, f"refine.lr must be a positive number, got {self.lr}")
        require(
            math.isfinite(self.kl_weight) and self.kl_weight >= 0,
            f"refine.kl_weight must be a number >= 0, got {self.kl_weight}",
        )
        require(self.batch_size > 0, f"refine.batch_size must be > 0, got {self.batch_size}")


@dataclass
class ScoreConfig:
    """Scoring of candidate directions on the validation prompts."""

    candidates_per_pass: int = 4
    """Candidates stacked into one forward pass (memory grows with it)."""
    batch_size: int = 16
    """Prompts per candidate in one forward pass."""
    induce_scale: float = 1.0
    """The induce score adds scale * (difference of means) at the direction's own layer."""
    max_prompts: int | None = None
    """Use at most this many validation prompts of each set (null: all)."""
    screen_prompts: int | None = 8
    """Two-stage search: first score every candidate on this many validation prompts of each set, then
    only the ``finalists`` best on all of them (null: score every candidate on all, one stage)."""
    finalists: int = 16
    """How many screened candidates are scored in full."""
    kl_prompts: str = "without_behaviour"
    """Baseline prompts the KL is averaged over: without_behaviour (those the unedited model does not meet
    with the behaviour: a tuned model's over-refusals of harmless requests should change, and are not
    damage) or all."""

    def __post_init__(self) -> None:
        require(
            self.candidates_per_pass > 0,
            f"score.candidates_per_pass must be > 0, got {self.candidates_per_pass}",
        )
        require(self.batch_size > 0, f"score.batch_size must be > 0, got {self.batch_size}")
        require(
            math.isfinite(self.induce_scale),
            f"score.induce_scale must be a finite number, got {self.induce_scale}",
        )
        require(
            self.max_prompts is None or self.max_prompts > 0,
            f"score.max_prompts must be > 0, got {self.max_prompts}",
        )
        require(
            self.screen_prompts is None or self.screen_prompts > 0,
            f"score.screen_prompts must be > 0 or null, got {self.screen_prompts}",
        )
        require(self.finalists > 0, f"score.finalists must be > 0, got {self.finalists}")
        self.kl_prompts = choice(KlPrompts, self.kl_prompts, "score.kl_prompts")


@dataclass
class SelectConfig:
    """Which candidate is chosen."""

    layer_cutoff: float = 0.8
    """Drop candidates from layers at or past this fraction of the depth (they tend to act on the output
    vocabulary rather than the concept). Must be in (0, 1]."""
    kl_limit: float = 0.2
    """Drop candidates whose ablation moves the baseline next-token distribution by more KL than this."""
    induce_min_gain: float = 1.0
    """Drop candidates whose addition raises the baseline prompts' behaviour log-odds by less than this
    over the unedited model's (1.0: odds at least e times higher). Relative, so that one value works for
    models that show the behaviour strongly or barely."""
    layer: int | None = None
    """Force this source layer (still ranked over positions); null searches all layers."""
    position: int | None = None
    """Force this position (negative index from the end, e.g. -1); null searches all positions."""
    min_behaviour: float = 0.2
    """Stop before collecting when the unedited model shows the behaviour on fewer than this share of the
    validation target prompts (judged on 32 generated tokens): there is nothing to remove. 0 skips it."""

    def __post_init__(self) -> None:
        check_fraction("select.layer_cutoff", self.layer_cutoff)
        require(
            0 <= self.min_behaviour <= 1, f"select.min_behaviour must be in [0, 1], got {self.min_behaviour}"
        )
        require(
            not math.isnan(self.kl_limit) and self.kl_limit > 0,
            f"select.kl_limit must be > 0, got {self.kl_limit}",
        )
        require(not math.isnan(self.induce_min_gain), "select.induce_min_gain must be a number, got nan")
        require(self.layer is None or self.layer >= 0, f"select.layer must be >= 0, got {self.layer}")
        require(
            self.position is None or self.position < 0,
            f"select.position counts from the end and must be negative (e.g. -1), got {self.position}",
        )


@dataclass
class AbliterateConfig(ConceptRunConfig):
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
