"""Least-loaded routing over replicas of one phase, by outstanding tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Router:
    """Picks the replica with the fewest outstanding tokens (prompt tokens for prefill, tokens
    still to generate for decode); ties go to the first listed. Thread-safe."""

    def __init__(self, models: list[str]) -> None:
        if not models or any(not m for m in models):
            raise ValueError(f"routing table needs at least one model name, got {models!r}")
        self._load = dict.fromkeys(models, 0)
        self._lock = threading.Lock()

    @property
    def models(self) -> list[str]:
        return list(self._load)

    def outstanding(self, model: str) -> int:
        return self._load[model]

    @contextmanager
    def route(self, tokens: int) -> Iterator[str]:
        """Picks a replica and counts `tokens` against it until the block exits."""
        with self._lock:
            model = min(self._load, key=self._load.__getitem__)
            self._load[model] += tokens
        try:
            yield model
        finally:
            with self._lock:
                self._load[model] -= tokens
