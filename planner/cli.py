"""Command line: `python -m planner profile | plan | replan`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backends.common.params import ParameterError
from planner import PlannerError
from planner.cluster import ClusterSpec
from planner.deployment import replica_names
from planner.goodput import SearchSettings, Slo
from planner.memory import DEFAULT_CAPACITY_TABLE, load_capacity_table
from planner.model_spec import resolve_model
from planner.placement import plan as run_plan
from planner.plan import Plan, save_plan
from planner.plan_deploy import deployment_from_plan
from planner.profile import DEFAULT_PROFILE, load_profile
from planner.repository import relative_model_dir, write_repository
from planner.search import Problem
from planner.workload import load_workload


def add_problem_args(ap: argparse.ArgumentParser) -> None:
    """Arguments describing the planning problem (shared by plan and replan)."""
    ap.add_argument("--profile", default=str(DEFAULT_PROFILE), help="latency profile JSON (DistServe format)")
    ap.add_argument("--colocated-profile", help="profile timing the colocated baseline (default: --profile)")
    ap.add_argument(
        "--capacity-table", default=str(DEFAULT_CAPACITY_TABLE), help="KV capacity CSV, or 'none'"
    )
    ap.add_argument("--model", required=True, help="known model name (opt-13b, ...) or a Hugging Face folder")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--nvlink-gbps", type=float, default=300.0)
    ap.add_argument("--no-nvlink", action="store_true", help="GPUs of a node talk over PCIe")
    ap.add_argument("--network-gbps", type=float, default=25.0, help="bandwidth between nodes (GB/s)")
    ap.add_argument("--affinity", choices=("high", "low"), default="high")
    ap.add_argument("--ttft", type=float, required=True, help="TTFT SLO, seconds")
    ap.add_argument("--tpot", type=float, required=True, help="TPOT SLO, seconds")
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument(
        "--workload", default="sharegpt", help="sharegpt | FILE | synthetic:prompt=DIST,output=DIST"
    )
    ap.add_argument("--tokenizer", help="folder with tokenizer.json (default: --model when it is a folder)")
    ap.add_argument("--rate", type=float, help="target rate (req/s); default: as much as the cluster serves")
    ap.add_argument("--arrival-cv", type=float, default=1.0, help="arrival burstiness (1 = Poisson)")
    ap.add_argument("--token-budget", type=int, default=2048, help="prefill batch token budget")
    ap.add_argument("--max-batch", type=int, default=256, help="max sequences in a decode batch")
    ap.add_argument("--max-pp", type=int, default=8, help="deepest pipeline searched")
    ap.add_argument("--precision", type=float, default=0.03, help="relative precision of goodput searches")
    ap.add_argument("--workers", type=int, default=0, help="search processes (0 = one per core)")
    ap.add_argument("--seed", type=int, default=0)


def build_problem(a: argparse.Namespace, workload_override: Any = None) -> Problem:
    if a.nodes < 1 or a.gpus_per_node < 1:
        raise PlannerError(f"need at least one node and one GPU per node (got {a.nodes} x {a.gpus_per_node})")
    model = resolve_model(a.model)
    profile = load_profile(a.profile).for_model(model.name)
    colo = load_profile(a.colocated_profile).for_model(model.name) if a.colocated_profile else None
    table = None if a.capacity_table == "none" else load_capacity_table(a.capacity_table)
    cluster = ClusterSpec(
        a.nodes, a.gpus_per_node, a.gpu_memory_gib, nvlink=not a.no_nvlink, nvlink_gbps=a.nvlink_gbps,
        network_gbps=a.network_gbps,
    )  # fmt: skip
    tokenizer = a.tokenizer or (a.model if Path(a.model).is_dir() else None)
    workload = workload_override or load_workload(
        a.workload, tokenizer, model.max_position_embeddings, a.seed
    )
    if a.token_budget < 1 or a.max_batch < 1 or a.max_pp < 1:
        raise PlannerError("--token-budget, --max-batch and --max-pp must be >= 1")
    return Problem(
        model=model,
        profile=profile,
        cluster=cluster,
        workload=workload,
        slo=Slo(a.ttft, a.tpot, a.attainment),
        settings=SearchSettings(precision=a.precision, seed=a.seed, arrival_cv=a.arrival_cv),
        capacity_table=table,
        colocated_profile=colo,
        token_budget=a.token_budget,
        max_batch=a.max_batch,
        workers=a.workers,
        max_pp=a.max_pp,
    )


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


def cmd_plan(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    problem = build_problem(a)
    log(
        f"workload {problem.workload.name}: {len(problem.workload.prompt_lens)} requests; {problem.workload.note}"
    )
    result = run_plan(problem, a.affinity, a.rate, log)
    elapsed = time.perf_counter() - t0
    inputs = {k: getattr(a, k) for k in sorted(vars(a)) if k not in ("func", "out", "model_dir", "command")}
    details = {**result.details, "inputs": inputs, "workload": problem.workload.summary(), "seconds": elapsed}
    result = Plan(**{**result.__dict__, "details": details})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_plan(result, out / "plan.json")
    model_dir = a.model_dir or (
        a.model if Path(a.model).is_dir() else f"models/{problem.model.name.split('/')[-1]}"
    )
    repo = out / "model_repository"
    dep = deployment_from_plan(
        result, problem.model, problem.cluster, relative_model_dir(model_dir, repo), problem.token_budget,
        problem.max_batch, problem.capacity_table,
    )  # fmt: skip
    names = write_repository(dep, repo)
    print(describe(result, problem))
    print(f"wrote {out / 'plan.json'} and {repo} ({len(names)} models) in {elapsed:.1f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m planner", description="Disaggregated serving planner")
    sub = ap.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("plan", help="search a placement and write plan.json + a Triton model repository")
    add_problem_args(pp)
    pp.add_argument(
        "--model-dir", help="model folder the repository points at (default: --model or models/NAME)"
    )
    pp.add_argument("--out", required=True)
    pp.set_defaults(func=cmd_plan)
    from planner import profiler, replan

    profiler.add_parser(sub)
    replan.add_parser(sub)
    a = ap.parse_args(argv)
    try:
        return int(a.func(a))
    except (PlannerError, ParameterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
