"""Metric interfaces the engine loops report to; the model.py files back them with Triton's
pb_utils.MetricFamily (and tests with plain recorders)."""

from __future__ import annotations

from typing import Protocol


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

# Bucket bounds (seconds) for latency histograms: 1 ms .. 60 s, roughly x2.5 apart.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
