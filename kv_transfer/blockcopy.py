"""Host-memory block copies and the packed-bytes checksum, fast enough to keep up with memcpy.

A pool tensor ``[layers, 2, blocks, block_size, heads, head_dim]`` is seen as ``layers*2`` planes of
``blocks`` rows of ``block_bytes`` bytes. Copying a sequence's blocks is a memcpy per (plane, run of
consecutive ids on both sides), in chunks of at most ``CHUNK_BYTES`` that are hashed right after the copy
while they are still in cache (see PlaneCopier for the threading).

Checksum definition (the value carried in a KV handle): the packed bytes of a sequence are the
``gather()`` of its blocks, ``[layers, 2, n, block_size, heads, head_dim]``. Each (layer, K/V) plane of
those bytes is hashed with xxh3_64; the checksum is the xxh3_64 of the planes' 8-byte big-endian digests
in plane order, as 16 hex digits. The two-level form lets the planes be hashed in parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import xxhash

CHUNK_BYTES = 1 << 20
Run = tuple[int, int, int]  # (src_start, dst_start, count) in blocks


def planes_u8(tensor: torch.Tensor) -> np.ndarray:
    """A CPU pool (or packed) tensor as a writable uint8 array [layers*2, blocks, block_bytes] (no copy)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("host block copies need a contiguous CPU tensor")
    layers, kv, blocks = tensor.shape[:3]
    flat = tensor.reshape(-1).view(torch.uint8).numpy()
    return flat.reshape(layers * kv, blocks, -1)


def matched_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[Run]:
    """Splits a block mapping into runs that are consecutive on both sides."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    runs: list[Run] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def combine_digests(digests: Sequence[int]) -> str:
    return xxhash.xxh3_64(b"".join(d.to_bytes(8, "big") for d in digests)).hexdigest()


def _chunks(runs: list[Run], block_bytes: int) -> list[tuple[int, int, int]]:
    """(src_byte, dst_byte, nbytes) pieces of at most CHUNK_BYTES (whole runs when blocks are larger)."""
    per = max(1, CHUNK_BYTES // block_bytes)
    out = []
    for s, d, c in runs:
        for k in range(0, c, per):
            n = min(per, c - k)
            out.append(((s + k) * block_bytes, (d + k) * block_bytes, n * block_bytes))
    return out


class PlaneCopier:
    """Block copies with the checksum computed alongside, on a background copy thread.

    Each run of consecutive blocks is copied for every plane at once by one numpy call (one memcpy
    per plane, the GIL released throughout). When a checksum is wanted and there are few runs, the
    copy runs on a background thread while the calling thread hashes the same source bytes (xxhash
    holds the GIL, numpy's copy does not, so the two overlap and the copy, bound by memory bandwidth,
    sets the pace). With many short runs the copy thread would wait for the GIL between runs, so the
    copier then works inline: copy a piece, hash it while it is in cache. ``workers=1`` always works
    inline. Close it to stop the thread.
    """

    # Between runs the copy thread needs the GIL, which the hashing thread holds: keep runs few.
    MAX_OVERLAPPED_RUNS = 4

    def __init__(self, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-copy") if workers > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def copy(self, src: np.ndarray, dst: np.ndarray, runs: list[Run], checksum: bool) -> str | None:
        """Copies blocks from src to dst (both from planes_u8); returns the checksum if asked.

        The checksum is computed over the source bytes the copy reads, in packed order.
        """
        if src.shape[0] != dst.shape[0] or src.shape[2] != dst.shape[2]:
            raise ValueError(f"plane shapes differ: {src.shape} vs {dst.shape}")

        def copy_runs() -> None:
            for s, d, c in runs:
                np.copyto(dst[:, d : d + c], src[:, s : s + c])

        if not checksum:
            copy_runs()
            return None
        if self._pool is None or len(runs) > self.MAX_OVERLAPPED_RUNS:
            return self._copy_inline(src, dst, runs)
        started = threading.Event()

        def copy_runs_started() -> None:
            started.set()
            copy_runs()

        future = self._pool.submit(copy_runs_started)
        # Waiting releases the GIL, so the copy thread starts its first memcpy at once instead of
        # waiting for the hashing loop below to hand the GIL over (up to the 5 ms switch interval).
        started.wait()
        try:
            digest = self.checksum(src, [b for s, _, c in runs for b in range(s, s + c)])
        finally:
            future.result()
        return digest

    def _copy_inline(self, src: np.ndarray, dst: np.ndarray, runs: list[Run]) -> str:
        pieces = _chunks(runs, src.shape[2])
        src_flat = src.reshape(src.shape[0], -1)
        dst_flat = dst.reshape(dst.shape[0], -1)
        digests = []
        for p in range(src.shape[0]):
            sp, dp = src_flat[p], dst_flat[p]
            h = xxhash.xxh3_64()
            for s, d, n in pieces:
                np.copyto(dp[d : d + n], sp[s : s + n])
                h.update(sp[s : s + n])
            digests.append(h.intdigest())
        return combine_digests(digests)

    def checksum(self, src: np.ndarray, block_ids: Sequence[int]) -> str:
        """The packed-bytes checksum of block_ids read in place (no copy)."""
        pieces = _chunks(matched_runs(block_ids, range(len(block_ids))), src.shape[2])
        src_flat = src.reshape(src.shape[0], -1)
        digests = []
        for p in range(src.shape[0]):
            h = xxhash.xxh3_64()
            sp = src_flat[p]
            for s, _, n in pieces:
                h.update(sp[s : s + n])
            digests.append(h.intdigest())
        return combine_digests(digests)
