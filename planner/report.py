"""What a plan says, in words: the plan's configurations, replicas, goodput and the colocated baseline."""

from __future__ import annotations

from planner.baselines import verdict
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
        f"  goodput: {plan.goodput:.2f} req/s (95% CI {plan.goodput_low:.2f}-{plan.goodput_high:.2f}) on "
        f"{plan.num_gpus} GPUs = {plan.per_gpu_goodput:.3f} req/s per GPU "
        f"(joint attainment {plan.attainment:.1%}, 95% CI {ci[0]:.1%}-{ci[1]:.1%})"
    )
    joint = plan.details.get("joint_candidates", [])
    if joint:
        lines.append(
            f"  chosen by joint simulation among {len(joint)} candidates (per-phase prediction -> joint):"
        )
        for cand in sorted(joint, key=lambda j: -j["joint_goodput"]):
            lines.append(
                f"    {cand['deployment']}: {cand['predicted_goodput']:.2f} -> {cand['joint_goodput']:.2f} req/s"
            )
    for b in plan.baselines:
        if b.choice is None:
            lines.append(f"  colocated baseline, {b.label} ({b.engine}): no configuration meets the SLOs")
            continue
        ratio = plan.ratio(b)
        assert ratio is not None
        n = b.choice.gpus
        lines.append(
            f"  colocated baseline, {b.label} ({b.engine}): tp={b.choice.tp} pp={b.choice.pp}, "
            f"{b.per_gpu:.3f} req/s per GPU (95% CI {b.low / n:.3f}-{b.high / n:.3f}) -> "
            f"disaggregated / colocated = {ratio.value:.2f}x (95% CI {ratio.low:.2f}-{ratio.high:.2f})"
        )
    lines.append(f"  verdict: {verdict(plan)}")
    return "\n".join(lines)
