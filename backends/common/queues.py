"""Draining a queue: what a writer or reader thread takes at each wake-up."""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")


def take_all(q: queue.SimpleQueue[T], timeout: float | None = None) -> list[T]:
    """At least one item, waiting up to `timeout` (forever if None; queue.Empty if none comes),
    then every item queued since, in order."""
    items = [q.get(timeout=timeout)]
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
