"""Responses sent from a thread of their own, merged per stream while they wait.

A python-backend send is a round trip to the server (the stub waits until the server has taken
the response): about 0.1 ms on an idle host, a millisecond or more when the cores are busy. An
engine loop that sent each token itself paid that once per running sequence per step, which made
the sends, not the model, what bounded decode throughput, and made it fall as the host filled.

An Outbox takes those sends off the engine loop. Contract:
- ``sink(inner)`` wraps a ResponseSink; its send() and error() return at once and the outbox's
  thread makes the real calls on `inner`, in the order they were made for that stream.
- Responses of one stream that queue up behind a slow send are merged into one with their
  `merge` (tokens and text concatenated: DecodeChunk, ClientChunk), so under load one response
  carries several tokens, and at light load every token still goes out as soon as it exists.
- A final response or an error closes the stream: later calls are ignored, as for any sink.
- ``close()`` sends everything still queued, then stops the thread; call it after the engine loop
  has ended its requests, so every request still gets its final response.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from backends.common.sink import ResponseSink
from backends.message import Message, StreamChunk

log = logging.getLogger(__name__)


class _Stream:
    """One stream's queued work: a response not yet sent, and whether it ends the stream."""

    __slots__ = ("closed", "error", "inner", "pending", "queued")

    def __init__(self, inner: ResponseSink) -> None:
        self.inner = inner
        self.pending: StreamChunk | None = None
        self.error: str | None = None
        self.closed = False  # a final response or an error was queued: what is queued is the last
        self.queued = False  # in the outbox's ready queue


class OutboxSink:
    """The ResponseSink an Outbox hands out (see the module docstring)."""

    def __init__(self, outbox: Outbox, inner: ResponseSink) -> None:
        self._outbox = outbox
        self._stream = _Stream(inner)

    def send(self, message: Message, final: bool) -> None:
        self._outbox._put(self._stream, message, final, None)

    def error(self, message: str) -> None:
        self._outbox._put(self._stream, None, True, message)

    def is_cancelled(self) -> bool:
        return self._stream.inner.is_cancelled()


class Outbox:
    def __init__(self, name: str = "outbox") -> None:
        self._cond = threading.Condition()
        self._ready: deque[_Stream] = deque()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def sink(self, inner: ResponseSink) -> OutboxSink:
        return OutboxSink(self, inner)

    def close(self, timeout: float = 10.0) -> None:
        """Sends what is queued, then stops the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _put(self, stream: _Stream, message: Message | None, final: bool, error: str | None) -> None:
        with self._cond:
            if stream.closed:
                return
            if message is not None:
                if not isinstance(message, StreamChunk):
                    raise TypeError(f"an outbox streams chunks, not {type(message).__name__}")
                stream.pending = message if stream.pending is None else stream.pending.merge(message)
            stream.error = error
            stream.closed = final
            if not stream.queued:
                stream.queued = True
                self._ready.append(stream)
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._closing:
                    self._cond.wait()
                if not self._ready:
                    return  # closing, and everything was sent
                stream = self._ready.popleft()
                stream.queued = False
                pending, final, error = stream.pending, stream.closed, stream.error
                stream.pending = None
            try:
                if pending is not None:
                    stream.inner.send(pending, final=final and error is None)
                if error is not None:
                    stream.inner.error(error)
            except Exception:  # a sink that raises must not stop every other stream's responses
                log.exception("sending a response failed")
