"""The sweep flow's own config sections: the space of trials (``sweep``), how they are searched
(``search``), which trial of the front is picked (``pick``) and how finalists are confirmed (``confirm``)."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum

from tasks.core.concept_config import CollectConfig, ConceptRunConfig
from tasks.core.config import OutputConfig
from tasks.core.contrast import KlPrompts
from tasks.core.errors import choice, require
from tasks.sweep.trial import INTERVENTIONS

log = logging.getLogger(__name__)
RUN_ID = re.compile(r"[0-9a-f]{32}")


class SearchKind(StrEnum):
    grid = "grid"
    tpe = "tpe"


class BehaviourRate(StrEnum):
    """When a prompt shows the behaviour at the first token (see tasks/sweep/trials.py)."""

    top1 = "top1"
    threshold = "threshold"


class PickRule(StrEnum):
    lowest_kl = "lowest_kl"
    lowest_rate = "lowest_rate"


KERNEL_PARAMS = ("peak_weight", "peak_at", "min_weight", "falloff")


@dataclass
class SweepSpace:
    """What trials vary. Grid: every combination of the listed values. TPE: a numeric list of two or more
    values is searched over its span [min, max], one value is fixed, positions and interventions are
    chosen among those listed."""

    layers: list[float] | None = None
    """Source layers of the direction (0 = embedding output .. number of decoder layers); fractional
    layers blend the two neighbours' directions. null: every layer within ``layer_span``."""
    layer_span: list[float] = field(default_factory=lambda: [0.4, 0.9])
    """[low, high] fractions of the depth that ``layers: null`` covers."""
    positions: list[int] = field(default_factory=lambda: [-1])
    """Token positions of the direction, negative from the end (-1: last token of the prompt)."""
    interventions: list[str] = field(default_factory=lambda: ["ablate"])
    """ablate (project the direction out of the residual writers, weighted by the kernels), add (add
    scale x difference of means entering the source layer) or ablate_add (both)."""
    scales: list[float] = field(default_factory=lambda: [-1.0])
    """add / ablate_add: multiples of the difference-of-means norm (negative: away from the behaviour)."""
    embed_weights: list[float] = field(default_factory=lambda: [0.0])
    """Ablation weight on the token embeddings (0 leaves them alone, as Heretic does)."""
    attn_peak_weight: list[float] = field(default_factory=lambda: [1.0])
    """Attention writers' kernel: weight at the peak."""
    attn_peak_at: list[float] = field(default_factory=lambda: [0.5])
    """Attention kernel: peak position as a fraction of the last layer index."""
    attn_min_weight: list[float] = field(default_factory=lambda: [1.0])
    """Attention kernel: weight at the fall-off distance (0 beyond it)."""
    attn_falloff: list[float] = field(default_factory=lambda: [1.0])
    """Attention kernel: fall-off distance as a fraction of the layer count (1: reaches every layer)."""
    mlp_peak_weight: list[float] = field(default_factory=lambda: [1.0])
    """MLP writers' kernel: weight at the peak."""
    mlp_peak_at: list[float] = field(default_factory=lambda: [0.5])
    """MLP kernel: peak position as a fraction of the last layer index."""
    mlp_min_weight: list[float] = field(default_factory=lambda: [1.0])
    """MLP kernel: weight at the fall-off distance."""
    mlp_falloff: list[float] = field(default_factory=lambda: [1.0])
    """MLP kernel: fall-off distance as a fraction of the layer count."""

    def __post_init__(self) -> None:
        require(
            len(self.layer_span) == 2 and 0 <= self.layer_span[0] <= self.layer_span[1] <= 1,
            f"sweep.layer_span must be [low, high] with 0 <= low <= high <= 1, got {self.layer_span}",
        )
        for name in ("positions", "interventions", "scales", "embed_weights"):
            require(len(getattr(self, name)) > 0, f"sweep.{name} must list at least one value")
        for name in ("scales", "embed_weights", "layer_span", *(["layers"] if self.layers else [])):
            values = getattr(self, name)
            require(
                all(math.isfinite(v) for v in values), f"sweep.{name} must be finite numbers, got {values}"
            )
        require(self.layers is None or len(self.layers) > 0, "sweep.layers must list a layer or be null")
        require(all(p < 0 for p in self.positions), f"sweep.positions must be negative, got {self.positions}")
        bad = [i for i in self.interventions if i not in INTERVENTIONS]
        require(not bad, f"sweep.interventions must be among {', '.join(INTERVENTIONS)}, got {bad}")
        for part in ("attn", "mlp"):
            for param in KERNEL_PARAMS:
                values = getattr(self, f"{part}_{param}")
                require(len(values) > 0, f"sweep.{part}_{param} must list at least one value")
                require(
                    all(math.isfinite(v) for v in values),
                    f"sweep.{part}_{param} must be finite, got {values}",
                )
            require(
                all(0 <= v <= 1 for v in getattr(self, f"{part}_peak_at")),
                f"sweep.{part}_peak_at is a fraction of the depth in [0, 1]",
            )
            require(
                all(v >= 0 for v in getattr(self, f"{part}_falloff")), f"sweep.{part}_falloff must be >= 0"
            )


@dataclass
class PickConfig:
    """Which trial of the front is chosen (on the validation scores)."""

    rule: str = "lowest_kl"
    """lowest_kl: the lowest KL among trials whose behaviour rate is <= max_rate; lowest_rate: the lowest
    behaviour rate among trials whose KL is <= max_kl. With no trial within the limit, the closest one
    (lowest rate, resp. lowest KL) is taken and a warning says so."""
    max_rate: float = 0.1
    """lowest_kl: highest behaviour rate accepted."""
    max_kl: float = 0.2
    """lowest_rate: highest KL accepted."""

    def __post_init__(self) -> None:
        self.rule = choice(PickRule, self.rule, "pick.rule")
        require(0 <= self.max_rate <= 1, f"pick.max_rate must be in [0, 1], got {self.max_rate}")
        require(self.max_kl >= 0, f"pick.max_kl must be >= 0, got {self.max_kl}")


@dataclass
class SearchConfig:
    """How trials are chosen and run."""

    kind: str = "tpe"
    """grid (every combination of the sweep's values) or tpe (seeded multi-objective Optuna TPE)."""
    trials: int | None = 32
    """tpe: trials to run. grid: the most combinations allowed (null: no limit); a bigger grid is an error."""
    parallel: int = 2
    """Trials in flight at once; the sweep starts this many model workers (collect.cpus_per_worker /
    collect.gpus_per_worker each)."""
    seed: int = 0
    """Seed of the TPE sampler (same seed and config: same trials, same front)."""
    startup_trials: int = 10
    """tpe: random trials before the sampler starts modelling."""
    batch_size: int = 32
    """Prompts per forward pass when scoring a trial."""
    max_prompts: int | None = None
    """Score trials on at most this many validation prompts of each set (null: all)."""
    rate: str = "top1"
    """When a validation prompt counts as showing the behaviour: top1 (the greedy first token is one of
    data.score_tokens', the closest generation-free reading of greedy generation) or threshold (their
    log-odds exceed search.threshold)."""
    threshold: float | None = None
    """rate=threshold: log-odds above which a prompt shows the behaviour (0: probability > 0.5). null:
    halfway between the unedited model's mean target and mean baseline log-odds."""
    resume_from_layer: bool = True
    """Start each trial's forward pass at the first layer it edits, from cached clean residuals."""
    kl_prompts: str = "without_behaviour"
    """Baseline prompts the KL objective is averaged over: without_behaviour (those the unedited model
    does not meet with the behaviour) or all (see score.kl_prompts)."""

    def __post_init__(self) -> None:
        self.kind = choice(SearchKind, self.kind, "search.kind")
        self.kl_prompts = choice(KlPrompts, self.kl_prompts, "search.kl_prompts")
        self.rate = choice(BehaviourRate, self.rate, "search.rate")
        require(self.trials is None or self.trials > 0, f"search.trials must be > 0, got {self.trials}")
        require(self.kind == "grid" or self.trials is not None, "search.trials must be set for search=tpe")
        require(self.parallel > 0, f"search.parallel must be > 0, got {self.parallel}")
        require(self.startup_trials >= 0, f"search.startup_trials must be >= 0, got {self.startup_trials}")
        require(self.batch_size > 0, f"search.batch_size must be > 0, got {self.batch_size}")
        require(
            self.max_prompts is None or self.max_prompts > 0,
            f"search.max_prompts must be > 0, got {self.max_prompts}",
        )


@dataclass
class ConfirmConfig:
    """Generation on the test split for the finalists (the search itself never generates)."""

    finalists: int = 2
    """Trials confirmed: the picked one, then its neighbours on the Pareto front (0: none)."""
    resamples: int = 2000
    """Bootstrap resamples for the rates' intervals."""
    confidence: float = 0.95
    """Coverage of the bootstrap intervals."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self) -> None:
        require(self.finalists >= 0, f"confirm.finalists must be >= 0, got {self.finalists}")
        require(self.resamples >= 1, f"confirm.resamples must be >= 1, got {self.resamples}")
        require(0 < self.confidence < 1, f"confirm.confidence must be in (0, 1), got {self.confidence}")


@dataclass
class SweepConfig(ConceptRunConfig):
    """A concept run whose pool has ``search.parallel`` workers (one per trial in flight), each with
    ``collect``'s per-worker resources."""

    sweep: SweepSpace = field(default_factory=SweepSpace)
    """What trials vary (see tasks/sweep/config.py)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """How trials are chosen and run (config group conf/search: tpe, grid)."""
    pick: PickConfig = field(default_factory=PickConfig)
    """Which trial of the front is chosen."""
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(save=False))
    """output.save=true orthogonalizes the picked trial into a checkpoint (ablate trials only)."""
    resume: str | None = None
    """MLflow run id of an interrupted sweep to continue, given with the same command: its finished trials
    (its nested runs, the sweep's journal) are taken as they are and only the rest run, in the same run;
    the trials, the front and the pick equal an uninterrupted sweep's."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.resume is None or RUN_ID.fullmatch(self.resume) is not None,
            f"resume must be an MLflow run id (32 hex digits), got {self.resume!r}",
        )
        if self.collect.workers not in (CollectConfig.workers, self.search.parallel):
            log.warning(
                "collect.workers=%d is not used by the sweep: its pool has search.parallel=%d workers",
                self.collect.workers,
                self.search.parallel,
            )

    @property
    def pool(self) -> CollectConfig:
        """The pool's resources: ``collect``'s per worker, ``search.parallel`` workers."""
        return replace(self.collect, workers=self.search.parallel)
