"""Colocated baselines and the verdict: should this engine be disaggregated for these SLOs?

Two questions, each answered by its own labelled baseline:
- "same engine": the best colocated deployment of the engine the plan was made for (its profile,
  the same (tp, pp) space). This is the question a user deploying that engine asks, and it decides
  the verdict.
- "reference engine": the best colocated deployment of another engine, timed by its own profile
  (`--colocated-profile`; the bundled vLLM A100 profile when planning with DistServe's published
  one, searched at pp=1 as vLLM served in 2024, which is the comparison DistServe's paper makes)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace

from planner.goodput import Goodput
from planner.plan import Baseline, PhaseChoice, Plan
from planner.search import PhaseTask, Problem, evaluate, phase_tasks

Log = Callable[[str], None]
SAME_ENGINE = "same engine"
REFERENCE_ENGINE = "reference engine"


def best_colocated(
    problem: Problem, phase: dict[PhaseTask, Goodput], log: Log
) -> tuple[PhaseTask, Goodput] | None:
    """Best colocated (tp, pp) by per-GPU goodput. On the same engine a colocated instance cannot
    beat the prefill-only or the decode-only instance of its shape (interference only adds delay),
    so min(prefill, decode goodput) from `phase` bounds it: configs are tried best bound first, in
    waves of one per worker, and the ones whose bound cannot beat the best found are skipped. Pass
    an empty `phase` when it was measured on another engine."""
    tasks = phase_tasks(problem, "colocated", problem.cluster.num_gpus)  # the disaggregated space

    def bound(t: PhaseTask) -> float:
        rates = [g.rate for k, g in phase.items() if (k.tp, k.pp) == (t.tp, t.pp)]
        kinds = {k.kind for k in phase if (k.tp, k.pp) == (t.tp, t.pp)}
        return min(rates) if kinds == {"prefill", "decode"} else math.inf

    todo = sorted(tasks, key=lambda t: (-bound(t) / t.gpus, t.gpus, t))
    best: tuple[float, PhaseTask, Goodput] | None = None
    wave = max(1, problem.workers or os.cpu_count() or 1)
    done = 0
    while todo:
        batch, todo = todo[:wave], todo[wave:]
        res = evaluate(problem, batch, "colocated")
        done += len(batch)
        for t in sorted(res):
            g = res[t]
            if g.rate > 0 and (best is None or (g.rate / t.gpus, -t.gpus) > (best[0], -best[1].gpus)):
                best = (g.rate / t.gpus, t, g)
        if best is not None:
            todo = [t for t in todo if bound(t) / t.gpus > best[0]]
    log(f"colocated baseline: {done} of {len(tasks)} configs simulated")
    return None if best is None else (best[1], best[2])


def baseline(label: str, engine: str, found: tuple[PhaseTask, Goodput] | None) -> Baseline:
    if found is None:
        return Baseline(label, engine, None)
    t, g = found
    return Baseline(label, engine, PhaseChoice(t.tp, t.pp, g.rate), g.low, g.high)


def colocated_baselines(problem: Problem, phase: dict[PhaseTask, Goodput], log: Log) -> tuple[Baseline, ...]:
    """The same-engine baseline and, when the problem has a reference engine, the reference one."""
    same = baseline(SAME_ENGINE, problem.profile_name, best_colocated(problem, phase, log))
    ref = problem.reference
    if ref is None:
        return (same,)
    ref_problem = replace(
        problem, profile=ref.profile, max_pp=min(ref.max_pp, problem.max_pp), reference=None
    )
    return same, baseline(REFERENCE_ENGINE, ref.name, best_colocated(ref_problem, {}, log))


def verdict(plan: Plan) -> str:
    """Disaggregate or colocate, from the same-engine baseline: a side wins when the 95% interval
    of the per-GPU goodput ratio excludes 1; otherwise the difference is within the simulation's
    uncertainty and the simpler colocated deployment is as good."""
    same = next((b for b in plan.baselines if b.label == SAME_ENGINE), None)
    if same is None:
        return "no verdict: the colocated baseline was not searched"
    r = plan.ratio(same)
    if r is None:
        return "disaggregate: no colocated configuration of this engine meets the SLOs"
    c = same.choice
    assert c is not None
    shown = f"{r.value:.2f}x (95% CI {r.low:.2f}-{r.high:.2f}) the per-GPU goodput of colocated tp={c.tp} pp={c.pp}"
    if r.low > 1:
        return f"disaggregate: {shown}"
    if r.high < 1:
        return f"colocate: disaggregation gives only {shown}"
    return (
        f"either: disaggregation gives {shown}, within the uncertainty; colocated is the simpler deployment"
    )
