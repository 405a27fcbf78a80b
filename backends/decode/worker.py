"""The decode instance's engine loop: pull KV by handle, then continuous batching.

One thread owns the engine. Each loop iteration: take new jobs, admit those whose whole life fits
in memory (their KV then streams in on a transfer thread while decoding goes on), drop cancelled
ones, and run one decode step over every running sequence, sending each new token at once. With
pipeline parallelism the running sequences form pp micro-batches (micro_batches.py): every idle
one is launched into stage 0, then the oldest in flight completes.
Invariants: a job ends with exactly one final response or error; every block a job took is freed
when it ends (finished, cancelled, failed transfer); a job not yet admitted holds no decode memory
(its KV waits in the prefill instance's pool, under lease). A job waiting for memory or for its KV
gets an empty heartbeat response every heartbeat_s, so a caller can tell a slow queue from a dead
instance.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import NamedTuple

from backends.common import trace
from backends.common.metrics import NULL, Counter, Gauge, Histogram
from backends.common.sink import ResponseSink
from backends.common.worker_loop import WorkerLoop
from backends.decode.micro_batches import MicroBatches
from backends.message import ABORT, DecodeChunk
from engine.engine import LLMEngine
from engine.scheduler import fits
from engine.sequence import Sequence, Status
from kv_transfer.handle import KVHandle
from kv_transfer.instance import InstanceReceiver

log = logging.getLogger(__name__)


@dataclass(eq=False)
class DecodeJob:
    seq: Sequence  # prompt_ids, params, seed; output_ids == [first token]; request_id names it
    handle: KVHandle
    sink: ResponseSink
    arrived: float = field(default_factory=time.perf_counter)
    last_sent: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def gone(self) -> bool:
        return self.cancelled or self.sink.is_cancelled()


class DecodeMetrics(NamedTuple):
    running: Gauge = NULL
    waiting: Gauge = NULL
    free_blocks: Gauge = NULL
    batch_size: Histogram = NULL
    kv_transfer_seconds: Histogram = NULL
    kv_transfer_bytes: Counter = NULL
    kv_transfer_failures: Counter = NULL
    cancelled: Counter = NULL


class DecodeWorker(WorkerLoop[DecodeJob]):
    def __init__(
        self,
        engine: LLMEngine,
        receiver: InstanceReceiver,
        metrics: DecodeMetrics | None = None,
        transfer_threads: int = 4,
        heartbeat_s: float = 1.0,
        corked: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        super().__init__("decode-loop")
        self.engine = engine
        self.receiver = receiver
        self.metrics = metrics or DecodeMetrics()
        self.heartbeat_s = heartbeat_s
        # A step's tokens are sent inside corked(): over token channels, in one write per channel.
        self._corked = corked
        self._cancels: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._by_id: dict[str, DecodeJob] = {}
        self._pending: deque[DecodeJob] = deque()  # not yet admitted: no decode memory held
        self._transferring: set[DecodeJob] = set()
        self._arrived: queue.SimpleQueue[tuple[DecodeJob, BaseException | None]] = queue.SimpleQueue()
        self._running: dict[Sequence, DecodeJob] = {}
        self._batches = MicroBatches(engine.config.pp_size)
        self._transfers = ThreadPoolExecutor(transfer_threads, thread_name_prefix="kv-pull")
        self._failed: str | None = None  # every job ends with this error (the engine died)
        self._update_gauges()
        self.start()

    def cancel(self, request_id: str) -> None:
        """Stops the job submitted under request_id (unknown or finished ids are ignored)."""
        self._cancels.put(request_id)
        self.wake()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends every job with an error (server shutting down) and stops the loop."""
        super().stop(timeout)
        self._transfers.shutdown(wait=True, cancel_futures=True)

    # ---- loop ------------------------------------------------------------------------------

    def iterate(self) -> None:
        self._take_new()
        if self.engine.dead is not None:
            self._fail_all(f"decode instance out of service: {self.engine.dead}")
            self.idle(0.2)
            return
        self._drop_cancelled()
        self._admit()
        self._collect_transfers()
        self._heartbeat()
        if self._running:
            self._step()
        else:
            self.idle(0.05)

    def on_failure(self, exc: Exception) -> None:
        self._fail_running(f"decode step failed: {exc}")

    def _take_new(self) -> None:
        for job in self.take_new():
            self._pending.append(job)
            if job.seq.request_id:
                self._by_id[job.seq.request_id] = job
        while True:
            try:
                target = self._by_id.get(self._cancels.get_nowait())
            except queue.Empty:
                return
            if target is not None:
                target.cancelled = True

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._pending if j.gone()]:
            self._pending.remove(job)
            self._release_remote(job)
            self._abort(job)
        for seq, job in list(self._running.items()):
            if job.gone() and not self._batches.in_flight(seq):  # else: once its step is back
                self._retire(seq)
                self._abort(job)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        for job in [*self._pending, *self._transferring]:
            if now - job.last_sent >= self.heartbeat_s:
                job.last_sent = now
                job.sink.send(DecodeChunk(), final=False)  # a heartbeat

    def _end(self, job: DecodeJob, last: DecodeChunk | None = None, error: str | None = None) -> None:
        """Sends the job's final response (or error) and forgets it."""
        self._by_id.pop(job.seq.request_id, None)
        if error is not None:
            job.sink.error(error)
        else:
            job.sink.send(last or DecodeChunk(), final=True)

    def _abort(self, job: DecodeJob) -> None:
        """Ends a job its client or the orchestrator cancelled."""
        self.metrics.cancelled.increment(1)
        self._end(job, DecodeChunk(finish_reason=ABORT))

    def _admit(self) -> None:
        while self._pending:
            job = self._pending[0]
            if len(self._running) + len(self._transferring) >= self.engine.config.max_num_seqs:
                break
            # Reserve the sequence's whole life next to what running and in-flight jobs may still take.
            others = [*self._running, *(j.seq for j in self._transferring)]
            if not fits(job.seq, others, self.engine.blocks):
                break
            self._pending.popleft()
            dst = self.engine.adopt(job.seq)
            self._transferring.add(job)
            self._transfers.submit(self._pull, job, dst)
        self._update_gauges()

    def _pull(self, job: DecodeJob, dst: list[int]) -> None:
        try:
            result = self.receiver.pull(job.handle, dst)
            self.metrics.kv_transfer_seconds.observe(result.seconds)
            self.metrics.kv_transfer_bytes.increment(result.bytes_moved)
            self._arrived.put((job, None))
        except BaseException as exc:
            self._arrived.put((job, exc))
        self.wake()

    def _collect_transfers(self) -> None:
        while True:
            try:
                job, exc = self._arrived.get_nowait()
            except queue.Empty:
                return
            self._transferring.discard(job)
            if self._failed is not None:
                self.engine.free(job.seq)
                self._end(job, error=self._failed)
            elif exc is not None:
                self.metrics.kv_transfer_failures.increment(1)
                self.engine.free(job.seq)
                self._end(job, error=f"KV transfer failed: {exc}")
            elif job.gone():
                self.engine.free(job.seq)
                self._abort(job)
            else:
                job.seq.status = Status.RUNNING
                self._running[job.seq] = job
                self._batches.add(job.seq)

    def _step(self) -> None:
        """Launches every micro-batch that is not in flight, then completes the oldest one."""
        for batch in self._batches.ready():
            self._batches.launched(batch, self.engine.launch_decode(list(batch.seqs)))
            self.metrics.batch_size.observe(len(batch.seqs))
        oldest = self._batches.oldest()
        if oldest is None:
            return
        assert oldest.step is not None
        seqs = oldest.step.seqs
        tokens = self.engine.complete(oldest.step)
        drawn_ns = time.time_ns()
        trace.mark("step")
        self._batches.landed()
        with self._corked():
            for seq, token in zip(seqs, tokens, strict=True):
                self._deliver(seq, token, drawn_ns)
        self._update_gauges()

    def _deliver(self, seq: Sequence, token: int, drawn_ns: int) -> None:
        job = self._running[seq]
        if seq.finished:
            self._retire(seq)
            chunk = DecodeChunk(
                output_ids=(token,),
                finish_reason=seq.finish_reason or "",
                output_log_probs=seq.last_log_probs,
                last_token_time_ns=drawn_ns,
                kv_blocks=seq.blocks_held,  # _retire freed its blocks
            )
            self._end(job, chunk)
        else:
            job.sink.send(DecodeChunk(output_ids=(token,), output_log_probs=seq.last_log_probs), final=False)

    def _retire(self, seq: Sequence) -> None:
        """A running sequence leaves: its micro-batch, the running set, its blocks."""
        del self._running[seq]
        self._batches.remove(seq)
        self.engine.free(seq)

    # ---- endings ---------------------------------------------------------------------------

    def _release_remote(self, job: DecodeJob) -> None:
        try:
            self.receiver.cancel(job.handle)
        except Exception as exc:  # the lease expires anyway
            log.warning("could not cancel KV lease: %s", exc)

    def _fail_running(self, message: str) -> None:
        """Ends every running job with `message`, steps in flight included (the engine died, or
        an iteration failed with them half done)."""
        self._batches.clear()
        for seq, job in list(self._running.items()):
            del self._running[seq]
            self.engine.free(seq)
            self._end(job, error=message)
        self._update_gauges()

    def shutdown(self) -> None:
        self._take_new()
        self._fail_all("decode instance is shutting down")

    def _fail_all(self, message: str) -> None:
        """Ends every job with `message`: waiting ones release their KV lease; transfers in flight
        end with it when they finish (_collect_transfers)."""
        self._failed = message
        for job in self._pending:
            self._release_remote(job)
            self._end(job, error=message)
        self._pending.clear()
        self._fail_running(message)
        self._collect_transfers()

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self._running))
        self.metrics.waiting.set(len(self._pending) + len(self._transferring))
        self.metrics.free_blocks.set(self.engine.blocks.num_free)
