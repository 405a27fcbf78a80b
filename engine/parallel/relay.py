"""What travels between pipeline stages with each step: the rows' sequence order, the tensor
(hidden states to the next stage, or the logits from the last stage to rank 0), and when each
stage ran the step.

One point-to-point message on the two ranks' link group: the order (int64) and the times
(float64) as bytes, then the tensor's bytes, packed into one uint8 buffer on the tensor's device
(a gloo message over loopback costs 1-3 ms here: one per hop, not three). Sizes are known to both
sides from the step plan; nothing is pickled.
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


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def send(
    group: Group, to: int, tensor: torch.Tensor, order: list[int], times: list[tuple[float, float]]
) -> Sending:
    """Posts the message to member `to` of `group`."""
    device = tensor.device
    head = torch.tensor(order, dtype=torch.int64, device=device)
    stamps = torch.tensor([x for span in times for x in span], dtype=torch.float64, device=device)
    message = torch.cat([_as_bytes(head), _as_bytes(stamps), _as_bytes(tensor)])
    return Sending([group.send([message], to, 0)], [message])


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
    numel = 1
    for d in shape:
        numel *= d
    sizes = (8 * sequences, 8 * 2 * stages, numel * torch.empty((), dtype=dtype).element_size())
    message = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    group.recv([message], source, 0).wait()
    head, stamps, body = torch.split(message, list(sizes))
    tensor = body.view(dtype).view(shape)
    flat = stamps.view(torch.float64).tolist()
    times = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    return Relayed(tensor, head.view(torch.int64).tolist(), times)
