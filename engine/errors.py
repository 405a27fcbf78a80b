"""Errors of the engine: one request's (RequestError) or the whole engine's (EngineDeadError)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine refuses: the message names the problem and is safe to show the client."""


class EngineDeadError(RuntimeError):
    """The engine can run no more steps (a tensor-parallel rank died): every request it holds
    fails, and new ones are refused, with this message."""
