"""The prefill instance's engine loop: batch prompts by a token budget, prefill, lease the KV.

A batch takes waiting prompts in arrival order while their total length fits the token budget
(a longer prompt runs alone) and their prompt blocks fit the free pool. The budget is DistServe's
L_m, the tokens that saturate a stage: with pp stages, batches filled to it take similar times in
every stage, and a new one enters stage 0 as soon as stage 0 is free (up to pp in flight). After prefill each
sequence's blocks go under a KV lease (the lease holds its own reference; the engine drops its
own), and the request is answered with the first token and the handle. Prefill memory is the
queue buffer between the phases: when leases fill the pool, batching waits, and decode pulling
(or lease expiry) makes room.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from backends.common import trace
from backends.common.metrics import NULL, Counter, Gauge, Histogram
from backends.common.sink import ResponseSink
from backends.common.worker_loop import WorkerLoop
from backends.message import PrefillResult
from engine.engine import LLMEngine, Step
from engine.sequence import Sequence
from kv_transfer.instance import InstanceSender

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PrefillJob:
    seq: Sequence
    sink: ResponseSink
    arrived: float = field(default_factory=time.perf_counter)
    trace_id: str = ""  # the request_id its trace marks are tagged with (common/trace.py)


class PrefillMetrics(NamedTuple):
    waiting: Gauge = NULL
    free_blocks: Gauge = NULL
    active_leases: Gauge = NULL
    batch_tokens: Histogram = NULL
    queue_seconds: Histogram = NULL
    cancelled: Counter = NULL
    prefill_seconds: Histogram = NULL


class PrefillWorker(WorkerLoop[PrefillJob]):
    def __init__(
        self, engine: LLMEngine, sender: InstanceSender, metrics: PrefillMetrics | None = None
    ) -> None:
        super().__init__("prefill-loop")
        self.engine = engine
        self.sender = sender
        self.metrics = metrics or PrefillMetrics()
        self._waiting: deque[PrefillJob] = deque()
        # Batches launched and not yet completed, oldest first: with pp stages up to pp are in the
        # pipeline at once (a new batch enters stage 0 as soon as stage 0 is free).
        # Each with its launch time (time.perf_counter, and time.time_ns for the perf outputs).
        self._in_flight: deque[tuple[Step, list[PrefillJob], float, int]] = deque()
        self._update_gauges()
        self.start()

    def iterate(self) -> None:
        self._waiting.extend(self.take_new())
        if self.engine.dead is not None:
            self._fail_waiting(f"prefill instance out of service: {self.engine.dead}")
            self.idle(0.2)
            return
        for job in [j for j in self._waiting if j.sink.is_cancelled()]:
            self._waiting.remove(job)
            self.metrics.cancelled.increment(1)
        while len(self._in_flight) < self.engine.config.pp_size and (batch := self._next_batch()):
            self._launch(batch)
        if self._in_flight:
            self._complete(*self._in_flight.popleft())
        else:
            # Nothing fits yet: wait for a request, or for leases to free blocks.
            self._update_gauges()
            self.idle(0.02 if self._waiting else 0.2)

    def on_failure(self, exc: Exception) -> None:
        # _launch and _complete end their own jobs on failure; waiting jobs are untouched.
        pass

    def shutdown(self) -> None:
        self._waiting.extend(self.take_new())
        self._fail_waiting("prefill instance is shutting down")

    def _fail_waiting(self, message: str) -> None:
        """Ends every job not yet prefilled, batches in flight included."""
        for _, batch, _, _ in self._in_flight:
            self._fail_batch(batch, message)
        self._in_flight.clear()
        for job in self._waiting:
            job.sink.error(message)
        self._waiting.clear()

    def _fail_batch(self, batch: list[PrefillJob], message: str) -> None:
        for job in batch:
            self.engine.free(job.seq)
            job.sink.error(message)

    def _next_batch(self) -> list[PrefillJob]:
        budget = self.engine.config.max_num_batched_tokens
        blocks = self.engine.blocks
        batch: list[PrefillJob] = []
        tokens = needed = 0
        for job in self._waiting:
            n = job.seq.prompt_len
            if batch and (tokens + n > budget or len(batch) >= self.engine.config.max_num_seqs):
                break
            if needed + blocks.blocks_for(n) > blocks.num_free:
                break
            batch.append(job)
            tokens += n
            needed += blocks.blocks_for(n)
        for _ in batch:
            self._waiting.popleft()
        return batch

    def _launch(self, batch: list[PrefillJob]) -> None:
        now = time.perf_counter()
        started_ns = time.time_ns()
        for j in batch:
            trace.mark("p.launch", j.trace_id)
        seqs = [j.seq for j in batch]
        try:
            step = self.engine.launch_prefill(seqs)
        except Exception as exc:
            log.exception("prefill failed")
            self._fail_batch(batch, f"prefill failed: {exc}")
            return
        self._in_flight.append((step, batch, now, started_ns))

    def _complete(self, step: Step, batch: list[PrefillJob], launched: float, started_ns: int) -> None:
        try:
            self.engine.complete(step)
            drawn_ns = time.time_ns()
            trace.mark("step")
            for j in batch:
                trace.mark("p.step", j.trace_id)
            prefill_s = time.perf_counter() - launched
        except Exception as exc:
            log.exception("prefill failed")
            self._fail_batch(batch, f"prefill failed: {exc}")
            return
        for job in batch:
            seq = job.seq
            handle = b""
            try:
                if not seq.finished:  # the first token may already end it (EOS, max_tokens=1)
                    handle = self.sender.register(seq.block_table, seq.prompt_len).encode()
            except Exception as exc:
                log.exception("KV lease failed")
                job.sink.error(f"could not lease the KV cache: {exc}")
                continue
            finally:
                self.engine.free(seq)  # the lease holds its own reference
            trace.mark("p.leased", job.trace_id)
            result = PrefillResult(
                first_token=seq.output_ids[0],
                kv_handle=handle,
                finish_reason=seq.finish_reason or "",
                first_log_prob=seq.output_logprobs[0] if seq.params.logprobs else None,
                first_scheduled_time_ns=started_ns,
                first_token_time_ns=drawn_ns,
                kv_blocks=seq.blocks_held,
            )
            job.sink.send(result, final=True)
        # Recorded once the first tokens are on their way (with create() metrics, each is an IPC).
        self.metrics.prefill_seconds.observe(prefill_s)
        self.metrics.batch_tokens.observe(sum(j.seq.prompt_len for j in batch))
        for job in batch:
            self.metrics.queue_seconds.observe(launched - job.arrived)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.free_blocks.set(self.engine.blocks.num_free)
        self.metrics.active_leases.set(self.sender.active_leases())
