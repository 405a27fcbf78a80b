"""OpenAI API request parsing and response shapes for /v1/completions and /v1/chat/completions.

Only what the deployment can honour is accepted; an unsupported option (n > 1, top alternatives in
logprobs, echo, best_of, tools, response_format, or any key this server does not know) is refused
with an OpenAI-style invalid_request_error naming it, instead of being ignored. Ranges are OpenAI's
(temperature in [0, 2], penalties in [-2, 2], top_p in (0, 1]); repetition_penalty, min_tokens,
top_k and ignore_eos are vLLM's extensions.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any

from client.api import InvalidRequestError, Prompt, SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions (a chat's is the rest of the context)


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ParsedRequest:
    """A validated OpenAI request: the Triton model, the prompt and the sampling parameters."""

    model: str
    prompt: Prompt
    params: SamplingParams
    stream: bool
    include_usage: bool
    # False for a chat that set neither max_completion_tokens nor max_tokens: its params hold
    # DEFAULT_MAX_TOKENS until the frontend replaces it with the rest of the model's context.
    max_tokens_given: bool = True


_UNSUPPORTED = ("echo", "best_of", "suffix", "tools", "functions", "logit_bias")
# Every key a request may carry; anything else is refused by name. "user" is an end-user id for the
# caller's own records (it does not change the output).
_KNOWN = frozenset({
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "n", "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_tokens", "ignore_eos", "user", "logprobs", "top_logprobs", *_UNSUPPORTED,
})  # fmt: skip


def _number(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise APIError(f"'{name}' must be {'an integer' if kind is int else 'a number'}", param=name)
    return kind(value)


def model_not_found(model: str, models: tuple[str, ...]) -> APIError:
    """The 404 of a model this frontend does not serve."""
    return APIError(
        f"The model '{model}' does not exist; available: {', '.join(models)}",
        status=404,
        param="model",
        code="model_not_found",
    )


def _ranged(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = _number(body, name, float)
    if value is not None and not low <= value <= high:
        raise APIError(f"'{name}' must be between {low:g} and {high:g}, got {value:g}", param=name)
    return value


def _logprobs(body: dict[str, Any], chat: bool) -> bool:
    """Whether the request wants each token's log-probability: chat's `logprobs: true`,
    completions' `logprobs: 0`. Alternatives (top_logprobs, completions' logprobs > 0) are refused."""
    top = _number(body, "top_logprobs", int)
    if top:
        raise APIError(
            "top_logprobs > 0 is not supported (each token's own log-probability is)", param="top_logprobs"
        )
    value = body.get("logprobs")
    if chat:
        if value is not None and not isinstance(value, bool):
            raise APIError("'logprobs' must be a boolean", param="logprobs")
        return bool(value)
    n = _number(body, "logprobs", int)
    if n:
        raise APIError(
            "logprobs > 0 (alternatives) is not supported; logprobs: 0 gives each token's", param="logprobs"
        )
    return n == 0


def _param_of(message: str) -> str | None:
    """The option a client-side validation message is about (its first word)."""
    word = message.split(" ", 1)[0]
    return word if word in _KNOWN else None


def _common(
    body: dict[str, Any], models: tuple[str, ...], max_tokens_key: str
) -> tuple[str, SamplingParams, bool, bool]:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError("'model' is required", param="model")
    if model not in models:
        raise model_not_found(model, models)
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise APIError(f"'{unknown[0]}' is not supported by this server", param=unknown[0])
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, 0, []):
            raise APIError(f"'{name}' is not supported by this server", param=name)
    if _number(body, "n", int, 1) != 1:
        raise APIError("only n=1 is supported", param="n")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else stop or ()
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise APIError("'stop' must be a non-empty string or a list of them", param="stop")
    max_tokens = _number(body, max_tokens_key, int)
    if max_tokens is None and max_tokens_key != "max_tokens":
        max_tokens = _number(body, "max_tokens", int)
    temperature = _ranged(body, "temperature", 0.0, 2.0)
    logprobs = _logprobs(body, chat=max_tokens_key != "max_tokens")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError("'ignore_eos' must be a boolean", param="ignore_eos")
    try:
        params = SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            # The server's greedy path is temperature 0; OpenAI's temperature 0 means the same.
            temperature=temperature if temperature else None,
            top_p=_number(body, "top_p", float),
            top_k=_number(body, "top_k", int),
            seed=_number(body, "seed", int),
            stop=tuple(stops),
            presence_penalty=_ranged(body, "presence_penalty", -2.0, 2.0),
            frequency_penalty=_ranged(body, "frequency_penalty", -2.0, 2.0),
            repetition_penalty=_number(body, "repetition_penalty", float),
            min_tokens=_number(body, "min_tokens", int),
            ignore_eos=ignore_eos,
            logprobs=logprobs,
        )
    except InvalidRequestError as exc:
        raise APIError(str(exc), param=_param_of(str(exc))) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return model, params, stream, include_usage


def parse_completion(body: Any, models: tuple[str, ...]) -> ParsedRequest:
    """/v1/completions: prompt is a string, a list of one string, or a list of token ids."""
    model, params, stream, usage = _common(body, models, "max_tokens")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return ParsedRequest(model, prompt, params, stream, usage)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return ParsedRequest(model, [int(t) for t in prompt], params, stream, usage)
    raise APIError(
        "'prompt' must be a non-empty string or list of token ids (one prompt per request)", param="prompt"
    )


def chat_messages(body: Any) -> list[dict[str, str]]:
    """The messages of a chat request as role/content strings (text parts of content lists joined)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
        ):
            raise APIError(
                f"messages[{i}] needs a role of system, developer, user, assistant or tool", param="messages"
            )
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(t, str) for t in parts):
                raise APIError(f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(str(t) for t in parts)
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string", param="messages")
        out.append({"role": str(m["role"]), "content": content})
    return out


def parse_chat(body: Any, models: tuple[str, ...], render: Any) -> ParsedRequest:
    """/v1/chat/completions: `render(messages) -> prompt text` applies the chat template."""
    model, params, stream, usage = _common(body, models, "max_completion_tokens")
    given = any(body.get(k) is not None for k in ("max_completion_tokens", "max_tokens"))
    return ParsedRequest(model, render(chat_messages(body)), params, stream, usage, given)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def logprobs_body(tokens: list[str], log_probs: list[float], chat: bool, offset: int = 0) -> dict[str, Any]:
    """The `logprobs` of a choice: each token's text and log-probability, no alternatives. For
    completions, text_offset counts from `offset` (the characters of the text before these tokens)."""
    if chat:
        return {
            "content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                for t, lp in zip(tokens, log_probs, strict=True)
            ]
        }
    offsets = list(itertools.accumulate((len(t) for t in tokens), initial=offset))[:-1]
    return {"tokens": tokens, "token_logprobs": log_probs, "top_logprobs": None, "text_offset": offsets}


def completion_body(
    rid: str,
    model: str,
    text: str,
    reason: str | None,
    use: dict[str, int] | None,
    chat: bool,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole response, or (chat=False/True with streaming callers) one chunk's envelope."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if use is not None:
        body["usage"] = use
    return body


def chunk_body(
    rid: str,
    model: str,
    text: str | None,
    reason: str | None,
    chat: bool,
    role: bool = False,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed chunk; with text None and no reason, a usage-only chunk has empty choices."""
    choices: list[dict[str, Any]] = []
    if text is not None or reason is not None or role:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choices.append({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason})
        else:
            choices.append({"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": reason})
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
