"""DistServe's chatbot comparison (OSDI 2024, Section 6.2), on our simulator.

    python -m planner.paper [--models opt-13b,opt-66b] [--precision 0.03] [--out FILE.json]

For each model, with DistServe's ShareGPT processing (`sharegpt-distserve`) and its chatbot SLOs, on
one node of 8 A100-80GB GPUs (the machine of the paper's OPT-13B and OPT-66B runs), it prints:
- the per-GPU goodput of our plan (Alg. 1), and of the deployment DistServe's artifact runs
  (evaluation/2-benchmark-serving/2-start-api-server.py), simulated jointly;
- the vLLM baseline the paper compares with: vLLM's measured profile, the paper's tensor
  parallelism, no pipeline, KV reserved (`reserve`) or, as vLLM does, allocated on demand with
  recompute preemption (`on_demand`); and the best colocated deployment of DistServe's own engine;
- the SLO-scale sweep of the paper's second row of figures: at the per-GPU rate DistServe's
  deployment just sustains at scale 1 (its goodput), the smallest factor on both SLOs that each
  deployment still meets for 90% of requests (lower is better; vLLM's factor over DistServe's is
  the paper's "tighter SLO")."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from planner.goodput import Slo, attainment_at, requests_for, search_goodput
from planner.gpu_assign import pack_independent
from planner.inputs import PlanInputs
from planner.joint import joint_config
from planner.placement import plan
from planner.profile import VLLM_PROFILE, load_profile
from planner.search import PhaseTask, Problem, task_config
from planner.simulator import SimConfig


class Setup(NamedTuple):
    """A model of the paper's chatbot experiment: its SLOs, DistServe's deployment (prefill tp, pp,
    decode tp, pp; one instance each) and vLLM's tensor parallelism."""

    ttft: float
    tpot: float
    distserve: tuple[int, int, int, int]
    vllm_tp: int


SETUPS = {
    "opt-13b": Setup(0.25, 0.1, (2, 1, 1, 1), 1),
    "opt-66b": Setup(2.5, 0.15, (4, 1, 2, 2), 4),
}
SCALES_LOW, SCALES_HIGH = 0.05, 4.0


class Deployment(NamedTuple):
    """A fixed deployment to measure: its simulator config and GPU count."""

    name: str
    config: SimConfig
    gpus: int


def distserve_deployment(problem: Problem, setup: Setup) -> Deployment:
    ptp, ppp, dtp, dpp = setup.distserve
    replicas = pack_independent(problem.cluster, [("prefill", ptp, ppp), ("decode", dtp, dpp)])
    assert replicas is not None
    return Deployment(f"DistServe's P({ptp},{ppp}) + D({dtp},{dpp})", joint_config(problem, replicas),
                      ptp * ppp + dtp * dpp)  # fmt: skip


def vllm_deployment(problem: Problem, setup: Setup, kv: str) -> Deployment:
    vllm = dataclasses.replace(problem, profile=load_profile(VLLM_PROFILE).for_model(problem.model.name),
                               colocated_kv=kv)  # fmt: skip
    task = PhaseTask("colocated", setup.vllm_tp, 1)
    return Deployment(f"vLLM tp={setup.vllm_tp}, KV {kv}", task_config(vllm, task), setup.vllm_tp)


def per_gpu_goodput(problem: Problem, d: Deployment, hint: float) -> float:
    return (
        search_goodput(d.config, problem.workload, problem.slo, problem.settings, hint * d.gpus).rate / d.gpus
    )


def min_slo_scale(problem: Problem, d: Deployment, per_gpu_rate: float) -> float:
    """Smallest factor on both SLOs met for the target attainment at this per-GPU rate (bisection,
    2% relative); SCALES_HIGH when even that is missed."""

    rate = per_gpu_rate * d.gpus
    # One run length for every scale (the one the goodput search used at scale 1): the length
    # otherwise follows the TPOT SLO, and a longer run near saturation measures a fuller queue.
    n = requests_for(rate, problem.workload, problem.slo, problem.settings)
    settings = dataclasses.replace(problem.settings, min_requests=n, max_requests=n)

    def ok(scale: float) -> bool:
        slo = Slo(problem.slo.ttft * scale, problem.slo.tpot * scale, problem.slo.attainment)
        return attainment_at(d.config, rate, problem.workload, slo, settings).value >= slo.attainment

    lo, hi = SCALES_LOW, SCALES_HIGH
    if not ok(hi):
        return hi
    while hi / lo > 1.02:
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def reproduce(model: str, precision: float) -> dict[str, Any]:
    setup = SETUPS[model]
    inputs = PlanInputs(model=model, nodes=1, gpus_per_node=8, ttft=setup.ttft, tpot=setup.tpot,
                        workload="sharegpt-distserve", precision=precision)  # fmt: skip
    problem = inputs.problem()
    ours = plan(problem, "high", None)
    hint = ours.per_gpu_goodput
    rows: dict[str, float] = {f"our plan: {ours.prefill.tp, ours.prefill.pp} x "
                              f"{len(ours.role_replicas('prefill'))} + {ours.decode.tp, ours.decode.pp} x "
                              f"{len(ours.role_replicas('decode'))}": ours.per_gpu_goodput}  # fmt: skip
    fixed = [distserve_deployment(problem, setup)] + [
        vllm_deployment(problem, setup, kv) for kv in ("reserve", "on_demand")
    ]
    for d in fixed:
        rows[d.name] = per_gpu_goodput(problem, d, hint)
    for b in ours.baselines:
        if b.choice is not None:
            rows[f"{b.label} colocated tp={b.choice.tp} pp={b.choice.pp}"] = b.per_gpu
    sweep_rate = rows[fixed[0].name]
    scales = {d.name: min_slo_scale(problem, d, sweep_rate) for d in fixed} if sweep_rate > 0 else {}
    return {"model": model, "slo": [setup.ttft, setup.tpot], "workload": problem.workload.summary(),
            "per_gpu_goodput": rows, "slo_scale": {"per_gpu_rate": sweep_rate, "min_scale": scales},
            "baselines": [b.to_json() for b in ours.baselines]}  # fmt: skip


def report(r: dict[str, Any]) -> str:
    lines = [f"{r['model']} (TTFT {r['slo'][0]} s, TPOT {r['slo'][1]} s, 90%), per-GPU goodput req/s:"]
    for name, value in r["per_gpu_goodput"].items():
        lines.append(f"  {name:45s} {value:7.3f}")
    s = r["slo_scale"]
    lines.append(f"  smallest SLO scale met at {s['per_gpu_rate']:.3f} req/s per GPU:")
    for name, scale in s["min_scale"].items():
        lines.append(f"    {name:43s} {scale:5.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m planner.paper", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    ap.add_argument("--precision", type=float, default=0.03)
    ap.add_argument("--out", help="also write the figures as JSON here")
    a = ap.parse_args(argv)
    results = [reproduce(m, a.precision) for m in a.models.split(",")]
    for r in results:
        print(report(r))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
