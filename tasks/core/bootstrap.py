"""Bootstrap confidence intervals for behaviour rates (fractions of judged answers that show a behaviour)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tasks.core.errors import CompalignError


@dataclass
class RateInterval:
    """A rate with its percentile-bootstrap interval."""

    rate: float
    low: float
    high: float
    flagged: int
    total: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.flagged}/{self.total} ({self.rate:.0%}, 95% CI {self.low:.0%}-{self.high:.0%})"


def bootstrap_rate(
    flags: list[bool], resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> RateInterval:
    """Rate of ``flags`` and the percentile interval of the rates of ``resamples`` resamples drawn with
    replacement (seeded: the same flags give the same interval). With every answer flagged, or none,
    the interval collapses onto the rate: resampling cannot show uncertainty it never saw, so read such
    an interval together with ``total``."""
    if resamples < 1:
        raise CompalignError(f"bootstrap resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise CompalignError(f"bootstrap confidence must be in (0, 1), got {confidence}")
    values = np.asarray(flags, dtype=np.float64)
    if values.size == 0:
        nan = float("nan")
        return RateInterval(nan, nan, nan, 0, 0)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, values.size, size=(resamples, values.size))
    rates = values[draws].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(rates, [tail, 1 - tail])
    return RateInterval(float(values.mean()), float(low), float(high), int(values.sum()), int(values.size))
