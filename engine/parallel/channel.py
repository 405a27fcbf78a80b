"""Step plans over a pipe: rank 0 writes each plan to every worker's stdin.

A plan is its header then its payload, both as raw little-endian int64 (StepPlan.to_tensors), so
the worker reads integers and nothing else. The pipe also supervises: a worker whose rank 0 died
reads end-of-file and exits, and rank 0 writing to a dead worker gets BrokenPipeError at once.
"""

from __future__ import annotations

from typing import IO

import numpy as np
import torch

from engine.step_plan import HEADER_LEN, StepPlan

_INT = np.dtype("<i8")


def write_plan(pipe: IO[bytes], plan: StepPlan) -> None:
    header, payload = plan.to_tensors()
    pipe.write(header.numpy().astype(_INT).tobytes() + payload.numpy().astype(_INT).tobytes())
    pipe.flush()


def read_plan(pipe: IO[bytes]) -> StepPlan | None:
    """The next plan, or None at end of file (rank 0 is gone or closed the pipe)."""
    raw = _read_exactly(pipe, HEADER_LEN * _INT.itemsize)
    if raw is None:
        return None
    header = torch.from_numpy(np.frombuffer(raw, dtype=_INT).copy())
    n = StepPlan.payload_len(header)
    body = _read_exactly(pipe, n * _INT.itemsize) if n else b""
    if body is None:
        return None
    return StepPlan.from_tensors(header, torch.from_numpy(np.frombuffer(body, dtype=_INT).copy()))


def _read_exactly(pipe: IO[bytes], n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = pipe.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
