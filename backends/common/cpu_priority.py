"""A model instance's CPU priority: its nice value, for phases that share a host's cores.

When prefill and decode run on the same cores (the CPU deployment), the scheduler splits a
contended core evenly between whichever threads are runnable. Decode's loop is always runnable
while it has sequences, so the orchestrator, the server and the clients, which need a core now
and then, preempt prefill as often as decode, and prefill's long bursts are what TTFT waits on.
A higher nice value on decode makes those threads take decode's share first (docs/overhead.md,
"Decode's CPU priority").
"""

from __future__ import annotations

import os

MAX_NICE = 19  # Linux's lowest priority


def lower_priority(increment: int) -> int:
    """Add `increment` to the nice value of every thread of this process (at most MAX_NICE) and
    return the calling thread's new nice value.

    Threads and processes started later (the engine loop, the writers, TP/PP workers) inherit the
    value of the thread that starts them, so this is called before any of them starts. Raising a
    nice value needs no privilege; 0 leaves every thread as it is.
    """
    if increment < 0:
        raise ValueError(f"a nice increment must be >= 0, got {increment}")
    if increment:
        for tid in map(int, os.listdir("/proc/self/task")):
            try:
                nice = os.getpriority(os.PRIO_PROCESS, tid)  # on Linux a tid names one thread
                os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, nice + increment))
            except ProcessLookupError:  # the thread ended meanwhile
                continue
    return os.getpriority(os.PRIO_PROCESS, 0)
