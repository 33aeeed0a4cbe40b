"""Search: the space made concrete, the grid, seeded TPE that does not depend on which trial finishes
first, the in-flight bound, the Pareto front, the pick rules and the plot."""

import math
import random

import pytest

from tasks.core.errors import CompalignError, ConfigError
from tasks.sweep.config import PickConfig, SearchConfig, SweepSpace
from tasks.sweep.front import finalists, pareto_mask, pick, trials_table
from tasks.sweep.plot import pareto_plot
from tasks.sweep.search import (
    GridProposer,
    LocalRunner,
    TpeProposer,
    TrialRecord,
    dimensions,
    grid_trials,
    run_search,
)
from tasks.sweep.trial import Trial
from tasks.sweep.trials import TrialScore

HERETIC = SweepSpace(
    interventions=["ablate", "ablate_add"],
    scales=[-2.0, 0.5],
    attn_peak_weight=[0.8, 1.5],
    attn_peak_at=[0.6, 1.0],
    attn_min_weight=[0.0, 1.0],
    attn_falloff=[0.03, 0.6],
    mlp_peak_weight=[0.8, 1.5],
)


def objective(trial: Trial) -> TrialScore:
    """A smooth synthetic trade-off: stronger, wider, later edits lower the rate and raise the KL."""
    strength = trial.attn.peak_weight * min(trial.attn.falloff, 10) / 10 + 0.3 * trial.mlp.peak_weight
    rate = max(0.0, 1 - 0.6 * strength - 0.02 * abs(trial.layer - 20))
    kl = 0.05 * strength**2 + 0.01 * abs(trial.layer - 18) + (0.2 if trial.adds else 0.0)
    return TrialScore(trial.number, round(rate, 2), -rate, kl, 0.0)


class ShuffledRunner:
    """Finishes whichever started trials a seeded RNG picks: results arrive out of order."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.started: dict[int, Trial] = {}
        self.max_in_flight = 0

    def start(self, trial):
        self.started[trial.number] = trial
        self.max_in_flight = max(self.max_in_flight, len(self.started))
        return trial.number

    def wait(self, handles):
        return self.rng.sample(handles, self.rng.randint(1, len(handles)))

    def result(self, handle):
        return objective(self.started.pop(handle))


def test_dimensions_resolve_fractions_and_defaults():
    dims = dimensions(HERETIC, n_layers=30, n_positions=5)
    assert dims["layer"] == [float(x) for x in range(12, 28)]  # layer_span 0.4..0.9 of 30 layers
    assert dims["attn.peak_position"] == pytest.approx([0.6 * 29, 29.0])
    assert dims["attn.falloff"] == pytest.approx([0.9, 18.0])
    assert dims["mlp.falloff"] == [30.0] and dims["position"] == [-1]
    with pytest.raises(CompalignError, match="outside 0..30"):
        dimensions(SweepSpace(layers=[4, 31]), 30, 5)
    with pytest.raises(CompalignError, match="positions"):
        dimensions(SweepSpace(positions=[-6]), 30, 5)


@pytest.mark.parametrize("key", ["scales", "embed_weights", "layers", "layer_span"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_space_refuses_non_finite_numbers(key, bad):
    values = {"scales": [-1.0, bad], "embed_weights": [bad], "layers": [4.0, bad], "layer_span": [0.4, bad]}
    with pytest.raises(CompalignError, match=f"sweep.{key} must be"):
        SweepSpace(**{key: values[key]})


def test_grid_is_every_combination_in_a_fixed_order():
    space = SweepSpace(layers=[4, 8, 12], positions=[-1, -2], interventions=["add"], scales=[0.5, 1, 2])
    trials = grid_trials(dimensions(space, 30, 5), limit=None)
    assert len(trials) == 18 and [t.number for t in trials] == list(range(18))
    assert [(t.layer, t.position, t.scale) for t in trials[:4]] == [
        (4, -1, 0.5),
        (4, -1, 1),
        (4, -1, 2),
        (4, -2, 0.5),
    ]
    assert len({(t.layer, t.position, t.scale) for t in trials}) == 18
    with pytest.raises(CompalignError, match="18 combinations"):
        grid_trials(dimensions(space, 30, 5), limit=10)


def test_grid_skips_parameters_an_intervention_ignores():
    space = SweepSpace(
        layers=[4, 8, 12], interventions=["ablate", "add"], scales=[0.5, 1, 2], attn_falloff=[0.1, 1]
    )
    trials = grid_trials(dimensions(space, 30, 5), limit=None)
    ablate = [t for t in trials if t.intervention == "ablate"]
    add = [t for t in trials if t.intervention == "add"]
    assert len(ablate) == 3 * 2 and {t.scale for t in ablate} == {0.5}  # scales do not multiply ablations
    assert len(add) == 3 * 3 and {t.attn.falloff for t in add} == {3.0}  # nor kernels additions
    assert len(trials) == 15


def test_grid_runs_every_trial_with_bounded_parallelism():
    trials = grid_trials(dimensions(SweepSpace(layers=[4, 8, 12], scales=[1, 2]), 30, 5), None)
    runner = ShuffledRunner(0)
    seen = []
    records = run_search(
        GridProposer(trials), runner, parallel=3, on_result=lambda r: seen.append(r.trial.number)
    )
    assert seen == list(range(len(trials))) and [r.trial for r in records] == trials
    assert runner.max_in_flight == 3


def _tpe(seed: int, runner, parallel: int = 4, n: int = 30):
    dims = dimensions(HERETIC, 30, 5)
    return run_search(TpeProposer(dims, n, seed, startup_trials=8), runner, parallel)


def test_tpe_same_seed_same_trials_and_front_whatever_finishes_first():
    a = _tpe(7, ShuffledRunner(1))
    b = _tpe(7, ShuffledRunner(2))  # other completion order
    c = _tpe(7, LocalRunner(objective))  # in order, one process
    assert len(a) == 30
    assert [r.trial for r in a] == [r.trial for r in b] == [r.trial for r in c]
    front = trials_table(a)[lambda t: t["pareto"]]
    assert front.equals(trials_table(b)[lambda t: t["pareto"]])
    other = _tpe(8, ShuffledRunner(1))
    assert [r.trial for r in other] != [r.trial for r in a]
    assert {r.trial.intervention for r in a} == {"ablate", "ablate_add"}
    assert all(0.8 <= r.trial.attn.peak_weight <= 1.5 for r in a)


def test_tpe_keeps_at_most_parallel_in_flight():
    runner = ShuffledRunner(3)
    _tpe(0, runner, parallel=2, n=12)
    assert runner.max_in_flight == 2


def _record(number, rate, kl, lo=0.0):
    return TrialRecord(Trial(number, 10.0 + number, -1), TrialScore(number, rate, lo, kl, 0.1))


def test_pareto_front_pick_and_finalists():
    recs = [_record(0, 0.9, 0.01), _record(1, 0.3, 0.05), _record(2, 0.05, 0.4), _record(3, 0.3, 0.09),
            _record(4, 0.0, 0.9), _record(5, 0.05, 0.4)]  # fmt: skip
    assert pareto_mask([(r.score.behaviour_rate, r.score.kl) for r in recs]) == [
        True,
        True,
        True,
        False,
        True,
        True,
    ]
    best, ok = pick(recs, PickConfig(rule="lowest_kl", max_rate=0.1))
    assert ok and best.trial.number == 2  # ties on (rate, KL) go to the lower trial number
    best, ok = pick(recs, PickConfig(rule="lowest_rate", max_kl=0.1))
    assert ok and best.trial.number == 1
    best, ok = pick(recs, PickConfig(rule="lowest_kl", max_rate=0.0))
    assert ok and best.trial.number == 4
    best, ok = pick(recs[:2], PickConfig(rule="lowest_kl", max_rate=0.1))
    assert not ok and best.trial.number == 1  # nothing within the limit: the lowest rate
    chosen = pick(recs, PickConfig())[0]
    assert [r.trial.number for r in finalists(recs, chosen, 3)] == [2, 4, 5]  # front: 4, 2, 5, 1, 0
    table = trials_table(recs, picked=2)
    assert list(table["number"]) == [4, 2, 5, 1, 0, 3]
    assert table.loc[table["picked"], "number"].tolist() == [2]
    assert {"layer", "attn.peak_weight", "behaviour_rate", "kl", "pareto", "seconds"} <= set(table.columns)


def test_pareto_plot_writes_a_png(tmp_path):
    recs = [_record(i, 1 - i / 10, 0.001 * (i + 1) ** 2) for i in range(8)]
    path = pareto_plot(trials_table(recs, 3), tmp_path / "front.png", PickConfig(max_rate=0.5),
                       TrialScore(-1, 0.95, 1.0, 0.0, 0.0))  # fmt: skip
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="search.parallel must be > 0"):
        SearchConfig(parallel=0)
    with pytest.raises(ConfigError, match="search.kind"):
        SearchConfig(kind="random")
    with pytest.raises(ConfigError, match="sweep.interventions"):
        SweepSpace(interventions=["steer"])
    with pytest.raises(ConfigError, match="sweep.attn_peak_at"):
        SweepSpace(attn_peak_at=[1.5])
    with pytest.raises(ConfigError, match="pick.rule"):
        PickConfig(rule="best")
    assert math.isinf(Trial(0, 1.0, -1).attn.falloff)


def test_a_tie_on_one_objective_is_dominated_by_the_better_other():
    # equal KL, lower rate dominates; equal rate, lower KL dominates; equal points both stay
    assert pareto_mask([(0.1, 0.5), (0.2, 0.5)]) == [True, False]
    assert pareto_mask([(0.2, 0.4), (0.2, 0.5)]) == [True, False]
    assert pareto_mask([(0.2, 0.5), (0.2, 0.5)]) == [True, True]
    assert pareto_mask([(0.3, 0.1), (0.1, 0.3)]) == [True, True]


def test_pick_limits_are_inclusive_and_the_fallback_is_reported():
    recs = [_record(0, 0.5, 0.2), _record(1, 0.2, 0.3), _record(2, 0.1, 0.6)]
    assert pick(recs, PickConfig(rule="lowest_rate", max_kl=0.3)) == (recs[1], True)  # kl == max_kl is within
    assert pick(recs, PickConfig(rule="lowest_kl", max_rate=0.2)) == (recs[1], True)  # rate == max_rate too
    assert pick(recs, PickConfig(rule="lowest_rate", max_kl=0.1)) == (
        recs[0],
        False,
    )  # none within: lowest KL
    assert pick(recs, PickConfig(rule="lowest_kl", max_rate=0.05)) == (recs[2], False)  # none: lowest rate
    with pytest.raises(CompalignError, match="^no trial finished; nothing to pick$"):
        pick([], PickConfig())


def test_finalists_include_a_picked_trial_off_the_front():
    recs = [_record(0, 0.0, 0.5), _record(1, 0.5, 0.0), _record(2, 0.6, 0.6)]  # 2 is dominated
    assert [r.trial.number for r in finalists(recs, recs[2], 3)] == [2, 1, 0]
    assert [r.trial.number for r in finalists(recs, recs[0], 5)] == [0, 1]


def test_trials_table_columns_and_order():
    recs = [_record(0, 0.9, 0.01), _record(1, 0.3, 0.05), _record(2, 0.95, 0.5), _record(3, 0.3, 0.02)]
    table = trials_table(recs, picked=3)
    assert list(table["number"]) == [3, 0, 1, 2]  # the front by rate, then the rest in trial order
    assert list(table.index) == [0, 1, 2, 3] and "index" not in table.columns
    assert table.columns[0] == "number" and list(table.columns[-2:]) == ["pareto", "picked"]
    assert list(table["picked"]) == [True, False, False, False]
