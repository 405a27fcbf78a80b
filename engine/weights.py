"""Loading a Hugging Face safetensors checkpoint (one or several shards) into CausalLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.model import CausalLM

# Buffers some exporters write that the engine recomputes itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in model folder {model_dir}")
    return files


def load_weights(model: CausalLM, model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> None:
    """Materializes a model built on the meta device and copies every tensor of the checkpoint into
    it (for a tensor-parallel rank, its slice of each sharded tensor, read straight from the file);
    fails on missing, unexpected or misshapen tensors."""
    model.to_empty(device=device).to(dtype)
    params = dict(model.named_parameters())
    missing = set(params)
    tied = model.config.tie_word_embeddings
    if tied:
        missing.discard("lm_head.weight")
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and (tied or model.lm_head is None):
                    continue  # tied to the embedding, or a rank without the head
                if name not in params:
                    raise ValueError(f"unexpected tensor {name!r} in {path.name}")
                tensor = _read(f, name, model.shard.slice_for(name))
                target = params[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                    )
                with torch.no_grad():
                    target.copy_(tensor.to(dtype=dtype))
                missing.discard(name)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks tensors: {sorted(missing)[:5]}")
    if tied and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.model.embed_tokens.weight


def _read(f: Any, name: str, part: tuple[int, int, int] | None) -> torch.Tensor:
    """The tensor `name`, or only rows/columns [start, stop) of dimension `dim` of it."""
    if part is None:
        return f.get_tensor(name)
    dim, start, stop = part
    view = f.get_slice(name)
    return view[start:stop] if dim == 0 else view[:, start:stop]
