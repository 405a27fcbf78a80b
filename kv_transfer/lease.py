"""Leases: the prefill side's hold on a finished sequence's KV blocks until decode has pulled them.

Invariants:
- A lease owns exactly one reference on each of its blocks (taken by ``open``); that reference is dropped
  exactly once, when the lease ends: all expected readers acknowledged, a cancel, expiry after the TTL,
  or ``close`` of the table.
- A pinned lease (a transfer reading it on this side, e.g. a TCP send) is never freed under the reader: an
  end that happens while pinned is recorded, and the blocks are freed at the last unpin. Pinned leases do
  not expire (the transfer's own socket timeout bounds it).
- Ended lease ids are remembered (bounded) so a late request gets "expired"/"cancelled", not "unknown".
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from kv_transfer.counters import TransferCounters
from kv_transfer.errors import (
    KVLeaseCancelledError,
    KVLeaseError,
    KVLeaseExpiredError,
    KVLeaseReleasedError,
    KVLeaseUnknownError,
    KVProtocolError,
)

_TOMBSTONES = 65536
_END_ERRORS: dict[str, type[KVLeaseError]] = {
    "acked": KVLeaseReleasedError,
    "cancelled": KVLeaseCancelledError,
    "expired": KVLeaseExpiredError,
}


@dataclass
class Lease:
    lease_id: str
    block_ids: list[int]
    deadline: float
    pins: int = 0
    ended: str | None = None  # 'acked' | 'cancelled' | 'expired' once the lease is over
    readers_expected: int = 0  # set by the first acknowledgement
    readers_acked: set[int] = field(default_factory=set)


class LeaseTable:
    """Thread-safe lease bookkeeping plus a reaper thread that expires leases past their TTL."""

    def __init__(
        self,
        block_manager: BlockManager,
        ttl_s: float,
        counters: TransferCounters,
        reap_interval_s: float | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl_s}")
        self._bm = block_manager
        self._ttl = ttl_s
        self._counters = counters
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._stop = threading.Event()
        interval = reap_interval_s if reap_interval_s is not None else min(1.0, ttl_s / 4)
        self._reaper = threading.Thread(
            target=self._reap_loop, args=(interval,), name="kv-lease-reaper", daemon=True
        )
        self._reaper.start()

    def open(self, block_ids: list[int]) -> str:
        """Takes a reference on the blocks and returns a new lease id."""
        self._bm.incref(block_ids)
        lease_id = secrets.token_hex(16)
        with self._lock:
            self._leases[lease_id] = Lease(lease_id, list(block_ids), time.monotonic() + self._ttl)
        self._counters.lease_opened()
        return lease_id

    def check(self, lease_id: str) -> list[int]:
        """The blocks of an active lease, or the lease error explaining why it is not active."""
        with self._lock:
            return list(self._active(lease_id).block_ids)

    def pin(self, lease_id: str) -> list[int]:
        with self._lock:
            lease = self._active(lease_id)
            lease.pins += 1
            return list(lease.block_ids)

    def unpin(self, lease_id: str) -> None:
        with self._lock:
            lease = self._leases[lease_id]
            lease.pins -= 1
            release = lease.pins == 0 and lease.ended is not None
            if release:
                del self._leases[lease_id]
        if release:
            self._bm.free(lease.block_ids)

    def ack(self, lease_id: str, reader: int, readers: int) -> bool:
        """Records reader's acknowledgement; the lease ends when all ``readers`` acknowledged.

        Raises the lease error if the lease ended before this acknowledgement (the reader's copy may
        then be stale). Returns True when this acknowledgement ended the lease.
        """
        if not 0 <= reader < readers:
            raise KVProtocolError(f"reader {reader} out of range for {readers} readers")
        with self._lock:
            lease = self._active(lease_id)
            if lease.readers_expected == 0:
                lease.readers_expected = readers
            elif lease.readers_expected != readers:
                raise KVProtocolError(
                    f"lease {lease_id}: {readers} readers announced, earlier {lease.readers_expected}"
                )
            lease.readers_acked.add(reader)
            if len(lease.readers_acked) < lease.readers_expected:
                return False
        self._end(lease_id, "acked")
        return True

    def cancel(self, lease_id: str) -> None:
        """Ends an active lease at once (frees its blocks unless a local transfer still reads them)."""
        with self._lock:
            self._active(lease_id)
        self._end(lease_id, "cancelled")

    def reap(self) -> int:
        """Expires overdue, unpinned leases; returns how many expired."""
        now = time.monotonic()
        with self._lock:
            overdue = [
                k for k, v in self._leases.items() if v.ended is None and v.pins == 0 and v.deadline <= now
            ]
        return sum(1 for k in overdue if self._end(k, "expired"))

    def close(self) -> None:
        """Stops the reaper and frees every remaining lease's blocks (counted as cancelled)."""
        self._stop.set()
        self._reaper.join()
        with self._lock:
            remaining = [k for k, v in self._leases.items() if v.ended is None]
        for k in remaining:
            self._end(k, "cancelled")
        with self._lock:
            pinned = list(self._leases.values())
            self._leases.clear()
        for lease in pinned:  # pinned by a transfer that close() interrupted
            self._bm.free(lease.block_ids)

    def _end(self, lease_id: str, how: str) -> bool:
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.ended is not None:
                return False
            lease.ended = how
            self._ended[lease_id] = how
            while len(self._ended) > _TOMBSTONES:
                self._ended.popitem(last=False)
            release = lease.pins == 0
            if release:
                del self._leases[lease_id]
        if release:
            self._bm.free(lease.block_ids)
        self._counters.lease_closed(how)
        return True

    def _active(self, lease_id: str) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is not None and lease.ended is None:
            return lease
        how = lease.ended if lease is not None else self._ended.get(lease_id)
        if how is None:
            raise KVLeaseUnknownError(f"KV lease {lease_id} is unknown to this prefill instance")
        raise _END_ERRORS[how](f"KV lease {lease_id} was {how}")

    def _reap_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.reap()
