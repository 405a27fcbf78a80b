"""Transfer counters that the serving layer exports as Prometheus metrics."""

from __future__ import annotations

import threading
from typing import NamedTuple


class CountersSnapshot(NamedTuple):
    """A consistent copy of the counters (all monotonic except active_leases, a gauge)."""

    bytes_moved: int
    transfer_seconds: float
    transfers: int
    failures: int
    active_leases: int
    expired_leases: int
    acked_leases: int
    cancelled_leases: int


class TransferCounters:
    """Thread-safe counters shared by a sender (leases, bytes served) or a receiver (bytes pulled)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = 0
        self._seconds = 0.0
        self._transfers = 0
        self._failures = 0
        self._active = 0
        self._expired = 0
        self._acked = 0
        self._cancelled = 0

    def transfer_done(self, num_bytes: int, seconds: float) -> None:
        with self._lock:
            self._bytes += num_bytes
            self._seconds += seconds
            self._transfers += 1

    def failure(self) -> None:
        with self._lock:
            self._failures += 1

    def lease_opened(self) -> None:
        with self._lock:
            self._active += 1

    def lease_closed(self, how: str) -> None:
        """how: 'acked', 'cancelled' or 'expired'."""
        with self._lock:
            self._active -= 1
            if how == "acked":
                self._acked += 1
            elif how == "cancelled":
                self._cancelled += 1
            elif how == "expired":
                self._expired += 1
            else:
                raise ValueError(f"unknown lease outcome {how!r}")

    def snapshot(self) -> CountersSnapshot:
        with self._lock:
            return CountersSnapshot(
                self._bytes,
                self._seconds,
                self._transfers,
                self._failures,
                self._active,
                self._expired,
                self._acked,
                self._cancelled,
            )
