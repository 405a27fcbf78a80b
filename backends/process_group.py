"""Process-group helpers: tritonserver runs in its own group, with its python-backend stubs."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def stub_shm_regions(pgid: int) -> list[str]:
    """Names of the shm regions the group's stubs use (an argument of each stub command line)."""
    names = []
    for pid in group_members(pgid):
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            names += [a.decode() for a in args if a.startswith(SHM_PREFIX.encode())]
    return names


def wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def kv_segment_prefix(pgid: int) -> str:
    """Name prefix of the KV pools the prefill models of a server (process group) create: the
    launcher removes them after the group is gone, even when it had to be killed."""
    return f"kvp_{pgid}_"


def kv_segments(pgid: int) -> list[Path]:
    return sorted(SHM_DIR.glob(kv_segment_prefix(pgid) + "*"))
