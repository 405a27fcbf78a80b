"""A worker rank of a tensor-parallel engine: a process that rank 0 starts and supervises.

    python -m engine.parallel.worker --rank R --size N --store-port P --config JSON [--pool DESCRIPTION]

It loads its shard of the weights, attaches the KV pool rank 0 made for it (or allocates its own),
says it is ready in the rendezvous store, joins the group, then runs every plan it reads from
stdin until a STOP plan or end of file. Rank 0's death closes that pipe, so the worker exits (and a
collective it waits in fails on the closed connection); a failure in a step ends the process,
which the other ranks see as a closed connection. It shares rank 0's process group, so stopping
the server's group stops it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

import torch

from engine.config import EngineConfig, ModelConfig
from engine.parallel.channel import read_plan
from engine.parallel.group import GroupReduce, compute_group, rendezvous
from engine.parallel.pools import attach
from engine.runner import ModelRunner, kv_layout_for
from engine.sharding import TPShard
from engine.shm_pool import ShmKVPool
from engine.step_plan import StepKind

log = logging.getLogger("engine.parallel.worker")


def config_to_json(config: EngineConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> EngineConfig:
    raw: dict[str, Any] = json.loads(text)
    raw["device_ids"] = tuple(raw.get("device_ids", ()))
    return EngineConfig(**raw)


def ready_key(rank: int) -> str:
    return f"ready/{rank}"


def serve(rank: int, size: int, store_port: int, config: EngineConfig, pool_description: str) -> None:
    if config.num_threads is not None and config.device == "cpu":
        torch.set_num_threads(config.num_threads)
    store = rendezvous(store_port, rank, size, config.tp_timeout_s)
    device = torch.device(config.rank_device(rank))
    shard = TPShard.of(ModelConfig.from_dir(config.model_dir), rank, size)
    pool = attach(pool_description, kv_layout_for(config), config.num_blocks)
    reduce = GroupReduce()
    runner = ModelRunner(config, shard, device, pool, reduce)
    store.set(ready_key(rank), "1")
    reduce.group = compute_group(store, rank, size, device, config.tp_timeout_s)
    log.info("rank %d/%d ready on %s", rank, size, device)
    stdin = sys.stdin.buffer
    while (plan := read_plan(stdin)) is not None and plan.kind != StepKind.STOP:
        runner.run(plan)
    if isinstance(pool, ShmKVPool):
        pool.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.parallel.worker", description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--store-port", type=int, required=True)
    parser.add_argument("--config", required=True, help="the EngineConfig as JSON")
    parser.add_argument("--pool", default="", help="this rank's KV pool (engine.parallel.pools.describe)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Rank 0 stops this process (STOP, or its pipe closing); a Ctrl-C or the server's SIGINT to
    # the whole process group must not kill it in the middle of a step before rank 0 knows.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(args.rank, args.size, args.store_port, config_from_json(args.config), args.pool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
