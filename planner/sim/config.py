"""What to simulate: the instances and how requests flow between them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from planner import PlannerError
from planner.cluster import ClusterSpec
from planner.latency import PhaseLatency


class Instance(NamedTuple):
    """One simulated instance. `group` restricts routing: prefill output goes to a decode instance of
    the same group when one exists (low node-affinity placements keep KV on NVLink)."""

    latency: PhaseLatency
    capacity_tokens: int = 1 << 40  # KV capacity; only decode and colocated instances use it
    max_batch: int = 1 << 30
    node: int = 0
    group: int = 0


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. mode: "joint" (prefill -> transfer -> decode, or colocated), "prefill_only"
    (TTFT of the prefill instances), "decode_only" (requests enter decode at arrival, their KV coming
    over the link given by `decode_only_same_node`). `colocated_kv`: "reserve" (prompt + output held
    from admission, never a preemption) or "on_demand" (vLLM's allocation with recompute preemption,
    sim/on_demand.py)."""

    prefill: tuple[Instance, ...] = ()
    decode: tuple[Instance, ...] = ()
    colocated: tuple[Instance, ...] = ()
    token_budget: int = 2048
    kv_bytes_per_token: int = 0
    cluster: ClusterSpec | None = None
    routing: str = "least_loaded"
    mode: str = "joint"
    decode_only_same_node: bool = True
    max_steps_per_event: int = 1 << 30  # 1: one event per decode step (the reference behaviour)
    colocated_kv: str = "reserve"

    def __post_init__(self) -> None:
        if self.mode not in ("joint", "prefill_only", "decode_only"):
            raise PlannerError(f"unknown simulation mode {self.mode!r}")
        if self.colocated_kv not in ("reserve", "on_demand"):
            raise PlannerError(f"unknown colocated KV policy {self.colocated_kv!r}: reserve or on_demand")
        if self.routing not in ("least_loaded", "round_robin"):
            raise PlannerError(f"unknown routing {self.routing!r}: least_loaded or round_robin")
        if self.colocated and (self.prefill or self.decode):
            raise PlannerError("simulate either colocated instances or prefill/decode instances")
        need_p = self.mode in ("joint", "prefill_only") and not self.colocated
        if need_p and not self.prefill:
            raise PlannerError("the simulation needs at least one prefill instance")
        if self.mode in ("joint", "decode_only") and not self.colocated and not self.decode:
            raise PlannerError("the simulation needs at least one decode instance")
        if self.token_budget < 1:
            raise PlannerError("the prefill token budget must be >= 1")
        if self.max_steps_per_event < 1:
            raise PlannerError("max_steps_per_event must be >= 1")
