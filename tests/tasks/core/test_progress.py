"""Progress without a TTY (as under pytest, CI and `ray job logs`): few, informative log lines."""

from __future__ import annotations

import logging

import pytest

from tasks.core import progress
from tasks.core.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "compalign.progress"]


def test_slow_stage_reports_each_tenth_with_estimate(clock, caplog):
    caplog.set_level(logging.INFO, "compalign.progress")
    with Progress("score candidates", 100, "candidates") as bar:
        for _ in range(100):
            clock.now += 1.0
            bar.update()
    lines = _lines(caplog)
    assert lines[0] == "score candidates: started, 100 candidates"
    assert lines[1] == "score candidates: 10/100 candidates (10%, 10 s, about 90 s left)"
    assert len(lines) == 11  # start, 10% .. 90%, done
    assert lines[-1] == "score candidates: done, 100 candidates in 100.0 s"


def test_fast_stage_is_two_lines(clock, caplog):
    caplog.set_level(logging.INFO, "compalign.progress")
    with Progress("collect target", 16, "prompts") as bar:
        for _ in range(8):
            clock.now += 0.01
            bar.update(2)
    assert _lines(caplog) == [
        "collect target: started, 16 prompts",
        "collect target: done, 16 prompts in 0.1 s",
    ]


def test_bursts_are_throttled_then_caught_up(clock, caplog):
    caplog.set_level(logging.INFO, "compalign.progress")
    with Progress("trials", 10, "trials") as bar:
        for step in range(10):
            clock.now += 30.0 if step == 5 else 0.1  # five quick trials, one slow, four quick
            bar.update()
    middle = _lines(caplog)[1:-1]
    assert middle == ["trials: 6/10 trials (60%, 30 s, about 20 s left)"]


def test_failure_says_where_it_stopped(clock, caplog):
    caplog.set_level(logging.INFO, "compalign.progress")
    with pytest.raises(RuntimeError), Progress("collect baseline", 10, "prompts") as bar:
        bar.update(3)
        raise RuntimeError("worker died")
    assert _lines(caplog)[-1] == "collect baseline: stopped after 3 prompts (0.0 s)"


def test_open_ended_stage_counts_now_and_then(clock, caplog):
    caplog.set_level(logging.INFO, "compalign.progress")
    with Progress("grid trials", 0, "trials") as bar:
        for _ in range(12):
            clock.now += 10.0
            bar.update()
    assert _lines(caplog) == [
        "grid trials: started",
        "grid trials: 3 trials so far (30 s)",
        "grid trials: 6 trials so far (60 s)",
        "grid trials: 9 trials so far (90 s)",
        "grid trials: 12 trials so far (120 s)",
        "grid trials: done, 12 trials in 120.0 s",
    ]
