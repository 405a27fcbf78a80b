"""Two-process KV transfer tests on a CUDA GPU: cuda_ipc and nccl (skipped without a GPU)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from engine.kv_cache import KVLayout, KVPool
from kv_transfer import (
    KVHandle,
    KVLayoutMismatchError,
    KVLeaseCancelledError,
    ReceiverConfig,
    create_receiver,
)
from kv_transfer.peer import PrefillPeer, head_slice, logical_kv, spawn_prefill_peer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TRANSPORTS = ["cuda_ipc", "nccl"]


def devices(transport: str) -> tuple[str, str]:
    """(prefill device, decode device): NCCL refuses two ranks on one GPU, so nccl needs two."""
    if transport == "nccl":
        if torch.cuda.device_count() < 2:
            pytest.skip("NCCL between two processes needs two GPUs")
        return "cuda:1", "cuda:0"
    return "cuda:0", "cuda:0"


SEED = 11


@pytest.fixture(scope="module")
def peer() -> Iterator[PrefillPeer]:
    with spawn_prefill_peer() as p:
        yield p


def register(peer: PrefillPeer, sid: int, ids: list[int], block_size: int) -> KVHandle:
    reply = peer(sid, "register", block_ids=ids, num_tokens=(len(ids) - 1) * block_size + 1)
    return KVHandle.decode(reply["handle"].encode())


def scattered(peer: PrefillPeer, sid: int, n: int, rng: random.Random) -> list[int]:
    got = peer(sid, "allocate", n=2 * n)["block_ids"]
    chosen = rng.sample(got, n)
    peer(sid, "free", block_ids=sorted(set(got) - set(chosen)))
    return chosen


CASES = [
    (KVLayout(num_layers=2, num_kv_heads=4, head_dim=16, block_size=4, dtype="float32"), 1, True),
    (KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, dtype="bfloat16"), 37, False),
    (KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_size=1, dtype="float16"), 2000, False),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0].dtype for c in CASES])
def test_gpu_bytes_identical(peer: PrefillPeer, transport: str, case: int) -> None:
    layout, n, checksum = CASES[case]
    rng = random.Random(f"{transport}{case}")
    src_dev, dst_dev = devices(transport)
    sid = peer.start(transport, layout, 2 * n, SEED, device=src_dev, checksum=checksum)
    ids = scattered(peer, sid, n, rng) if n > 1 else peer(sid, "allocate", n=1)["block_ids"]
    handle = register(peer, sid, ids, layout.block_size)
    dst = KVPool.allocate(layout, n + 8, dst_dev)
    dst_ids = rng.sample(range(n + 8), n)
    receiver = create_receiver(transport, dst)
    try:
        result = receiver.pull(handle, dst_ids)
        # a second sequence reuses the exported pool / the pairwise group
        ids2 = peer(sid, "allocate", n=1)["block_ids"]
        free_dst = sorted(set(range(n + 8)) - set(dst_ids))[:1]
        receiver.pull(register(peer, sid, ids2, layout.block_size), free_dst)
        assert torch.equal(dst.gather(free_dst).cpu(), logical_kv(layout, 2 * n, SEED)[:, :, ids2])
    finally:
        receiver.close()
    assert torch.equal(dst.gather(dst_ids).cpu(), logical_kv(layout, 2 * n, SEED)[:, :, ids])
    assert result.verified == checksum
    assert peer.num_free(sid) == 2 * n
    peer(sid, "close")


TOTAL = KVLayout(num_layers=2, num_kv_heads=4, head_dim=16, block_size=8, dtype="bfloat16")


def rank_layout(tp: int) -> KVLayout:
    return TOTAL.tp_shard(tp)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_gpu_reshard_both_directions(peer: PrefillPeer, transport: str) -> None:
    rng = random.Random(transport)
    src_dev, dst_dev = devices(transport)
    logical = logical_kv(TOTAL, 20, SEED)
    # prefill TP=2 -> decode TP=1
    sids = [peer.start(transport, TOTAL, 20, SEED, tp_size=2, tp_rank=r, device=src_dev) for r in range(2)]
    ids = [scattered(peer, s, 5, rng) for s in sids]
    handle = KVHandle.merge([register(peer, s, i, TOTAL.block_size) for s, i in zip(sids, ids, strict=True)])
    dst = KVPool.allocate(rank_layout(1), 8, dst_dev)
    receiver = create_receiver(transport, dst)
    try:
        receiver.pull(handle, [7, 1, 2, 5, 0])
    finally:
        receiver.close()
    got = dst.gather([7, 1, 2, 5, 0]).cpu()
    for r in range(2):
        heads = head_slice(4, 2, r)
        assert torch.equal(got[:, :, :, :, heads], logical[:, :, ids[r]][:, :, :, :, heads])
    assert [peer.num_free(s) for s in sids] == [20, 20]
    # prefill TP=1 -> decode TP=2
    sid = peer.start(transport, TOTAL, 20, SEED, device=src_dev)
    ids1 = scattered(peer, sid, 6, rng)
    handle = register(peer, sid, ids1, TOTAL.block_size)
    for rank in range(2):
        pool = KVPool.allocate(rank_layout(2), 6, dst_dev)
        rx = create_receiver(transport, pool, ReceiverConfig(tp_size=2, tp_rank=rank))
        try:
            rx.pull(handle, range(6))
        finally:
            rx.close()
        assert torch.equal(
            pool.gather(list(range(6))).cpu(), logical[:, :, ids1][:, :, :, :, head_slice(4, 2, rank)]
        )
    assert peer.num_free(sid) == 20
    for s in [*sids, sid]:
        peer(s, "close")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_gpu_refusals_and_cancel(peer: PrefillPeer, transport: str) -> None:
    rng = random.Random(transport)
    src_dev, dst_dev = devices(transport)
    sid = peer.start(transport, TOTAL, 20, SEED, device=src_dev)
    handle = register(peer, sid, scattered(peer, sid, 4, rng), TOTAL.block_size)
    wrong = create_receiver(transport, KVPool.allocate(KVLayout(2, 4, 16, 8, "float16"), 8, dst_dev))
    try:
        with pytest.raises(KVLayoutMismatchError):
            wrong.pull(handle, range(4))
        assert torch.count_nonzero(wrong.pool.tensor) == 0
    finally:
        wrong.close()
    receiver = create_receiver(transport, KVPool.allocate(TOTAL, 8, dst_dev))
    try:
        with pytest.raises(KVLeaseCancelledError):
            receiver.pull(handle, range(4), on_progress=lambda done, total: receiver.cancel(handle))
    finally:
        receiver.close()
    assert peer.num_free(sid) == 20
    peer(sid, "close")
