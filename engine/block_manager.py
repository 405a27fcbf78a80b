"""Block allocation with reference counts for a KVPool.

Invariants: every block id is either in the free list (ref count 0) or referenced (count >= 1),
never both; ``num_free + sum(1 for b if ref[b] > 0) == num_blocks``. Freed blocks are reused in
FIFO order, so a block just released (maybe still being read by a transfer that the lease table
guards) is the last to be handed out again.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable


class OutOfBlocksError(RuntimeError):
    """Raised by allocate() when the pool cannot hold the request; callers check can_allocate()."""


class BlockManager:
    """Thread-safe: the Triton models free blocks from transfer threads while the engine allocates."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        with self._lock:
            if num_blocks > len(self._free):
                raise OutOfBlocksError(
                    f"need {num_blocks} KV blocks, {len(self._free)} free of {self.num_blocks}"
                )
            ids = [self._free.popleft() for _ in range(num_blocks)]
            for b in ids:
                self._ref[b] = 1
            return ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Adds a reference (a second sequence or a transfer lease sharing the blocks)."""
        with self._lock:
            ids = list(block_ids)
            for b in ids:
                self._check(b)
                if self._ref[b] == 0:
                    raise ValueError(f"block {b} is free; cannot add a reference")
            for b in ids:
                self._ref[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drops one reference of each block; blocks reaching zero go back to the free list."""
        with self._lock:
            ids = list(block_ids)
            for b in ids:
                self._check(b)
                if self._ref[b] == 0:
                    raise ValueError(f"block {b} freed twice")
            for b in ids:
                self._ref[b] -= 1
                if self._ref[b] == 0:
                    self._free.append(b)

    def ref_count(self, block_id: int) -> int:
        self._check(block_id)
        return self._ref[block_id]

    def _check(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")
