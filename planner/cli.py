"""Command line: `python -m planner profile | plan | replan`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from backends.common.params import ParameterError
from planner import PlannerError, profiler, replan
from planner.inputs import PlanInputs, add_arguments
from planner.placement import plan as run_plan
from planner.plan import Plan, save_plan
from planner.plan_deploy import deployment_from_plan
from planner.report import describe
from planner.repository import add_decoupled_argument, relative_model_dir, write_repository
from workload import WorkloadError


def cmd_plan(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    inputs = PlanInputs.from_args(a)
    problem = inputs.problem()
    log(
        f"workload {problem.workload.name}: {len(problem.workload.prompt_lens)} requests; {problem.workload.note}"
    )
    result = run_plan(problem, a.affinity, a.rate, log)
    elapsed = time.perf_counter() - t0
    details = {
        **result.details,
        "inputs": inputs.to_json(),
        "workload": problem.workload.summary(),
        "seconds": elapsed,
    }
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
    names = write_repository(dataclasses.replace(dep, decoupled=a.decoupled == "true"), repo)
    print(describe(result, problem))
    print(f"wrote {out / 'plan.json'} and {repo} ({len(names)} models) in {elapsed:.1f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m planner", description="Disaggregated serving planner")
    sub = ap.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("plan", help="search a placement and write plan.json + a Triton model repository")
    add_arguments(pp)
    pp.add_argument(
        "--model-dir", help="model folder the repository points at (default: --model or models/NAME)"
    )
    pp.add_argument("--out", required=True)
    add_decoupled_argument(pp)
    pp.set_defaults(func=cmd_plan)
    profiler.add_parser(sub)
    replan.add_parser(sub)
    a = ap.parse_args(argv)
    try:
        return int(a.func(a))
    except (PlannerError, ParameterError, WorkloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
