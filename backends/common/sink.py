"""Where a model's responses for one request go.

The model.py files wrap Triton's response sender in this protocol; the engine loops only see
sinks, and send typed messages (backends.message). Contract: after ``send(..., final=True)`` or
``error(...)`` the sink is closed and further calls are ignored, so every request gets exactly one
final response.
"""

from __future__ import annotations

from typing import Protocol

from backends.message import Message


class ResponseSink(Protocol):
    def send(self, message: Message, final: bool) -> None:
        """Sends one response; final=True also ends the request's stream."""

    def error(self, message: str) -> None:
        """Sends an error response that ends the request's stream."""

    def is_cancelled(self) -> bool:
        """True once the client cancelled or went away."""
