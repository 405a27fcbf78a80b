"""One client request through prefill then decode: the orchestrator's per-request job.

Kept free of pb_utils: the model passes in `call`, which hands a message (backends.message) to a
model, over its request channel (returning None) or as a BLS request (returning an iterable of its
responses' tensors). What the 2.51 python backend cannot do for us is done here:
errors arrive in-band (finish_reason "error"), a stop word or a client cancel is sent down to
decode as an explicit cancel request, and a callee that stops answering (its process died) is
detected by a stall timeout instead of hanging the client. Prefill's result and decode's tokens
come back over the token channel (inbox.py), outside the server; a BLS call is only answered
"accepted" (or with an in-band error).
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from backends.common import trace
from backends.common.client_stream import ClientStream
from backends.common.params import OrchestratorParams
from backends.common.queues import take_all
from backends.message import (
    DecodeCancel,
    DecodeRequest,
    InbandError,
    PrefillRequest,
    PrefillResult,
    Sampling,
    Tensors,
)
from backends.orchestrator.forwarder import Forwarder, ForwardError
from backends.orchestrator.inbox import TokenInbox
from backends.orchestrator.router import RoutingTable
from engine.sampling import SamplingParams
from kv_transfer import LeaseReleaser

Response = Tensors
T = TypeVar("T")
Call = Callable[[str, PrefillRequest | DecodeRequest | DecodeCancel], Iterable[Response] | None]


class PhaseError(RuntimeError):
    """A failure of prefill or decode for this request; its message is passed on to the client."""


@dataclass(frozen=True)
class Timeouts:
    # Queueing for prefill can be long under load; decode sends a token or a heartbeat (1 s)
    # while it holds a request. The defaults are the orchestrator's parameters'.
    prefill_s: float = OrchestratorParams.prefill_timeout_seconds
    decode_stall_s: float = OrchestratorParams.decode_stall_timeout_seconds
    cancel_s: float = 5.0


def arrived(q: queue.SimpleQueue[T], timeout_s: float, what: str) -> list[T]:
    """At least one item of the queue (PhaseError if none comes within timeout_s: the callee may be
    down), then every item that has arrived since, in order."""
    try:
        return take_all(q, timeout_s)
    except queue.Empty:
        raise PhaseError(f"{what} sent nothing for {timeout_s:g} s; the instance may be down") from None


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
        batch: list[Response] = []
        for kind, value in arrived(inbox, timeout_s, what):
            error = InbandError.find(value) if kind == "item" else None
            if kind == "item" and error is None:
                batch.append(value)
                continue
            if batch:
                yield batch
            if kind == "end":
                return
            raise PhaseError(error.error_message if error is not None else f"{what} failed: {value}")
        yield batch


class Pipeline:
    def __init__(
        self,
        call: Call,
        routes: RoutingTable,
        leases: LeaseReleaser,
        inbox: TokenInbox,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.call = call
        self.routes = routes
        self.leases = leases
        self.timeouts = timeouts or Timeouts()
        self.inbox = inbox

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
        sampling = Sampling.fields_of(params, seed)
        prefill, decode = self.routes.pick()
        request_id = secrets.token_hex(16)
        trace.mark("o.start", request_id)
        with prefill.route(len(ids)) as model:
            request = PrefillRequest(
                input_ids=tuple(ids),
                request_id=request_id,
                reply_to=self.inbox.reply_to,
                **sampling,  # type: ignore[arg-type]
            )
            first = self._prefill(model, request)
        trace.mark("o.result", request_id)
        first_log_probs = () if first.first_log_prob is None else (first.first_log_prob,)
        if stream.perf is not None:
            stream.perf.record(
                first.first_scheduled_time_ns,
                first.first_token_time_ns,
                last_token_ns=first.first_token_time_ns if first.finish_reason else None,
                kv_blocks=first.kv_blocks,
            )
        ended = stream.push([first.first_token], first.finish_reason or None, first_log_probs)
        trace.mark("o.pushed", request_id)
        if ended or stream.is_cancelled():
            stream.cancelled()  # no-op when it ended
            if first.kv_handle:  # nobody will pull it
                self.leases.release(first.kv_handle)
            return
        continuation = DecodeRequest(
            input_ids=tuple(ids),
            first_token=first.first_token,
            kv_handle=first.kv_handle,
            request_id=request_id,
            reply_to=self.inbox.reply_to,
            **sampling,  # type: ignore[arg-type]
        )
        with decode.route(params.max_tokens - 1) as model:
            # Decode's tokens go to the client from the inbox's reader thread (forwarder.py).
            forwarder = Forwarder(stream, self.timeouts.decode_stall_s)
            self.inbox.attach(request_id, model, forwarder)
            try:
                self._hand(model, continuation, self.timeouts.decode_stall_s, "decode")
                try:
                    outcome = forwarder.wait()
                except ForwardError as exc:
                    raise PhaseError(str(exc)) from None
                if outcome != "finished":  # a stop word or the client: decode must stop too
                    self._cancel(model, request_id)
            finally:
                self.inbox.close_stream(request_id)
        if not stream.done:
            stream.error("decode ended without a final token")

    def _prefill(self, model: str, request: PrefillRequest) -> PrefillResult:
        """The prefill result, over the token channel (the call is only answered "accepted")."""
        assert request.request_id is not None
        timeout_s = self.timeouts.prefill_s
        items = self.inbox.open(request.request_id, model)  # before the call: the result may be quick
        try:
            self._hand(model, request, timeout_s, "prefill")
            kind, value = arrived(items, timeout_s, "prefill")[0]  # the result, or why there is none
            if kind != "result":
                raise PhaseError(str(value))
            assert isinstance(value, PrefillResult)
            return value
        finally:
            self.inbox.close_stream(request.request_id)

    def _hand(
        self, model: str, message: PrefillRequest | DecodeRequest | DecodeCancel, timeout_s: float, what: str
    ) -> None:
        """Sends a message to a phase. A BLS call's answer ("accepted", or an in-band error, raised)
        is awaited; one over the request channel has none (errors come over the token channel)."""
        replies = self.call(model, message)
        if replies is not None:
            for _ in watched(replies, timeout_s, what):
                pass

    def _cancel(self, model: str, request_id: str) -> None:
        # Best effort: the decode instance may be gone or the sequence already ended.
        with contextlib.suppress(PhaseError):
            self._hand(model, DecodeCancel(request_id=request_id), self.timeouts.cancel_s, "decode cancel")
