"""The metric catalog (every Prometheus family the models export, declared once) and the
interfaces the engine loops report to; the model.py files back them with Triton's
pb_utils.MetricFamily (triton_glue.Metrics.create), tests with plain recorders."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import NamedTuple, Protocol, TypeVar

MetricT = TypeVar("MetricT", bound=Hashable)


class Gauge(Protocol):
    def set(self, value: float) -> None: ...


class Counter(Protocol):
    def increment(self, value: float) -> None: ...


class Histogram(Protocol):
    def observe(self, value: float) -> None: ...


class _Null:
    def set(self, value: float) -> None:
        pass

    def increment(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


NULL = _Null()


def coalesce(updates: Iterable[tuple[MetricT, str, float]]) -> list[tuple[MetricT, str, float]]:
    """Queued (metric, "set" | "increment" | "observe", value) updates reduced to fewer that leave
    every metric as the whole list would: a gauge's last set, a counter's increments summed, and
    every histogram observation. Metrics are independent, so their order among each other is free."""
    sets: dict[MetricT, float] = {}
    increments: dict[MetricT, float] = {}
    observations: list[tuple[MetricT, str, float]] = []
    for metric, op, value in updates:
        if op == "set":
            sets[metric] = value
        elif op == "increment":
            increments[metric] = increments.get(metric, 0.0) + value
        else:
            observations.append((metric, op, value))
    return [
        *((m, "set", v) for m, v in sets.items()),
        *((m, "increment", v) for m, v in increments.items()),
        *observations,
    ]


# Bucket bounds (seconds) for latency histograms: 1 ms .. 60 s, roughly x2.5 apart.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class MetricSpec(NamedTuple):
    """One metric family: its name, kind (gauge, counter or histogram), help text and buckets."""

    name: str
    kind: str
    description: str
    buckets: tuple[float, ...] = ()


# Client-facing latencies (orchestrator and colocated).
TTFT = MetricSpec(
    "disagg_ttft_seconds",
    "histogram",
    "Time to first token, request arrival to first response",
    LATENCY_BUCKETS,
)
TPOT = MetricSpec(
    "disagg_tpot_seconds",
    "histogram",
    "Mean time per output token after the first, per request",
    LATENCY_BUCKETS,
)
REQUEST_SECONDS = MetricSpec(
    "disagg_request_seconds", "histogram", "Request latency, arrival to final response", LATENCY_BUCKETS
)
PROMPT_TOKENS = MetricSpec(
    "disagg_prompt_tokens_total", "counter", "Prompt tokens of the requests that got a first token"
)
REQUEST_FAILURES = MetricSpec(
    "disagg_request_failures_total",
    "counter",
    "Requests answered with an error: refused on arrival, or failed later (Triton's own "
    "nv_inference_request_failure misses those, 2.51 having counted the request when execute() returned)",
)
GENERATION_TOKENS = MetricSpec(
    "disagg_generation_tokens_total", "counter", "Tokens sent to clients (counted when a request ends)"
)
# Engine instances (prefill, decode, colocated).
PREFILL_QUEUE_DEPTH = MetricSpec("disagg_prefill_queue_depth", "gauge", "Prompts waiting for prefill")
DECODE_QUEUE_DEPTH = MetricSpec(
    "disagg_decode_queue_depth", "gauge", "Requests waiting for decode memory or their KV"
)
RUNNING_SEQUENCES = MetricSpec("disagg_running_sequences", "gauge", "Sequences in the decode batch")
KV_FREE_BLOCKS = MetricSpec("disagg_kv_free_blocks", "gauge", "Free KV blocks in the instance's pool")
KV_ACTIVE_LEASES = MetricSpec(
    "disagg_kv_active_leases", "gauge", "KV leases waiting for a decode instance to pull"
)
PREFILL_SECONDS = MetricSpec(
    "disagg_prefill_seconds",
    "histogram",
    "Engine time of one prefill batch: the prompts' forward pass and first tokens",
    LATENCY_BUCKETS,
)
PREFILL_BATCH_TOKENS = MetricSpec(
    "disagg_prefill_batch_tokens",
    "histogram",
    "Prompt tokens per prefill batch",
    tuple(16 * b for b in BATCH_BUCKETS),
)
PREFILL_QUEUE_SECONDS = MetricSpec(
    "disagg_prefill_queue_seconds", "histogram", "Time a prompt waited for prefill", LATENCY_BUCKETS
)
DECODE_BATCH_SIZE = MetricSpec(
    "disagg_decode_batch_size", "histogram", "Sequences per decode step", BATCH_BUCKETS
)
KV_TRANSFER_SECONDS = MetricSpec(
    "disagg_kv_transfer_seconds", "histogram", "Time to pull one request's KV", LATENCY_BUCKETS
)
KV_TRANSFER_BYTES = MetricSpec(
    "disagg_kv_transfer_bytes_total", "counter", "KV bytes pulled from prefill instances"
)
KV_TRANSFER_FAILURES = MetricSpec("disagg_kv_transfer_failures_total", "counter", "KV pulls that failed")
CANCELLED = MetricSpec("disagg_cancelled_total", "counter", "Requests cancelled before completion")

CATALOG = (
    TTFT,
    TPOT,
    REQUEST_SECONDS,
    PREFILL_QUEUE_DEPTH,
    DECODE_QUEUE_DEPTH,
    RUNNING_SEQUENCES,
    KV_FREE_BLOCKS,
    KV_ACTIVE_LEASES,
    PREFILL_BATCH_TOKENS,
    PREFILL_QUEUE_SECONDS,
    DECODE_BATCH_SIZE,
    KV_TRANSFER_SECONDS,
    KV_TRANSFER_BYTES,
    KV_TRANSFER_FAILURES,
    CANCELLED,
)
