"""Pipeline parallelism of the engine: PP=2 and TP=2 x PP=2 equal PP=1 on the default model, in
prefill and decode, and stages work on different micro-batches at the same time."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from engine.sharding import ShardingError, Stage

TEXTS = ["The quick brown fox", "Once upon a time there was a harbor town", "Memory holds the data", "A"]
NEW_TOKENS = 24


def greedy(model_dir: Path, tp: int, pp: int, decode_attention: str) -> list[list[int]]:
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    config = EngineConfig(
        model_dir=str(model_dir), num_blocks=128, block_size=4, tp_size=tp, pp_size=pp, num_threads=1,
        decode_attention=decode_attention,
    )  # fmt: skip
    engine = LLMEngine(config)
    try:
        seqs = engine.generate([tok(t).input_ids for t in TEXTS], SamplingParams(max_tokens=NEW_TOKENS))
        assert engine.blocks.num_free == engine.blocks.num_blocks
        return [s.output_ids for s in seqs]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[str, list[list[int]]]:
    return {mode: greedy(tiny_model_dir, 1, 1, mode) for mode in ("dense", "paged")}


@pytest.mark.parametrize("decode_attention", ["dense", "paged"])
@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2)])
def test_pp_equals_pp1(
    tiny_model_dir: Path, reference: dict[str, list[list[int]]], tp: int, pp: int, decode_attention: str
) -> None:
    assert greedy(tiny_model_dir, tp, pp, decode_attention) == reference[decode_attention]


def test_stages_split_the_layers() -> None:
    assert [Stage.of(30, i, 4).layers for i in range(4)] == [
        range(0, 8),
        range(8, 16),
        range(16, 23),
        range(23, 30),
    ]
    assert Stage.of(4, 1, 2).owns("model.layers.3.mlp.up_proj.weight")
    assert not Stage.of(4, 1, 2).owns("model.embed_tokens.weight") and Stage.of(4, 1, 2).owns(
        "lm_head.weight"
    )
    with pytest.raises(ShardingError, match="4 layers cannot run with pp_size 5"):
        Stage.of(4, 0, 5)


def test_micro_batches_overlap_across_stages(tiny_model_dir: Path) -> None:
    """Two micro-batches launched back to back: stage 1 works on the first while stage 0 (rank 0)
    runs the second. The stage times come from the processes themselves."""
    engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir), num_blocks=256, pp_size=2, num_threads=1))
    try:
        params = SamplingParams(max_tokens=64, ignore_eos=True)
        first, second = [Sequence([1, *range(5, 200)], params)], [Sequence([1, *range(300, 495)], params)]
        a, b = engine.launch_prefill(first), engine.launch_prefill(second)
        engine.complete(a)
        engine.complete(b)
        (a0, a1), (b0, b1) = a.stage_times, b.stage_times
        assert a0[1] <= a1[0] and b0[1] <= b1[0], "a stage starts a batch after the stage before it"
        assert b0[0] < a1[1] and a1[0] < b0[1], "stage 0 ran the second batch while stage 1 ran the first"
        tokens = [engine.decode_step(first + second) for _ in range(3)]
        assert all(len(t) == 2 for t in tokens)
    finally:
        engine.close()


def test_tied_head_loads_on_a_last_stage_without_the_embedding(random_checkpoints: dict[str, Path]) -> None:
    model_dir = random_checkpoints["llama-tied"]
    assert ModelConfig.from_dir(model_dir).tie_word_embeddings
    prompts = [[1, 5, 9, 30], [1, *range(40, 61)]]
    outputs = []
    for pp in (1, 2):
        engine = LLMEngine(
            EngineConfig(model_dir=str(model_dir), num_blocks=64, block_size=4, pp_size=pp, num_threads=1)
        )
        try:
            outputs.append([s.output_ids for s in engine.generate(prompts, SamplingParams(max_tokens=12))])
        finally:
            engine.close()
    assert outputs[0] == outputs[1]
