"""Client types: sampling parameters, results, stream pieces, errors, and the client contract.

Both models a client talks to (`orchestrator`, disaggregated, and `colocated`) take the
TensorRT-LLM ensemble's tensor names (backends/message/specs.py), so one client serves both.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

Prompt = str | Sequence[int]
PROTOCOLS = ("grpc", "http")
DEFAULT_MODEL = "orchestrator"


class ClientError(Exception):
    """Base class of every error the client raises."""


class InvalidRequestError(ClientError, ValueError):
    """The request was refused before it was sent (bad sampling parameters, empty prompt)."""


class ServerError(ClientError):
    """The server answered with an error (bad input, context overflow, a failed model...)."""

    def __init__(self, message: str, model: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.model = model


class ServerUnavailableError(ClientError):
    """The server could not be reached (connection refused, DNS, TLS)."""


class RequestTimeoutError(ClientError, TimeoutError):
    """No complete answer within the request's timeout; the request was cancelled on the server."""


class RequestCancelledError(ClientError):
    """The caller cancelled the request before it finished."""


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings. temperature None (or 0) means greedy, as on the server."""

    max_tokens: int = 64
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    end_id: int | None = None
    repetition_penalty: float | None = None  # > 0; 1 = off
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False  # each token's log-probability (StreamPiece.log_probs)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (0 <= self.seed < 2**64):
            raise InvalidRequestError(f"seed must be in [0, 2**64), got {self.seed!r}")
        if self.end_id is not None and self.end_id < 0:
            raise InvalidRequestError(f"end_id must be a token id >= 0, got {self.end_id!r}")
        if self.repetition_penalty is not None and not (
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0
        ):
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
        if self.min_tokens is not None and not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")


class StreamPiece(NamedTuple):
    """One streamed response: the new text and token ids, and when it arrived (time.perf_counter())."""

    text: str
    token_ids: tuple[int, ...]
    arrival: float
    finish_reason: str | None  # set on the last piece: "stop" or "length"
    log_probs: tuple[float, ...] = ()  # one per token id, when the request asked (logprobs)


class GenerateResult(NamedTuple):
    """A whole completion."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    latency_s: float


def check_prompt(prompt: Prompt) -> None:
    """Refuse an empty prompt or a token list that is not all non-negative integers."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        return
    ids = list(prompt)
    if not ids:
        raise InvalidRequestError("the prompt token list is empty")
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= 2**31 for t in ids):
        raise InvalidRequestError("prompt token ids must be integers in [0, 2**31)")


def collect(pieces: Iterator[StreamPiece], start: float) -> GenerateResult:
    """Joins streamed pieces into one result (latency measured from `start`)."""
    text: list[str] = []
    ids: list[int] = []
    reason, last = "", start
    for p in pieces:
        text.append(p.text)
        ids.extend(p.token_ids)
        reason = p.finish_reason or reason
        last = p.arrival
    return GenerateResult("".join(text), tuple(ids), reason, last - start)


class Client(ABC):
    """A synchronous client of one Triton server.

    Contract: `stream` yields one StreamPiece per server response in order, the last one carrying
    the finish reason; leaving the loop early (break, exception, garbage collection) cancels the
    request on the server. `generate` returns the whole completion from one non-streaming
    response. Both raise ServerError for an error the server reports, RequestTimeoutError after
    `timeout_s` (the request is cancelled), ServerUnavailableError when the server is unreachable.
    Use `make_client` to build one.
    """

    @abstractmethod
    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> GenerateResult: ...

    @abstractmethod
    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> Iterator[StreamPiece]: ...

    def close(self) -> None:  # noqa: B027 - optional hook: clients without connections keep it
        """Releases connections; the client is unusable afterwards."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(ABC):
    """The asyncio twin of Client, with the same contract; cancelling the awaiting task (or
    asyncio.timeout) cancels the request on the server. Use `make_async_client`."""

    @abstractmethod
    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> GenerateResult: ...

    @abstractmethod
    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> AsyncIterator[StreamPiece]: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Releases connections."""

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise InvalidRequestError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
