"""Replanning: compare the workload a deployment sees now with the one it was planned for.

    python -m planner replan --plan DIR/plan.json (--log requests.jsonl | --metrics-url URL) [--out DIR2]

Observed lengths come from a request log (JSON lines or CSV with a time and the prompt/output token
counts, e.g. {"time": 1700000000.1, "prompt_tokens": 120, "output_tokens": 300}); the rate from the
log's timestamps or from two reads of Triton's metrics (nv_inference_request_success of the
orchestrator). The current plan is simulated on the observed workload: if it misses the SLO, or a
new plan serves the observed rate with fewer GPUs, the plan should change."""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from planner import PlannerError
from planner.goodput import attainment_at
from planner.inputs import PlanInputs
from planner.joint import joint_config
from planner.placement import plan as run_plan
from planner.plan import Plan, load_plan, save_plan
from planner.report import describe
from workload import Workload, from_rows

_METRIC = re.compile(r"^nv_inference_request_success\{([^}]*)\}\s+([0-9.eE+-]+)", re.M)


class Observation(NamedTuple):
    """Recent traffic: rate (req/s) and the request lengths (None: keep the planned workload)."""

    rate: float
    workload: Workload | None
    source: str


class Decision(NamedTuple):
    change: bool
    reason: str
    current_attainment: float
    new_plan: Plan | None


def read_log(path: str | Path, window_s: float | None = None) -> Observation:
    """Rate and lengths from a request log; `window_s` keeps only the last seconds of it."""
    p = Path(path)
    if not p.is_file():
        raise PlannerError(f"request log {p} not found")
    if p.suffix == ".csv":
        rows: list[dict[str, Any]] = list(csv.DictReader(p.read_text().splitlines()))
    else:
        try:
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise PlannerError(f"request log {p}: not JSON lines ({exc})") from exc
    try:
        times = np.array([float(r.get("time", r.get("timestamp", ""))) for r in rows])
    except (TypeError, ValueError) as exc:
        raise PlannerError(f"request log {p}: every row needs a numeric 'time'") from exc
    if window_s is not None and len(times):
        keep = times >= times.max() - window_s
        rows = [r for r, k in zip(rows, keep, strict=True) if k]
        times = times[keep]
    if len(rows) < 2 or times.max() <= times.min():
        raise PlannerError(f"request log {p}: needs at least two requests at different times")
    rate = (len(times) - 1) / float(times.max() - times.min())
    return Observation(rate, from_rows(rows, "observed"), str(p))


def parse_success_count(text: str, model: str = "orchestrator") -> float:
    """Sum of nv_inference_request_success over the versions of `model` in Prometheus text."""
    total, seen = 0.0, False
    for labels, value in _METRIC.findall(text):
        if f'model="{model}"' in labels:
            total += float(value)
            seen = True
    if not seen:
        raise PlannerError(f"the metrics have no nv_inference_request_success for model {model!r}")
    return total


def read_metrics(url: str, interval_s: float, model: str = "orchestrator") -> Observation:
    def count() -> float:
        with urllib.request.urlopen(url, timeout=10) as r:
            return parse_success_count(r.read().decode(), model)

    first = count()
    time.sleep(interval_s)
    return Observation(max(count() - first, 0.0) / interval_s, None, url)


def recorded_inputs(plan: Plan) -> PlanInputs:
    """The problem `planner plan` was asked, as the plan recorded it."""
    inputs = plan.details.get("inputs")
    if not isinstance(inputs, dict):
        raise PlannerError("the plan has no recorded inputs (details.inputs): write it with `planner plan`")
    return PlanInputs.from_json(inputs)


def decide(plan: Plan, observed: Observation, affinity: str | None = None, log: Any = None) -> Decision:
    """Simulate the current plan on the observed traffic and search a new plan for it."""
    inputs = recorded_inputs(plan)
    problem = inputs.problem(observed.workload)
    if observed.rate <= 0:
        return Decision(False, "no traffic observed: keep the plan", 1.0, None)
    cfg = joint_config(problem, list(plan.replicas))
    current = attainment_at(cfg, observed.rate, problem.workload, problem.slo, problem.settings).value
    try:
        new = run_plan(problem, affinity or inputs.affinity, observed.rate, log or (lambda s: None))
    except PlannerError as exc:
        if current < problem.slo.attainment:
            return Decision(
                True, f"the plan misses the SLO ({current:.1%}) and no plan fits: {exc}", current, None
            )
        return Decision(False, f"keep: no cheaper plan ({exc})", current, None)
    if current < problem.slo.attainment:
        why = (
            f"the current plan meets the SLOs for only {current:.1%} of requests at {observed.rate:.2f} req/s"
        )
        return Decision(True, why, current, new)
    if new.num_gpus < plan.num_gpus:
        why = f"over-provisioned: {new.num_gpus} GPUs serve {observed.rate:.2f} req/s (now {plan.num_gpus})"
        return Decision(True, why, current, new)
    return Decision(
        False, f"keep: the plan meets the SLOs ({current:.1%}) at {observed.rate:.2f} req/s", current, None
    )


def cmd_replan(a: argparse.Namespace) -> int:
    plan = load_plan(a.plan)
    if a.log:
        obs = read_log(a.log, a.window)
    elif a.metrics_url:
        obs = read_metrics(a.metrics_url, a.interval)
    else:
        raise PlannerError("give --log or --metrics-url")
    if a.rate is not None:
        obs = obs._replace(rate=a.rate)
    print(f"observed {obs.rate:.3f} req/s from {obs.source}")
    d = decide(plan, obs)
    print(("CHANGE: " if d.change else "") + d.reason)
    if d.new_plan is not None and d.change:
        print(describe(d.new_plan, recorded_inputs(plan).problem(obs.workload)))
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            details = {**d.new_plan.details, "inputs": {**plan.details["inputs"], "rate": obs.rate}}
            save_plan(Plan(**{**d.new_plan.__dict__, "details": details}), Path(a.out) / "plan.json")
            print(
                f"wrote {Path(a.out) / 'plan.json'}; `python -m planner plan` with --rate {obs.rate:.3f} writes its repository"
            )
    return 0


def add_parser(sub: Any) -> None:
    ap = sub.add_parser("replan", help="check a plan against recent traffic and propose a new one")
    ap.add_argument("--plan", required=True, help="plan.json written by `planner plan`")
    ap.add_argument("--log", help="request log: JSON lines or CSV with time, prompt and output token counts")
    ap.add_argument("--window", type=float, help="only the last WINDOW seconds of the log")
    ap.add_argument("--metrics-url", help="Triton metrics endpoint, e.g. http://127.0.0.1:8002/metrics")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between the two metric reads")
    ap.add_argument("--rate", type=float, help="override the observed rate (req/s)")
    ap.add_argument("--out", help="write the proposed plan.json here")
    ap.set_defaults(func=cmd_replan)
