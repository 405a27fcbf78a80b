"""The event loop: the simulation clock and its queue of scheduled events."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

# An event handler gets the event's time and the argument it was scheduled with.
Handler = Callable[[float, Any], None]


class EventLoop:
    """Runs events in time order; events at the same time run in the order they were scheduled.

    The heap holds (time, sequence, handler, argument); the sequence number is unique, so tuples never
    compare past it and a run is deterministic. Arrivals are not put in the heap: they come from a
    separate stream sorted by time (ties by request index), and at equal times an arrival runs before
    any scheduled event, which is the order a heap seeded with every arrival up front would give (the
    arrivals would hold the lowest sequence numbers). Keeping them out keeps the heap small."""

    __slots__ = ("_heap", "_sequence")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Handler, Any]] = []
        self._sequence = 0

    def schedule(self, t: float, handler: Handler, arg: Any) -> None:
        """Call handler(t, arg) at time t."""
        self._sequence += 1
        heapq.heappush(self._heap, (t, self._sequence, handler, arg))

    def run(self, arrivals: list[float], on_arrival: Callable[[float, int], None]) -> None:
        """Deliver every arrival (on_arrival(time, request index)) and every event until none is left."""
        heap = self._heap
        pop = heapq.heappop
        for i in sorted(range(len(arrivals)), key=arrivals.__getitem__):  # stable: ties by index
            arrival = arrivals[i]
            while heap and heap[0][0] < arrival:
                t, _, handler, arg = pop(heap)
                handler(t, arg)
            on_arrival(arrival, i)
        while heap:
            t, _, handler, arg = pop(heap)
            handler(t, arg)
