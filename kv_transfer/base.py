"""The KV transfer interface: a sender on each prefill rank, a receiver on each decode rank.

Contract (every transport):
- ``KVSender.register(block_ids, num_tokens)`` puts a finished sequence's blocks under a lease (the
  lease takes its own reference, so the engine may drop its reference at once) and returns a
  ``KVHandle``. The blocks are freed when every reading decode rank acknowledged, on cancel, or when
  the lease outlives ``lease_ttl_s`` unacknowledged (a reaper thread checks).
- ``KVReceiver.pull(handle, dst_block_ids)`` checks transport, completeness, layout compatibility and the
  destination blocks BEFORE copying anything, copies this rank's heads of the blocks into its own pool
  (resharding between TP degrees), verifies the checksum where the transport computes one, then
  acknowledges. It raises a ``KVTransferError`` subclass on any failure; the destination blocks then
  hold undefined data and stay the caller's to free. A lease that ended during the pull (cancel,
  expiry) makes the pull fail even if bytes arrived.
- ``KVReceiver.cancel(handle)`` releases the lease without pulling.
- Counters (``counters.snapshot()``) count bytes moved, transfer seconds, leases and failures.
- ``close()`` stops every thread, socket and mapping the object owns; a sender's close frees all leases.
"""

from __future__ import annotations

import secrets
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from engine.block_manager import BlockManager
from engine.kv_cache import KVLayout, KVPool
from kv_transfer.blockcopy import PlaneCopier, planes_u8
from kv_transfer.config import ReceiverConfig, SenderConfig
from kv_transfer.control import ControlClient, ControlServer, Handler, Header
from kv_transfer.counters import TransferCounters
from kv_transfer.errors import (
    KVHandleError,
    KVIntegrityError,
    KVLeaseError,
    KVLeaseUnknownError,
    KVProtocolError,
    KVTransferError,
)
from kv_transfer.handle import KVHandle, ShardRef, runs_of
from kv_transfer.lease import LeaseTable
from kv_transfer.release import cancel_shard, shard_request
from kv_transfer.reshard import Place, ShardPlan, check_compatible, plan_pull

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total) during a pull


class PullResult(NamedTuple):
    bytes_moved: int
    seconds: float
    num_blocks: int
    verified: bool  # every shard's checksum was checked


def _lease_id(request: Header) -> str:
    lease = request.get("lease")
    if not isinstance(lease, str) or len(lease) != 32:
        raise KVProtocolError("request needs a 32-character 'lease'")
    return lease


def _int_field(request: Header, name: str) -> int:
    value = request.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise KVProtocolError(f"request field {name!r} must be an integer")
    return value


class KVSender(ABC):
    """Prefill side of one transport (see the module docstring for the contract)."""

    transport: str

    def __init__(self, pool: KVPool, block_manager: BlockManager, config: SenderConfig) -> None:
        if block_manager.num_blocks != pool.num_blocks:
            raise ValueError(f"block manager has {block_manager.num_blocks} blocks, pool {pool.num_blocks}")
        self.pool = pool
        self.block_manager = block_manager
        self.config = config
        self.instance = secrets.token_hex(8)
        self.counters = TransferCounters()
        on_cuda = pool.device.type == "cuda"
        self._checksum_on = (not on_cuda) if config.checksum is None else config.checksum
        self._copier = PlaneCopier(config.copy_workers)
        self.leases = LeaseTable(block_manager, config.lease_ttl_s, self.counters)
        handlers: dict[str, Handler] = {
            "begin": self._op_begin,
            "ack": self._op_ack,
            "cancel": self._op_cancel,
        }
        handlers.update(self._extra_handlers())
        self._server = ControlServer(config.host, config.port, handlers, config.io_timeout_s)
        host = config.advertise_host or self._server.host
        self.address = f"{host}:{self._server.port}"
        layout = pool.layout
        self.handle_layout = KVLayout(
            config.model_layers or layout.num_layers,
            layout.num_kv_heads * config.tp_size,
            layout.head_dim,
            layout.block_size,
            layout.dtype,
        )

    def register(self, block_ids: Sequence[int], num_tokens: int) -> KVHandle:
        """Leases a finished sequence's blocks (in sequence order) and returns its handle."""
        ids = [int(b) for b in block_ids]
        if not ids or len(set(ids)) != len(ids):
            raise ValueError("register needs a non-empty list of distinct block ids")
        if not all(0 <= b < self.pool.num_blocks for b in ids):
            raise ValueError(f"block ids must be in [0, {self.pool.num_blocks})")
        if self.block_manager.blocks_for(num_tokens) != len(ids):
            raise ValueError(
                f"{num_tokens} tokens need {self.block_manager.blocks_for(num_tokens)} blocks, got {len(ids)}"
            )
        if self.pool.device.type == "cuda":
            # The decode side reads the pool from another process/stream: the prefill writes must be done.
            torch.cuda.current_stream(self.pool.device).synchronize()
        checksum = self._checksum(ids) if self._checksum_on else None
        lease = self.leases.open(ids)
        shard = ShardRef(
            tp_rank=self.config.tp_rank,
            pp_rank=self.config.pp_rank,
            address=self.address,
            lease=lease,
            instance=self.instance,
            block_runs=runs_of(ids),
            pool_blocks=self.pool.num_blocks,
            segment=self._segment(),
            checksum=checksum,
        )
        return KVHandle(
            self.transport,
            num_tokens,
            len(ids),
            self.handle_layout,
            self.config.tp_size,
            (shard,),
            self.config.pp_size,
        )

    def cancel(self, lease_id: str) -> None:
        """Ends a lease locally (e.g. the client went away before decode pulled)."""
        self.leases.cancel(lease_id)

    def close(self) -> None:
        self._server.close()
        self._close_transport()
        self.leases.close()
        self._copier.close()

    def _checksum(self, ids: list[int]) -> str:
        if self.pool.device.type == "cpu":
            return self._copier.checksum(planes_u8(self.pool.tensor), ids)
        packed = self.pool.gather(ids).cpu().contiguous()
        return self._copier.checksum(planes_u8(packed), list(range(len(ids))))

    def _check_instance(self, request: Header) -> None:
        if request.get("instance") != self.instance:
            raise KVLeaseUnknownError(
                f"handle names sender instance {request.get('instance')!r}, this is {self.instance} (restarted?)"
            )

    def _op_begin(self, request: Header, conn: socket.socket) -> Header:
        self._check_instance(request)
        self.leases.check(_lease_id(request))
        return {"ok": True}

    def _op_ack(self, request: Header, conn: socket.socket) -> Header:
        self._check_instance(request)
        ended = self.leases.ack(
            _lease_id(request), _int_field(request, "reader"), _int_field(request, "readers")
        )
        return {"ok": True, "released": ended}

    def _op_cancel(self, request: Header, conn: socket.socket) -> Header:
        self._check_instance(request)
        self.leases.cancel(_lease_id(request))
        return {"ok": True}

    def _segment(self) -> str | None:
        return None

    def _extra_handlers(self) -> dict[str, Handler]:
        return {}

    def _close_transport(self) -> None:  # noqa: B027 - optional hook
        pass


class KVReceiver(ABC):
    """Decode side of one transport (see the module docstring for the contract)."""

    transport: str

    def __init__(self, pool: KVPool, config: ReceiverConfig) -> None:
        self.pool = pool
        self.config = config
        self.place = Place(config.tp_rank, config.tp_size, config.pp_rank, config.pp_size)
        self.counters = TransferCounters()
        self._control = ControlClient(config.io_timeout_s)
        self._copier = PlaneCopier(config.copy_workers)

    def pull(
        self, handle: KVHandle, dst_block_ids: Sequence[int], on_progress: ProgressFn | None = None
    ) -> PullResult:
        """Copies the handle's blocks into dst_block_ids of this pool, verifies, acknowledges."""
        start = time.perf_counter()
        moved, verified = 0, True
        try:
            dst = self._validate(handle, dst_block_ids)
            layout = handle.layout
            plans = plan_pull(
                layout.num_kv_heads, layout.num_layers, handle.tp_size, handle.pp_size, self.place
            )
            for plan in plans:
                shard = handle.shards[plan.shard_index]
                try:
                    n, ok = self._pull_shard(handle, shard, plan, dst, on_progress)
                except (OSError, ConnectionError) as exc:
                    self._raise_lease_reason(shard)
                    raise KVTransferError(f"KV transfer from {shard.address} failed: {exc}") from exc
                except KVTransferError as exc:
                    if not isinstance(exc, KVLeaseError):
                        self._raise_lease_reason(shard)
                    raise
                moved += n
                verified = verified and ok
            if self.pool.device.type == "cuda":
                torch.cuda.current_stream(self.pool.device).synchronize()
            for plan in plans:
                self._request(
                    handle.shards[plan.shard_index], "ack", reader=plan.reader, readers=plan.readers
                )
        except BaseException:
            self.counters.failure()
            raise
        seconds = time.perf_counter() - start
        self.counters.transfer_done(moved, seconds)
        return PullResult(moved, seconds, handle.num_blocks, verified)

    def cancel(self, handle: KVHandle) -> None:
        """Releases every shard's lease without pulling (an already-ended lease is not an error)."""
        for shard in handle.shards:
            cancel_shard(self._control, shard)

    def close(self) -> None:
        self._close_transport()
        self._control.close()
        self._copier.close()

    @abstractmethod
    def _pull_shard(
        self,
        handle: KVHandle,
        shard: ShardRef,
        plan: ShardPlan,
        dst_ids: list[int],
        on_progress: ProgressFn | None,
    ) -> tuple[int, bool]:
        """Copies one shard's part into the pool; returns (bytes moved, checksum verified)."""

    def _close_transport(self) -> None:  # noqa: B027 - optional hook
        pass

    def _request(self, shard: ShardRef, op: str, **fields: object) -> Header:
        return shard_request(self._control, shard, op, **fields)

    def _raise_lease_reason(self, shard: ShardRef) -> None:
        """After a failed transfer: raises the lease's error if the lease ended (e.g. cancelled meanwhile)."""
        try:
            self._request(shard, "begin")
        except KVLeaseError:
            raise
        except KVTransferError:
            return

    def _validate(self, handle: KVHandle, dst_block_ids: Sequence[int]) -> list[int]:
        if handle.transport != self.transport:
            raise KVHandleError(
                f"handle is for transport {handle.transport!r}, this receiver is {self.transport!r}"
            )
        if not handle.complete:
            raise KVHandleError(
                f"handle has {len(handle.shards)} of {handle.tp_size * handle.pp_size} shards; merge them first"
            )
        check_compatible(handle.layout, handle.tp_size, handle.pp_size, self.pool.layout, self.place)
        dst = [int(b) for b in dst_block_ids]
        if len(dst) != handle.num_blocks:
            raise ValueError(f"handle has {handle.num_blocks} blocks, got {len(dst)} destination blocks")
        if len(set(dst)) != len(dst) or not all(0 <= b < self.pool.num_blocks for b in dst):
            raise ValueError(f"destination blocks must be distinct ids in [0, {self.pool.num_blocks})")
        return dst

    def _verify(self, shard: ShardRef, actual: str | None) -> bool:
        """True if checked; raises KVIntegrityError on a mismatch."""
        if not self.config.verify_checksum or shard.checksum is None or actual is None:
            return False
        if actual != shard.checksum:
            raise KVIntegrityError(
                f"KV checksum mismatch for lease {shard.lease} from {shard.address}: expected {shard.checksum}, got {actual}"
            )
        return True
