"""Request validation, sampling controls and stop conditions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import RequestError
from engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(tiny_model_dir), num_blocks=256, max_model_len=128))


def test_bad_requests_name_the_problem(engine: LLMEngine) -> None:
    ok = SamplingParams(max_tokens=4)
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.new_sequence([], ok)
    with pytest.raises(RequestError, match="prompt has 200 tokens; the context is 128"):
        engine.new_sequence([1] * 200, ok)
    with pytest.raises(
        RequestError, match=r"prompt \(100 tokens\) \+ max_tokens \(40\) exceeds the context of 128"
    ):
        engine.new_sequence([1] * 100, SamplingParams(max_tokens=40))
    with pytest.raises(RequestError, match="token id 5000 out of range"):
        engine.new_sequence([1, 5000], ok)
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": -3}, "max_tokens must be a positive integer"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"seed": -1}, "seed must be an integer in"),
        ({"stop_token_ids": (-2,)}, "stop_token_ids must be non-negative"),
    ],
)
def test_bad_sampling_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [s.output_ids for s in engine.generate(prompts, params)]


def test_same_seed_same_output_regardless_of_batch(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=7, ignore_eos=True)
    alone = _run(engine, [[1, 40, 41]], params)[0]
    batched = _run(engine, [[1, 99, 98, 97, 96], [1, 40, 41]], params)[1]
    assert alone == batched == _run(engine, [[1, 40, 41]], params)[0]
    other = _run(
        engine, [[1, 40, 41]], SamplingParams(max_tokens=24, temperature=0.9, seed=8, ignore_eos=True)
    )[0]
    assert other != alone


def test_top_k_one_is_greedy(engine: LLMEngine) -> None:
    greedy = _run(engine, [[1, 70, 71]], SamplingParams(max_tokens=16, ignore_eos=True))
    topk1 = _run(
        engine,
        [[1, 70, 71]],
        SamplingParams(max_tokens=16, temperature=1.0, top_k=1, seed=3, ignore_eos=True),
    )
    assert greedy == topk1


def test_top_p_restricts_to_the_nucleus(engine: LLMEngine) -> None:
    # With a tiny nucleus only the most likely token survives: sampling equals greedy.
    greedy = _run(engine, [[1, 70, 71]], SamplingParams(max_tokens=16, ignore_eos=True))
    nucleus = _run(
        engine,
        [[1, 70, 71]],
        SamplingParams(max_tokens=16, temperature=1.0, top_p=1e-6, seed=5, ignore_eos=True),
    )
    assert greedy == nucleus


def test_stop_conditions(engine: LLMEngine) -> None:
    free_run = _run(engine, [[1, 33, 34]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    stop_at = free_run[5]
    seq = engine.generate(
        [[1, 33, 34]], SamplingParams(max_tokens=12, stop_token_ids=(stop_at,), ignore_eos=True)
    )[0]
    assert seq.output_ids == free_run[: free_run.index(stop_at) + 1] and seq.finish_reason == "stop"
    seq = engine.generate([[1, 33, 34]], SamplingParams(max_tokens=7, ignore_eos=True))[0]
    assert len(seq.output_ids) == 7 and seq.finish_reason == "length"


def test_eos_stops_unless_ignored(engine: LLMEngine) -> None:
    free_run = _run(engine, [[1, 33, 34]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    eos = free_run[4]
    original = engine.model_config
    engine.model_config = dataclasses.replace(original, eos_token_ids=(eos,))
    try:
        seq = engine.generate([[1, 33, 34]], SamplingParams(max_tokens=12))[0]
        # Like transformers' generate: the EOS token ends the output and is part of it.
        assert seq.output_ids == free_run[: free_run.index(eos) + 1] and seq.finish_reason == "stop"
        ignored = engine.generate([[1, 33, 34]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
        assert ignored.output_ids == free_run and ignored.finish_reason == "length"
    finally:
        engine.model_config = original
