"""KV handle encoding and strict validation, layout compatibility and TP/PP resharding plans."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.kv_cache import KVLayout
from kv_transfer.errors import KVHandleError, KVLayoutMismatchError
from kv_transfer.handle import MAX_HANDLE_BYTES, KVHandle, ShardRef, runs_of
from kv_transfer.reshard import Place, check_compatible, plan_pull

LAYOUT = KVLayout(num_layers=2, num_kv_heads=8, head_dim=64, block_size=16, dtype="bfloat16")


def shard(
    rank: int = 0,
    ids: list[int] | None = None,
    segment: str | None = "kvp_abc",
    pool: int = 64,
    stage: int = 0,
) -> ShardRef:
    return ShardRef(
        tp_rank=rank,
        pp_rank=stage,
        address="127.0.0.1:4100",
        lease="0123456789abcdef0123456789abcdef",
        instance="00112233aabbccdd",
        block_runs=runs_of(ids if ids is not None else [4, 5, 9]),
        pool_blocks=pool,
        segment=segment,
        checksum="a1b2c3d4e5f60718",
    )


def handle(**changes: Any) -> KVHandle:
    args: dict[str, Any] = dict(
        transport="shm", num_tokens=37, num_blocks=3, layout=LAYOUT, tp_size=1, shards=(shard(),)
    )
    args.update(changes)
    return KVHandle(**args)


def doc() -> dict[str, Any]:
    return json.loads(handle().encode())


def encode(d: dict[str, Any]) -> bytes:
    return json.dumps(d).encode()


def test_round_trip_and_runs() -> None:
    h = handle()
    data = h.encode()
    assert KVHandle.decode(data) == h
    assert KVHandle.decode(data.decode()) == h
    assert h.shards[0].block_ids == [4, 5, 9]
    assert json.loads(data)["shards"][0]["block_runs"] == [[4, 2], [9, 1]]
    assert runs_of([7, 8, 9, 3, 4, 0]) == ((7, 3), (3, 2), (0, 1))
    # thousands of consecutive blocks stay small on the wire
    big = handle(
        num_blocks=3000, num_tokens=3000 * 16, shards=(shard(ids=list(range(3000)), segment="s", pool=4096),)
    )
    assert KVHandle.decode(big.encode()) == big
    assert len(big.encode()) < 600


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=3), "version 3 is not supported"),
        (lambda d: d.update(version=True), "version must be an integer"),
        (lambda d: d.update(transport="carrier-pigeon"), "transport must be one of"),
        (lambda d: d.update(extra=1), "unexpected ['extra']"),
        (lambda d: d.pop("layout"), "missing ['layout']"),
        (lambda d: d["layout"].update(dtype="int8"), "layout.dtype must be one of"),
        (lambda d: d["layout"].update(head_dim=0), "layout.head_dim = 0 is out of range"),
        (lambda d: d["layout"].update(num_layers="2"), "layout.num_layers must be an integer"),
        (lambda d: d.update(num_tokens=100), "num_tokens 100 does not fit"),
        (lambda d: d.update(tp_size=3), "not divisible by tp_size"),
        (lambda d: d["shards"][0].update(lease="XYZ"), "lease must be 32 lowercase hex"),
        (lambda d: d["shards"][0].update(block_runs=[[4, 2], [5, 1]]), "names a block twice"),
        (lambda d: d["shards"][0].update(block_runs=[[62, 3]]), "block id 64 >= pool_blocks 64"),
        (lambda d: d["shards"][0].update(block_runs=[[-1, 3]]), "block_runs[0].start = -1 is out of range"),
        (lambda d: d["shards"][0].update(block_runs=[[4, 2]]), "names 2 blocks, expected num_blocks 3"),
        (lambda d: d["shards"][0].update(address="127.0.0.1:0"), "port in 1..65535"),
        (lambda d: d["shards"][0].update(address="no-port"), "must be 'host:port'"),
        (lambda d: d["shards"][0].update(segment="../etc/passwd"), "segment must be null or"),
        (lambda d: d["shards"][0].update(segment=None), "segment name is required for shm"),
        (lambda d: d["shards"][0].update(checksum="zz"), "checksum must be 16 lowercase hex"),
        (lambda d: d["shards"][0].update(tp_rank=1), "and tp_size 1"),
        (lambda d: d["shards"][0].update(pp_rank=1), "below pp_size 1"),
        (lambda d: d.update(shards=[]), "needs 1..1 shards"),
    ],
)
def test_invalid_handles_are_refused_with_a_named_reason(mutate: Any, message: str) -> None:
    d = doc()
    mutate(d)
    with pytest.raises(KVHandleError) as info:
        KVHandle.decode(encode(d))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xfe", b"[1, 2]", b"{", b"null", b"x" * (MAX_HANDLE_BYTES + 1)],
)
def test_garbage_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(KVHandleError):
        KVHandle.decode(data)


def test_truncated_and_bit_flipped_handles_never_decode_to_something_else() -> None:
    data = handle().encode()
    for cut in range(0, len(data), 7):
        with pytest.raises(KVHandleError):
            KVHandle.decode(data[:cut])
    original = handle()
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        try:
            decoded = KVHandle.decode(bytes(flipped))
        except KVHandleError:
            continue
        # A flip that still parses (a digit in a hex id, say) must show up as a different handle.
        assert decoded != original


def test_merge_joins_tp_shards() -> None:
    parts = [
        handle(tp_size=2, shards=(shard(rank=1, ids=[1, 2, 3]),)),
        handle(tp_size=2, shards=(shard(rank=0),)),
    ]
    assert not parts[0].complete
    merged = KVHandle.merge(parts)
    assert merged.complete and [s.tp_rank for s in merged.shards] == [0, 1]
    assert KVHandle.decode(merged.encode()) == merged
    with pytest.raises(KVHandleError, match="different sequences"):
        KVHandle.merge([parts[0], handle(tp_size=2, num_tokens=40, shards=(shard(rank=0),))])
    with pytest.raises(KVHandleError, match="distinct"):
        KVHandle.merge([parts[1], parts[1]])


def test_layout_mismatch_names_every_difference() -> None:
    local = KVLayout(num_layers=3, num_kv_heads=8, head_dim=32, block_size=8, dtype="float16")
    with pytest.raises(KVLayoutMismatchError) as info:
        check_compatible(LAYOUT, 1, 1, local, Place())
    text = str(info.value)
    for name in ("dtype", "head_dim", "block_size", "num_layers"):
        assert name in text
    with pytest.raises(KVLayoutMismatchError, match="num_kv_heads"):
        check_compatible(LAYOUT, 1, 1, KVLayout(2, 8, 64, 16, "bfloat16"), Place(tp_size=2))
    check_compatible(LAYOUT, 2, 1, KVLayout(2, 4, 64, 16, "bfloat16"), Place(tp_size=2))  # 4 heads x TP 2 = 8
    # a decode stage holds its share of the layers: 1 of 2 at PP 2
    check_compatible(LAYOUT, 1, 2, KVLayout(1, 8, 64, 16, "bfloat16"), Place(pp_rank=1, pp_size=2))
    with pytest.raises(KVLayoutMismatchError, match="decode stage 0 of 2 holds 2 layers"):
        check_compatible(LAYOUT, 1, 1, KVLayout(2, 8, 64, 16, "bfloat16"), Place(pp_size=2))


def test_reshard_plans() -> None:
    def plans(src_tp: int, at: Place, layers: int = 2, src_pp: int = 1) -> list[Any]:
        return plan_pull(8, layers, src_tp, src_pp, at)

    # prefill TP=2 -> decode TP=1: both shards, each into its half, one reader each
    assert [(p.shard_index, p.src_heads, p.dst_heads, p.full, p.readers) for p in plans(2, Place())] == [
        (0, slice(0, 4), slice(0, 4), False, 1),
        (1, slice(0, 4), slice(4, 8), False, 1),
    ]
    # prefill TP=1 -> decode TP=2: rank 1 takes heads 4..8 of the single shard, which has two readers
    (p,) = plans(1, Place(1, 2))
    assert (p.shard_index, p.src_heads, p.dst_heads, p.reader, p.readers, p.full) == (
        0,
        slice(4, 8),
        slice(0, 4),
        1,
        2,
        False,
    )
    # equal TP: the whole shard, a plain copy
    (p,) = plans(2, Place(1, 2))
    assert (p.shard_index, p.full, p.readers) == (1, True, 1)
    # 2 -> 4: rank 3 reads the upper half of shard 1
    (p,) = plans(2, Place(3, 4))
    assert (p.shard_index, p.src_heads, p.dst_heads, p.reader, p.readers) == (
        1,
        slice(2, 4),
        slice(0, 2),
        1,
        2,
    )


def test_reshard_plans_over_pipeline_stages() -> None:
    # prefill PP=2 -> decode PP=1 (4 layers): the one decode rank reads both stages, layers 0-1 and 2-3
    got = plan_pull(8, 4, 1, 2, Place())
    assert [(p.shard_index, p.src_layers, p.dst_layers, p.full, p.readers) for p in got] == [
        (0, slice(0, 2), slice(0, 2), False, 1),
        (1, slice(0, 2), slice(2, 4), False, 1),
    ]
    # prefill PP=1 -> decode PP=2: stage 1 takes layers 2-3 of the single shard, read by both stages
    (p,) = plan_pull(8, 4, 1, 1, Place(pp_rank=1, pp_size=2))
    assert (p.shard_index, p.src_layers, p.dst_layers, p.reader, p.readers) == (
        0,
        slice(2, 4),
        slice(0, 2),
        1,
        2,
    )
    # equal (tp, pp): each decode rank copies its twin shard whole
    (p,) = plan_pull(8, 4, 2, 2, Place(1, 2, 1, 2))
    assert (p.shard_index, p.full, p.readers) == (3, True, 1)
    # prefill (tp 2, pp 1) -> decode (tp 1, pp 2), 5 layers: stage 0 has layers 0-2, stage 1 layers 3-4
    got = plan_pull(8, 5, 2, 1, Place(pp_rank=1, pp_size=2))
    assert [(p.shard_index, p.src_layers, p.dst_heads, p.reader, p.readers) for p in got] == [
        (0, slice(3, 5), slice(0, 4), 1, 2),
        (1, slice(3, 5), slice(4, 8), 1, 2),
    ]
