"""A prefill or decode instance's end of the token channel (backends/message/wire.py).

One connection per orchestrator channel (`reply_to`), opened at its first request and announced
with a HELLO frame naming this model; each request's responses go out on it as frames. Writes are
a few dozen bytes into a local socket: made on the caller's thread (prefill's engine loop: the
first token is on its way at once), or with `writer` by a thread of their own (decode: its loop
never waits on a socket), in order per connection. A connection that fails (the orchestrator is gone) marks its
requests cancelled, so the engine loop drops them and frees their blocks; the next request for
that channel opens a new connection.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator

from backends.common import local_socket, trace
from backends.common.queues import take_all
from backends.message import DecodeChunk, InbandError, Message, PrefillResult, wire
from engine.errors import RequestError

log = logging.getLogger(__name__)


Emit = Callable[["_Connection", bytes], None]


class _Connection:
    def __init__(self, reply_to: str, model: str, emit: Emit) -> None:
        if not reply_to.startswith(wire.ABSTRACT_PREFIX):
            raise RequestError(f"unsupported reply_to {reply_to!r}")
        try:
            self.sock = local_socket.connect(reply_to[len(wire.ABSTRACT_PREFIX) :])
        except OSError as exc:
            raise RequestError(f"cannot reach the orchestrator's token channel {reply_to!r}: {exc}") from exc
        self.lock = threading.Lock()
        self.broken = False
        self._emit = emit
        self.send(wire.hello(model))  # before any frame: those are written after this returns

    def write(self, data: bytes) -> None:
        """Hands `data` to its Channels (Channels._emit), which sends it now or later, in order."""
        self._emit(self, data)

    def send(self, data: bytes) -> None:
        """Sends `data` on the caller's thread."""
        with self.lock:
            if self.broken:
                return
            try:
                trace.mark("send")
                self.sock.sendall(data)
                trace.mark("sent")
            except OSError as exc:
                log.info("token channel lost: %s", exc)
                self.broken = True
                self.sock.close()

    def close(self) -> None:
        with self.lock:
            self.broken = True
            self.sock.close()


class ChannelSink:
    """The ResponseSink of one request answered over a channel."""

    def __init__(self, conn: _Connection, request_id: str) -> None:
        self._conn = conn
        self._sid = wire.stream_id(request_id)
        self._closed = False

    def send(self, message: Message, final: bool) -> None:
        if self._closed:
            return
        assert isinstance(message, DecodeChunk | PrefillResult)
        self._closed = final
        self._conn.write(wire.encode(self._sid, message))

    def error(self, message: str) -> None:
        if not self._closed:
            self._closed = True
            self._conn.write(wire.encode(self._sid, InbandError(error_message=message)))

    def is_cancelled(self) -> bool:
        return self._conn.broken


class Channels:
    """This model instance's connections, by reply_to."""

    def __init__(self, model: str, writer: bool = False) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._conns: dict[str, _Connection] = {}
        self._corks = threading.local()
        # With a writer, every frame goes out from its thread, in the order written.
        self._queue: queue.SimpleQueue[tuple[_Connection, bytes] | None] | None = None
        self._writer: threading.Thread | None = None
        if writer:
            self._queue = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._write, name=f"{model}-channel-writer", daemon=True)
            self._writer.start()

    def sink(self, reply_to: str, request_id: str) -> ChannelSink:
        """A sink for the request; RequestError when the channel cannot be reached."""
        try:
            wire.stream_id(request_id)  # a malformed id is refused before anything is sent
        except wire.WireError as exc:
            raise RequestError(str(exc)) from exc
        with self._lock:
            conn = self._conns.get(reply_to)
            if conn is None or conn.broken:
                conn = self._conns[reply_to] = _Connection(reply_to, self.model, self._emit)
        return ChannelSink(conn, request_id)  # (the id was checked above)

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Frames this thread writes inside the block go out when it ends, one write per
        connection (decode: a step's tokens for every request of an orchestrator at once, one
        wake-up of its reader instead of one per token). Each connection's frames keep their order."""
        pending: dict[_Connection, list[bytes]] = {}
        self._corks.pending = pending
        try:
            yield
        finally:
            self._corks.pending = None
            for conn, frames in pending.items():
                self._emit(conn, b"".join(frames), corked=False)

    def _emit(self, conn: _Connection, data: bytes, corked: bool = True) -> None:
        pending: dict[_Connection, list[bytes]] | None = getattr(self._corks, "pending", None)
        if corked and pending is not None:
            pending.setdefault(conn, []).append(data)
        elif self._queue is not None:
            self._queue.put((conn, data))
        else:
            conn.send(data)

    def _write(self) -> None:
        """The writer thread: sends what is queued, one write per connection for all that
        waits, until close() queues None."""
        assert self._queue is not None
        while True:
            items = take_all(self._queue)
            batches: dict[_Connection, list[bytes]] = {}
            stop = False
            for item in items:
                if item is None:
                    stop = True
                    break
                batches.setdefault(item[0], []).append(item[1])
            for conn, frames in batches.items():
                conn.send(b"".join(frames))
            if stop:
                return

    def close(self) -> None:
        """Sends what the writer still holds, then closes every connection."""
        if self._queue is not None and self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=5.0)
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close()
