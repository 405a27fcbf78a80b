"""Opt-in timestamps of a token's way through the processes (docs/overhead.md).

With DISAGG_TRACE_DIR set in the server's environment, each model process appends `event seconds`
lines to DIR/<model>.<pid>.trace, the seconds from time.perf_counter (CLOCK_MONOTONIC on Linux: one
clock for every process of the host, so events of different processes can be ordered). Unset (the
default), mark() costs one global lookup. Events: "step" (an engine step produced tokens), "send"
and "sent" (around a response's IPC to the server), "read" (the orchestrator read a BLS response
or a channel frame). The orchestrator's first-token path is also marked per request, tagged with
its request_id (`event seconds request_id`): "o.*" in the orchestrator, "p.*" in prefill (the
hops are listed in client/bench/token_path.py REQUEST_FIRST).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TextIO

_DIR = os.environ.get("DISAGG_TRACE_DIR")
_out: TextIO | None = None
_lock = threading.Lock()


def configure(model: str) -> None:
    """Opens this process's trace file when tracing is on; call once, from initialize()."""
    global _out
    if _DIR:
        Path(_DIR).mkdir(parents=True, exist_ok=True)
        _out = open(Path(_DIR) / f"{model}.{os.getpid()}.trace", "a", buffering=1)  # noqa: SIM115


def mark(event: str, request: str = "") -> None:
    """Logs `event` now; `request` (no spaces) tags it with the request it belongs to."""
    if _out is not None:
        t = time.perf_counter()
        line = f"{event} {t:.7f} {request}\n" if request else f"{event} {t:.7f}\n"
        with _lock:
            _out.write(line)
