"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, per-request seed).

Randomness is counter-based: the draw for output token i of a request uses a generator seeded
from (seed, i). A sequence prefilled by one engine and decoded by another therefore samples
exactly what one engine doing both would, and the same seed always gives the same output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


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


def sample(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]
) -> list[int]:
    """logits [B, V] fp32; steps[i] is the index of the output token being drawn for row i."""
    # max().indices is argmax (the first maximum on ties) at a third of argmax's cost on CPU.
    tokens = logits.max(dim=-1).indices.tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter(logits[i].float().cpu() / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=step_generator(seeds[i], steps[i])).item())
    return tokens
