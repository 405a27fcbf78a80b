"""The orchestrator's ends of the phases' request channels (common/door.py): requests, decode
requests and cancels go straight to the prefill or decode instance's process, with no stub lock
held and no round trip through the server (docs/overhead.md).

One connection per model, opened at its first request and reopened after a failure; frames of
several threads never interleave (a lock per connection). A thread per connection waits for its
end: a prefill or decode instance that dies closes it, and `on_lost` fails that model's open
requests at once, even those whose answer was to come over a token channel not yet opened.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

from backends.common import local_socket
from backends.message import DecodeCancel, DecodeRequest, PrefillRequest, wire

log = logging.getLogger(__name__)


class DoorError(RuntimeError):
    """A request could not be handed to the model's request channel."""


class _Door:
    def __init__(self, model: str, on_lost: Callable[[str, str], None]) -> None:
        self.model = model
        try:
            self.sock = local_socket.connect(wire.door_name(model))
        except OSError as exc:
            raise DoorError(f"cannot reach model {model!r}'s request channel: {exc}") from exc
        self.lock = threading.Lock()
        self.broken = False
        self._on_lost = on_lost
        threading.Thread(target=self._watch, name=f"door-{model}", daemon=True).start()

    def send(self, data: bytes) -> None:
        with self.lock:
            if self.broken:
                raise DoorError(f"model {self.model!r}'s request channel is closed")
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self.broken = True
                raise DoorError(f"model {self.model!r}'s request channel failed: {exc}") from exc

    def close(self) -> None:
        with self.lock:
            self.broken = True
        with contextlib.suppress(OSError):  # _watch may have closed it already
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes _watch, which closes it

    def _watch(self) -> None:
        """The phase never writes on this connection: a read returns only when it ends."""
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass
        with self.lock:
            was_broken, self.broken = self.broken, True
        self.sock.close()
        if not was_broken:
            self._on_lost(self.model, "closed its request channel")


class Doors:
    """Sends messages to models by name; `on_lost(model, reason)` is called when a model's
    connection ends (its instance is gone)."""

    def __init__(self, on_lost: Callable[[str, str], None]) -> None:
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._doors: dict[str, _Door] = {}

    def send(self, model: str, message: PrefillRequest | DecodeRequest | DecodeCancel) -> None:
        """Hands `message` to `model`'s instance; DoorError when it cannot be reached (after one
        new connection, for an instance that restarted)."""
        assert message.request_id is not None
        data = wire.request(wire.stream_id(message.request_id), message.to_tensors())
        for attempt in (1, 2):
            door = self._door(model)
            try:
                door.send(data)
                return
            except DoorError:
                if attempt == 2:
                    raise
                with self._lock:
                    if self._doors.get(model) is door:
                        del self._doors[model]

    def close(self) -> None:
        with self._lock:
            doors, self._doors = list(self._doors.values()), {}
        for d in doors:
            d.close()

    def _door(self, model: str) -> _Door:
        with self._lock:
            door = self._doors.get(model)
            if door is None or door.broken:
                door = self._doors[model] = _Door(model, self._on_lost)
            return door
