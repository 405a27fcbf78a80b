"""glibc memcpy tuning for KV block copies (x86; ignored elsewhere).

KV blocks move in runs of a few MiB. glibc switches memcpy to non-temporal stores only above about
3/4 of the last-level cache, so those run copies pay read-for-ownership traffic that one bulk
memcpy does not (measured here: copies at ~0.7 of memcpy speed; with the threshold at 256 KiB
they reach it). Tunables are read when a process starts, so this is an environment setting for
the processes that copy KV: the tritonserver launcher and the transfer benchmark set it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

NON_TEMPORAL_THRESHOLD = "glibc.cpu.x86_non_temporal_threshold=0x40000"


def tuned_environment(env: Mapping[str, str]) -> dict[str, str]:
    """env with the KV copy tuning added to GLIBC_TUNABLES (an explicit threshold is kept)."""
    out = dict(env)
    current = out.get("GLIBC_TUNABLES", "")
    if "x86_non_temporal_threshold" not in current:
        out["GLIBC_TUNABLES"] = ":".join(t for t in (current, NON_TEMPORAL_THRESHOLD) if t)
    return out


def is_tuned() -> bool:
    return "x86_non_temporal_threshold" in os.environ.get("GLIBC_TUNABLES", "")
