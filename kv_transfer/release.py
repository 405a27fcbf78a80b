"""Ending leases from a process that holds KV handles but no KV pool (the orchestrator)."""

from __future__ import annotations

import contextlib
import logging

from kv_transfer.control import ControlClient, Header
from kv_transfer.errors import KVLeaseError, KVTransferError
from kv_transfer.handle import KVHandle, ShardRef

log = logging.getLogger(__name__)


def shard_request(control: ControlClient, shard: ShardRef, op: str, **fields: object) -> Header:
    """One control exchange about a shard's lease with the prefill instance that holds it."""
    host, port = shard.host_port
    header: Header = {"op": op, "lease": shard.lease, "instance": shard.instance, **fields}
    try:
        return control.request(host, port, header)
    except (OSError, ConnectionError) as exc:
        raise KVTransferError(f"control request {op!r} to {shard.address} failed: {exc}") from exc


def cancel_shard(control: ControlClient, shard: ShardRef) -> None:
    """Ends a shard's lease, freeing its blocks (a lease that already ended is not an error)."""
    with contextlib.suppress(KVLeaseError):
        shard_request(control, shard, "cancel")


class LeaseReleaser:
    """Releases every shard's lease of a handle nobody will pull (the client went away, or a stop
    word ended the request after prefill). Best effort: a prefill instance that cannot be reached
    expires the lease itself, so `release` logs the failure and returns False instead of raising."""

    def __init__(self, io_timeout_s: float = 5.0) -> None:
        self._control = ControlClient(io_timeout_s)

    def release(self, handle: KVHandle | bytes) -> bool:
        try:
            decoded = handle if isinstance(handle, KVHandle) else KVHandle.decode(handle)
            for shard in decoded.shards:
                cancel_shard(self._control, shard)
        except (KVTransferError, OSError) as exc:
            log.info("KV lease not released (it will expire): %s", exc)
            return False
        return True

    def close(self) -> None:
        self._control.close()
