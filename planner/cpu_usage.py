"""Where the host's CPU went during a measurement (Linux /proc): ours (this process and a server's
process group) versus everything else. A real-system check on a shared host is only as good as
the CPU it actually got; this records it next to the result."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

_TICK = float(os.sysconf("SC_CLK_TCK"))


class CpuSnapshot(NamedTuple):
    wall: float
    busy_s: float  # CPU seconds all cores spent outside idle/iowait since boot
    ours_s: float  # CPU seconds of this process and the watched process group


class CpuUsage(NamedTuple):
    """Average cores busy over an interval: in total, by us, by everything else."""

    seconds: float
    cores_busy: float
    cores_ours: float
    cores_others: float
    cores: int


def _group_cpu_s(pgid: int) -> float:
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        # After the command name: state ppid pgrp ... utime(12th) stime(13th), 0-based from state.
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def snapshot(server_pgid: int | None = None) -> CpuSnapshot:
    """Counters now; `server_pgid` is the process group of a server to count as ours."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in first]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    busy = (sum(ticks[:8]) - idle) / _TICK  # user..steal; guest time is already inside user
    own = os.times()
    ours = own.user + own.system + (_group_cpu_s(server_pgid) if server_pgid else 0.0)
    return CpuSnapshot(time.monotonic(), busy, ours)


def usage(before: CpuSnapshot, after: CpuSnapshot) -> CpuUsage:
    dt = max(after.wall - before.wall, 1e-9)
    busy = (after.busy_s - before.busy_s) / dt
    ours = (after.ours_s - before.ours_s) / dt
    return CpuUsage(dt, busy, ours, max(busy - ours, 0.0), os.cpu_count() or 1)
