"""Rank 0 of a tensor-parallel engine: it starts the worker ranks, sends them each step's plan,
runs its own shard, and watches them.

Supervision: a watcher thread polls the workers; one that exits marks the executor dead with a
message naming the rank and its exit code. A step then fails at once (or, if the death happens
during the step, as soon as the collective sees the closed connection), with EngineDeadError;
every later step is refused with the same error. close() sends STOP, waits, then kills. Workers
never outlive rank 0: their stdin is rank 0's pipe.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.config import EngineConfig, ModelConfig
from engine.errors import EngineDeadError
from engine.kv_cache import KVPool
from engine.parallel.channel import write_plan
from engine.parallel.group import LOCALHOST, GroupReduce, compute_group, rendezvous
from engine.parallel.pools import describe
from engine.parallel.worker import config_to_json, ready_key
from engine.runner import ForwardOutput, ModelRunner
from engine.sharding import TPShard
from engine.step_plan import StepKind, StepPlan

log = logging.getLogger(__name__)
POLL_S = 0.1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


class TensorParallelExecutor:
    """Runs step plans on all `config.tp_size` ranks. `pools`: every rank's KV pool, made by the
    caller so that rank 0 can reach them all (shared memory on CPU, rank r's GPU on CUDA; see
    engine.parallel.pools), or None (each rank allocates its own)."""

    def __init__(self, config: EngineConfig, pools: Sequence[KVPool] | None = None) -> None:
        size = config.tp_size
        if pools is not None and len(pools) != size:
            raise ValueError(f"a tensor-parallel engine of {size} ranks needs {size} pools, got {len(pools)}")
        self.config = config
        self._dead: str | None = None
        self._lock = threading.Lock()
        port = _free_port()
        self._store = rendezvous(port, 0, size, config.tp_timeout_s)
        self._workers = [self._spawn(rank, port, pools) for rank in range(1, size)]
        try:
            shard = TPShard.of(ModelConfig.from_dir(config.model_dir), 0, size)
            reduce = GroupReduce()
            device = torch.device(config.rank_device(0))
            self.runner = ModelRunner(config, shard, device, pools[0] if pools else None, reduce)
            self._wait_ready()
            reduce.group = compute_group(self._store, 0, size, device, config.tp_timeout_s)
        except BaseException:
            self._kill()
            raise
        self._watcher = threading.Thread(target=self._watch, name="tp-watch", daemon=True)
        self._watcher.start()

    @property
    def dead(self) -> str | None:
        """Why the executor can no longer run steps, or None while every rank is alive."""
        return self._dead

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._workers]

    def run(self, plan: StepPlan) -> ForwardOutput:
        """Runs a plan on every rank; raises EngineDeadError once a worker has died."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        try:
            for proc in self._workers:
                assert proc.stdin is not None
                write_plan(proc.stdin, plan)
            return self.runner.run(plan)
        except (OSError, RuntimeError) as exc:  # a broken pipe, or a collective that lost a peer
            self._fail(self._exited(wait_s=2.0) or f"tensor-parallel step failed: {exc}")
            raise EngineDeadError(self._dead or str(exc)) from exc

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops every worker (STOP, then SIGKILL after `timeout_s`). Idempotent."""
        with self._lock:
            if self._dead is None:
                self._dead = "the engine was shut down"
        for proc in self._workers:
            try:
                assert proc.stdin is not None
                write_plan(proc.stdin, StepPlan(StepKind.STOP))
                proc.stdin.close()
            except (OSError, ValueError):
                pass  # already gone
        deadline = time.monotonic() + timeout_s
        for proc in self._workers:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ---- internals -------------------------------------------------------------------------

    def _spawn(self, rank: int, port: int, pools: Sequence[KVPool] | None) -> subprocess.Popen[bytes]:
        pool = describe(pools[rank] if pools is not None else None)
        cmd = [
            _python(), "-m", "engine.parallel.worker", "--rank", str(rank), "--size", str(self.config.tp_size),
            "--store-port", str(port), "--config", config_to_json(self.config), "--pool", pool,
        ]  # fmt: skip
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, env=_worker_env())

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.tp_timeout_s
        waiting = {rank: proc for rank, proc in enumerate(self._workers, start=1)}
        while waiting:
            for rank, proc in list(waiting.items()):
                if proc.poll() is not None:
                    raise EngineDeadError(
                        f"tensor-parallel rank {rank} exited with code {proc.returncode} at start-up"
                    )
                if self._store.check([ready_key(rank)]):
                    del waiting[rank]
            if time.monotonic() > deadline:
                raise EngineDeadError(
                    f"tensor-parallel ranks {sorted(waiting)} not ready in {self.config.tp_timeout_s:g} s"
                )
            time.sleep(POLL_S)

    def _watch(self) -> None:
        while self._dead is None:
            exited = self._exited()
            if exited is not None:
                self._fail(exited)
                return
            time.sleep(POLL_S)

    def _exited(self, wait_s: float = 0.0) -> str | None:
        """Names the first worker that exited (waiting up to `wait_s` for one to), or None."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, proc in enumerate(self._workers, start=1):
                if proc.poll() is not None:
                    return f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.returncode}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S / 4)

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
                log.error("engine out of service: %s", reason)

    def _kill(self) -> None:
        for proc in self._workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _python() -> str:
    """This interpreter (inside Triton's python backend stub, sys.executable may be the stub
    itself: then the python3 first on PATH, which is the stub's environment)."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    found = shutil.which("python3")
    if found is None:
        raise EngineDeadError("no python3 on PATH to start the tensor-parallel workers with")
    return found


def _worker_env() -> dict[str, str]:
    """This environment, with the project's packages importable from wherever they are here."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env
