from __future__ import annotations

import threading

import pytest

from engine.block_manager import BlockManager, OutOfBlocksError


def test_allocate_until_exhausted_then_fail() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.can_allocate(8) and not bm.can_allocate(9)
    a = bm.allocate(5)
    assert len(set(a)) == 5 and bm.num_free == 3
    assert not bm.can_allocate(4)
    with pytest.raises(OutOfBlocksError, match="need 4 KV blocks, 3 free of 8"):
        bm.allocate(4)
    assert bm.num_free == 3, "a failed allocation must not take blocks"
    b = bm.allocate(3)
    assert set(a).isdisjoint(b) and bm.num_free == 0


def test_free_returns_blocks_and_they_are_reused_fifo() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    first = bm.allocate(4)
    bm.free(first[:2])
    assert bm.num_free == 2
    again = bm.allocate(2)
    assert again == first[:2]
    bm.free(first[2:])
    bm.free(again)
    assert bm.num_free == 4 and bm.num_used == 0


def test_reference_counts() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    ids = bm.allocate(2)
    bm.incref(ids)
    assert [bm.ref_count(b) for b in ids] == [2, 2]
    bm.free(ids)
    assert bm.num_free == 2, "blocks still referenced once stay allocated"
    bm.free(ids)
    assert bm.num_free == 4
    with pytest.raises(ValueError, match="freed twice"):
        bm.free(ids[:1])
    with pytest.raises(ValueError, match="is free"):
        bm.incref(ids[:1])
    with pytest.raises(ValueError, match="out of range"):
        bm.free([99])


def test_blocks_for_rounds_up() -> None:
    bm = BlockManager(num_blocks=4, block_size=16)
    assert [bm.blocks_for(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_concurrent_allocate_and_free_keep_the_invariant() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    errors: list[Exception] = []

    def worker() -> None:
        try:
            for _ in range(500):
                if bm.can_allocate(3):
                    try:
                        ids = bm.allocate(3)
                    except OutOfBlocksError:
                        continue
                    bm.free(ids)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert bm.num_free == 64
