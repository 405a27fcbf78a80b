"""Where a model's responses for one request go.

The model.py files wrap Triton's response sender in this protocol; the engine loops only see
sinks. Contract: after ``send(..., final=True)`` or ``error(...)`` the sink is closed and further
calls are ignored, so every request gets exactly one final response.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

Outputs = dict[str, np.ndarray]


class ResponseSink(Protocol):
    def send(self, outputs: Outputs, final: bool) -> None:
        """Sends one response; final=True also ends the request's stream."""

    def error(self, message: str) -> None:
        """Sends an error response that ends the request's stream."""

    def is_cancelled(self) -> bool:
        """True once the client cancelled or went away."""


def token_outputs(token_ids: list[int], finish_reason: str | None) -> Outputs:
    return {
        "output_ids": np.asarray(token_ids, dtype=np.int32),
        "finish_reason": np.asarray([(finish_reason or "").encode()], dtype=object),
    }


def merge_outputs(first: Outputs, then: Outputs) -> Outputs:
    """Two consecutive responses of one stream as one: token ids and text concatenated, every
    other output (finish_reason, error_message) from the later one."""
    merged = {**first, **then}
    if "output_ids" in first and "output_ids" in then:
        merged["output_ids"] = np.concatenate([first["output_ids"], then["output_ids"]])
    if "text_output" in first and "text_output" in then:
        text = first["text_output"].reshape(-1)[0] + then["text_output"].reshape(-1)[0]
        merged["text_output"] = np.asarray([text], dtype=object)
    return merged


def error_outputs(message: str) -> Outputs:
    """An in-band error (see interface.ERROR_OUTPUT)."""
    return {
        "finish_reason": np.asarray([b"error"], dtype=object),
        "error_message": np.asarray([message.encode("utf-8", "replace")], dtype=object),
    }
