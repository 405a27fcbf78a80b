"""KV-cache transfer from prefill to decode instances: one interface, transports shm, tcp, cuda_ipc, nccl.

Prefill: ``sender = create_sender("shm", pool, block_manager, SenderConfig(...))``;
``handle = sender.register(block_ids, num_tokens)``; send ``handle.encode()`` to the orchestrator.
Decode: ``receiver = create_receiver("shm", pool, ReceiverConfig(...))``;
``receiver.pull(KVHandle.decode(data), my_block_ids)``. A process with handles but no pool (the
orchestrator) ends a lease nobody will pull with ``LeaseReleaser().release(handle)``. See
docs/kv_transfer.md.
"""

from __future__ import annotations

from kv_transfer.base import KVReceiver, KVSender, PullResult
from kv_transfer.config import ReceiverConfig, SenderConfig
from kv_transfer.counters import CountersSnapshot, TransferCounters
from kv_transfer.errors import (
    KVHandleError,
    KVIntegrityError,
    KVLayoutMismatchError,
    KVLeaseCancelledError,
    KVLeaseError,
    KVLeaseExpiredError,
    KVLeaseReleasedError,
    KVLeaseUnknownError,
    KVProtocolError,
    KVTransferError,
)
from kv_transfer.factory import create_receiver, create_sender
from kv_transfer.handle import HANDLE_VERSION, TRANSPORTS, KVHandle, ShardRef
from kv_transfer.release import LeaseReleaser

__all__ = [
    "HANDLE_VERSION",
    "TRANSPORTS",
    "CountersSnapshot",
    "KVHandle",
    "KVHandleError",
    "KVIntegrityError",
    "KVLayoutMismatchError",
    "KVLeaseCancelledError",
    "KVLeaseError",
    "KVLeaseExpiredError",
    "KVLeaseReleasedError",
    "KVLeaseUnknownError",
    "KVProtocolError",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "LeaseReleaser",
    "PullResult",
    "ReceiverConfig",
    "SenderConfig",
    "ShardRef",
    "TransferCounters",
    "create_receiver",
    "create_sender",
]
