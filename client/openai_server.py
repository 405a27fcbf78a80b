"""OpenAI-compatible HTTP frontend: /v1/completions, /v1/chat/completions (streaming as
Server-Sent Events, or not) and /v1/models, forwarded to Triton over gRPC streaming.

    python -m client.openai_server --triton-url 127.0.0.1:8001 --port 8080 --tokenizer models/tiny-llama

A client disconnect cancels the handler's task, which cancels the gRPC call, which Triton turns
into a cancelled request in the model (its KV blocks are released).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from backends.common.params import request_context_tokens
from client.aio import AsyncGrpcClient
from client.api import ClientError, ServerError, ServerUnavailableError
from client.openai_protocol import (
    APIError,
    ParsedRequest,
    chunk_body,
    completion_body,
    logprobs_body,
    model_not_found,
    new_id,
    parse_chat,
    parse_completion,
    usage,
)

DEFAULT_MODELS = ("orchestrator", "colocated")


@dataclass(frozen=True)
class FrontendConfig:
    """Where to listen, which Triton to forward to, the served model names, the tokenizer folder
    (for usage counts and the chat template)."""

    triton_url: str = "127.0.0.1:8001"
    host: str = "127.0.0.1"
    port: int = 8080  # 0: a free port
    models: tuple[str, ...] = DEFAULT_MODELS
    tokenizer_dir: str | None = "models/tiny-llama"
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.models:
            raise ValueError("at least one model name is needed")
        if self.tokenizer_dir is not None and not Path(self.tokenizer_dir).is_dir():
            raise ValueError(f"tokenizer folder {self.tokenizer_dir} not found")


class Frontend:
    """The aiohttp application and its Triton client; `app` is ready to run."""

    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        self.tokenizer: Any = None
        if config.tokenizer_dir is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_dir)
        self.triton: AsyncGrpcClient | None = None
        self._contexts: dict[str, int] = {}  # each served model's request_context_tokens
        self.app = web.Application(middlewares=[self._errors])
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/models/{model}", self.model)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.on_startup.append(self._open)
        self.app.on_cleanup.append(self._close)

    async def _open(self, _: web.Application) -> None:
        self.triton = AsyncGrpcClient(self.config.triton_url)  # inside the serving loop

    async def _close(self, _: web.Application) -> None:
        if self.triton is not None:
            await self.triton.close()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as exc:
            return web.json_response(exc.body(), status=exc.status)
        except web.HTTPException as exc:  # 404 / 405 of the router, OpenAI-shaped
            err = APIError(f"{request.method} {request.path}: {exc.reason}", status=exc.status)
            return web.json_response(err.body(), status=exc.status)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The chat template of the tokenizer when it has one, else plain `role: content` lines."""
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return str(
                self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (its id as text without a tokenizer)."""
        if self.tokenizer is None:
            return [str(t) for t in ids]
        return [str(self.tokenizer.decode([t])) for t in ids]

    def prompt_tokens(self, parsed: ParsedRequest) -> int:
        if not isinstance(parsed.prompt, str):
            return len(parsed.prompt)
        return len(self.tokenizer(parsed.prompt).input_ids) if self.tokenizer is not None else 0

    async def models(self, _: web.Request) -> web.Response:
        data = [_model_card(m) for m in self.config.models]
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.config.models:
            raise model_not_found(name, self.config.models)
        return web.json_response(_model_card(name))

    async def health(self, _: web.Request) -> web.Response:
        """200 when Triton answers that it is ready (as vLLM's /health), else 503."""
        assert self.triton is not None
        if not await self.triton.ready():
            raise APIError(
                f"Triton at {self.config.triton_url} is not ready", status=503, type_="server_error"
            )
        return web.Response(status=200)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(
            request, parse_completion(await _json(request), self.config.models), chat=False
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_chat(await _json(request), self.config.models, self.render_chat)
        if not parsed.max_tokens_given:
            parsed = await self._to_context_end(parsed)
        return await self._serve(request, parsed, chat=True)

    async def _to_context_end(self, parsed: ParsedRequest) -> ParsedRequest:
        """A chat without max_tokens may use the rest of the context, as OpenAI's and vLLM's do:
        the model's limit (its config.pbtxt parameters and the checkpoint, request_context_tokens)
        minus the prompt. Without a tokenizer the prompt cannot be counted: OpenAI's completions
        default (16) stays."""
        if self.tokenizer is None or self.config.tokenizer_dir is None:
            return parsed
        context = self._contexts.get(parsed.model)
        if context is None:
            assert self.triton is not None
            try:
                raw = await self.triton.model_parameters(parsed.model)
            except ClientError as exc:
                raise _api_error(exc) from None
            context = self._contexts[parsed.model] = request_context_tokens(raw, self.config.tokenizer_dir)
        prompt = self.prompt_tokens(parsed)
        if prompt >= context:
            raise APIError(
                f"the prompt has {prompt} tokens; the model's context of {context} leaves no room for output",
                param="messages",
            )
        return dataclasses.replace(
            parsed, params=dataclasses.replace(parsed.params, max_tokens=context - prompt)
        )

    async def _serve(self, request: web.Request, parsed: ParsedRequest, chat: bool) -> web.StreamResponse:
        assert self.triton is not None
        rid = new_id("chatcmpl" if chat else "cmpl")
        pieces = self.triton.stream(
            parsed.prompt, parsed.params, model=parsed.model, timeout_s=self.config.request_timeout_s
        )
        want_logprobs = parsed.params.logprobs
        if not parsed.stream:
            text: list[str] = []
            ids: list[int] = []
            lps: list[float] = []
            reason = None
            try:
                async for p in pieces:
                    text.append(p.text)
                    ids += p.token_ids
                    lps += p.log_probs
                    reason = p.finish_reason or reason
            except ClientError as exc:
                raise _api_error(exc) from None
            use = usage(self.prompt_tokens(parsed), len(ids))
            logprobs = logprobs_body(self.token_texts(ids), lps, chat) if want_logprobs else None
            body = completion_body(rid, parsed.model, "".join(text), reason, use, chat, logprobs)
            return web.json_response(body)
        # Streaming: the first piece is awaited before the 200 goes out, so that a request the
        # server refuses (bad prompt, context overflow) still gets a proper HTTP error status.
        try:
            first = await pieces.__anext__()
        except StopAsyncIteration:
            first = None
        except ClientError as exc:
            raise _api_error(exc) from None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        model = parsed.model
        if chat:
            await _event(resp, chunk_body(rid, model, "", None, chat, role=True))
        n = chars = 0
        try:
            piece = first
            while piece is not None:
                n += len(piece.token_ids)
                logprobs = None
                if want_logprobs:
                    logprobs = logprobs_body(
                        self.token_texts(piece.token_ids), list(piece.log_probs), chat, chars
                    )
                chars += len(piece.text)
                await _event(
                    resp, chunk_body(rid, model, piece.text, piece.finish_reason, chat, logprobs=logprobs)
                )
                try:
                    piece = await pieces.__anext__()
                except StopAsyncIteration:
                    piece = None
        except ClientError as exc:
            await _event(resp, _api_error(exc).body())  # the status line is already sent
        if parsed.include_usage:
            body = chunk_body(rid, model, None, None, chat)
            body["usage"] = usage(self.prompt_tokens(parsed), n)
            await _event(resp, body)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "triton-disagg"}


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"the request body is not valid JSON: {exc}") from None


async def _event(resp: web.StreamResponse, body: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(body).encode() + b"\n\n")


def _api_error(exc: ClientError) -> APIError:
    if isinstance(exc, ServerUnavailableError):
        return APIError(str(exc), status=503, type_="server_error", code="triton_unavailable")
    if isinstance(exc, ServerError):
        # Triton refuses bad input per request (context overflow, bad ids): the caller's fault.
        return APIError(exc.message, status=400)
    return APIError(str(exc), status=500, type_="server_error")


class FrontendThread:
    """Runs the frontend on its own event loop in a background thread (tests, embedding)."""

    def __init__(self, config: FrontendConfig) -> None:
        self.frontend = Frontend(config)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="openai-frontend", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.frontend.config.host}:{self.port}"

    def start(self) -> FrontendThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.frontend.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.frontend.config.host, self.frontend.config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def __enter__(self) -> FrontendThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m client.openai_server", description=__doc__)
    parser.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton gRPC HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0: a free port")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="served Triton models")
    parser.add_argument("--tokenizer", default="models/tiny-llama", help="folder for usage counts and chat")
    args = parser.parse_args(argv)
    config = FrontendConfig(
        triton_url=args.triton_url,
        host=args.host,
        port=args.port,
        models=tuple(m for m in args.models.split(",") if m),
        tokenizer_dir=args.tokenizer or None,
    )
    web.run_app(Frontend(config).app, host=config.host, port=config.port)


if __name__ == "__main__":
    main()
