"""A KVPool whose tensor lives in a named POSIX shared-memory segment.

Two users: the shm KV transfer (a decode instance copies blocks straight out of a prefill pool)
and tensor parallelism on CPU (rank 0 creates every rank's pool, so that it can move KV in and out
of all of them, and the worker ranks attach theirs). The creating process owns the segment and
unlinks it on close(). Other processes attach by name with ``ShmKVPool.attach``: read-only unless
asked (a decode instance cannot corrupt the prefill pool), with shm_open + mmap directly, so the
attach is never registered with multiprocessing's resource tracker (which would otherwise unlink,
or double-account, a segment that another process owns).
"""

from __future__ import annotations

import _posixshmem
import contextlib
import gc
import mmap
import os
import re
import secrets
import warnings
from multiprocessing import shared_memory

import torch

from engine.kv_cache import KVLayout, KVPool

SEGMENT_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class SegmentError(OSError):
    """A shared segment is missing, too small, or badly named."""


def pool_nbytes(layout: KVLayout, num_blocks: int) -> int:
    return layout.bytes_per_block * num_blocks


class ShmKVPool(KVPool):
    """KVPool over a shared-memory segment; ``segment_name`` is what handles carry."""

    def __init__(
        self,
        layout: KVLayout,
        buf: memoryview | mmap.mmap,
        num_blocks: int,
        name: str,
        owner: shared_memory.SharedMemory | mmap.mmap,
    ) -> None:
        nbytes = pool_nbytes(layout, num_blocks)
        if len(buf) < nbytes:
            raise SegmentError(f"shared segment {name} has {len(buf)} bytes, the pool needs {nbytes}")
        with warnings.catch_warnings():
            # A read-only mapping: torch warns that the buffer is not writable; it is only read.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buf, dtype=layout.torch_dtype, count=nbytes // layout.itemsize)
        super().__init__(layout, flat.view(layout.pool_shape(num_blocks)))
        self.segment_name = name
        self._owner: shared_memory.SharedMemory | mmap.mmap | None = (
            owner  # SharedMemory when this process created the segment, else the mmap
        )

    @property
    def owner(self) -> bool:
        return isinstance(self._owner, shared_memory.SharedMemory)

    @classmethod
    def create(cls, layout: KVLayout, num_blocks: int, name: str | None = None) -> ShmKVPool:
        """Allocates a zeroed pool in a new segment (name: random 'kvp_<hex>' unless given)."""
        name = name or f"kvp_{secrets.token_hex(8)}"
        if not SEGMENT_RE.fullmatch(name):
            raise ValueError(f"segment name {name!r} must be 1-64 characters of [A-Za-z0-9_.-]")
        shm = shared_memory.SharedMemory(name=name, create=True, size=pool_nbytes(layout, num_blocks))
        assert shm.buf is not None
        return cls(layout, shm.buf, num_blocks, name, shm)

    @classmethod
    def attach(cls, name: str, layout: KVLayout, num_blocks: int, writable: bool = False) -> ShmKVPool:
        """Maps an existing segment (read-only unless `writable`); raises SegmentError if it is
        missing or too small."""
        if not SEGMENT_RE.fullmatch(name):
            raise SegmentError(f"invalid segment name {name!r}")
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR if writable else os.O_RDONLY, mode=0o600)
        except FileNotFoundError:
            raise SegmentError(f"shared segment {name!r} does not exist") from None
        try:
            size = os.fstat(fd).st_size
            if size < pool_nbytes(layout, num_blocks):
                raise SegmentError(
                    f"shared segment {name} has {size} bytes, the pool needs {pool_nbytes(layout, num_blocks)}"
                )
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)
        return cls(layout, mm, num_blocks, name, mm)

    def close(self) -> None:
        """Unmaps the segment (and unlinks it if this process created it). Idempotent."""
        owner, self._owner = self._owner, None
        if owner is None:
            return
        # The tensor holds an export of the buffer; drop it so the mapping can be closed.
        self.tensor = torch.empty(0, dtype=self.layout.torch_dtype)
        gc.collect()
        if isinstance(owner, shared_memory.SharedMemory):
            owner.unlink()
        # A caller still holding a view of the pool keeps the mapping alive until it lets go.
        with contextlib.suppress(BufferError):
            owner.close()
