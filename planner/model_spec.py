"""Model architecture facts the planner needs: layer/head counts (the search space), parameter
bytes (memory fit) and KV-cache bytes per token (decode capacity, KV-transfer time)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from planner import PlannerError

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only transformer (OPT or LLaMA family)."""

    name: str
    family: str  # "opt" or "llama": decides the parameter-count formula
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype_bytes: int = 2
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_heads", "num_kv_heads", "hidden_size", "intermediate_size"):
            if getattr(self, field) <= 0:
                raise PlannerError(f"model {self.name}: {field} must be positive")
        if self.family not in ("opt", "llama"):
            raise PlannerError(f"model {self.name}: unknown family {self.family!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise PlannerError(f"model {self.name}: hidden/heads/kv_heads are not divisible")
        if self.dtype_bytes not in (1, 2, 4):
            raise PlannerError(f"model {self.name}: dtype_bytes must be 1, 2 or 4")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        """Parameter count from the architecture (biases and norms included)."""
        h, f, layers, v = self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        if self.family == "opt":
            # q,k,v,o with biases; fc1/fc2 with biases; two layer norms (weight + bias).
            per_layer = 4 * (h * h + h) + 2 * h * f + f + h + 4 * h
            embed = v * h + (self.max_position_embeddings + 2) * h
            return layers * per_layer + embed + 2 * h + (0 if self.tie_word_embeddings else v * h)
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
        return layers * per_layer + v * h + h + (0 if self.tie_word_embeddings else v * h)

    @property
    def param_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token (whole model, all TP shards together)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def tp_degrees(self, limit: int) -> list[int]:
        """Tensor-parallel degrees that split the heads evenly, up to `limit`."""
        return [d for d in range(1, limit + 1) if self.num_heads % d == 0 and self.num_kv_heads % d == 0]

    def pp_degrees(self, limit: int) -> list[int]:
        """Pipeline degrees that split the layers evenly, up to `limit`."""
        return [d for d in range(1, limit + 1) if self.num_layers % d == 0]


def _opt(name: str, layers: int, heads: int, hidden: int) -> ModelSpec:
    return ModelSpec(name, "opt", layers, heads, heads, hidden, 4 * hidden, 50272, 2048)


KNOWN_MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _opt("facebook/opt-125m", 12, 12, 768),
        _opt("facebook/opt-1.3b", 24, 32, 2048),
        _opt("facebook/opt-2.7b", 32, 32, 2560),
        _opt("facebook/opt-6.7b", 32, 32, 4096),
        _opt("facebook/opt-13b", 40, 40, 5120),
        _opt("facebook/opt-30b", 48, 56, 7168),
        _opt("facebook/opt-66b", 64, 72, 9216),
        _opt("facebook/opt-175b", 96, 96, 12288),
        ModelSpec("meta-llama/Llama-2-7b-hf", "llama", 32, 32, 32, 4096, 11008, 32000, 4096, 2, False),
        ModelSpec("meta-llama/Llama-2-13b-hf", "llama", 40, 40, 40, 5120, 13824, 32000, 4096, 2, False),
        ModelSpec("meta-llama/Llama-2-70b-hf", "llama", 80, 64, 8, 8192, 28672, 32000, 4096, 2, False),
    )
}


def lookup_known(name: str) -> ModelSpec:
    """A known architecture by full or short name ("opt-13b", "facebook/opt-13b"), case-insensitive."""
    key = name.strip().lower()
    for full, spec in KNOWN_MODELS.items():
        if key in (full.lower(), full.split("/")[-1].lower()):
            return spec
    known = ", ".join(sorted(n.split("/")[-1] for n in KNOWN_MODELS))
    raise PlannerError(f"unknown model {name!r}: give a Hugging Face model folder or one of: {known}")


def from_hf_config(model_dir: str | Path) -> ModelSpec:
    """The architecture from a Hugging Face config.json (LLaMA, Mistral, Qwen2 or OPT)."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise PlannerError(f"{path} not found: --model must be a known name or a model folder") from exc
    except json.JSONDecodeError as exc:
        raise PlannerError(f"{path} is not valid JSON: {exc}") from exc
    model_type = str(cfg.get("model_type", ""))
    family = "opt" if model_type == "opt" else "llama"
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
    name = str(cfg.get("_name_or_path") or Path(model_dir).resolve().name)
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        inter = int(cfg["ffn_dim"] if family == "opt" else cfg["intermediate_size"])
        return ModelSpec(
            name=name,
            family=family,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            hidden_size=hidden,
            intermediate_size=inter,
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            dtype_bytes=_DTYPE_BYTES.get(dtype, 2),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family == "opt")),
        )
    except KeyError as exc:
        raise PlannerError(f"{path}: missing field {exc.args[0]!r}") from exc


def resolve_model(name_or_dir: str) -> ModelSpec:
    """A model folder (with config.json) if `name_or_dir` is one, else a known name."""
    if Path(name_or_dir).is_dir():
        return from_hf_config(name_or_dir)
    return lookup_known(name_or_dir)
