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
    it: for a tensor-parallel rank its slice of each sharded tensor, read straight from the file;
    for a pipeline stage the tensors of its layers (a tied LM head on a last stage without the
    embedding is loaded from the embedding's tensor). Fails on missing, unexpected or misshapen
    tensors."""
    model.to_empty(device=device).to(dtype)
    params = dict(model.named_parameters())
    missing = set(params)
    tied = model.config.tie_word_embeddings
    head_from_embedding = tied and model.lm_head is not None and model.model.embed_tokens is None
    if tied and not head_from_embedding:
        missing.discard("lm_head.weight")  # the same parameter as the embedding
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and (tied or model.lm_head is None):
                    continue  # tied to the embedding, or a rank without the head
                into = name
                if head_from_embedding and name == "model.embed_tokens.weight":
                    into = "lm_head.weight"
                elif not model.stage.owns(name):
                    continue  # another pipeline stage's
                if into not in params:
                    raise ValueError(f"unexpected tensor {name!r} in {path.name}")
                tensor = _read(f, name, model.shard.slice_for(name))
                target = params[into]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                    )
                with torch.no_grad():
                    target.copy_(tensor.to(dtype=dtype))
                missing.discard(into)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks tensors: {sorted(missing)[:5]}")
    if tied and not head_from_embedding and isinstance(model.lm_head, torch.nn.Linear):
        assert model.model.embed_tokens is not None
        model.lm_head.weight = model.model.embed_tokens.weight


def _read(f: Any, name: str, part: tuple[int, int, int] | None) -> torch.Tensor:
    """The tensor `name`, or only rows/columns [start, stop) of dimension `dim` of it."""
    if part is None:
        return f.get_tensor(name)
    dim, start, stop = part
    view = f.get_slice(name)
    return view[start:stop] if dim == 0 else view[:, start:stop]
