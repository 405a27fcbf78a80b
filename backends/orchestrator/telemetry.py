"""Client-facing latency histograms (orchestrator and colocated report the same names)."""

from __future__ import annotations

from typing import Any

from backends.common.client_stream import LatencyMetrics
from backends.common.metrics import LATENCY_BUCKETS


def latency_metrics(m: Any) -> LatencyMetrics:
    return LatencyMetrics(
        ttft=m.histogram(
            "disagg_ttft_seconds", "Time to first token, request arrival to first response", LATENCY_BUCKETS
        ),
        tpot=m.histogram(
            "disagg_tpot_seconds", "Mean time per output token after the first, per request", LATENCY_BUCKETS
        ),
        e2e=m.histogram(
            "disagg_request_seconds", "Request latency, arrival to final response", LATENCY_BUCKETS
        ),
    )
