"""A request to a unary entry point (decoupled false, TensorRT-LLM's decoupled_mode off): the
pipeline streams into an UnarySink, which keeps the one final response (or the error) for
execute() to return once every request of the call has ended."""

from __future__ import annotations

import threading

from backends.message import Message


class UnarySink:
    """The ResponseSink of one unary request. Only final responses are kept: a unary request does
    not stream (the entry point refuses stream=true), so its ClientStream sends one response."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.message: Message | None = None
        self.error_message: str | None = None

    def send(self, message: Message, final: bool) -> None:
        if final and not self.done.is_set():
            self.message = message
            self.done.set()

    def error(self, message: str) -> None:
        if not self.done.is_set():
            self.error_message = message
            self.done.set()

    def is_cancelled(self) -> bool:
        # A unary request cannot be cancelled by its client in 2.51's python backend.
        return False
