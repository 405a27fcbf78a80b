"""TensorRT-LLM's return_perf_metrics for one request: the times and KV blocks its final response
carries (specs.CLIENT_OUTPUTS), gathered from wherever each is known."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class PerfMetrics:
    """Wall-clock times in ns since the Unix epoch (comparable across processes and hosts with
    synchronized clocks). A time left unrecorded is filled in by the stream (first_token, last_token:
    when it sent them; first_scheduled: the first token's time)."""

    arrival_ns: int
    first_scheduled_ns: int | None = None
    first_token_ns: int | None = None
    last_token_ns: int | None = None
    kv_blocks: int | None = None  # the blocks the sequence held where it ended

    @staticmethod
    def arrived_at(perf_counter_arrival: float) -> PerfMetrics:
        """Metrics of a request that arrived at `perf_counter_arrival` (a time.perf_counter())."""
        return PerfMetrics(time.time_ns() - int((time.perf_counter() - perf_counter_arrival) * 1e9))

    def record(
        self,
        first_scheduled_ns: int | None = None,
        first_token_ns: int | None = None,
        last_token_ns: int | None = None,
        kv_blocks: int | None = None,
    ) -> None:
        """Notes what a phase measured (zero or None: not measured)."""
        self.first_scheduled_ns = first_scheduled_ns or self.first_scheduled_ns
        self.first_token_ns = first_token_ns or self.first_token_ns
        self.last_token_ns = last_token_ns or self.last_token_ns
        self.kv_blocks = kv_blocks if kv_blocks is not None else self.kv_blocks

    def outputs(self) -> dict[str, int]:
        """The final response's fields (ClientChunk's names); no prefix caching, so every block
        the sequence held was newly allocated."""
        now = time.time_ns()
        first_token = self.first_token_ns or now
        blocks = self.kv_blocks or 0
        return {
            "kv_cache_alloc_new_blocks": blocks,
            "kv_cache_reused_blocks": 0,
            "kv_cache_alloc_total_blocks": blocks,
            "arrival_time_ns": self.arrival_ns,
            "first_scheduled_time_ns": self.first_scheduled_ns or first_token,
            "first_token_time_ns": first_token,
            "last_token_time_ns": self.last_token_ns or now,
        }
