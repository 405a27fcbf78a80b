"""Model-config parameters (the string key/values of config.pbtxt) to typed configs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config import EngineConfig


def decoupled_model_parameters(args: Mapping[str, str]) -> tuple[dict[str, str], Path]:
    """What every model's initialize() starts with: checks the model is decoupled, returns its
    string parameters and the repository root (relative model_dir values resolve against it;
    args["model_repository"] is the model's own folder)."""
    config = model_config(args)
    require_decoupled(config)
    return parameters(config), Path(args["model_repository"]).parent


def model_config(args: Mapping[str, str]) -> dict[str, Any]:
    return dict(json.loads(args["model_config"]))


def parameters(config: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v.get("string_value", "")) for k, v in config.get("parameters", {}).items()}


def require_decoupled(config: Mapping[str, Any]) -> None:
    if not config.get("model_transaction_policy", {}).get("decoupled", False):
        raise ValueError(
            f"model {config.get('name')!r} must be decoupled: set model_transaction_policy {{ decoupled: true }}"
        )


def resolve_model_dir(params: Mapping[str, str], repository_root: str | Path) -> str:
    raw = params.get("model_dir", "")
    if not raw:
        raise ValueError("parameter 'model_dir' is required (a Hugging Face checkpoint folder)")
    path = Path(raw)
    if not path.is_absolute():
        path = Path(repository_root) / path
    if not (path / "config.json").is_file():
        raise ValueError(f"parameter 'model_dir' = {raw!r}: no config.json in {path}")
    return str(path.resolve())


def _int(params: Mapping[str, str], key: str, default: int | None) -> int | None:
    raw = params.get(key, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"parameter {key!r} must be an integer, got {raw!r}") from None


def _float(params: Mapping[str, str], key: str, default: float) -> float:
    raw = params.get(key, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"parameter {key!r} must be a number, got {raw!r}") from None


def engine_config(params: Mapping[str, str], repository_root: str | Path) -> EngineConfig:
    for key in ("tp_size", "pp_size"):
        if (_int(params, key, 1) or 1) != 1:
            raise ValueError(
                f"parameter {key} = {params[key]}: the built-in engine runs one device per replica; "
                "tensor/pipeline-parallel replicas need an engine that supports them (e.g. TensorRT-LLM)"
            )
    device = params.get("device", "cpu") or "cpu"
    ids = params.get("device_ids", "")
    if device == "cuda" and ids:
        device = f"cuda:{ids.split(',')[0]}"
    defaults = EngineConfig(model_dir="")
    return EngineConfig(
        model_dir=resolve_model_dir(params, repository_root),
        device=device,
        dtype=params.get("dtype", "") or defaults.dtype,
        block_size=_int(params, "block_size", defaults.block_size) or defaults.block_size,
        num_blocks=_int(params, "num_blocks", defaults.num_blocks) or defaults.num_blocks,
        max_num_batched_tokens=_int(params, "max_num_batched_tokens", defaults.max_num_batched_tokens)
        or defaults.max_num_batched_tokens,
        max_num_seqs=_int(params, "max_num_seqs", defaults.max_num_seqs) or defaults.max_num_seqs,
        max_model_len=_int(params, "max_model_len", None),
        num_threads=_int(params, "num_threads", None),
        decode_attention=params.get("decode_attention", "") or defaults.decode_attention,
    )


def kv_settings(params: Mapping[str, str]) -> tuple[str, float, int]:
    """(transport, lease seconds, control port)."""
    transport = params.get("kv_transport", "") or "shm"
    return transport, _float(params, "kv_lease_seconds", 30.0), _int(params, "kv_port", 0) or 0


def int_param(params: Mapping[str, str], key: str, default: int) -> int:
    value = _int(params, key, default)
    assert value is not None
    return value


def float_param(params: Mapping[str, str], key: str, default: float) -> float:
    return _float(params, key, default)
