"""shm transport: host shared memory between processes on one machine (CPU engines).

The prefill pool lives in a named shared-memory segment (``ShmKVPool``); the handle names the segment.
Decode checks the lease over the control socket ("begin"), attaches the segment (once per segment),
copies the blocks straight from the prefill pool into its own with the plane copier, verifies the
checksum of what it copied, then acknowledges. Only control messages cross the socket. Since decode
reads memory the prefill side could reuse, the acknowledgement is the proof: it fails if the lease
ended (cancel, expiry) while decode was reading, and the pull fails with it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from engine.block_manager import BlockManager
from engine.kv_cache import KVLayout, KVPool
from engine.shm_pool import SegmentError, ShmKVPool
from kv_transfer.base import KVReceiver, KVSender, ProgressFn
from kv_transfer.blockcopy import matched_runs, planes_u8
from kv_transfer.config import ReceiverConfig, SenderConfig
from kv_transfer.errors import KVTransferError
from kv_transfer.handle import KVHandle, ShardRef
from kv_transfer.reshard import ShardPlan, place

_MAX_ATTACHED = 64


class ShmSender(KVSender):
    transport = "shm"

    def __init__(self, pool: KVPool, block_manager: BlockManager, config: SenderConfig) -> None:
        if not isinstance(pool, ShmKVPool):
            raise TypeError(
                "the shm transport needs a pool in shared memory: allocate it with ShmKVPool.create"
            )
        self._segment_name = pool.segment_name
        super().__init__(pool, block_manager, config)

    def _segment(self) -> str | None:
        return self._segment_name


def require_cpu_pool(pool: KVPool, transport: str) -> None:
    if pool.device.type != "cpu":
        raise ValueError(f"the {transport} receiver needs a CPU pool, got one on {pool.device}")


class ShmReceiver(KVReceiver):
    transport = "shm"

    def __init__(self, pool: KVPool, config: ReceiverConfig) -> None:
        require_cpu_pool(pool, self.transport)
        super().__init__(pool, config)
        self._attached: OrderedDict[tuple[str, int], ShmKVPool] = OrderedDict()
        self._attach_lock = threading.Lock()  # pulls may run on several threads

    def _source(self, shard: ShardRef, layout: KVLayout) -> torch.Tensor:
        """The prefill pool's tensor (the reference keeps the mapping alive even if evicted meanwhile)."""
        assert shard.segment is not None  # the handle validation guarantees it for shm
        key = (shard.segment, shard.pool_blocks)
        with self._attach_lock:
            src = self._attached.get(key)
            if src is None:
                try:
                    src = ShmKVPool.attach(shard.segment, layout, shard.pool_blocks)
                except SegmentError as exc:
                    raise KVTransferError(f"{exc} (prefill instance gone?)") from None
                self._attached[key] = src
                # Mappings of segments not used lately are dropped (a pull still holding one keeps
                # it mapped through its own reference until it finishes).
                while len(self._attached) > _MAX_ATTACHED:
                    self._attached.popitem(last=False)[1].close()
            self._attached.move_to_end(key)
            return src.tensor

    def _pull_shard(
        self,
        handle: KVHandle,
        shard: ShardRef,
        plan: ShardPlan,
        dst_ids: list[int],
        on_progress: ProgressFn | None,
    ) -> tuple[int, bool]:
        self._request(shard, "begin")
        shard_layout = handle.layout_of(shard)
        src = self._source(shard, shard_layout)
        src_ids = shard.block_ids
        want = self.config.verify_checksum and shard.checksum is not None
        nbytes = shard_layout.bytes_per_block * len(src_ids)
        if plan.full:
            actual = self._copier.copy(
                planes_u8(src), planes_u8(self.pool.tensor), matched_runs(src_ids, dst_ids), want
            )
        else:
            # Another TP degree: stage the whole shard (its checksum covers every head), then place the slice.
            packed = torch.empty(shard_layout.pool_shape(len(src_ids)), dtype=shard_layout.torch_dtype)
            runs = matched_runs(src_ids, range(len(src_ids)))
            actual = self._copier.copy(planes_u8(src), planes_u8(packed), runs, want)
        verified = self._verify(shard, actual)
        if not plan.full:
            place(self.pool.tensor, torch.as_tensor(dst_ids, dtype=torch.long), packed, plan)
        if on_progress is not None:
            on_progress(nbytes, nbytes)
        return nbytes, verified

    def _close_transport(self) -> None:
        with self._attach_lock:
            for src in self._attached.values():
                src.close()
            self._attached.clear()
