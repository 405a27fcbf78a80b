"""Latency model per phase and (TP, PP), from a profile's coefficients.

Pipeline parallelism follows DistServe's estimator: a stage takes 1/pp of the whole model's time
plus a fixed per-stage hop (activation send), so a batch's latency through the pipeline is
t + pp*hop while a new batch can enter every t/pp + hop. The profile's per-iteration serving
overhead is part of every batch's and step's whole-model time t."""

from __future__ import annotations

from dataclasses import dataclass

from planner import PlannerError
from planner.profile import TpProfile

DEFAULT_HOP_MS = 1.0


@dataclass(frozen=True)
class PhaseLatency:
    """Latency of one (TP, PP) configuration of a model; all results in seconds."""

    tp: int
    pp: int
    coef: TpProfile
    hop_ms: float = DEFAULT_HOP_MS

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise PlannerError(f"tp and pp must be >= 1 (got tp={self.tp}, pp={self.pp})")
        if self.hop_ms < 0:
            raise PlannerError("the pipeline hop time must be >= 0")

    def prefill_full(self, sum_len: float, sum_sq: float) -> float:
        """Whole-model prefill time of a batch (all stages back to back), seconds."""
        a, b, c = self.coef.prefill
        return (max(a + b * sum_len + c * sum_sq, 0.0) + self.coef.overhead_ms) / 1000.0

    def prefill_stage(self, sum_len: float, sum_sq: float) -> float:
        """Time one pipeline stage spends on a prefill batch, seconds."""
        return self.prefill_full(sum_len, sum_sq) / self.pp + self.hop_ms / 1000.0

    def decode_full(self, sum_ctx_plus_one: float, batch: int) -> float:
        """Whole-model time of one decode step of `batch` sequences, seconds."""
        a, b, c = self.coef.decode_small if batch <= self.coef.threshold else self.coef.decode_large
        return (max(a + b * sum_ctx_plus_one + c * batch, 0.0) + self.coef.overhead_ms) / 1000.0

    def decode_step(self, sum_ctx_plus_one: float, batch: int) -> float:
        """Latency of one token of one pipeline micro-batch through all stages, seconds."""
        return self.decode_full(sum_ctx_plus_one, batch) + self.pp * self.hop_ms / 1000.0


def phase_latency(
    profile: dict[int, TpProfile], tp: int, pp: int, hop_ms: float = DEFAULT_HOP_MS
) -> PhaseLatency:
    if tp not in profile:
        have = ", ".join(str(t) for t in sorted(profile))
        raise PlannerError(f"the profile has no coefficients for tp={tp} (it has tp {have})")
    return PhaseLatency(tp, pp, profile[tp], hop_ms)
