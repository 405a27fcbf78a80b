"""A prefill peer process (synthetic pool + sender) driven over a multiprocessing pipe.

Used by the benchmark and the two-process tests: the parent starts ``prefill_peer_main`` with the
'spawn' start method and sends JSON commands (``send_bytes``), one reply per command. The pool holds
``logical_kv`` (deterministic integer-valued data, exact in every KV dtype) for this rank's heads, so
the decode side can recompute what it should receive.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from engine.block_manager import BlockManager
from engine.kv_cache import KVLayout, KVPool
from engine.sharding import Stage
from engine.shm_pool import ShmKVPool
from kv_transfer.base import KVSender
from kv_transfer.config import SenderConfig
from kv_transfer.factory import create_sender


def logical_kv(layout: KVLayout, num_blocks: int, seed: int) -> torch.Tensor:
    """The model-wide KV content [layers, 2, blocks, block_size, total_heads, head_dim] of a test pool."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-128, 128, layout.pool_shape(num_blocks), generator=g, dtype=torch.int16)
    return values.to(layout.torch_dtype)


def head_slice(total_heads: int, tp_size: int, tp_rank: int) -> slice:
    width = total_heads // tp_size
    return slice(tp_rank * width, (tp_rank + 1) * width)


def call(conn: Connection, proc: BaseProcess | None = None, **command: Any) -> dict[str, Any]:
    """Sends one command to a peer and returns its reply (RuntimeError on a peer error or exit)."""
    conn.send_bytes(json.dumps(command).encode())
    while proc is not None and not conn.poll(0.5):
        if not proc.is_alive():
            raise RuntimeError(f"prefill peer exited with code {proc.exitcode}")
    reply: dict[str, Any] = json.loads(conn.recv_bytes())
    if "error" in reply:
        raise RuntimeError(f"prefill peer: {reply['error']}")
    return reply


class _Sender:
    """One synthetic prefill pool with its block manager and sender."""

    def __init__(self, spec: dict[str, Any]) -> None:
        total = KVLayout(**spec["layout"])
        tp_size, tp_rank = spec.get("tp_size", 1), spec.get("tp_rank", 0)
        pp_size, pp_rank = spec.get("pp_size", 1), spec.get("pp_rank", 0)
        layers = Stage.of(total.num_layers, pp_rank, pp_size).layers
        local = dataclasses.replace(total.tp_shard(tp_size), num_layers=len(layers))
        n = spec["num_blocks"]
        device = spec.get("device", "cpu")
        self.pool: KVPool = (
            ShmKVPool.create(local, n) if spec["transport"] == "shm" else KVPool.allocate(local, n, device)
        )
        data = logical_kv(total, n, spec["seed"])[layers.start : layers.stop][
            :, :, :, :, head_slice(total.num_kv_heads, tp_size, tp_rank)
        ]
        self.pool.tensor.copy_(data)
        del data
        self.bm = BlockManager(n, total.block_size)
        config = SenderConfig(
            lease_ttl_s=spec.get("ttl", 30.0), tp_size=tp_size, tp_rank=tp_rank, checksum=spec.get("checksum"),
            pp_size=pp_size, pp_rank=pp_rank, model_layers=total.num_layers,
        )  # fmt: skip
        self.sender: KVSender = create_sender(spec["transport"], self.pool, self.bm, config)

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["cmd"]
        if op == "allocate":
            return {"block_ids": self.bm.allocate(cmd["n"])}
        if op == "free":
            self.bm.free(cmd["block_ids"])
            return {}
        if op == "register":
            handle = self.sender.register(cmd["block_ids"], cmd["num_tokens"])
            if cmd.get("drop", True):
                self.bm.free(cmd["block_ids"])  # the engine's reference; the lease holds its own
            return {"handle": handle.encode().decode()}
        if op == "status":
            return {"num_free": self.bm.num_free, "counters": self.sender.counters.snapshot()._asdict()}
        if op == "cancel":
            self.sender.cancel(cmd["lease"])
            return {}
        raise ValueError(f"unknown command {op!r}")

    def close(self) -> dict[str, Any]:
        self.sender.close()
        segment = None
        if isinstance(self.pool, ShmKVPool):
            segment = self.pool.segment_name
            self.pool.close()
        return {"num_free": self.bm.num_free, "segment": segment}


def prefill_peer_main(conn: Connection) -> None:
    """Entry point of the peer process.

    Commands: 'start' (a new sender; replies its "sid" and address), then commands naming a "sid"
    (allocate, free, register, status, cancel, close), and finally 'stop' (or the pipe closing).
    """
    senders: dict[int, _Sender] = {}
    try:
        while True:
            cmd = json.loads(conn.recv_bytes())
            if cmd["cmd"] == "stop":
                break
            try:
                if cmd["cmd"] == "start":
                    sid = len(senders)
                    senders[sid] = _Sender(cmd)
                    reply: dict[str, Any] = {"sid": sid, "address": senders[sid].sender.address}
                elif cmd["cmd"] == "close":
                    reply = senders.pop(cmd["sid"]).close()
                else:
                    reply = senders[cmd["sid"]].handle(cmd)
            except Exception as exc:
                reply = {"error": f"{exc!r}\n{traceback.format_exc()}"}
            conn.send_bytes(json.dumps(reply).encode())
    except EOFError:
        return  # parent gone; the finally block still releases everything
    finally:
        for s in senders.values():
            s.close()
    conn.send_bytes(b"{}")


class PrefillPeer:
    """The parent's side of a peer process: each start() makes a new sender there and returns its id."""

    def __init__(self, conn: Connection, proc: BaseProcess | None = None) -> None:
        self.conn = conn
        self.proc = proc

    def start(self, transport: str, layout: KVLayout, num_blocks: int, seed: int, **options: Any) -> int:
        """A new sender over a pool of num_blocks holding logical_kv(layout, num_blocks, seed).

        layout is the model-wide layout (all layers, all heads); options: tp_size, tp_rank, pp_size,
        pp_rank, ttl, checksum, device.
        """
        reply = call(
            self.conn,
            self.proc,
            cmd="start",
            transport=transport,
            layout=layout.to_dict(),
            num_blocks=num_blocks,
            seed=seed,
            **options,
        )
        return int(reply["sid"])

    def __call__(self, sid: int, cmd: str, **args: Any) -> dict[str, Any]:
        return call(self.conn, self.proc, sid=sid, cmd=cmd, **args)

    def num_free(self, sid: int) -> int:
        return int(self(sid, "status")["num_free"])

    def counters(self, sid: int) -> dict[str, Any]:
        return dict(self(sid, "status")["counters"])


@contextmanager
def spawn_prefill_peer() -> Iterator[PrefillPeer]:
    """Starts a peer process ('spawn'), yields its client, and stops it (every sender closed) on exit."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=prefill_peer_main, args=(child,), daemon=True)
    proc.start()
    try:
        yield PrefillPeer(conn, proc)
    finally:
        try:
            conn.send_bytes(json.dumps({"cmd": "stop"}).encode())
            conn.recv_bytes()
        except (EOFError, OSError):
            pass
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()
