"""The orchestrator's end of the token channel (backends/message/wire.py): prefill's results and
decode's tokens.

A TokenInbox listens on a Unix socket in Linux's abstract namespace under a random name (nothing
on the file system to clean up), accepts only peers of this user (SO_PEERCRED), and reads each
decode instance's connection on a thread of its own, handing every frame to the queue of its
request. Invariants:
- A request's queue exists from open() (before its DecodeRequest is sent) to close(); frames for
  a request without one (it ended, or was never ours) are dropped.
- When a prefill or decode instance's connection ends or carries a malformed frame, every open
  request of that model gets a "lost" item at once: a dead instance fails its requests without
  waiting for a timeout.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import struct
import threading
from typing import Literal

from backends.common import trace
from backends.message import DecodeChunk, InbandError, PrefillResult, wire
from kv_transfer.control import recv_exact

log = logging.getLogger(__name__)

Item = tuple[Literal["chunk", "result", "error", "lost"], DecodeChunk | PrefillResult | str]


class TokenInbox:
    def __init__(self) -> None:
        self.name = f"disagg-orchestrator-{os.getpid()}-{secrets.token_hex(8)}"
        self.reply_to = wire.ABSTRACT_PREFIX + self.name
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind("\0" + self.name)
        self._listener.listen(64)
        self._lock = threading.Lock()
        self._queues: dict[bytes, queue.SimpleQueue[Item]] = {}
        self._model_of: dict[bytes, str] = {}
        self._conns: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="inbox-accept", daemon=True).start()

    def open(self, request_id: str, model: str) -> queue.SimpleQueue[Item]:
        """The queue the request's frames from `model` will arrive in; call before sending it the
        request. A request open again (for its next phase) keeps its queue."""
        sid = wire.stream_id(request_id)
        with self._lock:
            q = self._queues.setdefault(sid, queue.SimpleQueue())
            self._model_of[sid] = model
        return q

    def close_stream(self, request_id: str) -> None:
        sid = wire.stream_id(request_id)
        with self._lock:
            self._queues.pop(sid, None)
            self._model_of.pop(sid, None)

    def close(self) -> None:
        with self._lock:  # a connection accepted from now on is closed by _accept
            self._closed = True
            conns = list(self._conns)
        self._listener.close()
        for c in conns:
            c.close()

    # ---- the threads -----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != os.getuid():
                log.warning("token channel: refused a peer of uid %d", uid)
                conn.close()
                continue
            with self._lock:
                closed = self._closed
                if not closed:
                    self._conns.add(conn)
            if closed:  # close() ran while this connection was being accepted
                conn.close()
                return
            threading.Thread(target=self._read, args=(conn,), name="inbox-read", daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        model = ""
        reason = "closed its token channel"
        try:
            while True:
                kind, sid, payload = _read_frame(conn)
                trace.mark("read")
                message = wire.parse(kind, payload)
                if isinstance(message, str):
                    model = message
                    continue
                with self._lock:
                    q = self._queues.get(sid)
                if q is None:
                    continue
                if isinstance(message, InbandError):
                    q.put(("error", message.error_message))
                elif isinstance(message, PrefillResult):
                    q.put(("result", message))
                else:
                    q.put(("chunk", message))
        except wire.WireError as exc:
            reason = f"sent a malformed frame ({exc})"
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)
                lost = [self._queues[s] for s, m in self._model_of.items() if m == model and model]
            for q in lost:
                q.put(("lost", f"model {model!r} {reason}; the instance may be down"))


def _read_frame(conn: socket.socket) -> tuple[int, bytes, bytes]:
    """One frame; ConnectionError (an OSError) when the peer closes the connection."""
    head = bytearray(wire.HEADER.size)
    recv_exact(conn, memoryview(head))
    length, kind, sid = wire.HEADER.unpack(head)
    if not 17 <= length <= wire.MAX_FRAME:
        raise wire.WireError(f"frame length {length} out of range")
    payload = bytearray(length - 17)
    recv_exact(conn, memoryview(payload))
    return kind, sid, bytes(payload)
