"""Errors of the engine: one request's (RequestError) or the whole engine's (EngineDeadError)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine refuses: the message names the problem and is safe to show the client."""


def check_context(prompt_len: int, max_tokens: int, context: int) -> None:
    """Raises RequestError unless a prompt and its max_tokens fit a context of `context` tokens."""
    if prompt_len >= context:
        raise RequestError(
            f"prompt has {prompt_len} tokens; the context is {context} and must hold at least one new token"
        )
    if prompt_len + max_tokens > context:
        raise RequestError(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of {context}"
        )


class EngineDeadError(RuntimeError):
    """The engine can run no more steps (a tensor-parallel rank died): every request it holds
    fails, and new ones are refused, with this message."""
