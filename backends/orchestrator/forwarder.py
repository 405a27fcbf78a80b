"""Decode's tokens for one request, forwarded to its client on the token inbox's reader thread.

A Forwarder is the request's inbox receiver (inbox.py) while it decodes. Each token chunk that
arrives is pushed to the client stream at once, on the thread that read it: no hand-off to the
request's own thread per token (docs/overhead.md). The chunks of frames that arrived together are
merged into one response, so a client whose sends fall behind gets several tokens at once.

The request's thread waits in wait() for the outcome and does what may block: a cancel sent down
to decode, or failing the stream. Invariants: after the outcome is set (done) nothing more is
pushed; the stall timeout counts from the last item of any kind (tokens, heartbeats).
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Literal

from backends.common.client_stream import ClientStream
from backends.message import DecodeChunk
from backends.orchestrator.inbox import Item

Outcome = Literal["finished", "stopped", "cancelled"]


class ForwardError(RuntimeError):
    """Decode failed, went away or fell silent; the message is for the client."""


class Forwarder:
    def __init__(self, stream: ClientStream, stall_s: float) -> None:
        self._stream = stream
        self._stall_s = stall_s
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._seen = time.monotonic()
        self._outcome: Outcome | None = None
        self._error: str | None = None

    def deliver(self, items: list[Item]) -> None:
        with self._lock:
            self._seen = time.monotonic()
            if self._done.is_set():
                return
            chunks: list[DecodeChunk] = []
            error = None
            for kind, value in items:
                if kind == "chunk":
                    assert isinstance(value, DecodeChunk)
                    chunks.append(value)
                    if value.finish_reason:
                        break
                elif kind != "result":  # an error, or the connection lost
                    error = str(value)
                    break
            if chunks:
                self._push(functools.reduce(DecodeChunk.merge, chunks))
            if error is not None and not self._done.is_set():
                self._end(error=error)

    def wait(self) -> Outcome:
        """Blocks until the request has ended: finished (decode sent the last token), stopped (a
        stop word ended it early: decode must be told) or cancelled (by the client: likewise).
        ForwardError when decode failed or sent nothing for the stall timeout."""
        while not self._done.wait(min(self._stall_s, 1.0)):
            with self._lock:
                silent = time.monotonic() - self._seen
                if silent > self._stall_s and not self._done.is_set():
                    self._end(error=f"decode sent nothing for {self._stall_s:g} s; the instance may be down")
        if self._error is not None:
            raise ForwardError(self._error)
        assert self._outcome is not None
        return self._outcome

    def _push(self, chunk: DecodeChunk) -> None:
        stream = self._stream
        if stream.is_cancelled():
            stream.cancelled()
            self._end(outcome="cancelled")
            return
        if chunk.is_heartbeat:
            return
        if stream.perf is not None and chunk.finish_reason:
            stream.perf.record(last_token_ns=chunk.last_token_time_ns, kv_blocks=chunk.kv_blocks)
        if stream.push(list(chunk.output_ids), chunk.finish_reason or None, chunk.output_log_probs):
            self._end(outcome="finished" if chunk.finish_reason else "stopped")

    def _end(self, outcome: Outcome | None = None, error: str | None = None) -> None:
        self._outcome, self._error = outcome, error
        self._done.set()
