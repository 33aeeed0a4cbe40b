"""Progress that reads well both in a terminal (a tqdm bar) and in `ray job logs` or CI (log lines, never a
flood of carriage returns).

Without a TTY a stage logs one line when it starts, a line at each tenth of the way (with the rate of
progress so far and an estimate of what is left) but at most one every ``MIN_LOG_INTERVAL_S`` seconds, and
one line when it ends: a stage of a few seconds reads as two lines, an hour-long one as about a dozen.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("compalign.progress")

MIN_LOG_INTERVAL_S = 5.0
"""Fewest seconds between two intermediate lines of one stage (without a TTY)."""
OPEN_ENDED_LOG_INTERVAL_S = 30.0
"""Seconds between lines of a stage whose total is not known in advance (total <= 0)."""


class Progress:
    def __init__(self, stage: str, total: int, unit: str = "it") -> None:
        self.stage, self.total, self.unit = stage, total, unit
        self.done = 0
        self.start = time.monotonic()
        self._last_report = self.start
        self._next_report = 0.1
        known = total > 0
        tty = sys.stderr.isatty()
        self._bar = tqdm(total=total if known else None, desc=stage, unit=unit, leave=False) if tty else None
        if self._bar is None and known:
            log.info("%s: started, %d %s", stage, total, unit)
        elif self._bar is None:
            log.info("%s: started", stage)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.total <= 0:
            # Open-ended (a search whose size is only known at its end): a count now and then.
            if now - self._last_report >= OPEN_ENDED_LOG_INTERVAL_S:
                log.info("%s: %d %s so far (%.0f s)", self.stage, self.done, self.unit, now - self.start)
                self._last_report = now
            return
        fraction = self.done / self.total
        # The last step is left to close(), which says how long the whole stage took.
        if self.done < self.total and fraction >= self._next_report:
            if now - self._last_report < MIN_LOG_INTERVAL_S:
                return  # the step is reported by a later update, once the interval has passed
            elapsed = now - self.start
            log.info(
                "%s: %d/%d %s (%.0f%%, %.0f s, about %.0f s left)",
                self.stage,
                self.done,
                self.total,
                self.unit,
                100 * fraction,
                elapsed,
                elapsed * (self.total - self.done) / max(self.done, 1),
            )
            self._last_report = now
            while self._next_report <= fraction:
                self._next_report += 0.1

    def close(self, failed: bool = False) -> None:
        if self._bar is not None:
            self._bar.close()
        elapsed = time.monotonic() - self.start
        if failed:
            log.info("%s: stopped after %d %s (%.1f s)", self.stage, self.done, self.unit, elapsed)
        else:
            log.info("%s: done, %d %s in %.1f s", self.stage, self.done, self.unit, elapsed)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)
