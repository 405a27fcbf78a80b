"""The decode batch split into pipeline micro-batches, each in flight on its own.

With pp_size stages, the running sequences are split into pp_size micro-batches that are in the
pipeline at the same time: while the later stages work on one, stage 0 runs the next. Each
micro-batch is a continuous batch of its own: a sequence joins the smallest one, and leaves when
it finishes. A sequence whose micro-batch is in flight must stay until the step completes (every
rank may still write its KV). With one stage this is the plain continuous batch, one step at a time.
"""

from __future__ import annotations

from collections import deque

from engine.engine import Step
from engine.sequence import Sequence


class MicroBatch:
    def __init__(self) -> None:
        self.seqs: list[Sequence] = []
        self.step: Step | None = None  # the step in flight, if any

    @property
    def in_flight(self) -> bool:
        return self.step is not None


class MicroBatches:
    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"need at least one micro-batch, got {count}")
        self.batches = [MicroBatch() for _ in range(count)]
        self._of: dict[int, MicroBatch] = {}  # seq_id -> its micro-batch
        self._flights: deque[MicroBatch] = deque()  # in launch order: steps complete in that order

    def add(self, seq: Sequence) -> None:
        """A sequence joins the micro-batch with the fewest sequences."""
        batch = min(self.batches, key=lambda b: len(b.seqs))
        batch.seqs.append(seq)
        self._of[seq.seq_id] = batch

    def in_flight(self, seq: Sequence) -> bool:
        batch = self._of.get(seq.seq_id)
        return batch is not None and batch.in_flight

    def remove(self, seq: Sequence) -> None:
        """The sequence leaves its micro-batch (which must not be in flight)."""
        batch = self._of.pop(seq.seq_id)
        if batch.in_flight:
            raise ValueError(f"sequence {seq.seq_id} is in a step in flight")
        batch.seqs.remove(seq)

    def ready(self) -> list[MicroBatch]:
        """Micro-batches that could be launched now: not in flight, not empty."""
        return [b for b in self.batches if not b.in_flight and b.seqs]

    def launched(self, batch: MicroBatch, step: Step) -> None:
        batch.step = step
        self._flights.append(batch)

    def oldest(self) -> MicroBatch | None:
        """The micro-batch whose step completes next."""
        return self._flights[0] if self._flights else None

    def landed(self) -> MicroBatch:
        """The oldest step completed: its micro-batch is no longer in flight."""
        batch = self._flights.popleft()
        batch.step = None
        return batch

    def clear(self) -> None:
        """Forgets every sequence and step (the engine died or is stopping)."""
        for batch in self.batches:
            batch.seqs.clear()
            batch.step = None
        self._of.clear()
        self._flights.clear()
