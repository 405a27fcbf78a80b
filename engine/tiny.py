"""The embedded default model: a small random-weight Llama with its own byte-level BPE tokenizer.

    python -m engine.tiny OUT_DIR

Deterministic: the same command writes byte-identical files. The tokenizer is trained offline on
the text in data/corpus.txt; weights come from a seeded generator, scaled up from the usual
initialisation so that greedy decoding wanders through the vocabulary instead of repeating one
token. The folder is a standard Hugging Face checkpoint (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json) that transformers loads as is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
SEED = 20240601

ARCH = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
}
# Std of the random projections. 0.02 (the usual init) gives near-uniform logits and a model
# that repeats itself; these make the residual stream, and so the greedy choice, vary per step.
EMBED_STD, PROJ_STD = 1.0, 0.09


def train_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines, trainer)
    # Like Llama's tokenizer: every encoded prompt starts with <s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def make_weights(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    h, inter, heads, kv = (
        ARCH["hidden_size"],
        ARCH["intermediate_size"],
        ARCH["num_attention_heads"],
        ARCH["num_key_value_heads"],
    )
    d = int(h) // int(heads)

    def rnd(*shape: int, std: float = PROJ_STD) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(vocab, int(h), std=EMBED_STD)}
    for i in range(int(ARCH["num_hidden_layers"])):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rnd(int(heads) * d, int(h))
        w[p + "self_attn.k_proj.weight"] = rnd(int(kv) * d, int(h))
        w[p + "self_attn.v_proj.weight"] = rnd(int(kv) * d, int(h))
        w[p + "self_attn.o_proj.weight"] = rnd(int(h), int(heads) * d)
        w[p + "mlp.gate_proj.weight"] = rnd(int(inter), int(h))
        w[p + "mlp.up_proj.weight"] = rnd(int(inter), int(h))
        w[p + "mlp.down_proj.weight"] = rnd(int(h), int(inter))
        w[p + "input_layernorm.weight"] = torch.ones(int(h))
        w[p + "post_attention_layernorm.weight"] = torch.ones(int(h))
    w["model.norm.weight"] = torch.ones(int(h))
    w["lm_head.weight"] = rnd(vocab, int(h))
    return {k: v.contiguous() for k, v in w.items()}


def build(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        **ARCH,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    tok.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "model_max_length": ARCH["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
        },
    )
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    save_file(make_weights(vocab), str(out / "model.safetensors"), metadata={"format": "pt"})
    # config.json last: its presence marks a complete folder (make uses it as the target).
    _write_json(out / "config.json", config)
    return out


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="folder to write the checkpoint into")
    out = build(parser.parse_args().out_dir)
    print(f"wrote the default model to {out}")


if __name__ == "__main__":
    main()
