"""Synchronous HTTP client over Triton's generate extension.

`/v2/models/<m>/infer` refuses decoupled models, so streaming uses `/generate_stream`
(Server-Sent Events, one event per response) and a whole answer uses `/generate` with stream
false (the model then sends exactly one response).
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

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
)
from client.tensors import http_body, http_result, parse_http_event

DEFAULT_HTTP_TIMEOUT_S = 600.0


def base_url(url: str) -> str:
    """ "host:port" or "http://host:port" -> "http://host:port"."""
    return url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"


def error_text(body: bytes) -> str:
    """Triton's JSON error message (a plain JSON body, or one SSE event from /generate_stream),
    or the raw body when it is neither."""
    text = body.decode("utf-8", errors="replace").strip()
    text = text[5:].strip() if text.startswith("data:") else text
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text


class HttpClient(Client):
    """Client over HTTP (url "host:port", default port 8000). The timeout bounds every wait on
    the socket; closing the stream early closes the connection."""

    def __init__(self, url: str) -> None:
        self.url = base_url(url)

    def _open(self, model: str, endpoint: str, body: dict[str, Any], timeout_s: float | None) -> Any:
        req = urllib.request.Request(
            f"{self.url}/v2/models/{model}/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            return urllib.request.urlopen(req, timeout=timeout_s or DEFAULT_HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise ServerError(error_text(exc.read()), model) from None
        except TimeoutError:
            raise RequestTimeoutError(f"no answer from {model} within {timeout_s} s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise RequestTimeoutError(f"no answer from {model} within {timeout_s} s") from None
            raise ServerUnavailableError(f"server unavailable at {self.url}: {exc.reason}") from None

    def generate(
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
            with self._open(model, "generate", body, timeout_s) as resp:
                event = json.loads(resp.read())
        except TimeoutError:
            raise RequestTimeoutError(f"no complete answer from {model} within {timeout_s} s") from None
        return http_result(event, model, start)

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> Iterator[StreamPiece]:
        body = http_body(prompt, params or SamplingParams(), stream=True)
        return self._events(model, body, timeout_s)

    def _events(self, model: str, body: dict[str, Any], timeout_s: float | None) -> Iterator[StreamPiece]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        resp = self._open(model, "generate_stream", body, timeout_s)
        try:
            for raw in resp:
                if deadline is not None and time.monotonic() > deadline:
                    raise RequestTimeoutError(f"no complete answer from {model} within {timeout_s} s")
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue  # blank separators between events
                event = json.loads(line[5:])
                if "error" in event:
                    raise ServerError(str(event["error"]), model)
                text, ids, reason, log_probs = parse_http_event(event)
                yield StreamPiece(text, ids, time.perf_counter(), reason, log_probs)
        except TimeoutError:
            raise RequestTimeoutError(f"no complete answer from {model} within {timeout_s} s") from None
        finally:
            resp.close()
