"""A prefill or decode instance's request channel, its "door": the orchestrator's requests arrive
here straight from its process, not as BLS calls through the server (docs/overhead.md).

The door listens on wire.door_name(model) and hands each REQUEST frame's tensors to `admit` on
the connection's thread. `admit` answers over the request's own reply channel (errors included),
so the door never writes back. A connection that sends a malformed frame is closed. One instance
per model holds the door: another instance of the same model (instance_group count > 1) says so in
the log and serves BLS calls only.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from backends.common import trace
from backends.common.local_socket import LocalListener
from backends.common.sink import ResponseSink
from backends.message import Tensors, wire

log = logging.getLogger(__name__)


class Door:
    def __init__(self, model: str, admit: Callable[[Tensors], None]) -> None:
        self._admit = admit
        self._listener: LocalListener | None = None
        try:
            self._listener = LocalListener(wire.door_name(model), self._serve, "door")
        except OSError as exc:
            log.warning(
                "model %r: its request channel is held by another instance (%s); BLS calls only", model, exc
            )

    @property
    def open(self) -> bool:
        return self._listener is not None

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def _serve(self, conn: socket.socket) -> None:
        frames = wire.FrameReader(conn)
        try:
            while True:
                kind, _, payload = frames.frame()
                trace.mark("arrive")
                tensors = wire.parse_request(kind, payload)
                try:
                    self._admit(tensors)
                except Exception:
                    log.exception("request channel: admitting a request failed")
        except wire.WireError as exc:
            log.warning("request channel: closed a connection that sent a malformed frame (%s)", exc)
        except OSError:
            pass  # the orchestrator went away


def refuse(error: str, call: ResponseSink | None, channel: ResponseSink | None) -> None:
    """Answers a request refused at admission: on its BLS call (`call`), else on its reply_to
    channel. A request over the request channel whose reply_to could not be read can only be logged."""
    answer = call or channel
    if answer is None:
        log.warning("dropped a request over the request channel: %s", error)
    else:
        answer.error(error)
