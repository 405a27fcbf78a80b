"""Continuous-batching scheduler: prefill batches by token budget, decode batches of all running.

Admission reserves memory for a sequence's whole life (prompt + max_tokens), the policy
TensorRT-LLM calls GUARANTEED_NO_EVICT: blocks are allocated lazily as tokens arrive, but a
sequence is admitted only if the free blocks cover every running sequence's remaining growth plus
its own, so a decode step never runs out of blocks and nothing is ever preempted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from engine.block_manager import BlockManager
from engine.sequence import Sequence, Status


def remaining_growth(seqs: Iterable[Sequence], blocks: BlockManager) -> int:
    """Blocks these sequences may still allocate before they finish."""
    return sum(blocks.blocks_for(s.max_total_tokens) - len(s.block_table) for s in seqs)


def fits(seq: Sequence, others: Iterable[Sequence], blocks: BlockManager, extra_reserved: int = 0) -> bool:
    """True if seq's whole life fits next to the remaining growth of `others` (the admission rule)."""
    need = blocks.blocks_for(seq.max_total_tokens) - len(seq.block_table)
    return need <= blocks.num_free - remaining_growth(others, blocks) - extra_reserved


class Batch(NamedTuple):
    kind: str  # "prefill" | "decode" | "idle"
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def can_admit(self, seq: Sequence, extra_reserved: int = 0) -> bool:
        return fits(seq, self.running, self.blocks, extra_reserved)

    def schedule(self) -> Batch:
        """Prefill first (lower TTFT, as vLLM does), else one decode step over every running sequence."""
        batch: list[Sequence] = []
        tokens = 0
        reserved = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            # A prompt over the budget still runs, alone: the budget bounds batching, not prompt length.
            if batch and tokens + seq.prompt_len > self.max_num_batched_tokens:
                break
            if not self.can_admit(seq, reserved):
                break
            self.waiting.popleft()
            batch.append(seq)
            tokens += seq.prompt_len
            reserved += self.blocks.blocks_for(seq.max_total_tokens)
        if batch:
            return Batch("prefill", batch)
        if self.running:
            return Batch("decode", list(self.running))
        return Batch("idle", [])

    def start(self, seqs: list[Sequence]) -> None:
        """Marks prefilled (or adopted) sequences as running."""
        for seq in seqs:
            if not seq.finished:
                seq.status = Status.RUNNING
                self.running.append(seq)

    def retire_finished(self) -> list[Sequence]:
        done = [s for s in self.running if s.finished]
        if done:
            self.running = [s for s in self.running if not s.finished]
        return done

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
