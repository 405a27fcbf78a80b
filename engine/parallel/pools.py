"""How a worker rank opens the KV pool rank 0 made for it, as a string on its command line.

"shm:NAME": a shared-memory segment (CPU); "ipc:JSON": CUDA memory exported over CUDA IPC
(engine.cuda_ipc_pool); "": none, the rank allocates its own (rank 0 then cannot reach it).
"""

from __future__ import annotations

import json

from engine.cuda_ipc_pool import export_pool, import_pool
from engine.kv_cache import KVLayout, KVPool
from engine.shm_pool import ShmKVPool


def describe(pool: KVPool | None) -> str:
    if pool is None:
        return ""
    if isinstance(pool, ShmKVPool):
        return f"shm:{pool.segment_name}"
    if pool.device.type == "cuda":
        return "ipc:" + json.dumps(export_pool(pool), sort_keys=True)
    raise ValueError("a worker rank can only open a pool in shared memory or on a CUDA device")


def attach(description: str, layout: KVLayout, num_blocks: int) -> KVPool | None:
    """The pool `description` names, mapped in this process (writable), or None for ""."""
    kind, _, rest = description.partition(":")
    if not description:
        return None
    if kind == "shm":
        return ShmKVPool.attach(rest, layout, num_blocks, writable=True)
    if kind == "ipc":
        tensor = import_pool(json.loads(rest), layout.pool_shape(num_blocks), layout.torch_dtype)
        return KVPool(layout, tensor)
    raise ValueError(f"unknown pool description {description[:16]!r}")
