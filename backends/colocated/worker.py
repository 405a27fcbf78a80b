"""The colocated instance's loop: the engine's own scheduler (prefill first, then decode steps
over every running sequence, as vLLM does), streaming each token to its client."""

from __future__ import annotations

import logging
import queue
import threading
from typing import NamedTuple

from backends.common.client_stream import ClientStream
from backends.common.metrics import NULL, Counter, Gauge, Histogram
from backends.engine.engine import LLMEngine
from backends.engine.sequence import Sequence

log = logging.getLogger(__name__)


class ColocatedMetrics(NamedTuple):
    running: Gauge = NULL
    waiting: Gauge = NULL
    free_blocks: Gauge = NULL
    batch_size: Histogram = NULL
    cancelled: Counter = NULL


class ColocatedWorker:
    def __init__(self, engine: LLMEngine, metrics: ColocatedMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or ColocatedMetrics()
        self._inbox: queue.SimpleQueue[tuple[Sequence, ClientStream]] = queue.SimpleQueue()
        self._streams: dict[Sequence, ClientStream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._update_gauges()
        self._thread = threading.Thread(target=self._loop, name="colocated-loop", daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence, stream: ClientStream) -> None:
        self._inbox.put((seq, stream))
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._take_new()
                self._drop_cancelled()
                result = self.engine.step()
                if result.kind == "idle":
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                if result.kind == "decode":
                    self.metrics.batch_size.observe(len(result.outputs))
                for out in result.outputs:
                    seq = out.seq
                    ended = self._streams[seq].push([out.token], seq.finish_reason if seq.finished else None)
                    if ended:
                        del self._streams[seq]
                        if not seq.finished:  # a stop word ended it
                            self.engine.abort(seq)
                self._update_gauges()
            except Exception:
                log.exception("colocated loop iteration failed")
                for seq, stream in list(self._streams.items()):
                    self.engine.abort(seq)
                    stream.error("internal error in the colocated engine loop")
                self._streams.clear()
        for seq, stream in list(self._streams.items()):
            self.engine.abort(seq)
            stream.error("colocated instance is shutting down")

    def _take_new(self) -> None:
        while True:
            try:
                seq, stream = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._streams[seq] = stream
            self.engine.add(seq)

    def _drop_cancelled(self) -> None:
        for seq, stream in list(self._streams.items()):
            if stream.is_cancelled():
                del self._streams[seq]
                self.engine.abort(seq)
                self.metrics.cancelled.increment(1)

    def _update_gauges(self) -> None:
        sched = self.engine.scheduler
        self.metrics.running.set(len(sched.running))
        self.metrics.waiting.set(len(sched.waiting))
        self.metrics.free_blocks.set(self.engine.blocks.num_free)
