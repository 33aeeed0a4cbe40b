"""Progress that reads well both in a terminal (a tqdm bar) and in `ray job logs` or CI (a log line at
every tenth of the way, never a flood of carriage returns)."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("compalign.progress")


class Progress:
    def __init__(self, stage: str, total: int, unit: str = "it") -> None:
        self.stage, self.total, self.unit = stage, total, unit
        self.done = 0
        self.start = time.monotonic()
        self._next_report = 0.1
        self._bar = tqdm(total=total, desc=stage, unit=unit, leave=False) if sys.stderr.isatty() else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        fraction = self.done / self.total if self.total else 1.0
        if fraction >= self._next_report or self.done >= self.total:
            log.info(
                "%s: %d/%d %s (%.0f s)",
                self.stage,
                self.done,
                self.total,
                self.unit,
                time.monotonic() - self.start,
            )
            while self._next_report <= fraction:
                self._next_report += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        log.info("%s: done, %d %s in %.1f s", self.stage, self.done, self.unit, time.monotonic() - self.start)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
