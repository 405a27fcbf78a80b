"""The process groups of one engine replica's ranks (torch.distributed, without global state).

Ranks are stage-major: rank stage * tp + t is tensor-parallel rank t of pipeline stage `stage`;
rank 0 (stage 0, t 0) is the engine's own process. A TCPStore hosted by rank 0 is the rendezvous.
The groups, gloo on CPU and NCCL on CUDA:
- "tp/<stage>": a stage's tensor-parallel ranks, for the all-reduces of its forward pass;
- "pp/<stage>/<t>": rank t of a stage and rank t of the next, for the activations between them;
- "out": the last stage's rank 0 and rank 0, for the logits rank 0 samples from.
Every process creates the groups it belongs to in one fixed order (creating a group waits for all
its members, so any other order could deadlock). No default process group is created, so several
engines can live in one process, as they do in the tests.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

LOCALHOST = "127.0.0.1"
# ProcessGroupGloo or ProcessGroupNCCL (torch's stubs do not declare their collectives).
Group = Any


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


class GroupSpec(NamedTuple):
    name: str
    ranks: tuple[int, ...]  # global ranks; a member's index here is its rank in the group


@dataclass(frozen=True)
class Topology:
    tp: int
    pp: int

    @property
    def size(self) -> int:
        return self.tp * self.pp

    def rank(self, stage: int, t: int) -> int:
        return stage * self.tp + t

    def place(self, rank: int) -> tuple[int, int]:
        """(stage, tensor-parallel rank) of a global rank."""
        return divmod(rank, self.tp)

    def groups(self) -> list[GroupSpec]:
        """Every group, in the order every process creates them."""
        specs = []
        if self.tp > 1:
            specs += [
                GroupSpec(f"tp/{s}", tuple(self.rank(s, t) for t in range(self.tp))) for s in range(self.pp)
            ]
        for s in range(self.pp - 1):
            specs += [
                GroupSpec(f"pp/{s}/{t}", (self.rank(s, t), self.rank(s + 1, t))) for t in range(self.tp)
            ]
        if self.pp > 1:
            specs.append(GroupSpec("out", (0, self.rank(self.pp - 1, 0))))
        return specs


class RankGroups:
    """The groups one rank belongs to: `tp` (its stage's all-reduces), `prev` and `next` (its
    links to the neighbouring stages; in both it is member 1 and 0 respectively), `out` (rank 0
    and the last stage's rank 0: member 0 and 1)."""

    def __init__(self, topology: Topology, rank: int) -> None:
        self.topology, self.rank = topology, rank
        self.tp: Group | None = None
        self.prev: Group | None = None
        self.next: Group | None = None
        self.out: Group | None = None

    def form(self, store: dist.Store, device: torch.device, timeout_s: float) -> None:
        """Creates this rank's groups (blocks until their other members create them too)."""
        stage, t = self.topology.place(self.rank)
        for spec in self.topology.groups():
            if self.rank not in spec.ranks:
                continue
            group = _group(
                dist.PrefixStore(spec.name, store),
                spec.ranks.index(self.rank),
                len(spec.ranks),
                device,
                timeout_s,
            )
            if spec.name.startswith("tp/"):
                self.tp = group
            elif spec.name == "out":
                self.out = group
            elif spec.name == f"pp/{stage}/{t}":
                self.next = group
            else:
                self.prev = group

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sums `tensor` over the stage's tensor-parallel ranks, in place."""
        if self.tp is None:
            raise RuntimeError("this rank's tensor-parallel group is not formed")
        self.tp.allreduce([tensor]).wait()


def _group(store: dist.Store, rank: int, size: int, device: torch.device, timeout_s: float) -> Group:
    """A group over `store`: NCCL when the ranks are GPUs, else gloo. Blocks until every member has
    joined (or `timeout_s`)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = datetime.timedelta(seconds=timeout_s)
        return dist.ProcessGroupNCCL(store, rank, size, options)
    return dist.ProcessGroupGloo(store, rank, size, datetime.timedelta(seconds=timeout_s))
