"""The thread that owns an engine inside a Triton model instance.

Contract: ``submit()`` may be called from any thread; everything else of a worker runs on its own
thread, which calls ``iterate()`` until ``stop()``, then ``shutdown()``. An exception in one
iteration is logged and handed to ``on_failure()`` (which must end the requests it affected), and
the loop goes on: one bad batch must not kill every stream of the instance. An engine that died
(engine.dead, a tensor-parallel rank gone) ends every request it holds; the model refuses new ones.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerLoop(ABC, Generic[T]):
    def __init__(self, name: str) -> None:
        self._inbox: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: T) -> None:
        self._inbox.put(item)
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def take_new(self) -> list[T]:
        """Everything submitted since the last call."""
        items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def idle(self, seconds: float) -> None:
        """Sleeps until new work arrives (submit or wake) or `seconds` pass."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.iterate()
            except Exception as exc:
                log.exception("%s iteration failed", self._thread.name)
                self.on_failure(exc)
        self.shutdown()

    @abstractmethod
    def iterate(self) -> None:
        """One pass: take new work, run at most one engine step, send responses."""

    @abstractmethod
    def on_failure(self, exc: Exception) -> None:
        """Ends (with an error) the requests an iteration that raised `exc` may have left half-done."""

    @abstractmethod
    def shutdown(self) -> None:
        """Ends every request still held (server shutting down)."""
