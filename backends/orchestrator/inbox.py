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

import os
import queue
import secrets
import socket
import threading
from typing import Literal

from backends.common import trace
from backends.common.local_socket import LocalListener
from backends.message import DecodeChunk, InbandError, PrefillResult, wire

Item = tuple[Literal["chunk", "result", "error", "lost"], DecodeChunk | PrefillResult | str]


class TokenInbox:
    def __init__(self) -> None:
        self.name = name = f"disagg-orchestrator-{os.getpid()}-{secrets.token_hex(8)}"
        self.reply_to = wire.ABSTRACT_PREFIX + name
        self._lock = threading.Lock()
        self._queues: dict[bytes, queue.SimpleQueue[Item]] = {}
        self._model_of: dict[bytes, str] = {}
        self._listener = LocalListener(name, self._read, "inbox")

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

    def lose(self, model: str, reason: str) -> None:
        """Fails every open request of `model` at once (its instance is gone)."""
        with self._lock:
            lost = [self._queues[s] for s, m in self._model_of.items() if m == model and model]
        for q in lost:
            q.put(("lost", f"model {model!r} {reason}; the instance may be down"))

    def close(self) -> None:
        self._listener.close()

    def _read(self, conn: socket.socket) -> None:
        """One prefill or decode instance's connection, until it ends."""
        model = ""
        reason = "closed its token channel"
        frames = wire.FrameReader(conn)
        try:
            while True:
                kind, sid, payload = frames.frame()
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
        self.lose(model, reason)
