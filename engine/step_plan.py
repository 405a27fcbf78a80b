"""The step plan: what rank 0 decided for one forward pass, sent to every worker rank.

Only integers cross between processes (two int64 tensors, a fixed-size header then the payload,
written to each worker's stdin by engine/parallel/channel.py), so a worker never unpickles
anything. Every rank runs the same plan on its shard, which keeps their state (pool contents,
dense decode rows) identical without further messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

HEADER_LEN = 5  # kind, sequences, tokens, block-table width, dropped sequences


class StepKind(IntEnum):
    PREFILL = 1
    DECODE = 2
    STOP = 3  # the workers exit


@dataclass(frozen=True)
class StepPlan:
    """One forward pass over a batch of sequences.

    prefill: token_ids are the prompts concatenated and num_tokens their lengths; decode: token_ids
    are each sequence's newest token and num_tokens each context length including it. block_tables
    hold each sequence's blocks (the same ids on every rank: rank 0's block manager allocates them).
    dropped: sequences that left the engine since the previous plan (their dense decode rows go).
    """

    kind: StepKind
    seq_ids: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    num_tokens: tuple[int, ...] = ()
    block_tables: tuple[tuple[int, ...], ...] = ()
    dropped: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.seq_ids)
        if len(self.num_tokens) != n or len(self.block_tables) != n:
            raise ValueError("a step plan needs num_tokens and a block table per sequence")
        expected = sum(self.num_tokens) if self.kind == StepKind.PREFILL else n
        if self.kind != StepKind.STOP and len(self.token_ids) != expected:
            raise ValueError(f"a {self.kind.name} plan needs {expected} token ids, got {len(self.token_ids)}")

    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(header [HEADER_LEN], payload) int64 tensors; block tables are padded with -1."""
        width = max((len(t) for t in self.block_tables), default=0)
        tables = [list(t) + [-1] * (width - len(t)) for t in self.block_tables]
        header = torch.tensor(
            [int(self.kind), len(self.seq_ids), len(self.token_ids), width, len(self.dropped)],
            dtype=torch.int64,
        )
        flat = [
            *self.seq_ids,
            *self.token_ids,
            *self.num_tokens,
            *(b for t in tables for b in t),
            *self.dropped,
        ]
        return header, torch.tensor(flat, dtype=torch.int64)

    @staticmethod
    def payload_len(header: torch.Tensor) -> int:
        _, seqs, tokens, width, dropped = (int(x) for x in header.tolist())
        return seqs * 2 + tokens + seqs * width + dropped

    @classmethod
    def from_tensors(cls, header: torch.Tensor, payload: torch.Tensor) -> StepPlan:
        kind, seqs, tokens, width, dropped = (int(x) for x in header.tolist())
        values = payload.tolist()
        if len(values) != cls.payload_len(header):
            raise ValueError(
                f"step plan payload has {len(values)} integers, the header says {cls.payload_len(header)}"
            )
        at = 0

        def take(n: int) -> list[int]:
            nonlocal at
            at += n
            return values[at - n : at]

        seq_ids, token_ids, num_tokens = take(seqs), take(tokens), take(seqs)
        tables = [tuple(b for b in take(width) if b >= 0) for _ in range(seqs)]
        return cls(
            StepKind(kind),
            tuple(seq_ids),
            tuple(token_ids),
            tuple(num_tokens),
            tuple(tables),
            tuple(take(dropped)),
        )
