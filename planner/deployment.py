"""What to deploy: model instances (prefill, decode, colocated replicas and the orchestrator) with
their engine parameters and devices. `planner.repository` turns a Deployment into a Triton model
repository; `deployment_from_plan` turns a placement plan into a Deployment."""

from __future__ import annotations

from dataclasses import dataclass

from planner import PlannerError

ROLES = ("prefill", "decode", "colocated")
DEVICES = ("cpu", "cuda")
KV_TRANSPORTS = ("shm", "tcp", "cuda_ipc", "nccl")
DTYPES = ("float32", "float16", "bfloat16")


def replica_names(role: str, count: int) -> list[str]:
    """`prefill` when there is one replica, else `prefill_0..prefill_{n-1}` (same for decode)."""
    if count < 1:
        raise PlannerError(f"need at least one {role} replica")
    return [role] if count == 1 else [f"{role}_{k}" for k in range(count)]


@dataclass(frozen=True)
class EngineParams:
    """Engine parameters of one replica (written as string parameters of its config.pbtxt).

    model_dir is absolute or relative to the model repository folder; None means "from the model"."""

    model_dir: str
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_blocks: int = 1024
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None
    tp_size: int = 1
    pp_size: int = 1
    num_threads: int | None = None
    decode_attention: str = "auto"  # auto | dense | paged (EngineConfig.decode_attention)
    kv_transport: str = "shm"
    kv_lease_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise PlannerError("engine parameter model_dir is required")
        if self.device not in DEVICES:
            raise PlannerError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise PlannerError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.decode_attention not in ("auto", "dense", "paged"):
            raise PlannerError(
                f"decode_attention must be auto, dense or paged, got {self.decode_attention!r}"
            )
        if self.kv_transport not in KV_TRANSPORTS:
            raise PlannerError(f"kv_transport must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}")
        positive = (
            "block_size",
            "num_blocks",
            "max_num_batched_tokens",
            "max_num_seqs",
            "tp_size",
            "pp_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise PlannerError(f"engine parameter {name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise PlannerError("max_model_len must be >= 1 (or None for the model's own)")
        if self.num_threads is not None and self.num_threads < 1:
            raise PlannerError("num_threads must be >= 1 (or None for the engine's default)")
        if self.kv_lease_seconds <= 0:
            raise PlannerError("kv_lease_seconds must be positive")
        if self.device == "cpu" and self.tp_size * self.pp_size != 1:
            raise PlannerError("CPU replicas run with tp_size = pp_size = 1")

    def as_parameters(self, device_ids: tuple[int, ...]) -> dict[str, str]:
        def opt(x: int | None) -> str:
            return "" if x is None else str(x)

        return {
            "model_dir": self.model_dir,
            "device": self.device,
            "device_ids": ",".join(str(d) for d in device_ids),
            "dtype": self.dtype,
            "block_size": str(self.block_size),
            "num_blocks": str(self.num_blocks),
            "max_num_batched_tokens": str(self.max_num_batched_tokens),
            "max_num_seqs": str(self.max_num_seqs),
            "max_model_len": opt(self.max_model_len),
            "tp_size": str(self.tp_size),
            "pp_size": str(self.pp_size),
            "num_threads": opt(self.num_threads),
            "decode_attention": self.decode_attention,
            "kv_transport": self.kv_transport,
            "kv_lease_seconds": f"{self.kv_lease_seconds:g}",
        }


@dataclass(frozen=True)
class ReplicaSpec:
    """One model in the repository = one model instance. device_ids are the node-local GPU ids
    (empty on CPU); `placement` lists node:device for every GPU when the replica is part of a
    multi-node plan."""

    name: str
    role: str
    engine: EngineParams
    device_ids: tuple[int, ...] = ()
    placement: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise PlannerError(f"replica role must be one of {ROLES}, got {self.role!r}")
        if not self.name.replace("_", "").isalnum():
            raise PlannerError(f"bad model name {self.name!r}")
        if self.engine.device == "cpu" and self.device_ids:
            raise PlannerError(f"{self.name}: CPU replicas take no device ids")
        if self.engine.device == "cuda":
            if not self.device_ids:
                raise PlannerError(f"{self.name}: a CUDA replica needs device ids")
            if any(d < 0 for d in self.device_ids):
                raise PlannerError(f"{self.name}: device ids must be >= 0")


@dataclass(frozen=True)
class OrchestratorSpec:
    """The BLS orchestrator: tokenizer folder, routing table and concurrency limit. routing_groups
    (optional) pairs prefill and decode replicas that share nodes ("p0,p1:d0,d1;..."), so KV stays
    on NVLink in low node-affinity plans."""

    model_dir: str
    max_concurrent_requests: int = 256
    routing_groups: str = ""

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise PlannerError("the orchestrator needs model_dir (for the tokenizer)")
        if self.max_concurrent_requests < 1:
            raise PlannerError("max_concurrent_requests must be >= 1")


@dataclass(frozen=True)
class Deployment:
    """A complete deployment: prefill and decode replicas, an optional colocated model (one engine
    serving both phases, for comparison) and the orchestrator routing over the replicas."""

    prefill: tuple[ReplicaSpec, ...]
    decode: tuple[ReplicaSpec, ...]
    orchestrator: OrchestratorSpec
    colocated: ReplicaSpec | None = None

    def __post_init__(self) -> None:
        for role, reps in (("prefill", self.prefill), ("decode", self.decode)):
            if [r.name for r in reps] != replica_names(role, len(reps)):
                raise PlannerError(f"{role} replicas must be named {replica_names(role, len(reps))}")
            if any(r.role != role for r in reps):
                raise PlannerError(f"the {role} list holds a replica of another role")
        if self.colocated is not None and (self.colocated.role, self.colocated.name) != (
            "colocated",
            "colocated",
        ):
            raise PlannerError("the colocated replica must be named 'colocated' with role 'colocated'")

    @property
    def replicas(self) -> tuple[ReplicaSpec, ...]:
        return (*self.prefill, *self.decode, *((self.colocated,) if self.colocated else ()))


def default_deployment(model_dir: str, device: str = "cpu", num_blocks: int = 1024) -> Deployment:
    """One prefill, one decode, one colocated and the orchestrator, with `num_blocks` KV blocks of
    16 tokens each (a few MB for the tiny default model, 46 KB per token for SmolLM2-135M). On CUDA
    everything shares GPU 0."""
    ids: tuple[int, ...] = (0,) if device == "cuda" else ()
    transport = "cuda_ipc" if device == "cuda" else "shm"
    dtype = "float16" if device == "cuda" else "float32"

    # On CPU the model processes share the cores: one torch thread each avoids oversubscription.
    threads = 1 if device == "cpu" else None

    def engine(max_seqs: int) -> EngineParams:
        return EngineParams(
            model_dir,
            device,
            dtype,
            num_blocks=num_blocks,
            max_num_seqs=max_seqs,
            num_threads=threads,
            kv_transport=transport,
        )

    return Deployment(
        prefill=(ReplicaSpec("prefill", "prefill", engine(64), ids),),
        decode=(ReplicaSpec("decode", "decode", engine(64), ids),),
        orchestrator=OrchestratorSpec(model_dir),
        colocated=ReplicaSpec("colocated", "colocated", engine(64), ids),
    )
