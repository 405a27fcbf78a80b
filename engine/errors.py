"""Errors the engine reports for one request (never for the whole engine)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine refuses: the message names the problem and is safe to show the client."""
