"""Prefill batching by token budget, decode continuous batching, and memory reservation."""

from __future__ import annotations

from pathlib import Path

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.sequence import Sequence


def _engine(model: Path, **kw: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(model), **kw))


def test_prefill_batches_respect_the_token_budget(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, max_num_batched_tokens=20, num_blocks=64)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    seqs = [Sequence([1] + [10] * (n - 1), params) for n in (8, 8, 8, 30)]
    for s in seqs:
        engine.add(s)
    kinds = []
    batches = []
    while engine.scheduler.has_work():
        result = engine.step()
        kinds.append(result.kind)
        if result.kind == "prefill":
            batches.append([o.seq.prompt_len for o in result.outputs])
    assert batches == [[8, 8], [8], [30]], (
        "8+8 fits 20, the third 8 waits; 30 exceeds the budget and runs alone"
    )
    assert all(len(s.output_ids) == 2 for s in seqs)


def test_sequences_join_and_leave_the_decode_batch(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, num_blocks=64)
    short = Sequence([1, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True))
    long = Sequence([1, 7, 8], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.add(short)
    engine.add(long)
    decode_sizes = []
    late = Sequence([1, 9], SamplingParams(max_tokens=4, ignore_eos=True))
    steps = 0
    while engine.scheduler.has_work():
        result = engine.step()
        steps += 1
        if steps == 2:
            engine.add(late)  # joins while the others are decoding
        if result.kind == "decode":
            decode_sizes.append(len(result.outputs))
    assert max(decode_sizes) == 3 and decode_sizes[-1] == 1
    assert [len(s.output_ids) for s in (short, long, late)] == [3, 8, 4]
    assert [s.finish_reason for s in (short, long, late)] == ["length"] * 3
    assert engine.blocks.num_free == 64


def test_admission_reserves_memory_for_the_whole_sequence(tiny_model_dir: Path) -> None:
    # 4 blocks of 16 tokens: a sequence of 8 prompt + 40 new tokens needs 3 blocks for its life.
    engine = _engine(tiny_model_dir, num_blocks=4, block_size=16)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    a, b = Sequence([1] + [5] * 7, params), Sequence([1] + [6] * 7, params)
    engine.add(a)
    engine.add(b)
    first = engine.step()
    assert first.kind == "prefill" and [o.seq for o in first.outputs] == [a], "b must wait: 3 + 3 > 4 blocks"
    while not a.finished:
        engine.step()
    assert engine.blocks.num_free == 4
    while engine.scheduler.has_work():
        engine.step()
    assert len(b.output_ids) == 40
