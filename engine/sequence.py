"""One request's state inside an engine."""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from enum import Enum

from engine.sampling import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """prompt_ids + output_ids is the token history. The KV cache holds every token but the last
    (the last one's K/V is written by the next decode step), in the blocks of block_table."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    # With params.logprobs, the log-probability of each token this engine drew (on a decode
    # instance from the second token on: prefill drew the first).
    output_logprobs: list[float] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    blocks_held: int = 0  # the most KV blocks it has held in this engine (kept once they are freed)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    seed: int = -1

    def __post_init__(self) -> None:
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        if self.seed < 0:
            self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_tokens(self) -> int:
        return self.prompt_len + self.params.max_tokens

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def last_log_probs(self) -> tuple[float, ...]:
        """The last drawn token's log-probability, as a 1-tuple when the request asked for them."""
        return (self.output_logprobs[-1],) if self.params.logprobs and self.output_logprobs else ()

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
