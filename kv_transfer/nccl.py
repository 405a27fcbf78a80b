"""nccl transport: packed KV blocks over a pairwise torch.distributed process group (across nodes).

Each (prefill sender, decode receiver) pair gets its own two-rank group, created lazily on the first
pull and reused: decode asks the sender ("group"), the sender answers with its TCPStore address and a
key prefix unique to the pair, and both sides construct the backend directly over a PrefixStore
(prefill rank 0, decode rank 1), so one process can hold many pairs without init_process_group.
A pull is then "send" over the control socket (lease, pair, tag) followed by one send/recv of the
packed blocks as bytes. The backend is NCCL for CUDA pools and gloo for CPU pools; the code is the
same, which is how CPU tests exercise it. Pulls on one pair are serialized by the decode side.
"""

from __future__ import annotations

import secrets
import socket
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from engine.block_manager import BlockManager
from engine.kv_cache import KVPool
from kv_transfer.base import KVReceiver, KVSender, ProgressFn, _int_field, _lease_id
from kv_transfer.blockcopy import combine_digests, matched_runs, planes_u8
from kv_transfer.config import ReceiverConfig, SenderConfig
from kv_transfer.control import Handler, Header, send_header
from kv_transfer.errors import KVProtocolError, KVTransferError
from kv_transfer.handle import KVHandle, ShardRef
from kv_transfer.reshard import ShardPlan, place

_PAIR_CHARS = set("0123456789abcdef")


def make_pair_group(backend: str, store: Any, rank: int, timeout_s: float, host: str) -> Any:
    """A two-rank gloo or NCCL backend over store (blocks until the peer constructs its side)."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, 2, opts)
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise KVTransferError("this torch build has no NCCL")
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, nccl_opts)
    raise ValueError(f"unknown backend {backend!r}")


def backend_for(pool: KVPool) -> str:
    return "nccl" if pool.device.type == "cuda" else "gloo"


@dataclass
class _SenderPair:
    ready: threading.Event = field(default_factory=threading.Event)
    group: Any = None
    error: str | None = None


class NcclSender(KVSender):
    transport = "nccl"

    def __init__(self, pool: KVPool, block_manager: BlockManager, config: SenderConfig) -> None:
        self._backend = backend_for(pool)
        self._store: Any = None
        self._pairs: dict[str, _SenderPair] = {}
        self._pairs_lock = threading.Lock()
        super().__init__(pool, block_manager, config)

    def _extra_handlers(self) -> dict[str, Handler]:
        return {"group": self._op_group, "send": self._op_send}

    def _pair_id(self, request: Header) -> str:
        pair = request.get("pair")
        if not isinstance(pair, str) or len(pair) != 16 or not set(pair) <= _PAIR_CHARS:
            raise KVProtocolError("request needs a 16-hex-digit 'pair'")
        return pair

    def _op_group(self, request: Header, conn: socket.socket) -> None:
        self._check_instance(request)
        pair_id = self._pair_id(request)
        with self._pairs_lock:
            if self._store is None:
                self._store = dist.TCPStore(
                    self.config.group_host,
                    self.config.store_port,
                    None,
                    True,
                    timedelta(seconds=self.config.group_timeout_s),
                    wait_for_workers=False,
                )
            generation = secrets.token_hex(4)
            pair = _SenderPair()
            self._pairs[pair_id] = pair  # a repeated request (peer retrying) replaces the old group
        prefix = f"kv/{self.instance}/{pair_id}/{generation}/"
        host = self.config.advertise_host or self.config.group_host
        send_header(
            conn,
            {
                "ok": True,
                "store_host": host,
                "store_port": self._store.port,
                "prefix": prefix,
                "backend": self._backend,
            },
        )
        try:
            pair.group = make_pair_group(
                self._backend,
                dist.PrefixStore(prefix, self._store),
                0,
                self.config.group_timeout_s,
                self.config.group_host,
            )
        except Exception as exc:  # the peer never joined: drop the pair, keep serving
            pair.error = repr(exc)
            with self._pairs_lock:
                if self._pairs.get(pair_id) is pair:
                    del self._pairs[pair_id]
        finally:
            pair.ready.set()

    def _op_send(self, request: Header, conn: socket.socket) -> None:
        self._check_instance(request)
        pair_id, tag, lease = self._pair_id(request), _int_field(request, "tag"), _lease_id(request)
        with self._pairs_lock:
            pair = self._pairs.get(pair_id)
        if pair is None:
            raise KVProtocolError(f"no process group for pair {pair_id}; request 'group' first")
        if not pair.ready.wait(self.config.group_timeout_s) or pair.group is None:
            raise KVTransferError(f"process group for pair {pair_id} is not available: {pair.error}")
        ids = self.leases.pin(lease)
        try:
            if self.pool.device.type == "cuda":
                torch.cuda.set_device(self.pool.device)
            if self.pool.device.type == "cpu":  # numpy run copies beat index_select on host memory
                packed = torch.empty(self.pool.layout.pool_shape(len(ids)), dtype=self.pool.tensor.dtype)
                runs = matched_runs(ids, range(len(ids)))
                self._copier.copy(planes_u8(self.pool.tensor), planes_u8(packed), runs, False)
            else:
                packed = self.pool.gather(ids).contiguous()
            payload = packed.reshape(-1).view(torch.uint8)
            send_header(conn, {"ok": True, "nbytes": payload.numel()})
            pair.group.send([payload], 1, tag).wait()
            if payload.is_cuda:
                torch.cuda.current_stream(payload.device).synchronize()
        except Exception:
            self.counters.failure()
            raise
        finally:
            self.leases.unpin(lease)
        self.counters.transfer_done(payload.numel(), 0.0)

    def _close_transport(self) -> None:
        with self._pairs_lock:
            self._pairs.clear()
            self._store = None


@dataclass
class _ReceiverPair:
    group: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    tag: int = 0


class NcclReceiver(KVReceiver):
    transport = "nccl"

    def __init__(self, pool: KVPool, config: ReceiverConfig) -> None:
        super().__init__(pool, config)
        self._backend = backend_for(pool)
        self._pair_id = secrets.token_hex(8)
        self._pairs: dict[tuple[str, str], _ReceiverPair] = {}
        self._pairs_lock = threading.Lock()
        self._stores: list[Any] = []

    def _pair(self, shard: ShardRef) -> _ReceiverPair:
        key = (shard.address, shard.instance)
        with self._pairs_lock:
            pair = self._pairs.get(key)
            if pair is not None:
                return pair
            # Created under the lock: two threads must not race to build two groups for one pair.
            reply = self._request(shard, "group", pair=self._pair_id)
            if reply.get("backend") != self._backend:
                raise KVTransferError(f"prefill uses {reply.get('backend')}, this pool needs {self._backend}")
            host, port, prefix = reply.get("store_host"), reply.get("store_port"), reply.get("prefix")
            if not isinstance(host, str) or not isinstance(port, int) or not isinstance(prefix, str):
                raise KVProtocolError(f"malformed group reply {reply!r}")
            timeout = timedelta(seconds=self.config.group_timeout_s)
            store = dist.TCPStore(host, port, None, False, timeout)
            group = make_pair_group(
                self._backend,
                dist.PrefixStore(prefix, store),
                1,
                self.config.group_timeout_s,
                self.config.group_host,
            )
            self._stores.append(store)
            pair = self._pairs[key] = _ReceiverPair(group)
            return pair

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
        pair = self._pair(shard)
        device = self.pool.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        payload = torch.empty(total, dtype=torch.uint8, device=device)
        with pair.lock:
            pair.tag += 1
            reply = self._request(shard, "send", pair=self._pair_id, tag=pair.tag)
            if reply.get("nbytes") != total:
                raise KVProtocolError(
                    f"prefill sends {reply.get('nbytes')} bytes, the handle implies {total}"
                )
            pair.group.recv([payload], 0, pair.tag).wait()
        if on_progress is not None:
            on_progress(total, total)
        packed = payload.view(layout.torch_dtype).view(layout.pool_shape(n))
        actual = None
        if self.config.verify_checksum and shard.checksum is not None:
            planes = planes_u8(packed.cpu()) if packed.is_cuda else planes_u8(packed)
            actual = combine_digests([xxhash.xxh3_64(planes[p]).intdigest() for p in range(planes.shape[0])])
        verified = self._verify(shard, actual)
        if plan.full and device.type == "cpu":
            self._copier.copy(
                planes_u8(packed), planes_u8(self.pool.tensor), matched_runs(range(n), dst_ids), False
            )
        else:
            place(self.pool.tensor, torch.as_tensor(dst_ids, dtype=torch.long, device=device), packed, plan)
        return total, verified

    def _close_transport(self) -> None:
        with self._pairs_lock:
            self._pairs.clear()
            self._stores.clear()
