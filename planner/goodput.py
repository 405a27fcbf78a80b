"""Goodput: the largest arrival rate whose simulated SLO attainment meets the target.

Attainment falls with the rate, so the search brackets the rate by doubling/halving and then
bisects to a relative precision. Every rate reuses one gap sequence and one length sample scaled to
the rate (common random numbers), which keeps the attainment curve monotone up to batching noise."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from planner import PlannerError
from planner.sim_stats import Attainment
from planner.simulator import SimConfig, simulate
from workload import ArrivalProcess, Workload


@dataclass(frozen=True)
class Slo:
    """Latency SLOs (seconds) and the fraction of requests that must meet both."""

    ttft: float
    tpot: float
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if not (self.ttft > 0 and self.tpot > 0):
            raise PlannerError(f"SLOs must be positive (got ttft={self.ttft}, tpot={self.tpot})")
        if not 0 < self.attainment <= 1:
            raise PlannerError(f"attainment must be in (0, 1], got {self.attainment}")


@dataclass(frozen=True)
class SearchSettings:
    """How much to simulate. The run is long enough that its warm-up (the first 20% of requests)
    spans `residence_multiple` mean decode residence times (output length x TPOT SLO), so the
    decode batch has reached steady state when measurement starts."""

    precision: float = 0.03
    min_requests: int = 600
    max_requests: int = 30000
    residence_multiple: float = 2.5
    seed: int = 0
    arrival_cv: float = 1.0
    min_rate: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 < self.precision < 1:
            raise PlannerError("the goodput precision must be in (0, 1)")
        if not 0 < self.min_requests <= self.max_requests:
            raise PlannerError("need 0 < min_requests <= max_requests")
        if self.arrival_cv <= 0:
            raise PlannerError("the arrival coefficient of variation must be > 0")


BRACKET_FACTOR = 1.5


class Goodput(NamedTuple):
    """Result of a goodput search: the rate (req/s), the attainment measured there, and a 95%
    interval for the rate (`low`, `high`): the attainment's own interval carried through the
    attainment-vs-rate slope around the goodput, widened by the bisection's last bracket."""

    rate: float
    attainment: Attainment
    simulations: int
    low: float = 0.0
    high: float = 0.0

    def scaled(self, factor: float) -> Goodput:
        """The goodput of `factor` identical, balanced copies of the simulated deployment."""
        return self._replace(rate=self.rate * factor, low=self.low * factor, high=self.high * factor)


def requests_for(
    rate: float, workload: Workload, slo: Slo, settings: SearchSettings, mode: str = "joint"
) -> int:
    # Prefill alone has no decode batch to fill: its queue relaxes on the scale of the TTFT SLO.
    residence = 4 * slo.ttft if mode == "prefill_only" else float(workload.output_lens.mean()) * slo.tpot
    warmup_seconds = settings.residence_multiple * residence
    n = math.ceil(rate * warmup_seconds / 0.2)
    return int(min(max(n, settings.min_requests), settings.max_requests))


_SAMPLES: dict[tuple[int, int, int, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _samples(workload: Workload, settings: SearchSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    key = (id(workload), settings.max_requests, settings.seed, settings.arrival_cv)
    if key not in _SAMPLES:
        p, o = workload.sample(settings.max_requests, settings.seed)
        gaps = ArrivalProcess(settings.arrival_cv).unit_gaps(settings.max_requests, settings.seed)
        _SAMPLES.clear()
        _SAMPLES[key] = (np.cumsum(gaps), p, o)
    return _SAMPLES[key]


def slo_for_mode(cfg: SimConfig, slo: Slo) -> tuple[float | None, float | None]:
    if cfg.mode == "prefill_only":
        return slo.ttft, None
    if cfg.mode == "decode_only":
        return None, slo.tpot
    return slo.ttft, slo.tpot


def attainment_at(
    cfg: SimConfig, rate: float, workload: Workload, slo: Slo, settings: SearchSettings
) -> Attainment:
    """Simulate `cfg` at `rate` requests/s and measure the attainment of the SLOs its mode covers."""
    if rate <= 0:
        raise PlannerError("the rate must be positive")
    times, p, o = _samples(workload, settings)
    n = requests_for(rate, workload, slo, settings, cfg.mode)
    res = simulate(cfg, times[:n] / rate, p[:n], o[:n])
    ttft, tpot = slo_for_mode(cfg, slo)
    return res.attainment(ttft, tpot)


def search_goodput(
    cfg: SimConfig, workload: Workload, slo: Slo, settings: SearchSettings, hint: float = 1.0
) -> Goodput:
    """The largest rate (to `settings.precision`) whose attainment >= slo.attainment; rate 0 when
    even `settings.min_rate` misses it."""
    seen: dict[float, Attainment] = {}

    def ok(rate: float) -> bool:
        seen[rate] = attainment_at(cfg, rate, workload, slo, settings)
        return seen[rate].value >= slo.attainment

    lo, hi = 0.0, math.inf
    rate = max(hint, settings.min_rate)
    if ok(rate):
        lo = rate
        while hi == math.inf:
            rate *= BRACKET_FACTOR
            if ok(rate):
                lo = rate
            else:
                hi = rate
    else:
        hi = rate
        while lo == 0.0:
            rate /= BRACKET_FACTOR
            if rate < settings.min_rate:
                return Goodput(0.0, Attainment(0.0, 0.0, 0.0, 0), len(seen))
            if ok(rate):
                lo = rate
            else:
                hi = rate
    while hi - lo > settings.precision * hi:
        mid = 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    final = seen[lo]
    low, high = _rate_interval(seen, lo, hi, final)
    return Goodput(lo, final, len(seen), low, high)


def _rate_interval(
    seen: dict[float, Attainment], lo: float, hi: float, at_lo: Attainment
) -> tuple[float, float]:
    """95% interval of the goodput: the attainment at `lo` is known to +-h, and attainment falls
    with the rate at slope s near the goodput, so the rate where the true attainment crosses the
    target lies within h/s of the bracket [lo, hi]. The slope comes from the bracket's two ends,
    or from the widest pair of probed rates when noise makes that one flat."""
    half = (at_lo.ci_high - at_lo.ci_low) / 2
    slope = (at_lo.value - seen[hi].value) / (hi - lo) if hi in seen and hi > lo else 0.0
    if slope <= 0:
        rates = sorted(seen)
        slope = (
            (seen[rates[0]].value - seen[rates[-1]].value) / (rates[-1] - rates[0]) if len(rates) > 1 else 0.0
        )
    if slope <= 0:
        return lo, hi
    return max(0.0, lo - half / slope), hi + half / slope
