"""Greedy output equals transformers' generate(do_sample=False), token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams

NEW_TOKENS = 40


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        outs.append(out[0, len(p) :].tolist())
    return outs


def engine_greedy(
    model_dir: Path,
    prompts: list[list[int]],
    new_tokens: int,
    block_size: int = 4,
    decode_attention: str = "auto",
    compiled_kernels: bool = True,
) -> list[list[int]]:
    config = EngineConfig(
        model_dir=str(model_dir),
        num_blocks=512,
        block_size=block_size,
        decode_attention=decode_attention,
        compiled_kernels=compiled_kernels,
    )
    engine = LLMEngine(config)
    seqs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens))
    assert engine.blocks.num_free == engine.blocks.num_blocks, "finished sequences must return their blocks"
    return [s.output_ids for s in seqs]


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, vocab, (n - 1,), generator=g).tolist()] for n in lengths]


@pytest.mark.parametrize("decode_attention", ["dense", "paged"])
def test_default_model_matches_transformers(tiny_model_dir: Path, decode_attention: str) -> None:
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    texts = ["The quick brown fox", "Once upon a time there was a harbor town", "Memory holds the data", "A"]
    prompts = [tok(t).input_ids for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts), "prompts must differ in length"
    ours = engine_greedy(
        tiny_model_dir, prompts, NEW_TOKENS, block_size=16, decode_attention=decode_attention
    )
    theirs = hf_greedy(tiny_model_dir, prompts, NEW_TOKENS)
    assert ours == theirs
    assert all(len(set(o)) > 5 for o in ours), "the default model must not repeat one token"


# Dense decode runs the compiled CPU kernels where they build, or the PyTorch reference ops.
@pytest.mark.parametrize(
    ("decode_attention", "compiled"), [("dense", True), ("dense", False), ("paged", True)]
)
@pytest.mark.parametrize(
    "name", ["llama-gqa-llama3", "qwen2", "mistral", "mistral-window", "llama-tied", "llama-bias"]
)
def test_random_checkpoints_match_transformers(
    random_checkpoints: dict[str, Path], name: str, decode_attention: str, compiled: bool
) -> None:
    prompts = _prompts(320, [5, 17, 2, 33, 9])
    ours = engine_greedy(
        random_checkpoints[name],
        prompts,
        NEW_TOKENS,
        decode_attention=decode_attention,
        compiled_kernels=compiled,
    )
    theirs = hf_greedy(random_checkpoints[name], prompts, NEW_TOKENS)
    assert ours == theirs


def test_dynamic_rope_past_original_context(random_checkpoints: dict[str, Path]) -> None:
    # max_position_embeddings is 48; dynamic scaling by 2 allows 96 and changes the frequencies
    # once a sequence passes 48 tokens.
    prompts = _prompts(320, [30, 10])
    ours = engine_greedy(random_checkpoints["llama-dynamic"], prompts, 40)
    theirs = hf_greedy(random_checkpoints["llama-dynamic"], prompts, 40)
    assert ours == theirs


def test_bf16_and_fp16_run(tiny_model_dir: Path) -> None:
    for dtype in ("bfloat16", "float16"):
        engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir), dtype=dtype, num_blocks=64))
        assert engine.pool.tensor.dtype == getattr(torch, dtype)
        seqs = engine.generate([[1, 50, 60, 70], [1, 80]], SamplingParams(max_tokens=12, ignore_eos=True))
        assert all(len(s.output_ids) == 12 for s in seqs)
        assert all(0 <= t < engine.model_config.vocab_size for s in seqs for t in s.output_ids)
