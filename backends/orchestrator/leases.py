"""Releasing a KV lease from the orchestrator (which holds handles but no KV pool)."""

from __future__ import annotations

import logging

from kv_transfer.control import ControlClient
from kv_transfer.errors import KVTransferError
from kv_transfer.handle import KVHandle

log = logging.getLogger(__name__)


class LeaseReleaser:
    """Cancels every shard's lease of a handle nobody will pull (the client went away or a stop
    word ended the request after prefill). Best effort: an unreachable prefill instance expires
    the lease itself."""

    def __init__(self, io_timeout_s: float = 5.0) -> None:
        self._client = ControlClient(io_timeout_s)

    def release(self, handle_bytes: bytes) -> None:
        try:
            handle = KVHandle.decode(handle_bytes)
            for shard in handle.shards:
                host, port = shard.host_port
                self._client.request(
                    host, port, {"op": "cancel", "lease": shard.lease, "instance": shard.instance}
                )
        except (KVTransferError, OSError) as exc:
            log.info("KV lease not released (it will expire): %s", exc)

    def close(self) -> None:
        self._client.close()
