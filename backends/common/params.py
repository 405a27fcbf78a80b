"""The parameters of config.pbtxt: one schema, written by the planner, read by every model.

Each parameter group is a frozen dataclass whose fields are the parameters: name, type, default,
allowed values and doc are declared once, below. The repository writer renders a group with
`to_parameters()`; a model reads its group with `from_parameters()`, which parses the strings
back, validates them, and refuses a parameter it does not know (a typo is an error, not a
silently ignored setting). Engine defaults come from the engine's own EngineConfig.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from backends.common.cpu_priority import MAX_NICE
from engine.config import EngineConfig, ModelConfig

P = TypeVar("P", bound="ParamGroup")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
DECODE_ATTENTION = ("auto", "dense", "paged")
KV_TRANSPORTS = ("shm", "tcp", "cuda_ipc", "nccl")


class ParameterError(ValueError):
    """A model parameter is missing, malformed or out of range; the message names it."""


def param(
    default: Any,
    doc: str,
    *,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A parameter: its default, what it means, and its allowed values or bounds."""
    return dataclasses.field(
        default=default, metadata={"doc": doc, "choices": choices, "minimum": minimum, "maximum": maximum}
    )


class ParamGroup:
    """Base of the parameter groups: validation, rendering and parsing derived from the fields."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            choices, minimum, maximum = f.metadata["choices"], f.metadata["minimum"], f.metadata["maximum"]
            if choices and value not in choices:
                allowed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
                raise ParameterError(f"{f.name} must be {allowed}, got {value!r}")
            if minimum is not None and value is not None and value < minimum:
                raise ParameterError(f"parameter {f.name} must be >= {minimum:g}, got {value}")
            if maximum is not None and value is not None and value > maximum:
                raise ParameterError(f"parameter {f.name} must be <= {maximum:g}, got {value}")

    def to_parameters(self) -> dict[str, str]:
        """Every parameter as the string config.pbtxt holds (None and () as "")."""
        return {f.name: _render(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_parameters(cls: type[P], raw: Mapping[str, str]) -> P:
        """The group from config.pbtxt's strings; absent or empty parameters take the default."""
        # Field types are annotation strings here (from __future__ import annotations): "int | None".
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(raw) - set(types))
        if unknown:
            raise ParameterError(f"unknown parameter {unknown[0]!r} (known: {', '.join(sorted(types))})")
        values = {k: _parse(k, v, types[k]) for k, v in raw.items() if k in types and v != ""}
        return cls(**values)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """(name, type, default, doc) of every parameter, for documentation."""
        return [
            (f.name, str(f.type), _render(f.default), f.metadata["doc"])
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        ]


def _render(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_KINDS = {"tuple": "a list of integers", "int": "an integer", "float": "a number"}


def _parse(name: str, raw: str, hint: str) -> Any:
    """A parameter's string as its field's type (`hint`: the annotation, e.g. "int | None")."""
    kind = next((k for k in _KINDS if hint.startswith(k)), None)
    try:
        if kind == "tuple":
            return tuple(int(x) for x in raw.split(","))
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ParameterError(f"parameter {name!r} must be {_KINDS[str(kind)]}, got {raw!r}") from None
    return raw


@dataclass(frozen=True)
class EngineParams(ParamGroup):
    """What a prefill, decode or colocated model instance runs: its engine and its KV transfer."""

    model_dir: str = param("", "Hugging Face checkpoint folder, absolute or relative to the repository")
    device: str = param("cpu", "where the engine runs", choices=DEVICES)
    dtype: str = param(EngineConfig.dtype, "weights and KV cache precision", choices=DTYPES)
    block_size: int = param(EngineConfig.block_size, "tokens per KV block", minimum=1)
    num_blocks: int = param(EngineConfig.num_blocks, "KV blocks in the instance's pool", minimum=1)
    max_num_batched_tokens: int = param(
        EngineConfig.max_num_batched_tokens, "prefill token budget per batch (L_m)", minimum=1
    )
    max_num_seqs: int = param(EngineConfig.max_num_seqs, "most sequences in a batch", minimum=1)
    max_model_len: int | None = param(None, "longest context (empty: the model's own)", minimum=1)
    tp_size: int = param(1, "tensor-parallel degree", minimum=1)
    pp_size: int = param(1, "pipeline-parallel degree", minimum=1)
    num_threads: int | None = param(None, "torch intra-op threads on CPU (empty: torch's default)", minimum=1)
    decode_attention: str = param(
        EngineConfig.decode_attention,
        "decode attention over a dense cache or the paged pool",
        choices=DECODE_ATTENTION,
    )
    device_ids: tuple[int, ...] = param(
        (), "node-local GPU ids of the instance, one per rank, stage-major (CUDA only)"
    )
    kv_transport: str = param("shm", "how decode pulls KV from prefill", choices=KV_TRANSPORTS)
    kv_lease_seconds: float = param(
        30.0, "seconds leased KV waits for a decode instance to pull it", minimum=1e-3
    )
    kv_port: int = param(0, "control port of the KV sender (0: a free port)", minimum=0)
    placement: str = param(
        "", "node:device of every GPU of the instance in a multi-node plan (informational)"
    )
    cpu_nice: int = param(
        0,
        f"nice value added to the instance's threads and workers (0-{MAX_NICE}): where phases share "
        "CPU cores, a higher value lets the other phases' threads run first",
        minimum=0,
        maximum=MAX_NICE,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.device == "cuda" and not self.device_ids:
            raise ParameterError("a CUDA replica needs device ids (parameter device_ids)")
        if self.device == "cpu" and self.device_ids:
            raise ParameterError("CPU replicas take no device ids")
        if any(d < 0 for d in self.device_ids):
            raise ParameterError(f"device ids must be >= 0, got {self.device_ids}")

    @property
    def max_context_tokens(self) -> int:
        """The most prompt + output tokens one request may have here, as far as the parameters
        tell: the KV pool (a sequence's whole life must fit in it) and max_model_len when set; the
        checkpoint's own context bounds it too (request_context_tokens)."""
        pool = self.num_blocks * self.block_size
        return min(pool, self.max_model_len) if self.max_model_len else pool

    def engine_config(self, repository_root: str | Path) -> EngineConfig:
        """The EngineConfig of this instance (model_dir resolved against the repository)."""
        ranks = self.tp_size * self.pp_size
        if self.device == "cuda" and len(self.device_ids) != ranks:
            raise ParameterError(
                f"device_ids {self.device_ids} must name one GPU per rank ({ranks}: tp_size x pp_size)"
            )
        rank_ids = self.device_ids if ranks > 1 else ()
        device = f"cuda:{self.device_ids[0]}" if self.device == "cuda" and not rank_ids else self.device
        return EngineConfig(
            model_dir=resolve_model_dir(self.model_dir, repository_root),
            device=device,
            dtype=self.dtype,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            num_threads=self.num_threads,
            decode_attention=self.decode_attention,
            tp_size=self.tp_size,
            pp_size=self.pp_size,
            device_ids=rank_ids,
        )


@dataclass(frozen=True)
class OrchestratorParams(ParamGroup):
    """What the orchestrator routes to and how long it waits."""

    model_dir: str = param("", "checkpoint folder of the tokenizer, absolute or relative to the repository")
    prefill_models: str = param("prefill", "prefill replicas, comma-separated")
    decode_models: str = param("decode", "decode replicas, comma-separated")
    routing_groups: str = param("", "replicas sharing nodes, 'p0,p1:d0;p2:d1' (empty: any pair)")
    max_concurrent_requests: int = param(256, "requests in flight in the instance", minimum=1)
    prefill_timeout_seconds: float = param(120.0, "longest wait for a prefill result", minimum=1e-3)
    decode_stall_timeout_seconds: float = param(
        10.0, "longest silence of a decode instance before the request fails", minimum=1e-3
    )
    max_context_tokens: int = param(
        0,
        "the most prompt + output tokens a request may have: the smallest of the routed engines' "
        "(their KV pools and max_model_len; the planner writes it), 0: only the model's own context",
        minimum=0,
    )
    phase_requests: str = param(
        "socket",
        "how requests reach prefill and decode: over their request channels, straight from this "
        "process (socket), or as BLS calls through the server (bls)",
        choices=("socket", "bls"),
    )
    input_in_output: str = param(
        "exclude",
        "non-streaming text of a request without exclude_input_in_output: without the prompt "
        "(this project's default) or with it (TensorRT-LLM's, the ensemble and tensorrt_llm_bls entry points)",
        choices=("exclude", "include"),
    )


def request_context_tokens(raw: Mapping[str, str], model_dir: str | Path) -> int:
    """The most prompt + output tokens one request to a client-facing model may have, from its
    config.pbtxt parameters (an orchestrator's max_context_tokens, or a colocated engine's own
    limits) and the checkpoint's context (model_dir). The OpenAI frontend defaults a chat's
    max_tokens to this minus the prompt; the orchestrator refuses more up front."""
    own = ModelConfig.from_dir(model_dir).derived_max_len
    if "prefill_models" in raw:  # an orchestrator or an entry point
        limit = OrchestratorParams.from_parameters(raw).max_context_tokens
    else:
        limit = EngineParams.from_parameters(raw).max_context_tokens
    return min(own, limit) if limit else own


def model_parameters(args: Mapping[str, str], unary_ok: bool = False) -> tuple[dict[str, str], Path]:
    """What every model's initialize() starts with: checks the model is decoupled (unless
    `unary_ok`: the entry points may answer once), returns its string parameters and the repository
    root (relative model_dir values resolve against it; args["model_repository"] is the model's
    own folder)."""
    config = dict(json.loads(args["model_config"]))
    if not unary_ok and not config.get("model_transaction_policy", {}).get("decoupled", False):
        raise ParameterError(
            f"model {config.get('name')!r} must be decoupled: set model_transaction_policy {{ decoupled: true }}"
        )
    raw = {k: str(v.get("string_value", "")) for k, v in config.get("parameters", {}).items()}
    return raw, Path(args["model_repository"]).parent


def resolve_model_dir(raw: str, repository_root: str | Path) -> str:
    """model_dir as an absolute folder that holds a checkpoint."""
    if not raw:
        raise ParameterError("parameter 'model_dir' is required (a Hugging Face checkpoint folder)")
    path = Path(raw)
    if not path.is_absolute():
        path = Path(repository_root) / path
    if not (path / "config.json").is_file():
        raise ParameterError(f"parameter 'model_dir' = {raw!r}: no config.json in {path}")
    return str(path.resolve())
