"""Sampling parameters and the sampler (penalties, min_tokens, greedy, temperature, top-k, top-p,
per-request seed, the chosen token's log-probability).

Randomness is counter-based: the draw for output token i of a request uses a generator seeded
from (seed, i). Penalties and min_tokens read only the sequence's own history (prompt and output
so far). A sequence prefilled by one engine and decoded by another therefore samples exactly what
one engine doing both would, and the same seed always gives the same output.

A row's logits go through, in this order (transformers' and vLLM's order): the repetition penalty
over the prompt and the output, the presence and frequency penalties over the output, bad words,
min_tokens (end-of-sequence and stop tokens banned until that many tokens were made), then temperature,
top-k and top-p. The log-probability returned is the chosen token's under that final distribution
(what transformers' compute_transition_scores(normalize_logits=True) gives; greedy: after the
penalties).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.errors import RequestError

_UINT64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: int | None = None  # None: the engine draws one per request
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # > 0; 1 = off. Positive logits / p, negative ones * p
    presence_penalty: float = 0.0  # subtracted once from every token the output holds
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    min_tokens: int = 0  # end-of-sequence and stop tokens are banned until this many were made
    logprobs: bool = False  # return each chosen token's log-probability
    # Token sequences never to produce: a word's last token is banned whenever the history (prompt
    # and output) ends with the rest of it (a one-token word: always), as transformers' bad_words_ids.
    bad_words: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= _UINT64):
            raise RequestError(f"seed must be an integer in [0, 2^64), got {self.seed!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise RequestError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise RequestError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if any(not word or any(not isinstance(t, int) or t < 0 for t in word) for word in self.bad_words):
            raise RequestError(
                f"bad_words must be non-empty sequences of token ids >= 0, got {self.bad_words!r}"
            )
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or min_tokens can change this request's logits."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.min_tokens > 0
            or bool(self.bad_words)
        )


class Draw(NamedTuple):
    """What the sampler needs of one sequence: its parameters, seed and history (the token being
    drawn is output token len(output_ids))."""

    params: SamplingParams
    seed: int
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]


def step_generator(seed: int, step: int) -> torch.Generator:
    mixed = (seed * _GOLDEN + step * 0xBF58476D1CE4E5B9 + 1) & _UINT64
    return torch.Generator().manual_seed(mixed & ((1 << 63) - 1))


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] fp32 -> logits with filtered-out entries set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - top_p)
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def adjust(logits: torch.Tensor, draw: Draw, end_ids: Sequence[int]) -> torch.Tensor:
    """logits: [V] fp32 -> the row after the penalties and min_tokens (a new tensor)."""
    p = draw.params
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*draw.prompt_ids, *draw.output_ids}), dtype=torch.long)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if draw.output_ids and (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0):
        counts = torch.bincount(torch.tensor(draw.output_ids, dtype=torch.long), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.bad_words:
        history = [*draw.prompt_ids, *draw.output_ids]
        for word in p.bad_words:
            *prefix, last = word
            if last < logits.shape[-1] and (not prefix or history[len(history) - len(prefix) :] == prefix):
                logits[last] = float("-inf")
    if len(draw.output_ids) < p.min_tokens:
        banned = [t for t in (*end_ids, *p.stop_token_ids) if t < logits.shape[-1]]
        logits[banned] = float("-inf")
    return logits


def sample(
    logits: torch.Tensor, draws: Sequence[Draw], end_ids: Sequence[int] = ()
) -> tuple[list[int], list[float | None]]:
    """logits [B, V] fp32 -> each row's token and, where its request asked, the token's
    log-probability. end_ids: the model's end-of-sequence tokens (what min_tokens bans, unless the
    request ignores them)."""
    # max().indices is argmax (the first maximum on ties) at a third of argmax's cost on CPU.
    tokens = logits.max(dim=-1).indices.tolist()
    logprobs: list[float | None] = [None] * len(tokens)
    for i, draw in enumerate(draws):
        p = draw.params
        if p.greedy and not p.adjusts_logits and not p.logprobs:
            continue
        row = logits[i].float().cpu()
        if p.adjusts_logits:
            row = adjust(row, draw, () if p.ignore_eos else end_ids)
        if p.greedy:
            tokens[i] = int(row.max(dim=-1).indices.item())
        else:
            row = _filter(row / p.temperature, p.top_k, p.top_p)
            gen = step_generator(draw.seed, len(draw.output_ids))
            tokens[i] = int(torch.multinomial(row.softmax(-1), 1, generator=gen).item())
        if p.logprobs:
            logprobs[i] = float(row.log_softmax(-1)[tokens[i]])
    return tokens, logprobs
