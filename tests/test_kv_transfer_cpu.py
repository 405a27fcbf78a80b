"""Two-process KV transfer tests on CPU: shm, tcp and the gloo path of nccl.

A prefill peer process (kv_transfer.peer, started with 'spawn') owns the pools, block managers and
senders; this process is the decode side. Pools hold deterministic data (logical_kv), so every pull is
checked byte for byte against what the prefill pool holds.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

from engine.kv_cache import KVLayout, KVPool
from engine.sharding import Stage
from kv_transfer import (
    KVHandle,
    KVHandleError,
    KVIntegrityError,
    KVLayoutMismatchError,
    KVLeaseCancelledError,
    KVLeaseExpiredError,
    KVLeaseUnknownError,
    LeaseReleaser,
    ReceiverConfig,
    create_receiver,
)
from kv_transfer.peer import PrefillPeer, head_slice, logical_kv, spawn_prefill_peer

TRANSPORTS = ["shm", "tcp", "nccl"]
SEED = 7


@pytest.fixture(scope="module")
def peer() -> Iterator[PrefillPeer]:
    with spawn_prefill_peer() as p:
        yield p


def lease_blocks(peer: PrefillPeer, sid: int, n: int, pool_blocks: int, rng: random.Random) -> list[int]:
    """n blocks of the prefill pool in a scattered order, as a busy engine would hold them."""
    got = peer(sid, "allocate", n=min(pool_blocks, 2 * n))["block_ids"]
    chosen = rng.sample(got, n)
    spare = sorted(set(got) - set(chosen))
    if spare:
        peer(sid, "free", block_ids=spare)
    return chosen


def register(peer: PrefillPeer, sid: int, ids: list[int], block_size: int) -> KVHandle:
    reply = peer(sid, "register", block_ids=ids, num_tokens=(len(ids) - 1) * block_size + 1)
    return KVHandle.decode(reply["handle"].encode())


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


CASES = [
    # (layout, blocks moved, prefill pool blocks)
    (KVLayout(num_layers=2, num_kv_heads=4, head_dim=16, block_size=4, dtype="float32"), 1, 8),
    (KVLayout(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16, dtype="bfloat16"), 37, 100),
    (KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, block_size=1, dtype="float16"), 3000, 4000),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0].dtype for c in CASES])
def test_bytes_identical_after_transfer(peer: PrefillPeer, transport: str, case: int) -> None:
    layout, n, pool_blocks = CASES[case]
    rng = random.Random(f"{transport}{case}")
    sid = peer.start(transport, layout, pool_blocks, SEED)
    ids = lease_blocks(peer, sid, n, pool_blocks, rng)
    handle = register(peer, sid, ids, layout.block_size)
    assert peer.num_free(sid) == pool_blocks - n  # the engine dropped its reference; the lease holds them
    dst_pool = KVPool.allocate(layout, n + 50)
    dst_ids = rng.sample(range(n + 50), n)
    receiver = create_receiver(transport, dst_pool)
    try:
        result = receiver.pull(handle, dst_ids)
    finally:
        receiver.close()
    expected = logical_kv(layout, pool_blocks, SEED)[:, :, ids]
    assert torch.equal(dst_pool.gather(dst_ids), expected)
    untouched = sorted(set(range(n + 50)) - set(dst_ids))
    assert torch.count_nonzero(dst_pool.gather(untouched)) == 0
    assert result.verified and result.bytes_moved == n * layout.bytes_per_block and result.num_blocks == n
    assert receiver.counters.snapshot().bytes_moved == result.bytes_moved
    assert peer.num_free(sid) == pool_blocks
    counters = peer.counters(sid)
    assert (counters["active_leases"], counters["acked_leases"]) == (0, 1)
    closed = peer(sid, "close")
    if transport == "shm":
        assert not os.path.exists(f"/dev/shm/{closed['segment']}")  # the segment was unlinked


TOTAL = KVLayout(num_layers=2, num_kv_heads=4, head_dim=8, block_size=4, dtype="bfloat16")


def rank_layout(tp: int) -> KVLayout:
    return TOTAL.tp_shard(tp)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reshard_prefill_tp2_to_decode_tp1(peer: PrefillPeer, transport: str) -> None:
    rng = random.Random(transport)
    sids = [peer.start(transport, TOTAL, 30, SEED, tp_size=2, tp_rank=r) for r in range(2)]
    peer(sids[1], "allocate", n=3)  # the ranks need not use the same block ids
    ids = [lease_blocks(peer, s, 9, 30, rng) for s in sids]
    handle = KVHandle.merge([register(peer, s, i, TOTAL.block_size) for s, i in zip(sids, ids, strict=True)])
    assert handle.tp_size == 2 and handle.complete
    dst_pool = KVPool.allocate(rank_layout(1), 20)
    dst_ids = rng.sample(range(20), 9)
    receiver = create_receiver(transport, dst_pool, ReceiverConfig(tp_size=1))
    try:
        result = receiver.pull(KVHandle.decode(handle.encode()), dst_ids)
    finally:
        receiver.close()
    logical = logical_kv(TOTAL, 30, SEED)
    for r in range(2):
        heads = head_slice(4, 2, r)
        assert torch.equal(
            dst_pool.gather(dst_ids)[:, :, :, :, heads], logical[:, :, ids[r]][:, :, :, :, heads]
        )
    assert result.verified
    assert [peer.num_free(s) for s in sids] == [30, 30 - 3]  # rank 1 still holds its 3 extra blocks
    for s in sids:
        peer(s, "close")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reshard_prefill_tp1_to_decode_tp2(peer: PrefillPeer, transport: str) -> None:
    rng = random.Random(transport)
    sid = peer.start(transport, TOTAL, 30, SEED)
    ids = lease_blocks(peer, sid, 6, 30, rng)
    handle = register(peer, sid, ids, TOTAL.block_size)
    logical = logical_kv(TOTAL, 30, SEED)[:, :, ids]
    for rank in range(2):
        dst_pool = KVPool.allocate(rank_layout(2), 10)
        dst_ids = rng.sample(range(10), 6)
        receiver = create_receiver(transport, dst_pool, ReceiverConfig(tp_size=2, tp_rank=rank))
        try:
            receiver.pull(handle, dst_ids)
        finally:
            receiver.close()
        assert torch.equal(dst_pool.gather(dst_ids), logical[:, :, :, :, head_slice(4, 2, rank)])
        # the lease ends only when both decode ranks have acknowledged
        assert peer.num_free(sid) == (30 - 6 if rank == 0 else 30)
    peer(sid, "close")


DEEP = KVLayout(num_layers=5, num_kv_heads=4, head_dim=8, block_size=4, dtype="bfloat16")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("src", "dst"), [((1, 2), (2, 1)), ((2, 1), (1, 2)), ((2, 2), (1, 2)), ((1, 2), (1, 3))]
)
def test_reshard_between_pipeline_stages(
    peer: PrefillPeer, transport: str, src: tuple[int, int], dst: tuple[int, int]
) -> None:
    """Prefill (tp, pp) -> decode (tp, pp) with 5 layers (uneven stages): every decode rank gets
    exactly its heads of its stage's layers, and every prefill shard's lease ends once all its
    readers acknowledged."""
    (src_tp, src_pp), (dst_tp, dst_pp) = src, dst
    rng = random.Random(f"{transport}{src}{dst}")
    sids, ids = [], []
    for stage in range(src_pp):
        for r in range(src_tp):
            sid = peer.start(
                transport, DEEP, 20, SEED, tp_size=src_tp, tp_rank=r, pp_size=src_pp, pp_rank=stage
            )
            sids.append(sid)
            ids.append(lease_blocks(peer, sid, 5, 20, rng))
    handle = KVHandle.merge([register(peer, s, i, DEEP.block_size) for s, i in zip(sids, ids, strict=True)])
    assert handle.complete and (handle.tp_size, handle.pp_size) == src
    logical = logical_kv(DEEP, 20, SEED)
    for stage in range(dst_pp):
        layers = Stage.of(DEEP.num_layers, stage, dst_pp).layers
        for r in range(dst_tp):
            local = dataclasses.replace(DEEP.tp_shard(dst_tp), num_layers=len(layers))
            dst_pool = KVPool.allocate(local, 8)
            dst_ids = rng.sample(range(8), 5)
            config = ReceiverConfig(tp_size=dst_tp, tp_rank=r, pp_size=dst_pp, pp_rank=stage)
            receiver = create_receiver(transport, dst_pool, config)
            try:
                assert receiver.pull(KVHandle.decode(handle.encode()), dst_ids).verified
            finally:
                receiver.close()
            heads = head_slice(DEEP.num_kv_heads, dst_tp, r)
            for shard_index, shard_ids in enumerate(ids):  # each prefill shard used its own block ids
                p_stage, p_rank = divmod(shard_index, src_tp)
                theirs = Stage.of(DEEP.num_layers, p_stage, src_pp).layers
                common = range(max(layers.start, theirs.start), min(layers.stop, theirs.stop))
                p_heads = head_slice(DEEP.num_kv_heads, src_tp, p_rank)
                lo, hi = max(heads.start, p_heads.start), min(heads.stop, p_heads.stop)
                if not common or lo >= hi:
                    continue
                got = dst_pool.gather(dst_ids)[common.start - layers.start : common.stop - layers.start]
                want = logical[common.start : common.stop][:, :, shard_ids]
                assert torch.equal(
                    got[:, :, :, :, lo - heads.start : hi - heads.start], want[:, :, :, :, lo:hi]
                )
    assert [peer.num_free(s) for s in sids] == [20] * len(sids), "every lease ended"
    for s in sids:
        peer(s, "close")


LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, block_size=8, dtype="float16")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_refusals_move_nothing(peer: PrefillPeer, transport: str) -> None:
    rng = random.Random(transport)
    sid = peer.start(transport, LAYOUT, 40, SEED)
    ids = lease_blocks(peer, sid, 5, 40, rng)
    handle = register(peer, sid, ids, LAYOUT.block_size)
    dst_pool = KVPool.allocate(LAYOUT, 10)
    receiver = create_receiver(transport, dst_pool)
    try:
        unknown = KVHandle.decode(handle.encode().replace(handle.shards[0].lease.encode(), b"0" * 32))
        with pytest.raises(KVLeaseUnknownError, match="unknown"):
            receiver.pull(unknown, range(5))
        corrupted = bytearray(handle.encode())
        corrupted[len(corrupted) // 2] ^= 0x55
        with pytest.raises(KVHandleError):
            receiver.pull(KVHandle.decode(bytes(corrupted)), range(5))
        for other in (
            KVLayout(4, 2, 32, 8, "bfloat16"),
            KVLayout(4, 2, 64, 8, "float16"),
            KVLayout(4, 2, 32, 16, "float16"),
            KVLayout(3, 2, 32, 8, "float16"),
        ):
            wrong = create_receiver(transport, KVPool.allocate(other, 10))
            try:
                with pytest.raises(KVLayoutMismatchError, match="nothing copied"):
                    wrong.pull(handle, range(5))
                assert torch.count_nonzero(wrong.pool.tensor) == 0
            finally:
                wrong.close()
        with pytest.raises(ValueError, match="destination blocks"):
            receiver.pull(handle, [0, 1, 2, 3, 3])
        assert torch.count_nonzero(dst_pool.tensor) == 0
        assert peer.num_free(sid) == 35  # refusals leave the lease alone ...
        checksum = handle.shards[0].checksum
        assert checksum is not None
        bad_sum = KVHandle.decode(handle.encode().replace(checksum.encode(), b"0123456789abcdef"))
        with pytest.raises(KVIntegrityError, match="checksum mismatch"):
            receiver.pull(bad_sum, range(5))
        receiver.pull(handle, range(5))  # ... so the real pull still works afterwards
        assert torch.equal(dst_pool.gather(list(range(5))), logical_kv(LAYOUT, 40, SEED)[:, :, ids])
        assert peer.num_free(sid) == 40
        assert receiver.counters.snapshot().failures >= 3
    finally:
        receiver.close()
        peer(sid, "close")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_expired_and_cancelled_leases(peer: PrefillPeer, transport: str) -> None:
    rng = random.Random(transport)
    sid = peer.start(transport, LAYOUT, 40, SEED, ttl=0.3)
    expiring = register(peer, sid, lease_blocks(peer, sid, 4, 40, rng), LAYOUT.block_size)
    assert wait_for(lambda: peer.num_free(sid) == 40)
    dst_pool = KVPool.allocate(LAYOUT, 10)
    receiver = create_receiver(transport, dst_pool)
    try:
        with pytest.raises(KVLeaseExpiredError, match="expired"):
            receiver.pull(expiring, range(4))
        assert torch.count_nonzero(dst_pool.tensor) == 0
        cancelled = register(peer, sid, lease_blocks(peer, sid, 4, 40, rng), LAYOUT.block_size)
        receiver.cancel(cancelled)
        assert peer.num_free(sid) == 40
        with pytest.raises(KVLeaseCancelledError):
            receiver.pull(cancelled, range(4))
        receiver.cancel(cancelled)  # cancelling twice is harmless
        counters = peer.counters(sid)
        assert (counters["expired_leases"], counters["cancelled_leases"], counters["active_leases"]) == (
            1,
            1,
            0,
        )
    finally:
        receiver.close()
        peer(sid, "close")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_during_transfer_frees_everything(peer: PrefillPeer, transport: str) -> None:
    rng = random.Random(transport)
    big = KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, block_size=16, dtype="float32")  # 512 KiB/block
    sid = peer.start(transport, big, 64, SEED, ttl=60.0)
    handle = register(peer, sid, lease_blocks(peer, sid, 48, 64, rng), big.block_size)
    dst_pool = KVPool.allocate(big, 48)
    receiver = create_receiver(transport, dst_pool)
    calls: list[int] = []

    def cancel_midway(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 1:
            receiver.cancel(handle)  # from the decode side, while the pull is under way

    try:
        with pytest.raises(KVLeaseCancelledError):
            receiver.pull(handle, range(48), on_progress=cancel_midway)
        assert (calls and calls[0] < 48 * big.bytes_per_block) or transport != "tcp"
        assert wait_for(lambda: peer.num_free(sid) == 64)
        assert peer.counters(sid)["cancelled_leases"] == 1
        assert receiver.counters.snapshot().failures == 1
    finally:
        receiver.close()
        peer(sid, "close")


def _decode_that_dies(transport: str, layout: dict[str, Any], conn: Connection) -> None:
    """A decode process that crashes in the middle of its pull, before acknowledging."""
    pool = KVPool.allocate(KVLayout(**layout), 16)
    receiver = create_receiver(transport, pool)
    conn.send_bytes(b"ready")
    handle = KVHandle.decode(conn.recv_bytes())
    receiver.pull(handle, range(12), on_progress=lambda done, total: os._exit(3))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_decode_dies_before_ack_lease_expires(peer: PrefillPeer, transport: str) -> None:
    rng = random.Random(transport)
    sid = peer.start(transport, LAYOUT, 40, SEED, ttl=1.0)
    start_free = peer.num_free(sid)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_decode_that_dies, args=(transport, LAYOUT.to_dict(), child_conn))
    child.start()
    assert conn.poll(60) and conn.recv_bytes() == b"ready"  # imported and set up: the TTL starts now
    handle = register(peer, sid, lease_blocks(peer, sid, 12, 40, rng), LAYOUT.block_size)
    assert peer.num_free(sid) == start_free - 12
    conn.send_bytes(handle.encode())
    child.join(timeout=60)
    assert child.exitcode == 3
    assert wait_for(lambda: peer.num_free(sid) == start_free, timeout=15)
    counters = peer.counters(sid)
    assert (counters["expired_leases"], counters["acked_leases"], counters["active_leases"]) == (1, 0, 0)
    peer(sid, "close")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrent_pulls_on_one_receiver(peer: PrefillPeer, transport: str) -> None:
    """A decode instance pulls several sequences at once from worker threads."""
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(transport)
    sid = peer.start(transport, LAYOUT, 64, SEED)
    seqs = [lease_blocks(peer, sid, 6, 64, rng) for _ in range(5)]
    handles = [register(peer, sid, ids, LAYOUT.block_size) for ids in seqs]
    dst_pool = KVPool.allocate(LAYOUT, 40)
    dst = [list(range(8 * i, 8 * i + 6)) for i in range(5)]
    receiver = create_receiver(transport, dst_pool)
    try:
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(receiver.pull, handles, dst))
    finally:
        receiver.close()
    logical = logical_kv(LAYOUT, 64, SEED)
    for ids, d, result in zip(seqs, dst, results, strict=True):
        assert result.verified
        assert torch.equal(dst_pool.gather(d), logical[:, :, ids])
    assert peer.num_free(sid) == 64
    assert receiver.counters.snapshot().transfers == 5
    peer(sid, "close")


def test_lease_releaser_ends_a_lease_without_a_pool(peer: PrefillPeer) -> None:
    """The orchestrator's path: it holds the handle's bytes, no pool, and nobody will pull."""
    rng = random.Random("release")
    sid = peer.start("shm", LAYOUT, 40, SEED)
    releaser = LeaseReleaser(io_timeout_s=5.0)
    try:
        handle = register(peer, sid, lease_blocks(peer, sid, 4, 40, rng), LAYOUT.block_size)
        assert peer.num_free(sid) == 36
        assert releaser.release(handle.encode())
        assert peer.num_free(sid) == 40 and peer.counters(sid)["cancelled_leases"] == 1
        assert releaser.release(handle.encode()), "a lease that already ended is not a failure"
        assert not releaser.release(b"not a handle"), "best effort: a bad handle is logged, not raised"
    finally:
        releaser.close()
        peer(sid, "close")
