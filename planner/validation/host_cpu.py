"""CPU contention on a host that every process of a deployment shares (the real-system check).

The engine profile times each phase alone on an idle host. Served on one CPU host, the prefill and
decode engines, the orchestrator, tritonserver and the load generator share its cores, and every
phase runs slower the busier the host is. Modelled as one slowdown factor S on every latency:

    U = (idle + engine CPU + tokens/s * cpu_per_token) / cores     (the host's utilization)
    S = scale * (1 - U) ** -exponent

The engine CPU is the simulated compute time of the prefill and decode instances (single-threaded
processes) divided by S: work does not grow when it is slowed down, but larger decode batches
(slower steps let more sequences join) do less work per token, which is why S is a fixed point of
the simulation (`solve`) and not a function of the rate alone. `idle` and `cpu_per_token` (the
orchestrator, tritonserver and the client per streamed token) come from CPU accounting of the
deployment's processes while idle and during two load probes at different rates; `scale` and
`exponent` from the slowdowns that make the simulated mean TPOT of each probe equal the measured
one. The form is that of queueing delay (1/(1 - U) for one core, milder with several cores and
short bursts); the probes set its steepness instead of assuming M/M/c. `scale` is 1 on a host
whose calibration ran idle; the served overheads (planner.validation.calibration) are measured under some
load already, which `scale` < 1 takes back out. U is capped at `max_utilization`: past it the
prediction says "overloaded", not by how much.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from planner import PlannerError


class Load(NamedTuple):
    """What one simulated run asks of the host: engine compute (CPU) seconds, streamed tokens, and
    the run's span in seconds."""

    engine_cpu_s: float
    tokens: int
    span_s: float


@dataclass(frozen=True)
class HostCpu:
    cores: int
    idle_cores: float
    cpu_per_token_s: float
    exponent: float
    scale: float = 1.0
    max_utilization: float = 0.95

    def __post_init__(self) -> None:
        if self.cores < 1:
            raise PlannerError(f"a host has at least one core, got {self.cores}")
        if self.idle_cores < 0 or self.cpu_per_token_s < 0 or self.exponent < 0:
            raise PlannerError("idle_cores, cpu_per_token_s and exponent must be >= 0")
        if self.scale <= 0:
            raise PlannerError("scale must be positive")
        if not 0 < self.max_utilization < 1:
            raise PlannerError("max_utilization must be in (0, 1)")

    def utilization(self, load: Load) -> float:
        span = max(load.span_s, 1e-9)
        return (
            self.idle_cores + load.engine_cpu_s / span + load.tokens / span * self.cpu_per_token_s
        ) / self.cores

    def slowdown(self, utilization: float) -> float:
        return self.scale * (1.0 - min(utilization, self.max_utilization)) ** -self.exponent


NO_CONTENTION = HostCpu(cores=1, idle_cores=0.0, cpu_per_token_s=0.0, exponent=0.0)


class Contention(NamedTuple):
    slowdown: float
    utilization: float
    saturated: bool


def solve(host: HostCpu, load_at: Callable[[float], Load], iterations: int = 30) -> Contention:
    """The fixed point S = host.slowdown(U(S)), where `load_at(S)` simulates the run with every
    latency scaled by S and reports its load with engine CPU at the unscaled speed (damped
    iteration from S = 1)."""
    s, u = 1.0, 0.0
    for _ in range(iterations):
        u = host.utilization(load_at(s))
        target = host.slowdown(u)
        if abs(target - s) < 1e-3 * s:
            s = target
            break
        s = 0.5 * (s + target)
    return Contention(s, u, u >= host.max_utilization)


def fit_slowdown(
    tpot_at: Callable[[float], float], measured_tpot: float, lo: float = 0.25, hi: float = 8.0
) -> float:
    """The factor S in [lo, hi] at which `tpot_at(S)` (the simulated mean TPOT with every latency
    scaled by S, increasing in S) equals `measured_tpot` (bisection, clamped to the bounds)."""
    if tpot_at(lo) >= measured_tpot:
        return lo
    if tpot_at(hi) <= measured_tpot:
        return hi
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if tpot_at(mid) < measured_tpot:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class Probe(NamedTuple):
    """One load probe: cores our processes kept busy, the run's simulated load at the fitted
    slowdown, and that slowdown."""

    cores_busy: float
    load: Load
    slowdown: float


def fit_host(cores: int, idle_cores: float, probes: Sequence[Probe]) -> HostCpu:
    """The host model through one idle measurement and one or two load probes (one probe: scale 1)."""
    if not 1 <= len(probes) <= 2:
        raise PlannerError(f"the host model is fitted from one or two load probes, got {len(probes)}")
    per_token = []
    for p in probes:
        span = max(p.load.span_s, 1e-9)
        streaming = p.cores_busy - idle_cores - p.load.engine_cpu_s / span
        per_token.append(max(streaming, 0.0) / max(p.load.tokens / span, 1e-9))
    free = [1.0 - min(p.cores_busy / cores, HostCpu.max_utilization) for p in probes]
    if len(probes) == 1:
        scale, exponent = 1.0, math.log(max(probes[0].slowdown, 1.0)) / -math.log(free[0])
    else:
        (f1, f2), (s1, s2) = free, (probes[0].slowdown, probes[1].slowdown)
        exponent = math.log(s2 / s1) / math.log(f1 / f2) if f1 != f2 else 0.0
        if exponent < 0:  # the busier probe ran no slower: no measurable contention
            exponent = 0.0
        scale = math.exp(
            sum(math.log(s) + exponent * math.log(f) for s, f in zip((s1, s2), free, strict=True)) / 2
        )
    return HostCpu(cores, max(idle_cores, 0.0), float(np.mean(per_token)), exponent, scale)
