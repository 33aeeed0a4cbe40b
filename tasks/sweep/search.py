"""Sweep search: the space of trials, an exhaustive grid or a seeded multi-objective TPE over it, a
bounded number of trials in flight, the Pareto front and the user's pick.

The space (config ``sweep``) lists values per parameter. The grid runs every combination. TPE searches
each numeric parameter over the span of its listed values (one value fixes it) and chooses among the
listed positions and interventions. Both objectives are minimised: the behaviour rate on the target
validation prompts and the first-token KL on the baseline ones.

Reproducibility with trials in flight: when trial n is asked, exactly trials 0..n-parallel have been
told (in trial order) and n-parallel+1..n-1 are pending, so what the sampler knows at each ask never
depends on which worker finished first: the same seed gives the same trials and the same front on any
cluster.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402

from tasks.core.errors import CompalignError, require  # noqa: E402
from tasks.sweep.kernels import falloff_layers, peak_position_at  # noqa: E402
from tasks.sweep.trials import INTERVENTIONS, Trial, TrialScore  # noqa: E402

log = logging.getLogger(__name__)

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
        require(
            self.rule in ("lowest_kl", "lowest_rate"),
            f"pick.rule must be lowest_kl or lowest_rate, got {self.rule!r}",
        )
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
        require(self.kind in ("grid", "tpe"), f"search.kind must be grid or tpe, got {self.kind!r}")
        require(
            self.kl_prompts in ("without_behaviour", "all"),
            f"search.kl_prompts must be without_behaviour or all, got {self.kl_prompts!r}",
        )
        require(
            self.rate in ("top1", "threshold"), f"search.rate must be top1 or threshold, got {self.rate!r}"
        )
        require(self.trials is None or self.trials > 0, f"search.trials must be > 0, got {self.trials}")
        require(self.kind == "grid" or self.trials is not None, "search.trials must be set for search=tpe")
        require(self.parallel > 0, f"search.parallel must be > 0, got {self.parallel}")
        require(self.startup_trials >= 0, f"search.startup_trials must be >= 0, got {self.startup_trials}")
        require(self.batch_size > 0, f"search.batch_size must be > 0, got {self.batch_size}")
        require(
            self.max_prompts is None or self.max_prompts > 0,
            f"search.max_prompts must be > 0, got {self.max_prompts}",
        )


# ----------------------------------------------------------------------------- the space, made concrete


def dimensions(space: SweepSpace, n_layers: int, n_positions: int) -> dict[str, list]:
    """Concrete values per trial parameter (names as in ``Trial.params``) for a model with ``n_layers``
    decoder layers and ``n_positions`` collected positions: layers absolute, kernel geometry in layers."""
    if space.layers is None:
        low, high = math.ceil(space.layer_span[0] * n_layers), math.floor(space.layer_span[1] * n_layers)
        layers = [float(x) for x in range(low, max(high, low) + 1)]
    else:
        layers = [float(x) for x in space.layers]
    bad = [x for x in layers if not 0 <= x <= n_layers]
    if bad:
        raise CompalignError(
            f"sweep.layers {bad} are outside 0..{n_layers} (the model has {n_layers} decoder layers)"
        )
    bad = [p for p in space.positions if p < -n_positions]
    if bad:
        raise CompalignError(
            f"sweep.positions {bad} are outside -{n_positions}..-1 (the positions collected after the instruction)"
        )
    dims: dict[str, list] = {
        "layer": layers,
        "position": list(space.positions),
        "intervention": list(space.interventions),
        "scale": [float(x) for x in space.scales],
        "embed_weight": [float(x) for x in space.embed_weights],
    }
    for part in ("attn", "mlp"):
        dims[f"{part}.peak_weight"] = [float(x) for x in getattr(space, f"{part}_peak_weight")]
        dims[f"{part}.peak_position"] = [
            peak_position_at(x, n_layers) for x in getattr(space, f"{part}_peak_at")
        ]
        dims[f"{part}.min_weight"] = [float(x) for x in getattr(space, f"{part}_min_weight")]
        dims[f"{part}.falloff"] = [falloff_layers(x, n_layers) for x in getattr(space, f"{part}_falloff")]
    return {k: list(dict.fromkeys(v)) for k, v in dims.items()}  # drop repeats, keep order


def grid_trials(dims: dict[str, list], limit: int | None) -> list[Trial]:
    """Every distinct combination, in a fixed order (the last parameter varies fastest). Parameters a
    trial's intervention ignores (the scale of an ablation, the kernels of an addition) take their first
    value, so that those combinations are not run again."""
    names = list(dims)
    first = {k: v[0] for k, v in dims.items()}
    ignored = {
        "ablate": ["scale"],
        "add": ["embed_weight", *(k for k in names if k.startswith(("attn.", "mlp.")))],
        "ablate_add": [],
    }
    combos: dict[tuple, dict] = {}
    for values in itertools.product(*dims.values()):
        params = dict(zip(names, values, strict=True))
        params.update({k: first[k] for k in ignored[params["intervention"]]})
        combos.setdefault(tuple(params.values()), params)
    if limit is not None and len(combos) > limit:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in dims.items() if len(v) > 1)
        raise CompalignError(
            f"the grid has {len(combos)} combinations ({sizes}), more than search.trials={limit}; list fewer "
            "values in sweep.* or raise search.trials"
        )
    return [Trial.from_params(number, params) for number, params in enumerate(combos.values())]


CATEGORICAL = ("position", "intervention")


def suggest(ot: optuna.Trial, dims: dict[str, list]) -> Trial:
    """A trial from an Optuna trial: numeric spans as floats, positions and interventions as choices."""
    params = {}
    for name, values in dims.items():
        if len(values) == 1:
            params[name] = values[0]
        elif name in CATEGORICAL:
            params[name] = ot.suggest_categorical(name, values)
        else:
            params[name] = ot.suggest_float(name, min(values), max(values))
    return Trial.from_params(ot.number, params)


# ----------------------------------------------------------------------------- ask / tell over workers


class Proposer(Protocol):
    total: int
    """How many trials the search will ask for."""

    def ask(self) -> Trial | None:
        """The next trial, or None when the search is over."""

    def tell(self, trial: Trial, score: TrialScore) -> None: ...


class GridProposer:
    def __init__(self, trials: list[Trial]) -> None:
        self.total = len(trials)
        self._trials = iter(trials)

    def ask(self) -> Trial | None:
        return next(self._trials, None)

    def tell(self, trial: Trial, score: TrialScore) -> None:
        pass


class TpeProposer:
    """Multi-objective TPE (minimise behaviour rate and KL), seeded."""

    def __init__(self, dims: dict[str, list], trials: int, seed: int, startup_trials: int) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
        self.study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        self.dims, self.remaining, self.total = dims, trials, trials

    def ask(self) -> Trial | None:
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        return suggest(self.study.ask(), self.dims)

    def tell(self, trial: Trial, score: TrialScore) -> None:
        self.study.tell(trial.number, [score.behaviour_rate, score.kl])


class TrialRunner(Protocol):
    """Runs trials somewhere (Ray workers, or in this process): ``start`` returns a hashable handle."""

    def start(self, trial: Trial) -> object: ...

    def wait(self, handles: list) -> list:
        """Handles that have finished (at least one)."""

    def result(self, handle) -> TrialScore: ...


class LocalRunner:
    """Runs each trial in this process when started (tests, debugging)."""

    def __init__(self, evaluate: Callable[[Trial], TrialScore]) -> None:
        self.evaluate = evaluate
        self._results: dict[int, TrialScore] = {}

    def start(self, trial: Trial) -> object:
        self._results[trial.number] = self.evaluate(trial)
        return trial.number

    def wait(self, handles: list) -> list:
        return list(handles)

    def result(self, handle) -> TrialScore:
        return self._results.pop(handle)


@dataclass
class TrialRecord:
    trial: Trial
    score: TrialScore


def run_search(
    proposer: Proposer,
    runner: TrialRunner,
    parallel: int,
    on_result: Callable[[TrialRecord], None] | None = None,
) -> list[TrialRecord]:
    """Run trials with at most ``parallel`` in flight; records (and ``on_result`` calls) in trial order.

    Before trial n is asked, exactly trials 0..n-parallel have been told to the proposer (waiting for
    them if need be, holding back later ones that finished early), so the sampler sees the same
    history at every ask whatever the order in which workers finish."""
    in_flight: dict[object, Trial] = {}
    finished: dict[int, TrialRecord] = {}
    records: list[TrialRecord] = []
    asked = told = 0
    exhausted = False
    while True:
        while not exhausted:
            while told <= asked - parallel and told < len(records):
                proposer.tell(records[told].trial, records[told].score)
                told += 1
            if told <= asked - parallel:
                break  # trial `told` is still running
            trial = proposer.ask()
            if trial is None:
                exhausted = True
                break
            asked += 1
            in_flight[runner.start(trial)] = trial
        if not in_flight:
            for record in records[told:]:
                proposer.tell(record.trial, record.score)
            return records
        for handle in runner.wait(list(in_flight)):
            trial = in_flight.pop(handle)
            finished[trial.number] = TrialRecord(trial, runner.result(handle))
        while len(records) in finished:
            records.append(finished.pop(len(records)))
            if on_result is not None:
                on_result(records[-1])


def make_proposer(search: SearchConfig, dims: dict[str, list]) -> Proposer:
    if search.kind == "grid":
        return GridProposer(grid_trials(dims, search.trials))
    return TpeProposer(dims, search.trials, search.seed, search.startup_trials)


# ----------------------------------------------------------------------------- front and pick


def pareto_mask(points: list[tuple[float, float]]) -> list[bool]:
    """True for points no other point dominates (both objectives minimised; equal points all stay)."""

    def dominates(a, b) -> bool:
        return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])

    return [not any(dominates(q, p) for q in points) for p in points]


def trials_table(records: list[TrialRecord], picked: int | None = None) -> pd.DataFrame:
    """One row per trial: number, parameters, scores, seconds, pareto, picked; front first (by rate, then
    KL), then the rest in trial order."""
    rows = [
        {"number": r.trial.number, **r.trial.params(), **r.score.metrics(), "seconds": r.score.seconds}
        for r in records
    ]
    table = pd.DataFrame(rows)
    table["pareto"] = pareto_mask(list(zip(table["behaviour_rate"], table["kl"], strict=True)))
    table["picked"] = table["number"] == picked
    front = table[table["pareto"]].sort_values(["behaviour_rate", "kl", "number"], kind="stable")
    rest = table[~table["pareto"]].sort_values("number", kind="stable")
    return pd.concat([front, rest]).reset_index(drop=True)


def pick(records: list[TrialRecord], cfg: PickConfig) -> tuple[TrialRecord, bool]:
    """(the trial the rule picks, whether it met the rule's limit)."""
    if not records:
        raise CompalignError("no trial finished; nothing to pick")

    def key_kl(r: TrialRecord):
        return (r.score.kl, r.score.behaviour_rate, r.score.mean_log_odds, r.trial.number)

    def key_rate(r: TrialRecord):
        return (r.score.behaviour_rate, r.score.kl, r.score.mean_log_odds, r.trial.number)

    if cfg.rule == "lowest_kl":
        ok = [r for r in records if r.score.behaviour_rate <= cfg.max_rate]
        return (min(ok, key=key_kl), True) if ok else (min(records, key=key_rate), False)
    ok = [r for r in records if r.score.kl <= cfg.max_kl]
    return (min(ok, key=key_rate), True) if ok else (min(records, key=key_kl), False)


def finalists(records: list[TrialRecord], picked: TrialRecord, count: int) -> list[TrialRecord]:
    """The picked trial, then its neighbours along the front (alternately lower and higher rate)."""
    mask = pareto_mask([(r.score.behaviour_rate, r.score.kl) for r in records])
    front = sorted(
        (r for r, m in zip(records, mask, strict=True) if m),
        key=lambda r: (r.score.behaviour_rate, r.score.kl, r.trial.number),
    )
    if picked not in front:
        front.append(picked)
    at = front.index(picked)
    order = [picked]
    for step in range(1, len(front)):
        for j in (at - step, at + step):
            if 0 <= j < len(front):
                order.append(front[j])
    return order[:count]


def pareto_plot(
    table: pd.DataFrame, path: Path, cfg: PickConfig, clean: TrialScore | None = None, title: str = ""
) -> Path:
    """Behaviour rate (x) against KL (y, log scale) of every trial, coloured by source layer; the front
    as a red staircase, the picked trial as a star, the rule's limit as a dashed line."""
    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    floor = 1e-5
    kl = table["kl"].clip(lower=floor)
    points = ax.scatter(table["behaviour_rate"], kl, c=table["layer"], cmap="viridis", s=28, alpha=0.85)
    fig.colorbar(points, ax=ax, label="source layer")
    front = table[table["pareto"]].sort_values(["behaviour_rate", "kl"])
    ax.step(
        front["behaviour_rate"],
        front["kl"].clip(lower=floor),
        where="post",
        color="red",
        lw=1.2,
        label="Pareto front",
    )
    chosen = table[table["picked"]]
    if not chosen.empty:
        ax.scatter(chosen["behaviour_rate"], chosen["kl"].clip(lower=floor), marker="*", s=260, c="red",
                   edgecolors="black", zorder=5, label=f"picked (trial {int(chosen['number'].iloc[0])})")  # fmt: skip
    if cfg.rule == "lowest_kl":
        ax.axvline(cfg.max_rate, ls="--", c="gray", lw=1, label=f"max_rate {cfg.max_rate:g}")
    else:
        ax.axhline(max(cfg.max_kl, floor), ls="--", c="gray", lw=1, label=f"max_kl {cfg.max_kl:g}")
    if clean is not None:
        ax.axvline(
            clean.behaviour_rate, ls=":", c="black", lw=1, label=f"unedited rate {clean.behaviour_rate:.2f}"
        )
    ax.set_yscale("log")
    ax.set_xlabel("behaviour rate on target validation prompts (first token; lower = behaviour removed)")
    ax.set_ylabel("first-token KL on baseline prompts (lower = less damage)")
    ax.set_title(title or f"{len(table)} trials, {int(table['pareto'].sum())} on the front", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
