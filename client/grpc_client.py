"""Synchronous gRPC client: one bidirectional stream per request.

Triton 2.51 sends a stream error without the request id (docs/triton-python-backend.md, 10), so
each request gets its own stream and an error on it belongs to that request alone.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Iterator
from typing import Any

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.api import (
    DEFAULT_MODEL,
    Client,
    GenerateResult,
    Prompt,
    RequestTimeoutError,
    SamplingParams,
    ServerError,
    ServerUnavailableError,
    StreamPiece,
    collect,
)
from client.tensors import grpc_inputs, parse_grpc_result

_ids = itertools.count()


def server_error(error: InferenceServerException, model: str) -> Exception:
    """The client exception for a Triton error: unreachable server or a refused request."""
    status = str(error.status() or "")
    text = str(error.message() or error)
    if "UNAVAILABLE" in status or "failed to connect" in text.lower() or "Socket closed" in text:
        return ServerUnavailableError(f"server unavailable: {text}")
    if "DEADLINE_EXCEEDED" in status:
        return RequestTimeoutError(f"request timed out: {text}")
    return ServerError(text, model)


class GrpcClient(Client):
    """Client over tritonclient.grpc (url "host:port", default port 8001)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> Iterator[StreamPiece]:
        return self._run(prompt, params or SamplingParams(), model, timeout_s, stream=True)

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        start = time.perf_counter()
        return collect(self._run(prompt, params or SamplingParams(), model, timeout_s, stream=False), start)

    def _run(
        self, prompt: Prompt, params: SamplingParams, model: str, timeout_s: float | None, stream: bool
    ) -> Iterator[StreamPiece]:
        inputs = grpc_inputs(prompt, params, stream)  # validates before any connection
        return self._pieces(inputs, model, timeout_s)

    def _pieces(self, inputs: list[Any], model: str, timeout_s: float | None) -> Iterator[StreamPiece]:
        # A generator: its finally runs on exhaustion, on an exception and when the caller drops
        # it (close() / garbage collection), so an abandoned stream is always cancelled.
        responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        conn = grpcclient.InferenceServerClient(self.url)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            conn.start_stream(callback=lambda result=None, error=None: responses.put((result, error)))
            try:
                conn.async_stream_infer(
                    model, inputs, request_id=f"c{next(_ids)}", enable_empty_final_response=True
                )
            except InferenceServerException as exc:
                # A broken stream (e.g. nothing listening) reports its cause through the callback.
                try:
                    _, cause = responses.get(timeout=1.0)
                except queue.Empty:
                    cause = None
                raise server_error(cause if cause is not None else exc, model) from None
            while True:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise RequestTimeoutError(f"no complete answer from {model} within {timeout_s} s")
                try:
                    result, error = responses.get(timeout=wait)
                except queue.Empty:
                    continue  # the deadline check above raises
                now = time.perf_counter()
                if error is not None:
                    raise server_error(error, model)
                parsed = parse_grpc_result(result)
                final = result.get_response().parameters["triton_final_response"].bool_param
                if parsed is not None:
                    text, ids, reason, log_probs = parsed
                    yield StreamPiece(text, ids, now, reason, log_probs)
                if final:
                    return
        except InferenceServerException as exc:
            raise server_error(exc, model) from None
        finally:
            # cancel_requests=True: never wait for an unfinished request (it is cancelled instead).
            conn.stop_stream(cancel_requests=True)
            conn.close()
