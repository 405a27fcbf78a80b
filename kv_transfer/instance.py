"""KV transfer for a parallel instance: one sender or receiver per rank, used as one.

The rank 0 of a tensor- or pipeline-parallel instance can reach every rank's pool (shared memory
on CPU, CUDA memory on a GPU), so it moves the KV of all its ranks itself. Pools are indexed by
rank, stage-major (rank = stage * tp + tensor-parallel rank). Prefill: every rank's sender leases
the sequence's blocks (the same block ids on every rank: one block manager allocates them) and the
handles are merged into one, with a shard per rank (its stage's layers, its heads); the blocks are
free again once every shard's lease ended (each lease holds a reference). Decode: each rank's
receiver pulls exactly that rank's heads of its stage's layers from the prefill shards that hold
them (kv_transfer.reshard), into the same destination blocks, and acknowledges as one of each
shard's readers; a prefill shard's lease ends when all its readers have acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_manager import BlockManager
from engine.kv_cache import KVPool
from kv_transfer.base import KVReceiver, KVSender, PullResult
from kv_transfer.config import ReceiverConfig, SenderConfig
from kv_transfer.counters import CountersSnapshot
from kv_transfer.factory import create_receiver, create_sender
from kv_transfer.handle import KVHandle


class InstanceSender:
    """The senders of every rank of a prefill instance (rank r's pool is pools[r])."""

    def __init__(
        self,
        transport: str,
        pools: Sequence[KVPool],
        block_manager: BlockManager,
        config: SenderConfig,
        pp_size: int = 1,
        model_layers: int = 0,
    ) -> None:
        """`pools`: every rank's, stage-major (pp_size stages of len(pools) / pp_size ranks);
        `model_layers`: the model's layer count (needed when pp_size > 1)."""
        tp = len(pools) // pp_size
        self.senders: list[KVSender] = []
        try:
            for rank, pool in enumerate(pools):
                stage, t = divmod(rank, tp)
                place = {
                    "tp_size": tp,
                    "tp_rank": t,
                    "pp_size": pp_size,
                    "pp_rank": stage,
                    "model_layers": model_layers,
                }
                rank_config = SenderConfig(**{**config.__dict__, **place})
                self.senders.append(create_sender(transport, pool, block_manager, rank_config))
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str:
        return ", ".join(s.address for s in self.senders)

    def register(self, block_ids: Sequence[int], num_tokens: int) -> KVHandle:
        """Leases the blocks on every rank; returns the handle with a shard per rank. If a rank
        fails to lease, the leases already taken end, so nothing stays referenced."""
        parts: list[KVHandle] = []
        try:
            for sender in self.senders:
                parts.append(sender.register(block_ids, num_tokens))
        except BaseException:
            for sender, part in zip(self.senders, parts, strict=False):
                sender.cancel(part.shards[0].lease)
            raise
        return parts[0] if len(parts) == 1 else KVHandle.merge(parts)

    def active_leases(self) -> int:
        """Sequences whose KV waits to be pulled (each holds a lease on every rank)."""
        return max((s.counters.snapshot().active_leases for s in self.senders), default=0)

    def close(self) -> None:
        for sender in self.senders:
            sender.close()


class InstanceReceiver:
    """The receivers of every rank of a decode instance (rank r's pool is pools[r])."""

    def __init__(
        self, transport: str, pools: Sequence[KVPool], config: ReceiverConfig, pp_size: int = 1
    ) -> None:
        """`pools`: every rank's, stage-major (pp_size stages of len(pools) / pp_size ranks)."""
        tp = len(pools) // pp_size
        self.receivers: list[KVReceiver] = []
        try:
            for rank, pool in enumerate(pools):
                stage, t = divmod(rank, tp)
                place = {"tp_size": tp, "tp_rank": t, "pp_size": pp_size, "pp_rank": stage}
                rank_config = ReceiverConfig(**{**config.__dict__, **place})
                self.receivers.append(create_receiver(transport, pool, rank_config))
        except BaseException:
            self.close()
            raise

    def pull(self, handle: KVHandle, dst_block_ids: Sequence[int]) -> PullResult:
        """Every rank pulls its KV heads into dst_block_ids. On a failure the handle's leases are
        cancelled (ranks that already pulled acknowledged; the rest never will) and the error raised."""
        results: list[PullResult] = []
        try:
            for receiver in self.receivers:
                results.append(receiver.pull(handle, dst_block_ids))
        except BaseException:
            self.cancel(handle)
            raise
        return PullResult(
            sum(r.bytes_moved for r in results),
            sum(r.seconds for r in results),
            results[0].num_blocks,
            all(r.verified for r in results),
        )

    def cancel(self, handle: KVHandle) -> None:
        """Releases every shard's lease without pulling."""
        self.receivers[0].cancel(handle)

    def counters(self) -> list[CountersSnapshot]:
        return [r.counters.snapshot() for r in self.receivers]

    def close(self) -> None:
        for receiver in self.receivers:
            receiver.close()
