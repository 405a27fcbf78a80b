"""A worker rank of a tensor-parallel engine: a process that rank 0 starts and supervises.

    python -m engine.parallel.worker --rank R --store-port P --config JSON [--pool DESCRIPTION]

It loads its share of the weights (its stage's layers, its tensor-parallel slice), opens the KV
pool rank 0 made for it (or allocates its own), says it is ready in the rendezvous store, forms its
groups, then runs every plan it reads from stdin until a STOP plan or end of file: a stage after
the first waits for the previous stage's hidden states, and every stage passes its own on (the
last stage's rank 0 sends the logits to rank 0). Rank 0's death closes that pipe, so the worker exits (and a
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
import time
from collections.abc import Sequence
from typing import Any

import torch

from engine.config import EngineConfig, ModelConfig
from engine.parallel.channel import read_plan
from engine.parallel.group import RankGroups, Topology, rendezvous
from engine.parallel.pools import attach
from engine.parallel.relay import receive, send
from engine.runner import ModelRunner, kv_layout_for
from engine.sharding import Stage, TPShard
from engine.shm_pool import ShmKVPool
from engine.step_plan import StepKind, StepPlan

log = logging.getLogger("engine.parallel.worker")


def config_to_json(config: EngineConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> EngineConfig:
    raw: dict[str, Any] = json.loads(text)
    raw["device_ids"] = tuple(raw.get("device_ids", ()))
    return EngineConfig(**raw)


def ready_key(rank: int) -> str:
    return f"ready/{rank}"


def serve(rank: int, store_port: int, config: EngineConfig, pool_description: str) -> None:
    if config.num_threads is not None and config.device == "cpu":
        torch.set_num_threads(config.num_threads)
    topology = Topology(config.tp_size, config.pp_size)
    store = rendezvous(store_port, rank, topology.size, config.tp_timeout_s)
    device = torch.device(config.rank_device(rank))
    mc = ModelConfig.from_dir(config.model_dir)
    stage_index, t = topology.place(rank)
    shard, stage = TPShard.of(mc, t, config.tp_size), Stage.of(mc.num_layers, stage_index, config.pp_size)
    pool = attach(pool_description, kv_layout_for(config, mc, stage_index), config.num_blocks)
    groups = RankGroups(topology, rank)
    runner = ModelRunner(config, shard, device, pool, groups.all_reduce if shard.size > 1 else None, stage)
    store.set(ready_key(rank), "1")
    groups.form(store, device, config.tp_timeout_s)
    log.info(
        "rank %d/%d (stage %d, tensor-parallel rank %d) ready on %s",
        rank,
        topology.size,
        stage_index,
        t,
        device,
    )
    stdin = sys.stdin.buffer
    while (plan := read_plan(stdin)) is not None and plan.kind != StepKind.STOP:
        run_stage(runner, groups, plan)
    if isinstance(pool, ShmKVPool):
        pool.close()


def run_stage(runner: ModelRunner, groups: RankGroups, plan: StepPlan) -> None:
    """This rank's part of a step: the previous stage's hidden states in, this stage's out to the
    next stage (or, from the last stage's rank 0, the logits to rank 0)."""
    stage = runner.stage
    times: list[tuple[float, float]] = []
    hidden, order = None, None
    if not stage.is_first:
        rows = sum(plan.num_tokens) if plan.kind == StepKind.PREFILL else len(plan.seq_ids)
        got = receive(
            groups.prev, 0, (rows, runner.model_config.hidden_size), runner.dtype, runner.device,
            len(plan.seq_ids), stage.index,
        )  # fmt: skip
        hidden, order, times = got.tensor, got.order, got.times
    start = time.monotonic()
    out = runner.run(plan, hidden, order)
    times = [*times, (start, time.monotonic())]
    if not stage.is_last:
        assert out.hidden is not None
        send(groups.next, 1, out.hidden, out.seq_ids, times).wait()
    elif out.logits is not None:  # the last stage's rank 0
        send(groups.out, 0, out.logits, out.seq_ids, times).wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.parallel.worker", description=__doc__)
    parser.add_argument("--rank", type=int, required=True, help="stage * tp_size + tensor-parallel rank")
    parser.add_argument("--store-port", type=int, required=True)
    parser.add_argument("--config", required=True, help="the EngineConfig as JSON")
    parser.add_argument("--pool", default="", help="this rank's KV pool (engine.parallel.pools.describe)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Rank 0 stops this process (STOP, or its pipe closing); a Ctrl-C or the server's SIGINT to
    # the whole process group must not kill it in the middle of a step before rank 0 knows.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(args.rank, args.store_port, config_from_json(args.config), args.pool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
