"""Factories: the transport name picks the sender/receiver class (imported on demand)."""

from __future__ import annotations

import importlib

from engine.block_manager import BlockManager
from engine.kv_cache import KVPool
from kv_transfer.base import KVReceiver, KVSender
from kv_transfer.config import ReceiverConfig, SenderConfig
from kv_transfer.handle import TRANSPORTS

_CLASSES = {
    "shm": ("kv_transfer.shm", "ShmSender", "ShmReceiver"),
    "tcp": ("kv_transfer.tcp", "TcpSender", "TcpReceiver"),
    "cuda_ipc": ("kv_transfer.cuda_ipc", "CudaIpcSender", "CudaIpcReceiver"),
    "nccl": ("kv_transfer.nccl", "NcclSender", "NcclReceiver"),
}


def _classes(transport: str) -> tuple[type[KVSender], type[KVReceiver]]:
    if transport not in _CLASSES:
        raise ValueError(f"unknown KV transport {transport!r}; expected one of {TRANSPORTS}")
    module, sender, receiver = _CLASSES[transport]
    mod = importlib.import_module(module)
    return getattr(mod, sender), getattr(mod, receiver)


def create_sender(
    transport: str, pool: KVPool, block_manager: BlockManager, config: SenderConfig | None = None
) -> KVSender:
    """The prefill-side sender of a transport (starts its control server and lease reaper)."""
    return _classes(transport)[0](pool, block_manager, config or SenderConfig())


def create_receiver(transport: str, pool: KVPool, config: ReceiverConfig | None = None) -> KVReceiver:
    """The decode-side receiver of a transport."""
    return _classes(transport)[1](pool, config or ReceiverConfig())
