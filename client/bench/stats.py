"""Per-request measurements and their summaries: percentiles, joint SLO attainment, goodput."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np


class RequestRecord(NamedTuple):
    """One request as the client saw it; times in seconds from its send."""

    prompt_len: int
    output_len: int
    ttft: float  # first token
    tpot: float  # mean gap between later tokens (0 for a single token)
    latency: float  # last token
    error: str | None


def record(
    prompt_len: int, send: float, arrivals: Sequence[float], tokens: int, error: str | None
) -> RequestRecord:
    if error is not None or not arrivals:
        return RequestRecord(
            prompt_len, tokens, float("inf"), float("inf"), float("inf"), error or "no tokens"
        )
    tpot = (arrivals[-1] - arrivals[0]) / (tokens - 1) if tokens > 1 else 0.0
    return RequestRecord(prompt_len, tokens, arrivals[0] - send, tpot, arrivals[-1] - send, None)


def attainment(
    records: Sequence[RequestRecord], ttft_slo: float, tpot_slo: float, scale: float = 1.0
) -> float:
    """Fraction of requests meeting BOTH SLOs (scaled); a failed request meets neither."""
    if not records:
        return 0.0
    ok = sum(
        1 for r in records if r.error is None and r.ttft <= ttft_slo * scale and r.tpot <= tpot_slo * scale
    )
    return ok / len(records)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    return {
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
    }


def summarize(
    records: Sequence[RequestRecord], rate: float, duration_s: float, ttft_slo: float, tpot_slo: float
) -> dict[str, Any]:
    done = [r for r in records if r.error is None]
    return {
        "rate": rate,
        "requests": len(records),
        "errors": len(records) - len(done),
        "duration_s": duration_s,
        "throughput_rps": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_tokens_per_s": sum(r.output_len for r in done) / duration_s if duration_s > 0 else 0.0,
        "attainment": attainment(records, ttft_slo, tpot_slo),
        "ttft_attainment": sum(r.ttft <= ttft_slo for r in done) / max(len(records), 1),
        "tpot_attainment": sum(r.tpot <= tpot_slo for r in done) / max(len(records), 1),
        "ttft": percentiles([r.ttft for r in records]),
        "tpot": percentiles([r.tpot for r in records]),
        "latency": percentiles([r.latency for r in records]),
    }


class Goodput(NamedTuple):
    tested: float  # the largest tested rate whose attainment meets the target (0: none)
    interpolated: float  # linear interpolation to where attainment crosses the target


def goodput(rates: Sequence[float], attainments: Sequence[float], target: float) -> Goodput:
    """Goodput: the largest rate meeting the attainment target, scanning rates upwards and
    stopping at the first rate that misses it (attainment is not strictly monotone when noisy)."""
    pairs = sorted(zip(rates, attainments, strict=True))
    best, interp = 0.0, 0.0
    for i, (rate, att) in enumerate(pairs):
        if att < target:
            if i > 0:
                r0, a0 = pairs[i - 1]
                interp = r0 + (a0 - target) / (a0 - att) * (rate - r0)
            break
        best = interp = rate
    return Goodput(best, interp)
