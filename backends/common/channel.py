"""A prefill or decode instance's end of the token channel (backends/message/wire.py).

One connection per orchestrator channel (`reply_to`), opened at its first request and announced
with a HELLO frame naming this model; each request's responses go out on it as frames. Writes are
a few dozen bytes into a local socket, so they are made on the caller's thread (the engine loop),
under the connection's lock. A connection that fails (the orchestrator is gone) marks its
requests cancelled, so the engine loop drops them and frees their blocks; the next request for
that channel opens a new connection.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator

from backends.common import trace
from backends.message import DecodeChunk, InbandError, Message, PrefillResult, wire
from engine.errors import RequestError

log = logging.getLogger(__name__)


class _Connection:
    def __init__(self, reply_to: str, model: str, corks: threading.local) -> None:
        if not reply_to.startswith(wire.ABSTRACT_PREFIX):
            raise RequestError(f"unsupported reply_to {reply_to!r}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect("\0" + reply_to[len(wire.ABSTRACT_PREFIX) :])
        except OSError as exc:
            self.sock.close()
            raise RequestError(f"cannot reach the orchestrator's token channel {reply_to!r}: {exc}") from exc
        self.lock = threading.Lock()
        self.broken = False
        self._corks = corks
        self.send(wire.hello(model))

    def write(self, data: bytes) -> None:
        """Sends `data`, or keeps it for the end of the writing thread's Channels.corked() block."""
        pending: dict[_Connection, list[bytes]] | None = getattr(self._corks, "pending", None)
        if pending is not None:
            pending.setdefault(self, []).append(data)
        else:
            self.send(data)

    def send(self, data: bytes) -> None:
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

    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._conns: dict[str, _Connection] = {}
        self._corks = threading.local()

    def sink(self, reply_to: str, request_id: str) -> ChannelSink:
        """A sink for the request; RequestError when the channel cannot be reached."""
        try:
            wire.stream_id(request_id)  # a malformed id is refused before anything is sent
        except wire.WireError as exc:
            raise RequestError(str(exc)) from exc
        with self._lock:
            conn = self._conns.get(reply_to)
            if conn is None or conn.broken:
                conn = self._conns[reply_to] = _Connection(reply_to, self.model, self._corks)
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
                conn.send(b"".join(frames))

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close()
