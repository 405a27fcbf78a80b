"""Client of the triton-disagg deployment: sync and asyncio, gRPC and HTTP.

from client import SamplingParams, make_client
with make_client("127.0.0.1:8001", "grpc") as c:
    print(c.generate("The quick brown fox", SamplingParams(max_tokens=16)).text)
    for piece in c.stream("Once upon a time"):
        print(piece.text, end="", flush=True)
"""

from __future__ import annotations

from client.api import (
    DEFAULT_MODEL,
    AsyncClient,
    Client,
    ClientError,
    GenerateResult,
    InvalidRequestError,
    Prompt,
    RequestCancelledError,
    RequestTimeoutError,
    SamplingParams,
    ServerError,
    ServerUnavailableError,
    StreamPiece,
    check_protocol,
)

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}


def make_client(url: str | None = None, protocol: str = "grpc") -> Client:
    """A synchronous client; url "host:port" (default: Triton's default port for the protocol)."""
    check_protocol(protocol)
    url = url or DEFAULT_URLS[protocol]
    if protocol == "grpc":
        from client.grpc_client import GrpcClient

        return GrpcClient(url)
    from client.http_client import HttpClient

    return HttpClient(url)


def make_async_client(url: str | None = None, protocol: str = "grpc") -> AsyncClient:
    """An asyncio client; create it inside the running event loop."""
    check_protocol(protocol)
    url = url or DEFAULT_URLS[protocol]
    if protocol == "grpc":
        from client.aio import AsyncGrpcClient

        return AsyncGrpcClient(url)
    from client.aio_http import AsyncHttpClient

    return AsyncHttpClient(url)


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_URLS",
    "AsyncClient",
    "Client",
    "ClientError",
    "GenerateResult",
    "InvalidRequestError",
    "Prompt",
    "RequestCancelledError",
    "RequestTimeoutError",
    "SamplingParams",
    "ServerError",
    "ServerUnavailableError",
    "StreamPiece",
    "make_async_client",
    "make_client",
]
