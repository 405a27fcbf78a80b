"""Lease table: references, acknowledgement by all readers, cancel, expiry, pins, counters."""

from __future__ import annotations

import time

import pytest

from engine.block_manager import BlockManager
from kv_transfer.counters import TransferCounters
from kv_transfer.errors import (
    KVLeaseCancelledError,
    KVLeaseExpiredError,
    KVLeaseReleasedError,
    KVLeaseUnknownError,
    KVProtocolError,
)
from kv_transfer.lease import LeaseTable


def make(ttl: float = 30.0) -> tuple[BlockManager, TransferCounters, LeaseTable]:
    bm = BlockManager(16, 4)
    counters = TransferCounters()
    return bm, counters, LeaseTable(bm, ttl, counters, reap_interval_s=0.02)


def engine_sequence(bm: BlockManager, table: LeaseTable, n: int) -> tuple[list[int], str]:
    """Allocate, lease, then drop the engine's own reference, as a prefill engine does."""
    ids = bm.allocate(n)
    lease = table.open(ids)
    bm.free(ids)
    return ids, lease


def test_ack_frees_blocks_and_later_requests_say_why() -> None:
    bm, counters, table = make()
    ids, lease = engine_sequence(bm, table, 3)
    assert bm.num_free == 13 and all(bm.ref_count(b) == 1 for b in ids)
    assert table.check(lease) == ids
    assert table.ack(lease, reader=0, readers=1)
    assert bm.num_free == 16
    with pytest.raises(KVLeaseReleasedError, match="acked"):
        table.check(lease)
    with pytest.raises(KVLeaseUnknownError):
        table.check("f" * 32)
    snap = counters.snapshot()
    assert (snap.active_leases, snap.acked_leases) == (0, 1)
    table.close()


def test_lease_ends_when_every_reader_acknowledged() -> None:
    bm, _, table = make()
    _, lease = engine_sequence(bm, table, 2)
    assert not table.ack(lease, reader=1, readers=2)
    assert bm.num_free == 14
    with pytest.raises(KVProtocolError, match="readers announced"):
        table.ack(lease, reader=0, readers=3)
    assert table.ack(lease, reader=0, readers=2)
    assert bm.num_free == 16
    table.close()


def test_expiry_by_the_reaper_and_cancel() -> None:
    bm, counters, table = make(ttl=0.1)
    _, lease = engine_sequence(bm, table, 4)
    _, other = engine_sequence(bm, table, 2)
    table.cancel(other)
    assert bm.num_free == 12
    deadline = time.monotonic() + 5
    while bm.num_free != 16 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bm.num_free == 16
    with pytest.raises(KVLeaseExpiredError):
        table.ack(lease, 0, 1)
    with pytest.raises(KVLeaseCancelledError):
        table.check(other)
    snap = counters.snapshot()
    assert (snap.active_leases, snap.expired_leases, snap.cancelled_leases) == (0, 1, 1)
    table.close()


def test_pinned_lease_is_freed_only_after_the_reader_lets_go() -> None:
    bm, _, table = make(ttl=0.05)
    _, lease = engine_sequence(bm, table, 3)
    table.pin(lease)
    time.sleep(0.2)  # past the TTL, but pinned leases do not expire
    assert table.check(lease)
    table.cancel(lease)
    assert bm.num_free == 13  # still being read
    with pytest.raises(KVLeaseCancelledError):
        table.pin(lease)
    table.unpin(lease)
    assert bm.num_free == 16
    table.close()


def test_close_frees_everything() -> None:
    bm, counters, table = make()
    for n in (1, 2, 3):
        engine_sequence(bm, table, n)
    _, pinned = engine_sequence(bm, table, 2)
    table.pin(pinned)
    table.close()
    assert bm.num_free == 16
    assert counters.snapshot().active_leases == 0


def test_sender_register_validates_and_close_releases_everything() -> None:
    import socket

    from engine.kv_cache import KVLayout, KVPool
    from kv_transfer import SenderConfig, create_sender

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=4, dtype="float32")
    bm = BlockManager(8, 4)
    sender = create_sender("tcp", KVPool.allocate(layout, 8), bm, SenderConfig(port=0))
    host, port = sender.address.rsplit(":", 1)
    ids = bm.allocate(3)
    with pytest.raises(ValueError, match="need 3 blocks, got 2"):
        sender.register(ids[:2], 12)
    with pytest.raises(ValueError, match="distinct"):
        sender.register([ids[0], ids[0]], 5)
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        sender.register([1, 2, 99], 12)
    with pytest.raises(ValueError, match="is free"):
        sender.register([ids[0], 7], 5)
    handle = sender.register(ids, 12)
    assert handle.shards[0].address == sender.address and handle.shards[0].block_ids == ids
    bm.free(ids)
    assert bm.num_free == 5
    sender.close()
    assert bm.num_free == 8  # close() ended the lease
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()
