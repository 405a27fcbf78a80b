"""The colocated instance's loop: the engine's own scheduler (prefill first, then decode steps
over every running sequence, as vLLM does), streaming each token to its client."""

from __future__ import annotations

import time
from typing import NamedTuple

from backends.common import trace
from backends.common.client_stream import ClientStream
from backends.common.metrics import NULL, Counter, Gauge, Histogram
from backends.common.worker_loop import WorkerLoop
from engine.engine import LLMEngine
from engine.sequence import Sequence


class ColocatedMetrics(NamedTuple):
    running: Gauge = NULL
    waiting: Gauge = NULL
    free_blocks: Gauge = NULL
    batch_size: Histogram = NULL
    cancelled: Counter = NULL
    prefill_seconds: Histogram = NULL


class ColocatedWorker(WorkerLoop[tuple[Sequence, ClientStream]]):
    def __init__(self, engine: LLMEngine, metrics: ColocatedMetrics | None = None) -> None:
        super().__init__("colocated-loop")
        self.engine = engine
        self.metrics = metrics or ColocatedMetrics()
        self._streams: dict[Sequence, ClientStream] = {}
        self._update_gauges()
        self.start()

    def iterate(self) -> None:
        for seq, stream in self.take_new():
            self._streams[seq] = stream
            self.engine.add(seq)
        if self.engine.dead is not None:
            self._end_all(f"colocated instance out of service: {self.engine.dead}")
            self.idle(0.2)
            return
        self._drop_cancelled()
        started, started_ns = time.perf_counter(), time.time_ns()
        result = self.engine.step()
        drawn_ns = time.time_ns()
        if result.kind == "prefill":
            self.metrics.prefill_seconds.observe(time.perf_counter() - started)
        if result.kind == "idle":
            self.idle(0.05)
            return
        trace.mark("step" if result.kind == "decode" else result.kind)
        if result.kind == "decode":
            self.metrics.batch_size.observe(len(result.outputs))
        for out in result.outputs:
            seq = out.seq
            reason = seq.finish_reason if seq.finished else None
            stream = self._streams[seq]
            if stream.perf is not None:
                prefilled = result.kind == "prefill"
                stream.perf.record(
                    first_scheduled_ns=started_ns if prefilled else None,
                    first_token_ns=drawn_ns if prefilled else None,
                    last_token_ns=drawn_ns if seq.finished else None,
                    # The engine freed a finished sequence's blocks: blocks_held is what it had.
                    kv_blocks=seq.blocks_held if seq.finished else None,
                )
            ended = stream.push([out.token], reason, seq.last_log_probs)
            if ended:
                del self._streams[seq]
                if not seq.finished:  # a stop word ended it
                    self.engine.abort(seq)
        self._update_gauges()

    def on_failure(self, exc: Exception) -> None:
        self._end_all(f"colocated step failed: {exc}")

    def shutdown(self) -> None:
        for seq, stream in self.take_new():
            self._streams[seq] = stream
        self._end_all("colocated instance is shutting down")

    def _end_all(self, message: str) -> None:
        for seq, stream in list(self._streams.items()):
            self.engine.abort(seq)
            stream.error(message)
        self._streams.clear()

    def _drop_cancelled(self) -> None:
        for seq, stream in list(self._streams.items()):
            if stream.is_cancelled():
                stream.cancelled()
                del self._streams[seq]
                self.engine.abort(seq)
                self.metrics.cancelled.increment(1)

    def _update_gauges(self) -> None:
        sched = self.engine.scheduler
        self.metrics.running.set(len(sched.running))
        self.metrics.waiting.set(len(sched.waiting))
        self.metrics.free_blocks.set(self.engine.blocks.num_free)
