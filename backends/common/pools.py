"""The KV pools of an instance's ranks, where rank 0 can reach them all.

Rank 0 moves KV in and out of every rank's pool (kv_transfer.instance), and the shm transport
reads a prefill pool from the decode process. On CPU such pools live in shared memory, created by
rank 0 and attached by the worker ranks; their names start with the server's process-group
prefix, so the launcher removes them even when this process was killed before close(). On CUDA
rank 0 allocates each rank's pool on that rank's GPU and the worker opens it over CUDA IPC.
"""

from __future__ import annotations

import os
import secrets

from backends.process_group import kv_segment_prefix
from engine.config import EngineConfig
from engine.kv_cache import KVPool
from engine.runner import kv_layout_for
from engine.shm_pool import ShmKVPool


class RankPools:
    """The pools of every rank (None: each rank allocates its own, unreachable by rank 0)."""

    def __init__(self, config: EngineConfig, shared: bool) -> None:
        self.pools: list[KVPool] | None = None
        if not shared:
            return
        prefix = kv_segment_prefix(os.getpgrp())
        self.pools = []
        try:
            for rank in range(config.world_size):  # stage-major: rank = stage * tp_size + t
                layout = kv_layout_for(config, stage=rank // config.tp_size)
                if config.device == "cpu":
                    self.pools.append(
                        ShmKVPool.create(layout, config.num_blocks, prefix + secrets.token_hex(6))
                    )
                else:  # on the rank's GPU; the worker rank opens it over CUDA IPC
                    self.pools.append(KVPool.allocate(layout, config.num_blocks, config.rank_device(rank)))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unlinks the segments (after the engine's workers have stopped)."""
        for pool in self.pools or []:
            if isinstance(pool, ShmKVPool):
                pool.close()
