"""One client request through prefill then decode: the orchestrator's per-request job.

Kept free of pb_utils: the model passes in `call`, which starts a BLS request against a model and
returns an iterable of response dicts. What the 2.51 python backend cannot do for us is done here:
errors arrive in-band (finish_reason "error"), a stop word or a client cancel is sent down to
decode as an explicit cancel request, and a callee that stops answering (its process died) is
detected by a stall timeout instead of hanging the client.
"""

from __future__ import annotations

import functools
import queue
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.common.client_stream import ClientStream
from backends.common.sink import merge_outputs
from backends.orchestrator.leases import LeaseReleaser
from backends.orchestrator.router import RoutingTable
from engine.sampling import SamplingParams

Response = dict[str, np.ndarray]
Call = Callable[[str, dict[str, np.ndarray]], Iterable[Response]]


class PhaseError(RuntimeError):
    """A failure of prefill or decode for this request; its message is passed on to the client."""


@dataclass(frozen=True)
class Timeouts:
    prefill_s: float = 120.0  # queueing for prefill can be long under load
    decode_stall_s: float = 10.0  # decode sends a token or a heartbeat (1 s) while it holds a request
    cancel_s: float = 5.0


def sampling_tensors(params: SamplingParams, seed: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {
        "max_tokens": np.asarray([params.max_tokens], dtype=np.int32),
        "temperature": np.asarray([params.temperature], dtype=np.float32),
        "top_k": np.asarray([params.top_k], dtype=np.int32),
        "top_p": np.asarray([params.top_p], dtype=np.float32),
        "random_seed": np.asarray([seed], dtype=np.uint64),
    }
    if params.stop_token_ids:
        out["end_id"] = np.asarray([params.stop_token_ids[0]], dtype=np.int32)
    return out


def _text(arr: Any) -> str:
    value = np.asarray(arr, dtype=object).reshape(-1)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def watched(responses: Iterable[Response], timeout_s: float, what: str) -> Iterator[Response]:
    """Yields responses, raising PhaseError if none arrives for timeout_s or one is an in-band
    error (see watched_batches)."""
    for batch in watched_batches(responses, timeout_s, what):
        yield from batch


def watched_batches(responses: Iterable[Response], timeout_s: float, what: str) -> Iterator[list[Response]]:
    """Yields the responses that have arrived, all of them at once (at least one), raising
    PhaseError if none arrives for timeout_s or one is an in-band error (after yielding those
    before it). A reader thread does the blocking iteration (the BLS iterator has no timeout); if
    the callee died, that thread stays blocked, which is the price of not hanging the client.
    Batches are what let a caller whose own sends are slow forward several tokens in one."""
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def pump() -> None:
        try:
            for r in responses:
                inbox.put(("item", r))
            inbox.put(("end", None))
        except BaseException as exc:
            inbox.put(("error", exc))

    threading.Thread(target=pump, name=f"bls-{what}", daemon=True).start()
    while True:
        try:
            events = [inbox.get(timeout=timeout_s)]
        except queue.Empty:
            raise PhaseError(f"{what} sent nothing for {timeout_s:g} s; the instance may be down") from None
        while events[-1][0] == "item":
            try:
                events.append(inbox.get_nowait())
            except queue.Empty:
                break
        batch: list[Response] = []
        for kind, value in events:
            message = inband_error(value) if kind == "item" else None
            if kind == "item" and message is None:
                batch.append(value)
                continue
            if batch:
                yield batch
            if kind == "end":
                return
            raise PhaseError(message if message is not None else f"{what} failed: {value}")
        yield batch


def inband_error(response: Response) -> str | None:
    """The message of an in-band error response (see interface.ERROR_OUTPUT), else None."""
    if "finish_reason" in response and _text(response["finish_reason"]) == "error":
        return _text(response["error_message"]) if "error_message" in response else "unknown error"
    return None


class Pipeline:
    def __init__(
        self,
        call: Call,
        routes: RoutingTable,
        leases: LeaseReleaser,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.call = call
        self.routes = routes
        self.leases = leases
        self.timeouts = timeouts or Timeouts()

    def run(self, ids: list[int], params: SamplingParams, stream: ClientStream) -> None:
        """Streams the request's tokens into `stream`; always ends it (final response or error)."""
        try:
            self._run(ids, params, stream)
        except PhaseError as exc:
            stream.error(str(exc))
        except Exception as exc:
            stream.error(f"orchestrator error: {exc!r}")

    def _run(self, ids: list[int], params: SamplingParams, stream: ClientStream) -> None:
        # Prefill and decode must draw from the same random stream: fix the seed here.
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        common = {"input_ids": np.asarray(ids, dtype=np.int32), **sampling_tensors(params, seed)}
        prefill, decode = self.routes.pick()
        with prefill.route(len(ids)) as model:
            first = self._first(watched(self.call(model, common), self.timeouts.prefill_s, "prefill"))
        token = int(np.asarray(first["first_token"]).reshape(-1)[0])
        handle = bytes(np.asarray(first["kv_handle"], dtype=object).reshape(-1)[0])
        reason = _text(first["finish_reason"]) or None
        if stream.push([token], reason) or stream.is_cancelled():
            if handle:  # nobody will pull it
                self.leases.release(handle)
            return
        request_id = secrets.token_hex(16)
        inputs = {
            **common,
            "first_token": np.asarray([token], dtype=np.int32),
            "kv_handle": np.asarray([handle], dtype=object),
            "request_id": np.asarray([request_id.encode()], dtype=object),
        }
        with decode.route(params.max_tokens - 1) as model:
            for batch in watched_batches(self.call(model, inputs), self.timeouts.decode_stall_s, "decode"):
                if stream.is_cancelled():
                    self._cancel(model, request_id)
                    return
                # Everything decode sent while this request's last send was under way goes in one.
                r = functools.reduce(merge_outputs, batch)
                tokens = [int(t) for t in np.asarray(r.get("output_ids", [])).reshape(-1)]
                reason = _text(r["finish_reason"]) if "finish_reason" in r else None
                if not tokens and not reason:
                    continue  # a heartbeat
                if stream.push(tokens, reason or None):
                    if not reason:  # a stop word: decode must stop too
                        self._cancel(model, request_id)
                    return
        if not stream.done:
            stream.error("decode ended without a final token")

    def _cancel(self, model: str, request_id: str) -> None:
        inputs = {"request_id": np.asarray([request_id.encode()], dtype=object), "cancel": np.asarray([True])}
        try:
            for _ in watched(self.call(model, inputs), self.timeouts.cancel_s, "decode cancel"):
                pass
        except PhaseError:
            pass  # best effort: the decode instance is gone or the sequence already ended

    @staticmethod
    def _first(responses: Iterable[Response]) -> Response:
        result = None
        for r in responses:
            if "first_token" in r:
                result = r
        if result is None:
            raise PhaseError("prefill returned no result")
        return result
