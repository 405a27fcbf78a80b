"""What travels between pipeline stages with each step: the rows' sequence order, the tensor
(hidden states to the next stage, or the logits from the last stage to rank 0), and when each
stage ran the step.

Three point-to-point messages on the two ranks' link group, always in the same order, so they
match up without tags. Sizes are known to both sides from the step plan; nothing is pickled.
The stage times (time.monotonic, one clock for every process of the machine) are what the
pipeline benchmark measures overlap with.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from engine.parallel.group import Group


class Relayed(NamedTuple):
    tensor: torch.Tensor
    order: list[int]  # the sequence id of each row (decode), or of each sequence (prefill)
    times: list[tuple[float, float]]  # (start, end) of this step on every stage so far


class Sending:
    """Messages posted without waiting (rank 0 goes on with the next step meanwhile); the tensors
    stay referenced here until wait() says the transport is done with them."""

    def __init__(self, works: list[Any], tensors: list[torch.Tensor]) -> None:
        self._works, self._tensors = works, tensors

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._tensors = [], []


def send(
    group: Group, to: int, tensor: torch.Tensor, order: list[int], times: list[tuple[float, float]]
) -> Sending:
    """Posts the three messages to member `to` of `group`."""
    device = tensor.device
    parts = [
        torch.tensor(order, dtype=torch.int64, device=device),
        tensor.contiguous(),
        torch.tensor([x for span in times for x in span], dtype=torch.float64, device=device),
    ]
    return Sending([group.send([p], to, 0) for p in parts], parts)


def receive(
    group: Group,
    source: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    sequences: int,
    stages: int,
) -> Relayed:
    """Receives what member `source` sent: a tensor of `shape` and `dtype`, the order of
    `sequences` sequences and the times of `stages` stages."""
    order = torch.empty(sequences, dtype=torch.int64, device=device)
    tensor = torch.empty(shape, dtype=dtype, device=device)
    times = torch.empty(2 * stages, dtype=torch.float64, device=device)
    for part in (order, tensor, times):
        group.recv([part], source, 0).wait()
    flat = times.tolist()
    return Relayed(tensor, order.tolist(), [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)])
