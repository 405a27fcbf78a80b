"""asyncio HTTP client over Triton's generate extension (see http_client.py), with aiohttp."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from client.api import (
    DEFAULT_MODEL,
    AsyncClient,
    GenerateResult,
    Prompt,
    RequestTimeoutError,
    SamplingParams,
    ServerError,
    ServerUnavailableError,
    StreamPiece,
)
from client.http_client import base_url, error_text
from client.tensors import http_body, http_result, parse_http_event


class AsyncHttpClient(AsyncClient):
    """asyncio client over HTTP (url "host:port"); one aiohttp session, made on first use."""

    def __init__(self, url: str) -> None:
        self.url = base_url(url)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No pool limit: the benchmark keeps hundreds of streams open at once.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        body = http_body(prompt, params or SamplingParams(), stream=False)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                async with self._post(model, "generate", body) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        raise ServerError(error_text(raw), model)
        except TimeoutError:
            raise RequestTimeoutError(f"no complete answer from {model} within {timeout_s} s") from None
        except aiohttp.ClientConnectionError as exc:
            raise ServerUnavailableError(f"server unavailable at {self.url}: {exc}") from None
        event = json.loads(raw)
        return http_result(event, model, start)

    def _post(self, model: str, endpoint: str, body: dict[str, Any]) -> Any:
        return self._http().post(f"{self.url}/v2/models/{model}/{endpoint}", json=body)

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> AsyncIterator[StreamPiece]:
        body = http_body(prompt, params or SamplingParams(), stream=True)  # validates now
        return self._events(model, body, timeout_s)

    async def _events(
        self, model: str, body: dict[str, Any], timeout_s: float | None
    ) -> AsyncIterator[StreamPiece]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            async with self._post(model, "generate_stream", body) as resp:
                if resp.status != 200:
                    raise ServerError(error_text(await resp.read()), model)
                while True:
                    left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    raw = await asyncio.wait_for(resp.content.readline(), left)
                    if not raw:
                        return
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise ServerError(str(event["error"]), model)
                    text, ids, reason, log_probs = parse_http_event(event)
                    yield StreamPiece(text, ids, time.perf_counter(), reason, log_probs)
        except (asyncio.TimeoutError, TimeoutError):
            raise RequestTimeoutError(f"no complete answer from {model} within {timeout_s} s") from None
        except aiohttp.ClientConnectionError as exc:
            raise ServerUnavailableError(f"server unavailable at {self.url}: {exc}") from None
