"""Engine and model configuration.

``ModelConfig`` is read from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2); ``EngineConfig``
holds the serving knobs. Both are frozen and validated at construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.kv_cache import DTYPES

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | dynamic | llama3
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "dynamic", "llama3"):
            raise ValueError(
                f"unsupported rope_scaling type {self.rope_type!r} (default, linear, dynamic, llama3)"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope theta and factor must be positive, got {self.theta}, {self.factor}")

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> RopeConfig:
        # transformers 5 writes `rope_parameters` (theta inside); 4.x wrote rope_theta + rope_scaling.
        params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = str(params.get("rope_type", params.get("type", "default")))
        return cls(
            theta=theta,
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            original_max_position_embeddings=params.get("original_max_position_embeddings"),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a LLaMA-family checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def o_proj_bias(self) -> bool:
        """Llama's attention_bias covers the output projection too; Qwen2's (q/k/v only) does not."""
        return self.attention_bias and self.model_type == "llama"

    @property
    def derived_max_len(self) -> int:
        """Longest context the checkpoint supports: dynamic NTK scaling exists to stretch it by its factor."""
        if self.rope.rope_type == "dynamic":
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model folder {model_dir}")
        raw = json.loads(path.read_text())
        gen_path = Path(model_dir) / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_hf(raw, gen)

    @classmethod
    def from_hf(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        # generate() stops on generation_config's eos ids when present, else the model config's.
        eos = (generation or {}).get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        model_type = str(raw.get("model_type", ""))
        sliding = raw.get("sliding_window")
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            sliding = None
        dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
        return cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(raw),
            attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=dtype if dtype in DTYPES else "float32",
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
        )


@dataclass(frozen=True)
class EngineConfig:
    """Serving knobs of one engine instance (one prefill, decode or colocated model instance)."""

    model_dir: str
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (the checkpoint's torch_dtype)
    block_size: int = 16
    num_blocks: int = 1024
    max_num_batched_tokens: int = 2048  # prefill token budget per batch (L_m)
    max_num_seqs: int = 64  # decode batch limit
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    num_threads: int | None = None  # torch intra-op threads (CPU); None leaves torch's default
    # Decode attention reads K/V from "paged" (gathers the blocks every step) or "dense" (a
    # DenseDecodeCache: one contiguous row per decoding sequence, loaded once, taking up to the
    # pool's size again). "auto": dense on CPU, where the gather dominates a step; paged on CUDA,
    # where KV memory is the scarce resource.
    decode_attention: str = "auto"
    # fp32 on CPU: run norms, activation, rotary and dense decode attention as compiled fused
    # kernels (engine/kernels.py), falling back to PyTorch ops where they cannot build.
    compiled_kernels: bool = True
    # Tensor and pipeline parallelism: tp_size x pp_size processes (engine/parallel/); rank
    # stage * tp_size + t is tensor-parallel rank t of pipeline stage `stage`. On CUDA rank r runs
    # on GPU device_ids[r]; on CPU every rank runs on the CPU (num_threads threads each).
    tp_size: int = 1
    pp_size: int = 1
    device_ids: tuple[int, ...] = ()
    # Seconds a rank waits for the others (start-up, and any collective of a step).
    tp_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        for name in ("block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"EngineConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.decode_attention not in ("auto", "dense", "paged"):
            raise ValueError(f"decode_attention must be auto, dense or paged, got {self.decode_attention!r}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads must be positive, got {self.num_threads}")
        if self.tp_size < 1 or self.pp_size < 1 or self.tp_timeout_s <= 0:
            raise ValueError(
                "tp_size and pp_size must be >= 1 and tp_timeout_s > 0, "
                f"got {self.tp_size}, {self.pp_size}, {self.tp_timeout_s}"
            )
        if self.device_ids and (self.device == "cpu" or len(self.device_ids) != self.world_size):
            raise ValueError(
                f"device_ids {self.device_ids} must name one CUDA device per rank ({self.world_size} ranks)"
            )
        if self.device.startswith("cuda") and self.world_size > 1 and not self.device_ids:
            raise ValueError(f"a CUDA engine of {self.world_size} ranks needs device_ids, one GPU per rank")

    @property
    def world_size(self) -> int:
        """Processes of the engine: tp_size x pp_size."""
        return self.tp_size * self.pp_size

    def rank_device(self, rank: int) -> str:
        """The device rank `rank` (stage * tp_size + tensor-parallel rank) runs on."""
        return f"cuda:{self.device_ids[rank]}" if self.device_ids else self.device
