"""Turn a placement plan into a Deployment (and so a Triton model repository)."""

from __future__ import annotations

from backends.common.params import EngineParams, OrchestratorParams
from planner.cluster import ClusterSpec
from planner.deployment import Deployment, ReplicaSpec, replica_names
from planner.gpu_assign import Replica
from planner.memory import CapacityTable, kv_capacity_tokens
from planner.model_spec import ModelSpec
from planner.plan import Plan

BLOCK_SIZE = 16


def _transport(rep: Replica, peers: list[Replica]) -> str:
    """cuda_ipc when every KV peer of this replica shares its node, else nccl."""
    return "cuda_ipc" if all(p.node == rep.node for p in peers) else "nccl"


def deployment_from_plan(
    plan: Plan,
    model: ModelSpec,
    cluster: ClusterSpec,
    model_dir: str,
    token_budget: int,
    max_batch: int,
    capacity_table: CapacityTable | None = None,
    dtype: str = "float16",
) -> Deployment:
    """Replicas named by the repository conventions; KV blocks sized from the instance's capacity;
    with routing groups (Alg. 2) prefill replicas only send to decode replicas of their group."""
    pre, dec = plan.role_replicas("prefill"), plan.role_replicas("decode")
    grouped = plan.algorithm.startswith("alg2")

    def peers(rep: Replica, others: list[Replica]) -> list[Replica]:
        return [o for o in others if o.group == rep.group] if grouped else others

    def spec(name: str, rep: Replica, others: list[Replica]) -> ReplicaSpec:
        cap = kv_capacity_tokens(model, cluster, rep.tp, rep.pp, capacity_table)
        local = tuple(g.device for g in rep.gpus if g.node == rep.node)
        engine = EngineParams(
            model_dir=model_dir,
            device="cuda",
            dtype=dtype,
            block_size=BLOCK_SIZE,
            num_blocks=max(1, cap // BLOCK_SIZE),
            max_num_batched_tokens=token_budget,
            max_num_seqs=max_batch,
            tp_size=rep.tp,
            pp_size=rep.pp,
            kv_transport=_transport(rep, peers(rep, others)),
            device_ids=local,
            placement=",".join(f"{g.node}:{g.device}" for g in rep.gpus),
        )
        return ReplicaSpec(name, rep.role, engine)

    p_names, d_names = replica_names("prefill", len(pre)), replica_names("decode", len(dec))
    groups = ""
    if grouped:
        parts = []
        for g in sorted({r.group for r in plan.replicas}):
            ps = [n for n, r in zip(p_names, pre, strict=True) if r.group == g]
            ds = [n for n, r in zip(d_names, dec, strict=True) if r.group == g]
            parts.append(f"{','.join(ps)}:{','.join(ds)}")
        groups = ";".join(parts)
    return Deployment(
        prefill=tuple(spec(n, r, dec) for n, r in zip(p_names, pre, strict=True)),
        decode=tuple(spec(n, r, pre) for n, r in zip(d_names, dec, strict=True)),
        orchestrator=OrchestratorParams(model_dir, routing_groups=groups),
    )
