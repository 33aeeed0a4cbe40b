"""Sweep search: the space of trials, an exhaustive grid or a seeded multi-objective TPE over it, a
bounded number of trials in flight.

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
from dataclasses import dataclass
from typing import Protocol

import optuna

from tasks.core.errors import CompalignError
from tasks.sweep.config import SearchConfig, SweepSpace
from tasks.sweep.kernels import falloff_layers, peak_position_at
from tasks.sweep.trial import Trial
from tasks.sweep.trials import TrialScore, run_trial

log = logging.getLogger(__name__)


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


class PoolTrialRunner:
    """Runs trials on a pool's workers (``tasks.runtime.pool.WorkerPool``): each trial goes to the worker with
    the fewest trials in flight; a worker runs its trials one after another. A trial whose worker is lost
    runs again on another one (the pool's retry), with the same score."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.load = [0] * pool.size
        self._worker: dict[object, int] = {}

    def start(self, trial: Trial):
        worker = self.load.index(min(self.load))
        self.load[worker] += 1
        handle = self.pool.start(worker, run_trial, trial, anywhere=True)
        self._worker[handle] = worker
        return handle

    def wait(self, handles: list) -> list:
        return self.pool.wait_any(handles)

    def result(self, handle) -> TrialScore:
        self.load[self._worker.pop(handle)] -= 1
        return handle.get()


class ResumedRunner:
    """A TrialRunner that takes the trials an interrupted sweep finished from its journal (trial number ->
    (params as logged, score)) instead of running them, and runs the rest on ``runner``. The search asks the
    same trials in the same order (seeded, told in trial order), so a finished trial is recognised by its
    number; its params must match, or the config or code changed since."""

    def __init__(self, runner: TrialRunner, journal: dict[int, tuple[dict[str, str], TrialScore]]) -> None:
        self.runner, self.journal = runner, journal
        self.resumed: set[int] = set()

    def start(self, trial: Trial) -> object:
        if trial.number not in self.journal:
            return ("run", self.runner.start(trial))
        logged, _ = self.journal[trial.number]
        asked = {k: str(v) for k, v in trial.params().items()}
        if asked != logged:
            changed = sorted(k for k in asked.keys() | logged.keys() if asked.get(k) != logged.get(k))
            raise CompalignError(
                f"resume: trial {trial.number} of the interrupted sweep had {', '.join(changed)} = "
                f"{[logged.get(k) for k in changed]}, this search asks {[asked.get(k) for k in changed]}: the "
                "sweep's config or code changed since; start a new sweep"
            )
        self.resumed.add(trial.number)
        return ("journal", trial.number)

    def wait(self, handles: list) -> list:
        ready = [h for h in handles if h[0] == "journal"]
        if ready:
            return ready
        return [("run", h) for h in self.runner.wait([h for _, h in handles])]

    def result(self, handle) -> TrialScore:
        kind, inner = handle
        return self.journal[inner][1] if kind == "journal" else self.runner.result(inner)


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
