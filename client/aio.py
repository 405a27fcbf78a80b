"""asyncio gRPC client: many concurrent requests on one channel, one stream per request."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from client.api import (
    DEFAULT_MODEL,
    AsyncClient,
    GenerateResult,
    Prompt,
    RequestTimeoutError,
    SamplingParams,
    StreamPiece,
    collect,
)
from client.grpc_client import server_error
from client.tensors import grpc_inputs, parse_grpc_result

_ids = itertools.count()


def remaining(deadline: float | None) -> float | None:
    """Seconds left until a time.monotonic() deadline (None: no deadline)."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class AsyncGrpcClient(AsyncClient):
    """asyncio client over tritonclient.grpc.aio (url "host:port").

    The end of a request is the end of its stream: the client half-closes after its one request,
    and the server closes the stream once the request's FINAL response is out (tritonclient's
    aio API refuses the reserved `triton_enable_empty_final_response` parameter, so there is no
    empty final response to wait for). A cancelled or timed-out request cancels the gRPC call,
    which Triton turns into a cancelled request in the model.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn = grpcaio.InferenceServerClient(url)

    async def close(self) -> None:
        await self._conn.close()

    async def ready(self) -> bool:
        """Whether the server answers that it is ready; False when it cannot be reached."""
        try:
            return bool(await self._conn.is_server_ready())
        except (InferenceServerException, grpc.RpcError, OSError):
            return False

    async def model_parameters(self, model: str) -> dict[str, str]:
        """The string parameters of a served model's config.pbtxt (Triton's model config API)."""
        try:
            reply = await self._conn.get_model_config(model, as_json=True)
        except InferenceServerException as exc:
            raise server_error(exc, model) from None
        params = reply.get("config", {}).get("parameters", {})
        return {k: str(v.get("string_value", "")) for k, v in params.items()}

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        start = time.perf_counter()
        pieces = [
            p async for p in self._pieces(prompt, params or SamplingParams(), model, timeout_s, stream=False)
        ]
        return collect(iter(pieces), start)

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> AsyncIterator[StreamPiece]:
        params = params or SamplingParams()
        grpc_inputs(prompt, params, True)  # raise InvalidRequestError now, not at the first await
        return self._pieces(prompt, params, model, timeout_s, stream=True)

    async def _pieces(
        self, prompt: Prompt, params: SamplingParams, model: str, timeout_s: float | None, stream: bool
    ) -> AsyncIterator[StreamPiece]:
        request: dict[str, Any] = {
            "model_name": model,
            "inputs": grpc_inputs(prompt, params, stream),
            "request_id": f"a{next(_ids)}",
        }

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield request

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        call = self._conn.stream_infer(one_request())
        try:
            while True:
                try:
                    result, error = await asyncio.wait_for(call.__anext__(), remaining(deadline))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise RequestTimeoutError(
                        f"no complete answer from {model} within {timeout_s} s"
                    ) from None
                now = time.perf_counter()
                if error is not None:
                    raise server_error(error, model)
                parsed = parse_grpc_result(result)
                if parsed is not None:
                    yield StreamPiece(parsed[0], parsed[1], now, parsed[2], parsed[3])
        except InferenceServerException as exc:
            raise server_error(exc, model) from None
        except grpc.aio.AioRpcError as exc:  # e.g. connection refused
            cause = InferenceServerException(msg=str(exc.details()), status=str(exc.code()))
            raise server_error(cause, model) from None
        finally:
            # Cancelling a finished call is a no-op; an unfinished one is cancelled on the server.
            call.cancel()
