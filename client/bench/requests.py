"""Benchmark requests: prompt token ids of the sampled lengths and exact output lengths."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from workload import ArrivalProcess, load_workload

# An end token the model can never produce (outside any vocabulary): every request then generates
# exactly its sampled output length, as vLLM's and DistServe's benchmarks do with ignore_eos.
NEVER_END_ID = 2**31 - 1
FIRST_ORDINARY_ID = 3  # ids 0-2 are the special tokens of LLaMA-family tokenizers


class BenchRequest(NamedTuple):
    prompt_ids: list[int]
    output_len: int


def make_requests(
    spec: str, n: int, seed: int, vocab_size: int, context: int, tokenizer_dir: str | None
) -> list[BenchRequest]:
    """n requests drawn from workload `spec` (sharegpt | synthetic:SPEC | a file), lengths capped
    so prompt + output fits the model's context. Prompts are random ordinary token ids: cost
    depends on lengths, not content."""
    workload = load_workload(spec, tokenizer_dir=tokenizer_dir, max_len=context, seed=seed)
    prompt_lens, output_lens = workload.sample(n, seed)
    rng = np.random.default_rng(seed + 1)
    out = []
    for p, o in zip(prompt_lens, output_lens, strict=True):
        o = int(min(o, context - 1))
        p = int(min(p, context - o))
        ids = rng.integers(FIRST_ORDINARY_ID, vocab_size, size=p).tolist()
        out.append(BenchRequest([int(t) for t in ids], o))
    return out


def arrival_times(n: int, rate: float, cv: float, seed: int) -> np.ndarray:
    """Send offsets in seconds for n requests at `rate` req/s; one gap sequence scaled per rate
    (common random numbers) so rates are compared on the same arrival pattern."""
    gaps = ArrivalProcess(cv).unit_gaps(n, seed)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) / rate
