"""What a plan says, in words: the plan's configurations, replicas, goodput and the colocated baseline."""

from __future__ import annotations

from planner.deployment import replica_names
from planner.plan import Plan
from planner.search import Problem


def describe(plan: Plan, problem: Problem) -> str:
    c, s = problem.cluster, problem.slo
    lines = [
        f"plan: {plan.algorithm} for {plan.model} on {c.nodes}x{c.gpus_per_node} GPUs "
        f"(TTFT {s.ttft:g} s, TPOT {s.tpot:g} s, {s.attainment:.0%} attainment)"
    ]
    for role, choice in (("prefill", plan.prefill), ("decode", plan.decode)):
        reps = plan.role_replicas(role)
        lines.append(
            f"  {role:7s}: tp={choice.tp} pp={choice.pp} x {len(reps)} replicas "
            f"(one instance: {choice.goodput:.2f} req/s, {choice.goodput / choice.gpus:.2f} per GPU)"
        )
        for name, r in zip(replica_names(role, len(reps)), reps, strict=True):
            gpus = " ".join(f"n{g.node}:g{g.device}" for g in r.gpus)
            lines.append(f"    {name} (group {r.group}): {gpus}")
    ci = plan.details.get("joint_ci", [0.0, 0.0])
    lines.append(
        f"  goodput: {plan.goodput:.2f} req/s on {plan.num_gpus} GPUs = {plan.per_gpu_goodput:.3f} req/s per GPU "
        f"(joint attainment {plan.attainment:.1%}, 95% CI {ci[0]:.1%}-{ci[1]:.1%})"
    )
    if plan.colocated is not None:
        ratio = plan.per_gpu_goodput / plan.colocated_per_gpu if plan.colocated_per_gpu else float("inf")
        lines.append(
            f"  colocated best: tp={plan.colocated.tp} pp={plan.colocated.pp}: {plan.colocated_per_gpu:.3f} req/s "
            f"per GPU -> disaggregated / colocated = {ratio:.2f}x"
        )
    else:
        lines.append("  colocated: no configuration meets the SLOs")
    return "\n".join(lines)
