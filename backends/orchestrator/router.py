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


class RoutingTable:
    """Prefill/decode replica groups. A request goes to the group with the fewest outstanding
    tokens, then to that group's least loaded prefill and decode replicas. Low node-affinity plans
    group the replicas that share nodes, so the KV cache never leaves a node; otherwise there is
    one group holding every replica."""

    def __init__(self, groups: list[tuple[list[str], list[str]]]) -> None:
        if not groups:
            raise ValueError("routing table needs at least one group")
        self.groups = [(Router(p), Router(d)) for p, d in groups]
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, prefill_models: str, decode_models: str, routing_groups: str = "") -> RoutingTable:
        """prefill_models/decode_models: comma-separated names; routing_groups: 'p0,p1:d0;p2:d1'."""
        prefill = [m.strip() for m in prefill_models.split(",") if m.strip()]
        decode = [m.strip() for m in decode_models.split(",") if m.strip()]
        if not routing_groups.strip():
            return cls([(prefill, decode)])
        groups = []
        for part in routing_groups.split(";"):
            ps, sep, ds = part.partition(":")
            group = (
                [m.strip() for m in ps.split(",") if m.strip()],
                [m.strip() for m in ds.split(",") if m.strip()],
            )
            if not sep or not group[0] or not group[1]:
                raise ValueError(f"routing group {part!r} must be 'prefill,...:decode,...'")
            groups.append(group)
        named_p = sorted(m for g in groups for m in g[0])
        named_d = sorted(m for g in groups for m in g[1])
        if named_p != sorted(prefill) or named_d != sorted(decode):
            raise ValueError("routing_groups must name every prefill and decode model exactly once")
        return cls(groups)

    @property
    def prefill_models(self) -> list[str]:
        return [m for p, _ in self.groups for m in p.models]

    def pick(self) -> tuple[Router, Router]:
        with self._lock:
            return min(
                self.groups,
                key=lambda g: (
                    sum(map(g[0].outstanding, g[0].models)) + sum(map(g[1].outstanding, g[1].models))
                ),
            )
