"""tcp transport: packed KV blocks streamed over the control connection (hosts without GPUs).

Decode sends ``{"op": "fetch"}``; prefill pins the lease, replies ``{"ok": true, "nbytes": N}`` and
streams the packed bytes plane by plane (layer-major, K then V, blocks in sequence order: exactly the
bytes of ``KVPool.gather``). Between planes it checks the lease: a cancel during the stream closes the
connection, and the pin keeps the blocks allocated until the stream stops. Decode hashes each plane as
it lands, checks the handle's checksum, places the blocks, then acknowledges.
"""

from __future__ import annotations

import socket

import numpy as np
import torch
import xxhash

from backends.engine.block_manager import BlockManager
from backends.engine.kv_cache import KVLayout, KVPool
from kv_transfer.base import KVReceiver, KVSender, ProgressFn, _lease_id
from kv_transfer.blockcopy import combine_digests, matched_runs, planes_u8
from kv_transfer.config import ReceiverConfig, SenderConfig
from kv_transfer.control import Handler, Header, raise_if_error, recv_exact, recv_header, send_header
from kv_transfer.errors import KVProtocolError
from kv_transfer.handle import KVHandle, ShardRef
from kv_transfer.reshard import ShardPlan, place
from kv_transfer.shm import require_cpu_pool


def shard_layout(handle: KVHandle) -> KVLayout:
    lay = handle.layout
    return KVLayout(
        lay.num_layers, lay.num_kv_heads // handle.tp_size, lay.head_dim, lay.block_size, lay.dtype
    )


class TcpSender(KVSender):
    transport = "tcp"

    def __init__(self, pool: KVPool, block_manager: BlockManager, config: SenderConfig) -> None:
        require_cpu_pool(pool, "tcp sender")
        super().__init__(pool, block_manager, config)

    def _extra_handlers(self) -> dict[str, Handler]:
        return {"fetch": self._op_fetch}

    def _op_fetch(self, request: Header, conn: socket.socket) -> Header | None:
        self._check_instance(request)
        lease = _lease_id(request)
        ids = self.leases.pin(lease)
        try:
            planes = planes_u8(self.pool.tensor)
            index = np.asarray(ids, dtype=np.int64)
            send_header(conn, {"ok": True, "nbytes": planes.shape[0] * len(ids) * planes.shape[2]})
            buf = np.empty((len(ids), planes.shape[2]), dtype=np.uint8)
            for p in range(planes.shape[0]):
                if p:
                    self.leases.check(lease)  # raises if cancelled mid-stream: the connection is dropped
                np.take(planes[p], index, axis=0, out=buf)
                conn.sendall(buf.data)
        except Exception:
            self.counters.failure()
            raise ConnectionAbortedError("stream aborted") from None
        finally:
            self.leases.unpin(lease)
        self.counters.transfer_done(buf.nbytes * planes.shape[0], 0.0)
        return None


class TcpReceiver(KVReceiver):
    transport = "tcp"

    def __init__(self, pool: KVPool, config: ReceiverConfig) -> None:
        require_cpu_pool(pool, self.transport)
        super().__init__(pool, config)

    def _pull_shard(
        self,
        handle: KVHandle,
        shard: ShardRef,
        plan: ShardPlan,
        dst_ids: list[int],
        on_progress: ProgressFn | None,
    ) -> tuple[int, bool]:
        layout = shard_layout(handle)
        n = handle.num_blocks
        packed = torch.empty(layout.pool_shape(n), dtype=layout.torch_dtype)
        planes = planes_u8(packed)
        total = packed.numel() * layout.itemsize
        want = self.config.verify_checksum and shard.checksum is not None
        host, port = shard.host_port
        sock = self._control.connect(host, port)
        try:
            send_header(sock, {"op": "fetch", "lease": shard.lease, "instance": shard.instance})
            reply = raise_if_error(recv_header(sock))
            if reply.get("nbytes") != total:
                raise KVProtocolError(
                    f"prefill offers {reply.get('nbytes')} bytes, the handle implies {total}"
                )
            digests = []
            for p in range(planes.shape[0]):
                view = memoryview(planes[p].reshape(-1))
                recv_exact(sock, view)
                if want:
                    digests.append(xxhash.xxh3_64(view).intdigest())
                if on_progress is not None:
                    on_progress((p + 1) * len(view), total)
        except BaseException:
            sock.close()
            raise
        self._control.release(host, port, sock)
        verified = self._verify(shard, combine_digests(digests) if want else None)
        if plan.full:
            self._copier.copy(planes, planes_u8(self.pool.tensor), matched_runs(range(n), dst_ids), False)
        else:
            place(self.pool.tensor, torch.as_tensor(dst_ids, dtype=torch.long), packed, plan)
        return total, verified
