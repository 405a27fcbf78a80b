"""Pipelining measured, not asserted: PP=1 against PP=N on a stream of prefill batches and on decode
micro-batches, with the time the stages spent working at the same time.

Every stage reports when it ran each step (time.monotonic is one clock for every process of the
machine), so the overlap is measured from the stages themselves. Alongside, the simulator's
pipeline model: a stage takes 1/pp of the whole model's time plus a hop, the hop fitted from one
batch's latency through the pipeline.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

from engine.engine import LLMEngine, Step
from engine.sampling import SamplingParams
from engine.sequence import Sequence


class Stream(NamedTuple):
    """A run: its wall time, the tokens it processed, and every step's per-stage (start, end)."""

    seconds: float
    tokens: int
    steps: list[list[tuple[float, float]]]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def busy(self) -> float:
        """Seconds in which at least two stages were working (0 with one stage)."""
        stages = max((len(s) for s in self.steps), default=0)
        if stages < 2:
            return 0.0
        per_stage = [_union([step[k] for step in self.steps if len(step) > k]) for k in range(stages)]
        return _measure_at_least_two(per_stage)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _measure_at_least_two(per_stage: list[list[tuple[float, float]]]) -> float:
    """Length of the time covered by two or more of the stages' span lists."""
    edges = sorted(
        [(s, 1) for spans in per_stage for s, _ in spans] + [(e, -1) for spans in per_stage for _, e in spans]
    )
    total, depth, last = 0.0, 0, 0.0
    for at, change in edges:
        if depth >= 2:
            total += at - last
        depth += change
        last = at
    return total


def prefill_stream(engine: LLMEngine, batches: list[list[list[int]]]) -> Stream:
    """Prefills the batches one after another, keeping up to pp in flight (a new batch enters stage
    0 as soon as it is free), as the prefill instance does."""
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    in_flight: deque[Step] = deque()
    steps: list[list[tuple[float, float]]] = []

    def land() -> None:
        step = in_flight.popleft()
        engine.complete(step)
        steps.append(step.stage_times)
        for seq in step.seqs:
            engine.free(seq)

    start = time.monotonic()
    for prompts in batches:
        if len(in_flight) == engine.config.pp_size:
            land()
        in_flight.append(engine.launch_prefill([Sequence(p, params) for p in prompts]))
    while in_flight:
        land()
    tokens = sum(len(p) for prompts in batches for p in prompts)
    return Stream(time.monotonic() - start, tokens, steps)


def decode_stream(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> Stream:
    """Decodes the prompts for `new_tokens` steps as pp micro-batches in flight together, as the
    decode instance does (one batch of all of them at PP=1)."""
    pp = engine.config.pp_size
    seqs = [Sequence(p, SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True)) for p in prompts]
    engine.prefill(seqs)
    micro = [seqs[k::pp] for k in range(pp)]
    steps: list[list[tuple[float, float]]] = []
    done = [0] * pp
    in_flight: deque[tuple[int, Step]] = deque()
    start = time.monotonic()
    while any(d < new_tokens for d in done) or in_flight:
        for k in range(pp):
            if done[k] < new_tokens and all(k != j for j, _ in in_flight):
                in_flight.append((k, engine.launch_decode(micro[k])))
        k, step = in_flight.popleft()
        engine.complete(step)
        steps.append(step.stage_times)
        done[k] += 1
    seconds = time.monotonic() - start
    for seq in seqs:
        engine.free(seq)
    return Stream(seconds, len(seqs) * new_tokens, steps)


def report(name: str, one: Stream, many: Stream, step_alone: tuple[float, float], pp: int) -> str:
    """A line of the comparison: throughput of PP=1 and PP=pp, the overlap, and the simulator's
    pipeline model. `step_alone`: the seconds of one of the PP run's steps with nothing else in
    flight, on one device at PP=1 (t: the profiler's whole-model time) and through the PP=pp
    pipeline (t + pp hops, which gives the hop); the model says a new step enters the pipeline
    every t/pp + hop."""
    t1, tpp = step_alone
    hop = max((tpp - t1) / pp, 0.0)
    per_step_tokens = many.tokens / max(len(many.steps), 1)
    predicted = per_step_tokens / (t1 / pp + hop)
    overlap = many.busy()
    return (
        f"{name}: PP=1 {one.tokens_per_s:,.0f} tok/s, PP={pp} {many.tokens_per_s:,.0f} tok/s "
        f"(x{many.tokens_per_s / one.tokens_per_s:.2f}); stages overlapped {overlap:.2f} s of "
        f"{many.seconds:.2f} s ({overlap / many.seconds:.0%}); pipeline model: hop {hop * 1e3:.1f} ms, "
        f"PP={pp} predicted {predicted:,.0f} tok/s"
    )
