"""tcp transport: packed KV blocks streamed over the control connection (hosts without GPUs).

Decode sends ``{"op": "fetch"}``; prefill pins the lease, replies ``{"ok": true, "nbytes": N}`` and
streams the packed bytes plane by plane (layer-major, K then V, blocks in sequence order: exactly the
bytes of ``KVPool.gather``). Between planes it checks the lease: a cancel during the stream closes the
connection, and the pin keeps the blocks allocated until the stream stops. Decode hashes each plane as
it lands, checks the handle's checksum, places the blocks, then acknowledges.
"""

from __future__ import annotations

import contextlib
import socket
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import xxhash

from engine.block_manager import BlockManager
from engine.kv_cache import KVPool
from kv_transfer.base import KVReceiver, KVSender, ProgressFn, _lease_id
from kv_transfer.blockcopy import combine_digests, matched_runs, planes_u8
from kv_transfer.config import ReceiverConfig, SenderConfig
from kv_transfer.control import Handler, Header, raise_if_error, recv_exact, recv_header, send_header
from kv_transfer.errors import KVProtocolError
from kv_transfer.handle import KVHandle, ShardRef
from kv_transfer.reshard import ShardPlan, place
from kv_transfer.shm import require_cpu_pool


class TcpSender(KVSender):
    transport = "tcp"

    def __init__(self, pool: KVPool, block_manager: BlockManager, config: SenderConfig) -> None:
        require_cpu_pool(pool, "tcp sender")
        self._gatherer = ThreadPoolExecutor(1, thread_name_prefix="kv-tcp-gather")
        super().__init__(pool, block_manager, config)

    def _extra_handlers(self) -> dict[str, Handler]:
        return {"fetch": self._op_fetch}

    def _op_fetch(self, request: Header, conn: socket.socket) -> Header | None:
        self._check_instance(request)
        lease = _lease_id(request)
        ids = self.leases.pin(lease)
        planes = planes_u8(self.pool.tensor)
        index = np.asarray(ids, dtype=np.int64)
        # Two buffers: the gather of plane p+1 (numpy, GIL released) overlaps the send of plane p.
        bufs = [np.empty((len(ids), planes.shape[2]), dtype=np.uint8) for _ in range(2)]

        def gather(p: int) -> np.ndarray:
            return np.take(planes[p], index, axis=0, out=bufs[p % 2])

        pending: Future[np.ndarray] | None = None
        try:
            send_header(conn, {"ok": True, "nbytes": planes.shape[0] * bufs[0].nbytes})
            pending = self._gatherer.submit(gather, 0)
            for p in range(planes.shape[0]):
                assert pending is not None
                buf = pending.result()
                pending = self._gatherer.submit(gather, p + 1) if p + 1 < planes.shape[0] else None
                if p:
                    self.leases.check(lease)  # raises if cancelled mid-stream: the connection is dropped
                conn.sendall(buf.data)
        except Exception:
            self.counters.failure()
            raise ConnectionAbortedError("stream aborted") from None
        finally:
            if pending is not None:  # never unpin while a gather still reads the blocks
                with contextlib.suppress(Exception):
                    pending.result()
            self.leases.unpin(lease)
        self.counters.transfer_done(planes.shape[0] * bufs[0].nbytes, 0.0)
        return None

    def _close_transport(self) -> None:
        self._gatherer.shutdown(wait=True)


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
        layout = handle.layout_of(shard)
        n = handle.num_blocks
        total = layout.bytes_per_block * n
        want = self.config.verify_checksum and shard.checksum is not None
        packed: torch.Tensor | None = None
        if plan.full:
            # Same heads on both sides: receive straight into the destination blocks, run by run.
            dst_planes = planes_u8(self.pool.tensor)
            runs = [(d, c) for _, d, c in matched_runs(range(n), dst_ids)]
        else:
            packed = torch.empty(layout.pool_shape(n), dtype=layout.torch_dtype)
            dst_planes, runs = planes_u8(packed), [(0, n)]
        host, port = shard.host_port
        sock = self._control.connect(host, port)
        try:
            send_header(sock, {"op": "fetch", "lease": shard.lease, "instance": shard.instance})
            reply = raise_if_error(recv_header(sock))
            if reply.get("nbytes") != total:
                raise KVProtocolError(
                    f"prefill offers {reply.get('nbytes')} bytes, the handle implies {total}"
                )
            digests, done = [], 0
            for p in range(dst_planes.shape[0]):
                h = xxhash.xxh3_64()
                for d, c in runs:
                    view = dst_planes[p, d : d + c].reshape(-1).data
                    recv_exact(sock, view)
                    if want:
                        h.update(view)  # still in cache
                    done += len(view)
                digests.append(h.intdigest())
                if on_progress is not None:
                    on_progress(done, total)
        except BaseException:
            sock.close()
            raise
        self._control.release(host, port, sock)
        verified = self._verify(shard, combine_digests(digests) if want else None)
        if packed is not None:
            place(self.pool.tensor, torch.as_tensor(dst_ids, dtype=torch.long), packed, plan)
        return total, verified
