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
    ours_wait_s: float  # seconds their threads were runnable but waiting for a core (schedstat)
    stolen_s: float  # CPU seconds the hypervisor ran other guests while ours wanted a core


class CpuUsage(NamedTuple):
    """Average cores busy over an interval: in total, by us, by everything else, and stolen.

    Stolen time (/proc/stat "steal") is a virtual machine's cores lost to other guests on the
    same host: invisible to every process inside, it still removes capacity. On this kind of
    machine it went from 0.0 to 0.7 of 2 cores between runs minutes apart, the largest source
    of run-to-run differences of the real-system check.
    """

    seconds: float
    cores_busy: float
    cores_ours: float
    cores_others: float
    cores: int
    wait_per_run: float  # our threads' seconds waiting for a core per second running
    cores_stolen: float

    @property
    def slowdown(self) -> float:
        """How much longer our work took than with a core always free: (run + wait) / run."""
        return 1.0 + self.wait_per_run


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid:  # after the command name: state ppid pgrp ...
            pids.append(int(stat.parent.name))
    return pids


def _run_and_wait_s(pid: int) -> tuple[float, float]:
    """CPU seconds and run-queue wait seconds of all threads of `pid` (/proc/PID/task/*/schedstat)."""
    run = wait = 0
    for f in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            r, w, _ = f.read_text().split()
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        run += int(r)
        wait += int(w)
    return run / 1e9, wait / 1e9


def snapshot(server_pgid: int | None = None) -> CpuSnapshot:
    """Counters now; `server_pgid` is the process group of a server to count as ours."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in first]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    busy = (sum(ticks[:8]) - idle) / _TICK  # user..steal; guest time is already inside user
    stolen = (ticks[7] if len(ticks) > 7 else 0) / _TICK
    pids = [os.getpid(), *(_group_pids(server_pgid) if server_pgid else [])]
    ours = wait = 0.0
    for pid in pids:
        r, w = _run_and_wait_s(pid)
        ours += r
        wait += w
    return CpuSnapshot(time.monotonic(), busy, ours, wait, stolen)


def usage(before: CpuSnapshot, after: CpuSnapshot) -> CpuUsage:
    dt = max(after.wall - before.wall, 1e-9)
    busy = (after.busy_s - before.busy_s) / dt
    ours = (after.ours_s - before.ours_s) / dt
    run = after.ours_s - before.ours_s
    wait = after.ours_wait_s - before.ours_wait_s
    stolen = (after.stolen_s - before.stolen_s) / dt
    return CpuUsage(
        dt,
        busy,
        ours,
        max(busy - ours - stolen, 0.0),
        os.cpu_count() or 1,
        wait / run if run > 0 else 0.0,
        stolen,
    )
