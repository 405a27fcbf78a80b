"""Rank 0 of a parallel engine: it starts the worker ranks, sends them each step's plan, runs its
own shard (stage 0's), and watches them.

Supervision: a watcher thread polls the workers; one that exits marks the executor dead with a
message naming the rank and its exit code. A step then fails at once (or, if the death happens
during the step, as soon as the collective sees the closed connection), with EngineDeadError;
every later step is refused with the same error. close() sends STOP, waits, then kills. Workers
never outlive rank 0: their stdin is rank 0's pipe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig, ModelConfig
from engine.errors import EngineDeadError
from engine.kv_cache import KVPool
from engine.parallel.channel import write_plan
from engine.parallel.group import LOCALHOST, RankGroups, Topology, rendezvous
from engine.parallel.pools import describe
from engine.parallel.relay import Sending, receive, send
from engine.parallel.worker import config_to_json, ready_key
from engine.runner import ForwardOutput, ModelRunner
from engine.sharding import Stage, TPShard
from engine.step_plan import StepKind, StepPlan

log = logging.getLogger(__name__)
POLL_S = 0.1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class InFlight:
    """A step rank 0 has launched: its part is done, the rest of the pipeline may still run."""

    plan: StepPlan
    output: ForwardOutput | None  # the whole step's, when rank 0 holds the last stage
    sending: Sending | None  # rank 0's hidden states on their way to stage 1
    times: list[tuple[float, float]]  # rank 0's (start, end)


class ParallelExecutor:
    """Runs step plans on all tp_size x pp_size ranks. `pools`: every rank's KV pool, made by the
    caller so that rank 0 can reach them all (shared memory on CPU, the rank's GPU on CUDA; see
    engine.parallel.pools), or None (each rank allocates its own).

    launch() sends the plan to the workers and runs rank 0's stage; with pp > 1 it returns while
    the later stages still work, so rank 0 can launch the next micro-batch into stage 0 at once.
    complete() waits for the step's logits (from the last stage) in launch order."""

    def __init__(self, config: EngineConfig, pools: Sequence[KVPool] | None = None) -> None:
        self.topology = Topology(config.tp_size, config.pp_size)
        size = self.topology.size
        if pools is not None and len(pools) != size:
            raise ValueError(f"a parallel engine of {size} ranks needs {size} pools, got {len(pools)}")
        self.config = config
        self._dead: str | None = None
        self._lock = threading.Lock()
        port = _free_port()
        self._store = rendezvous(port, 0, size, config.tp_timeout_s)
        self._workers = [self._spawn(rank, port, pools) for rank in range(1, size)]
        try:
            mc = ModelConfig.from_dir(config.model_dir)
            shard, stage = TPShard.of(mc, 0, config.tp_size), Stage.of(mc.num_layers, 0, config.pp_size)
            self.groups = RankGroups(self.topology, 0)
            device = torch.device(config.rank_device(0))
            reduce = self.groups.all_reduce if shard.size > 1 else None
            self.runner = ModelRunner(config, shard, device, pools[0] if pools else None, reduce, stage)
            self._wait_ready()
            self.groups.form(self._store, device, config.tp_timeout_s)
        except BaseException:
            self._kill()
            raise
        self._vocab = mc.vocab_size
        self._watcher = threading.Thread(target=self._watch, name="engine-ranks-watch", daemon=True)
        self._watcher.start()

    @property
    def dead(self) -> str | None:
        """Why the executor can no longer run steps, or None while every rank is alive."""
        return self._dead

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._workers]

    def run(self, plan: StepPlan) -> ForwardOutput:
        """A whole step on every rank."""
        return self.complete(self.launch(plan))

    def launch(self, plan: StepPlan) -> InFlight:
        """Sends the plan to every worker and runs rank 0's stage; raises EngineDeadError once a
        rank has died."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        with self._failing():
            for proc in self._workers:
                assert proc.stdin is not None
                write_plan(proc.stdin, plan)
            start = time.monotonic()
            out = self.runner.run(plan)
            times = [(start, time.monotonic())]
            if self.topology.pp == 1:
                return InFlight(plan, out._replace(stage_times=times), None, times)
            assert out.hidden is not None and self.groups.next is not None
            return InFlight(plan, None, send(self.groups.next, 1, out.hidden, out.seq_ids, times), times)

    def complete(self, flight: InFlight) -> ForwardOutput:
        """The step's logits (rank 0 samples from them), with every stage's (start, end)."""
        if flight.output is not None:
            return flight.output
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        with self._failing():
            assert flight.sending is not None and self.groups.out is not None
            flight.sending.wait()
            n = len(flight.plan.seq_ids)
            got = receive(
                self.groups.out, 1, (n, self._vocab), torch.float32, self.runner.device, n, self.topology.pp
            )
            return ForwardOutput(got.tensor, got.order, None, got.times)

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
            _python(), "-m", "engine.parallel.worker", "--rank", str(rank), "--store-port", str(port), "--config", config_to_json(self.config), "--pool", pool,
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
                    f"engine ranks {sorted(waiting)} not ready in {self.config.tp_timeout_s:g} s"
                )
            time.sleep(POLL_S)

    def _rank_name(self, rank: int) -> str:
        return f"tensor-parallel rank {rank}" if self.topology.pp == 1 else f"engine rank {rank}"

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
                    stage, t = self.topology.place(rank)
                    return (
                        f"{self._rank_name(rank)} (stage {stage}, tensor-parallel rank {t}; pid {proc.pid}) "
                        f"exited with code {proc.returncode}"
                    )
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S / 4)

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
                log.error("engine out of service: %s", reason)

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """A broken pipe or a collective that lost a peer takes the engine out of service."""
        try:
            yield
        except (OSError, RuntimeError) as exc:
            self._fail(self._exited(wait_s=2.0) or f"parallel engine step failed: {exc}")
            raise EngineDeadError(self._dead or str(exc)) from exc

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
