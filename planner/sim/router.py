"""Routing: which instance a request goes to (the orchestrator's router)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar


class Loaded(Protocol):
    def owed_tokens(self, t: float) -> int:
        """Tokens the instance still owes as of t: prompt tokens not yet prefilled for a prefill
        instance, tokens still to generate for a decode instance (both for a colocated one)."""
        ...


T = TypeVar("T", bound=Loaded)
P = TypeVar("P", bound=Loaded)  # a prefill instance
D = TypeVar("D", bound=Loaded)  # a decode instance


class Router(Generic[T]):
    """Picks among `instances`: the one owing the fewest tokens (ties to the first), or by turns.

    A single instance is returned without taking a turn, so a one-instance router never moves the
    round-robin counter."""

    __slots__ = ("instances", "next_turn", "round_robin")

    def __init__(self, instances: Sequence[T], round_robin: bool) -> None:
        self.instances = list(instances)
        self.round_robin = round_robin
        self.next_turn = 0

    def pick(self, t: float) -> T:
        instances = self.instances
        if len(instances) == 1:
            return instances[0]
        if self.round_robin:
            k = self.next_turn % len(instances)
            self.next_turn += 1
            return instances[k]
        return min(instances, key=lambda x: x.owed_tokens(t))


class NodeUnit(Generic[P, D]):
    """A node-local unit: prefill and decode instances of one group, so KV moves over NVLink."""

    __slots__ = ("decode", "prefill", "prefill_router")

    def __init__(self, prefill: list[P], decode: list[D]) -> None:
        self.prefill = prefill
        self.decode = decode
        self.prefill_router = Router(prefill, round_robin=False)

    def load(self, t: float) -> float:
        """Tokens owed per decode instance: decode tokens still to generate + prompts queued."""
        owed = sum(d.owed_tokens(t) for d in self.decode)
        prompts = sum(p.owed_tokens(t) for p in self.prefill)
        return (owed + prompts) / len(self.decode)


class UnitRouter(Generic[P, D]):
    """Least-loaded routing over node-local units: the unit whose decode instances owe the fewest
    tokens each (ties to the first), then its least loaded prefill instance (routing to the least
    loaded prefill instance overall would send every tie to unit 0)."""

    __slots__ = ("units",)

    def __init__(self, units: list[NodeUnit[P, D]]) -> None:
        self.units = units

    def pick(self, t: float) -> P:
        unit = min(self.units, key=lambda u: u.load(t))
        return unit.prefill_router.pick(t)
