"""A GGUF checkpoint turned into a Hugging Face folder that the engine and transformers load.

    python -m engine.gguf_import FILE.gguf OUT_DIR

transformers' GGUF loader does all the format work: it reads the metadata into a model config,
builds the tokenizer (with the chat template the file carries) and dequantizes every tensor to
fp32 with the `gguf` package, undoing llama.cpp's q/k row permutation. This module only writes the
result as a plain checkpoint: config.json (no quantization entry), generation_config.json,
model.safetensors (fp32), tokenizer.json and tokenizer_config.json.

Deterministic: the same GGUF file and library versions give byte-identical files (dequantization
is exact arithmetic on the stored blocks; the writers emit tensors and keys in a fixed order).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

# Fields of the loaded config that describe the GGUF source, not the fp32 checkpoint we write.
_SOURCE_FIELDS = ("quantization_config", "_name_or_path", "_model_name_or_path", "name_or_path")


def convert(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Writes the dequantized checkpoint of `gguf_file` to `out_dir` (replaced if present).

    The folder appears only when complete: it is written beside `out_dir` and renamed into place,
    so an interrupted run never leaves a folder that looks built."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_file).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"no GGUF file at {src}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    fields = {k: v for k, v in quantized.config.to_dict().items() if k not in _SOURCE_FIELDS}
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # assign=True takes the dequantized tensors as they are (no copy into meta storage).
    model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    model.tie_weights()
    if getattr(config, "pad_token_id", None) is not None:
        model.generation_config.pad_token_id = config.pad_token_id
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for path in (staging, *staging.iterdir()):  # mkdtemp and the writers make them private
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("gguf_file", help="the .gguf checkpoint")
    parser.add_argument("out_dir", help="folder to write the Hugging Face checkpoint into")
    args = parser.parse_args()
    print(f"wrote {convert(args.gguf_file, args.out_dir)}")


if __name__ == "__main__":
    main()
