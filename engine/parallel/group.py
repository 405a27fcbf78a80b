"""The process group of one engine replica's ranks (torch.distributed, without global state).

A TCPStore hosted by rank 0 is the rendezvous; the group reduces activations with gloo on CPU and
NCCL on CUDA. No default process group is created, so several engines (and their groups) can
live in one process, as they do in the tests.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

LOCALHOST = "127.0.0.1"


def rendezvous(port: int, rank: int, size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0 hosts the store on `port` (127.0.0.1); the other ranks connect to it."""
    return dist.TCPStore(
        LOCALHOST,
        port,
        size,
        is_master=rank == 0,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


# ProcessGroupGloo or ProcessGroupNCCL (torch's stubs do not declare their collectives).
Group = Any


def compute_group(store: dist.Store, rank: int, size: int, device: torch.device, timeout_s: float) -> Group:
    """The ranks' group for all-reduces: NCCL when the ranks are GPUs, else gloo. Blocks until
    every rank has joined (or `timeout_s`)."""
    prefix = dist.PrefixStore("tp", store)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = datetime.timedelta(seconds=timeout_s)
        return dist.ProcessGroupNCCL(prefix, rank, size, options)
    return dist.ProcessGroupGloo(prefix, rank, size, datetime.timedelta(seconds=timeout_s))


class GroupReduce:
    """An all-reduce (sum, in place) over a group set once it exists: the model is built, with
    this as its reduction, before the ranks rendezvous."""

    def __init__(self) -> None:
        self.group: Group | None = None

    def __call__(self, tensor: torch.Tensor) -> None:
        if self.group is None:
            raise RuntimeError("the tensor-parallel group is not formed yet")
        self.group.allreduce([tensor]).wait()
