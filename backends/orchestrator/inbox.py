"""The orchestrator's end of the token channel (backends/message/wire.py): prefill's results and
decode's tokens.

A TokenInbox listens on a Unix socket in Linux's abstract namespace under a random name (nothing
on the file system to clean up), accepts only peers of this user (SO_PEERCRED), and reads each
decode instance's connection on a thread of its own, handing every frame to its request's
receiver: a queue (open()), or an object that takes them on the reader's thread (attach(): the
orchestrator's forwarding of decode's tokens, with no hand-off to another thread). A receiver
gets the items of all the frames that had arrived together in one call, in order. Invariants:
- A request's receiver exists from open() or attach() (before its request is sent) to
  close_stream(); frames for a request without one (it ended, or was never ours) are dropped.
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
from typing import Literal, Protocol

from backends.common import trace
from backends.common.local_socket import LocalListener
from backends.message import DecodeChunk, InbandError, PrefillResult, wire

Item = tuple[Literal["chunk", "result", "error", "lost"], DecodeChunk | PrefillResult | str]


class Receiver(Protocol):
    def deliver(self, items: list[Item]) -> None:
        """Takes a request's items, in order (called on a reader thread: must not block for long)."""


class _Queued:
    """The receiver of open(): a queue the request's own thread reads."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Item] = queue.SimpleQueue()

    def deliver(self, items: list[Item]) -> None:
        for item in items:
            self.queue.put(item)


class TokenInbox:
    def __init__(self) -> None:
        self.name = name = f"disagg-orchestrator-{os.getpid()}-{secrets.token_hex(8)}"
        self.reply_to = wire.ABSTRACT_PREFIX + name
        self._lock = threading.Lock()
        self._receivers: dict[bytes, Receiver] = {}
        self._model_of: dict[bytes, str] = {}
        self._listener = LocalListener(name, self._read, "inbox")

    def open(self, request_id: str, model: str) -> queue.SimpleQueue[Item]:
        """The queue the request's frames from `model` will arrive in; call before sending it the
        request. A request open again (for its next phase) keeps its queue."""
        sid = wire.stream_id(request_id)
        with self._lock:
            receiver = self._receivers.get(sid)
            if not isinstance(receiver, _Queued):
                receiver = self._receivers[sid] = _Queued()
            self._model_of[sid] = model
        return receiver.queue

    def attach(self, request_id: str, model: str, receiver: Receiver) -> None:
        """Hands the request's frames from `model` to `receiver` from now on; call before sending
        it the request."""
        sid = wire.stream_id(request_id)
        with self._lock:
            self._receivers[sid] = receiver
            self._model_of[sid] = model

    def close_stream(self, request_id: str) -> None:
        sid = wire.stream_id(request_id)
        with self._lock:
            self._receivers.pop(sid, None)
            self._model_of.pop(sid, None)

    def lose(self, model: str, reason: str) -> None:
        """Fails every open request of `model` at once (its instance is gone)."""
        with self._lock:
            lost = [self._receivers[s] for s, m in self._model_of.items() if m == model and model]
        for r in lost:
            r.deliver([("lost", f"model {model!r} {reason}; the instance may be down")])

    def close(self) -> None:
        self._listener.close()

    def _read(self, conn: socket.socket) -> None:
        """One prefill or decode instance's connection, until it ends."""
        model = ""
        reason = "closed its token channel"
        frames = wire.FrameReader(conn)
        try:
            while True:
                got: dict[bytes, list[Item]] = {}
                for kind, sid, payload in [frames.frame(), *frames.ready()]:
                    trace.mark("read")
                    message = wire.parse(kind, payload)
                    if isinstance(message, str):
                        model = message
                    elif isinstance(message, InbandError):
                        got.setdefault(sid, []).append(("error", message.error_message))
                    elif isinstance(message, PrefillResult):
                        got.setdefault(sid, []).append(("result", message))
                    else:
                        got.setdefault(sid, []).append(("chunk", message))
                for sid, items in got.items():
                    with self._lock:
                        receiver = self._receivers.get(sid)
                    if receiver is not None:
                        receiver.deliver(items)
        except wire.WireError as exc:
            reason = f"sent a malformed frame ({exc})"
        except OSError:
            pass
        self.lose(model, reason)
