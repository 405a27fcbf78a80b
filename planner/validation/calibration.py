"""Serving overheads measured through a running server, added to an engine profile.

The profiler times the engine alone. Served, every request also crosses the orchestrator (a BLS
hop, tokenizer checks, one response per token through Triton's core and gRPC) and, on a CPU host,
shares the cores with those processes and with the client. `calibrate` measures what the served
system adds on top of the engine profile, with a few small requests sent to a running server:

- prefill: single requests of several prompt lengths, one at a time; the extra TTFT over the
  profile's prefill time is a fixed per-batch cost (the median residual: robust to one slow run);
- decode: B identical requests sent at once (they prefill together and decode in lockstep); the
  extra TPOT over the profile's step time is fitted as d0 + d1*B by least squares: d0 per step,
  d1 per running sequence (each token is one response through the orchestrator and the client).

`with_overheads` folds these into the profile's coefficients, so the simulator needs no change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from client.bench.requests import FIRST_ORDINARY_ID, BenchRequest
from client.bench.runner import run_rate
from planner import PlannerError
from planner.latency import PhaseLatency
from planner.profile import TpProfile


@dataclass(frozen=True)
class CalibrationPlan:
    """The probe requests: prompt lengths of the sequential prefill probes (each sent `repeats`
    times), and the decode batch sizes (each batch of `decode_prompt` tokens decoding
    `decode_tokens` tokens)."""

    prefill_lens: tuple[int, ...] = (32, 128, 512)
    decode_batches: tuple[int, ...] = (1, 4, 16)
    decode_prompt: int = 128
    decode_tokens: int = 33
    repeats: int = 2

    def __post_init__(self) -> None:
        if not self.prefill_lens or min(self.prefill_lens) < 1:
            raise PlannerError("calibration prefill lengths must be >= 1")
        if len(self.decode_batches) < 2 or min(self.decode_batches) < 1:
            raise PlannerError("calibration needs at least two decode batch sizes >= 1")
        if self.decode_prompt < 1 or self.decode_tokens < 3 or self.repeats < 1:
            raise PlannerError("calibration needs decode_prompt >= 1, decode_tokens >= 3, repeats >= 1")


class Calibration(NamedTuple):
    """Overheads in milliseconds, and the probe measurements they were fitted from."""

    prefill_ms: float  # per prefill batch (the request's hop through the orchestrator)
    decode_step_ms: float  # per decode step
    decode_seq_ms: float  # per running sequence per decode step
    probes: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


NO_OVERHEAD = Calibration(0.0, 0.0, 0.0, {})


def with_overheads(tp: TpProfile, cal: Calibration) -> TpProfile:
    """The profile with the overheads added to the constant (prefill, decode) and per-sequence
    (decode) coefficients."""

    def dec(c: tuple[float, float, float]) -> tuple[float, float, float]:
        return (c[0] + cal.decode_step_ms, c[1], c[2] + cal.decode_seq_ms)

    p = tp.prefill
    return TpProfile(
        (p[0] + cal.prefill_ms, p[1], p[2]), dec(tp.decode_small), dec(tp.decode_large), tp.threshold
    )


def calibrate(
    url: str, latency: PhaseLatency, vocab_size: int, plan: CalibrationPlan | None = None, seed: int = 0
) -> Calibration:
    """Send the probe requests to the server's orchestrator at `url` (gRPC) and fit the overheads
    of the served system over `latency` (the engine profile)."""

    plan = plan or CalibrationPlan()
    rng = np.random.default_rng(seed)

    def req(prompt: int, out: int) -> BenchRequest:
        return BenchRequest(rng.integers(FIRST_ORDINARY_ID, vocab_size, size=prompt).tolist(), out)

    def send(reqs: list[BenchRequest]) -> list[Any]:
        res = run_rate(url, "grpc", "orchestrator", reqs, [0.0] * len(reqs), 60.0, "calibration")
        bad = [r.error for r in res.records if r.error is not None]
        if bad:
            raise PlannerError(f"calibration request failed: {bad[0]}")
        return res.records

    send([req(64, 8)])  # warm-up: first-call costs of every process on the path
    pre_rows = []
    for n in plan.prefill_lens:
        for _ in range(plan.repeats):
            ttft = send([req(n, 2)])[0].ttft
            pre_rows.append((n, ttft * 1e3, latency.prefill_full(n, n * n) * 1e3))
    prefill_ms = float(np.median([m - p for _, m, p in pre_rows]))

    dec_rows = []
    for b in plan.decode_batches:
        for _ in range(plan.repeats):
            recs = send([req(plan.decode_prompt, plan.decode_tokens) for _ in range(b)])
            tpot = float(np.mean([r.tpot for r in recs]))
            # Mean step over the run: contexts grow from prompt+1 to prompt+tokens-1.
            ctx = plan.decode_prompt + plan.decode_tokens // 2
            dec_rows.append((b, tpot * 1e3, latency.decode_full(b * (ctx + 1), b) * 1e3))
    x = np.array([[1.0, b] for b, _, _ in dec_rows])
    y = np.array([m - p for _, m, p in dec_rows])
    (d0, d1), *_ = np.linalg.lstsq(x, y, rcond=None)
    return Calibration(
        prefill_ms=max(prefill_ms, 0.0),
        decode_step_ms=max(float(d0), 0.0),
        decode_seq_ms=max(float(d1), 0.0),
        probes={
            "prefill": [{"prompt": n, "measured_ms": m, "profile_ms": p} for n, m, p in pre_rows],
            "decode": [{"batch": b, "measured_tpot_ms": m, "profile_step_ms": p} for b, m, p in dec_rows],
        },
    )
