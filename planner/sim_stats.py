"""Simulation results and SLO attainment with a batch-means confidence interval."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats

# The measured window: requests before WARMUP_FRACTION of the run see an emptier system (warm-up),
# requests after TAIL_FRACTION see arrivals stop (drain). Both are excluded.
WARMUP_FRACTION = 0.2
TAIL_FRACTION = 0.9
CI_BATCHES = 10


class Attainment(NamedTuple):
    """Fraction of measured requests meeting the SLO(s), with a 95% confidence interval."""

    value: float
    ci_low: float
    ci_high: float
    measured: int


class SimResult(NamedTuple):
    """Per-request results of a simulation (seconds); `completions` counts finishes per request;
    `busy_s` the compute time of the prefill (first) and decode (or colocated step) instances."""

    ttft: np.ndarray
    tpot: np.ndarray
    finish: np.ndarray
    completions: np.ndarray
    busy_s: tuple[float, float] = (0.0, 0.0)

    def window(self) -> slice:
        n = len(self.ttft)
        return slice(int(n * WARMUP_FRACTION), max(int(n * TAIL_FRACTION), int(n * WARMUP_FRACTION) + 1))

    def attainment(self, ttft_slo: float | None, tpot_slo: float | None) -> Attainment:
        """Joint attainment: fraction of requests meeting BOTH SLOs (None = that SLO is ignored).

        Consecutive requests in a queue are correlated, so the interval comes from batch means
        (CI_BATCHES consecutive groups, Student t), not from a binomial formula."""
        w = self.window()
        ok = np.ones(len(self.ttft[w]), dtype=bool)
        if ttft_slo is not None:
            ok &= self.ttft[w] <= ttft_slo
        if tpot_slo is not None:
            ok &= self.tpot[w] <= tpot_slo
        return fraction_with_ci(ok)


def fraction_with_ci(ok: np.ndarray) -> Attainment:
    """Fraction of True in `ok` (requests in arrival order) with a 95% batch-means interval."""
    m = len(ok)
    value = float(ok.mean()) if m else 0.0
    if m < 2 * CI_BATCHES:
        return Attainment(value, 0.0, 1.0, m)
    means = np.array([b.mean() for b in np.array_split(ok, CI_BATCHES)])
    half = float(stats.t.ppf(0.975, CI_BATCHES - 1) * means.std(ddof=1) / np.sqrt(CI_BATCHES))
    return Attainment(value, max(0.0, value - half), min(1.0, value + half), m)
