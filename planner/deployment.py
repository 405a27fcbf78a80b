"""What to deploy: model instances (prefill, decode, colocated replicas and the orchestrator) with
their parameters. The parameters are the serving layer's schema (backends.common.params), which the
models read back. `planner.repository` turns a Deployment into a Triton model repository;
`deployment_from_plan` turns a placement plan into a Deployment."""

from __future__ import annotations

from dataclasses import dataclass

from backends.common.params import EngineParams, OrchestratorParams
from planner import PlannerError

ROLES = ("prefill", "decode", "colocated")


def replica_names(role: str, count: int) -> list[str]:
    """`prefill` when there is one replica, else `prefill_0..prefill_{n-1}` (same for decode)."""
    if count < 1:
        raise PlannerError(f"need at least one {role} replica")
    return [role] if count == 1 else [f"{role}_{k}" for k in range(count)]


@dataclass(frozen=True)
class ReplicaSpec:
    """One model in the repository = one model instance, with its parameters (device ids and
    placement among them)."""

    name: str
    role: str
    engine: EngineParams

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise PlannerError(f"replica role must be one of {ROLES}, got {self.role!r}")
        if not self.name.replace("_", "").isalnum():
            raise PlannerError(f"bad model name {self.name!r}")
        if not self.engine.model_dir:
            raise PlannerError(f"{self.name}: engine parameter model_dir is required")


TENSORRT_LLM_ENTRY_POINTS = ("ensemble", "tensorrt_llm_bls")


@dataclass(frozen=True)
class Deployment:
    """A complete deployment: prefill and decode replicas, an optional colocated model (one engine
    serving both phases, for comparison) and the orchestrator routing over the replicas."""

    prefill: tuple[ReplicaSpec, ...]
    decode: tuple[ReplicaSpec, ...]
    orchestrator: OrchestratorParams  # its prefill_models and decode_models are the replicas'
    colocated: ReplicaSpec | None = None
    # More entry points routing over the same replicas, under the names TensorRT-LLM's clients
    # call, with its tensor shapes (a batch dimension) and defaults: orchestrators, not engines.
    tensorrt_llm_entry_points: tuple[str, ...] = TENSORRT_LLM_ENTRY_POINTS
    # Streaming entry points (decoupled; the default) or unary ones (TensorRT-LLM's
    # decoupled_mode false: gRPC ModelInfer, HTTP /infer and /generate).
    decoupled: bool = True

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
        if not self.orchestrator.model_dir:
            raise PlannerError("the orchestrator needs model_dir (for the tokenizer)")
        taken = {"orchestrator", *(r.name for r in self.replicas)}
        for name in self.tensorrt_llm_entry_points:
            if name not in TENSORRT_LLM_ENTRY_POINTS or name in taken:
                raise PlannerError(f"entry point {name!r}: must be one of {TENSORRT_LLM_ENTRY_POINTS}, once")
            taken.add(name)

    @property
    def replicas(self) -> tuple[ReplicaSpec, ...]:
        return (*self.prefill, *self.decode, *((self.colocated,) if self.colocated else ()))


# On CPU prefill and decode share the cores. Decode's loop is runnable whenever it has sequences, so
# at an even priority the server's, orchestrator's and clients' threads preempt prefill, whose
# bursts TTFT waits on, as often as decode; a lower priority for decode makes them take decode's
# share first. 5 restored the TTFT attainment under load that decode's faster loop had cost
# (docs/overhead.md, "Decode's CPU priority").
DECODE_CPU_NICE = 5


def default_deployment(
    model_dir: str,
    device: str = "cpu",
    num_blocks: int = 1024,
    prefill_tp: int = 1,
    decode_tp: int = 1,
    prefill_pp: int = 1,
    decode_pp: int = 1,
) -> Deployment:
    """One prefill (over prefill_tp x prefill_pp ranks), one decode (decode_tp x decode_pp), one
    colocated at TP 1, PP 1 and the orchestrator, each with `num_blocks` KV blocks of 16 tokens (a
    few MB for the tiny default model, 46 KB per token for SmolLM2-135M). On CUDA the instances'
    ranks take GPUs 0, 1, ... (all instances from GPU 0 up); on CPU every rank is a process, and
    decode's run at DECODE_CPU_NICE."""
    transport = "cuda_ipc" if device == "cuda" else "shm"
    dtype = "float16" if device == "cuda" else "float32"
    # On CPU the model processes share the cores: one torch thread each avoids oversubscription.
    threads = 1 if device == "cpu" else None
    decode_nice = DECODE_CPU_NICE if device == "cpu" else 0

    def engine(tp: int, pp: int = 1, cpu_nice: int = 0) -> EngineParams:
        ids = tuple(range(tp * pp)) if device == "cuda" else ()
        return EngineParams(
            model_dir,
            device,
            dtype,
            num_blocks=num_blocks,
            max_num_seqs=64,
            tp_size=tp,
            pp_size=pp,
            num_threads=threads,
            device_ids=ids,
            kv_transport=transport,
            cpu_nice=cpu_nice,
        )

    return Deployment(
        prefill=(ReplicaSpec("prefill", "prefill", engine(prefill_tp, prefill_pp)),),
        decode=(ReplicaSpec("decode", "decode", engine(decode_tp, decode_pp, decode_nice)),),
        orchestrator=OrchestratorParams(model_dir),
        colocated=ReplicaSpec("colocated", "colocated", engine(1)),
    )
