"""Placement search (DistServe Alg. 1 and Alg. 2) and the colocated baseline.

Alg. 1 (high node-affinity): the best prefill config and the best decode config by single-instance
per-GPU goodput, chosen independently; replica counts then serve the target rate with the fewest
GPUs (or, without a target rate, the most rate the cluster holds).
Alg. 2 (low node-affinity): a unit spans `inter_op` nodes; on each node it holds k_p prefill and k_d
decode segments of the same layers, so KV moves over NVLink. Segments are enumerated jointly.
Per-phase goodputs only rank the candidates: the best few of each pipeline depth are simulated
jointly (planner/joint.py) and the plan is the best of those by joint goodput. Colocated baselines
and the verdict come from planner/baselines.py."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from planner import PlannerError
from planner.baselines import colocated_baselines
from planner.goodput import Goodput
from planner.gpu_assign import Segment, pack_independent, units_that_fit
from planner.joint import Candidate, Settled, best_settled, simulate_candidates, top_per_pp_level
from planner.plan import PhaseChoice, Plan
from planner.search import PhaseTask, Problem, evaluate, fits, phase_tasks

Log = Callable[[str], None]
Scored = list[tuple[tuple[float, ...], Candidate]]


def _no_fit_message(problem: Problem, kind: str) -> str:
    m = problem.model
    return (
        f"no {kind} configuration of {m.name} fits this cluster: the weights take "
        f"{m.param_bytes / 2**30:.0f} GiB, a GPU holds {problem.cluster.usable_bytes_per_gpu / 2**30:.0f} GiB, "
        f"profiled tp degrees {sorted(problem.profile)}, {problem.cluster.num_gpus} GPUs"
    )


def _unmet(problem: Problem, kind: str) -> PlannerError:
    slo = problem.slo
    what = "TTFT" if kind == "prefill" else "TPOT" if kind == "decode" else "TTFT and TPOT"
    return PlannerError(
        f"no {kind} configuration meets the {what} SLO (ttft {slo.ttft}s, tpot {slo.tpot}s) for "
        f"{slo.attainment:.0%} of requests at any rate; relax the SLO or add GPUs"
    )


def _finish(
    problem: Problem,
    algorithm: str,
    settled: list[Settled],
    rate: float | None,
    phase: dict[PhaseTask, Goodput],
    details: dict[str, object],
    log: Log,
) -> Plan:
    """The plan: the best jointly simulated candidate, with the colocated baselines."""
    best = best_settled(settled, rate)
    cand, good = best.candidate, best.goodput
    log(
        f"chosen by joint simulation: {cand.describe()}: {good.rate:.2f} req/s (per-phase figures: {cand.predicted:.2f})"
    )
    details = {
        **details,
        "predicted_goodput": cand.predicted,
        "joint_ci": [good.attainment.ci_low, good.attainment.ci_high],
        "simulated_units": 1 if cand.units > 1 else None,
        "joint_candidates": [{**s.candidate.to_json(), "joint_goodput": s.goodput.rate} for s in settled],
    }
    if cand.segment is not None:
        details.update(units=cand.units, segment=cand.segment._asdict())
    pre = PhaseChoice(cand.prefill.tp, cand.prefill.pp, phase[cand.prefill].rate)
    dec = PhaseChoice(cand.decode.tp, cand.decode.pp, phase[cand.decode].rate)
    return Plan(algorithm, problem.model.name, pre, dec, best.replicas, good.rate, good.attainment.value, rate,
                colocated_baselines(problem, phase, log), good.low, good.high, details)  # fmt: skip


def _joint_choice(problem: Problem, scored: Scored, rate: float | None, log: Log) -> list[Settled]:
    candidates = top_per_pp_level(scored, problem.joint_candidates)
    t0 = time.perf_counter()
    settled = simulate_candidates(problem, candidates, rate, log)
    log(f"simulated {len(candidates)} candidate deployments jointly in {time.perf_counter() - t0:.1f}s")
    if not settled:
        raise PlannerError(
            f"{rate} req/s does not fit in {problem.cluster.num_gpus} GPUs once simulated jointly"
        )
    return settled


def alg1(problem: Problem, rate: float | None, log: Log = lambda s: None) -> Plan:
    """High node-affinity placement."""
    c = problem.cluster
    same = c.nodes == 1  # with several nodes a decode instance may pull from another node
    tp_ = phase_tasks(problem, "prefill", c.num_gpus)
    td_ = phase_tasks(problem, "decode", c.num_gpus, same)
    if not tp_ or not td_:
        raise PlannerError(_no_fit_message(problem, "prefill" if not tp_ else "decode"))
    t0 = time.perf_counter()
    res = evaluate(problem, [*tp_, *td_], "alg1 configs")
    log(f"evaluated {len(tp_) + len(td_)} single-instance configs in {time.perf_counter() - t0:.1f}s")
    settled = _joint_choice(problem, _pair_candidates(problem, res, tp_, td_, rate), rate, log)
    details: dict[str, object] = {"configs_evaluated": len(res), "kv_link": "nvlink" if same else "network"}
    return _finish(problem, "alg1-high-affinity", settled, rate, res, details, log)


def _pair_candidates(
    problem: Problem,
    res: dict[PhaseTask, Goodput],
    tp_: list[PhaseTask],
    td_: list[PhaseTask],
    rate: float | None,
) -> Scored:
    """Every (prefill, decode) pair with its replica counts, scored by the per-phase goodputs: serving
    the target rate with the fewest GPUs, then per-GPU goodput; or, filling the cluster, the most
    rate, then the fewest GPUs. Counts are whole numbers, so every pair is scored with its counts."""
    ps = [t for t in tp_ if res[t].rate > 0]
    ds = [t for t in td_ if res[t].rate > 0]
    if not ps:
        raise _unmet(problem, "prefill")
    if not ds:
        raise _unmet(problem, "decode")
    scored: Scored = []
    for bp in ps:
        for bd in ds:
            gp, gd = res[bp].rate, res[bd].rate
            if rate is not None:
                n_p, n_d = math.ceil(rate / gp), math.ceil(rate / gd)
                if pack_independent(problem.cluster, _wanted(bp, bd, n_p, n_d)) is None:
                    continue
            else:
                counts = _fill_counts(problem, bp, bd, gp, gd)
                if counts is None:
                    continue
                n_p, n_d = counts
            gpus = n_p * bp.gpus + n_d * bd.gpus
            served = min(n_p * gp, n_d * gd)
            score = (-gpus, served / gpus) if rate is not None else (served, -gpus)
            scored.append((score, Candidate(bp, bd, n_p, n_d, predicted=served)))
    if not scored:
        c = min(ps, key=lambda t: t.gpus), min(ds, key=lambda t: t.gpus)
        want = f"{rate} req/s" if rate is not None else "one prefill and one decode instance"
        raise PlannerError(
            f"{want} does not fit in {problem.cluster.num_gpus} GPUs (the smallest SLO-meeting prefill "
            f"instance takes {c[0].gpus} GPUs, decode {c[1].gpus})"
        )
    return scored


def _fill_counts(
    problem: Problem, bp: PhaseTask, bd: PhaseTask, gp: float, gd: float
) -> tuple[int, int] | None:
    """Replica counts that fit the cluster and maximize min(n_p*gp, n_d*gd), fewest GPUs on ties."""
    total = problem.cluster.num_gpus
    best: tuple[float, int, int, int] | None = None
    for n_p in range(1, total // bp.gpus + 1):
        n_d = (total - n_p * bp.gpus) // bd.gpus
        while n_d >= 1 and pack_independent(problem.cluster, _wanted(bp, bd, n_p, n_d)) is None:
            n_d -= 1
        if n_d < 1:
            continue
        rate = min(n_p * gp, n_d * gd)
        # Trim the phase with slack: the same rate on fewer GPUs.
        while n_d > 1 and (n_d - 1) * gd >= rate:
            n_d -= 1
        gpus = n_p * bp.gpus + n_d * bd.gpus
        key = (rate, -gpus, n_p, n_d)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else (best[2], best[3])


def _wanted(bp: PhaseTask, bd: PhaseTask, n_p: int, n_d: int) -> list[tuple[str, int, int]]:
    return [("prefill", bp.tp, bp.pp)] * n_p + [("decode", bd.tp, bd.pp)] * n_d


def alg2_segments(problem: Problem) -> list[tuple[Segment, PhaseTask, PhaseTask]]:
    """Every unit shape: inter_op nodes, per node (tp_p, pp_p) x k_p and (tp_d, pp_d) x k_d."""
    m, c = problem.model, problem.cluster
    tps = [t for t in m.tp_degrees(c.gpus_per_node) if t in problem.profile]
    out = []
    for inter_op in m.pp_degrees(c.nodes):
        local = [
            (tp, pp)
            for tp in tps
            for pp in range(1, c.gpus_per_node // tp + 1)
            if m.num_layers % (pp * inter_op) == 0 and pp * inter_op <= problem.max_pp
        ]
        for tp_p, pp_p in local:
            tpk = PhaseTask("prefill", tp_p, pp_p * inter_op)
            if not fits(problem, tpk):
                continue
            for tp_d, pp_d in local:
                tdk = PhaseTask("decode", tp_d, pp_d * inter_op)
                if not fits(problem, tdk):
                    continue
                g_p, g_d = tp_p * pp_p, tp_d * pp_d
                for k_p in range(1, (c.gpus_per_node - g_d) // g_p + 1):
                    for k_d in range(1, (c.gpus_per_node - k_p * g_p) // g_d + 1):
                        out.append((Segment(inter_op, tp_p, pp_p, k_p, tp_d, pp_d, k_d), tpk, tdk))
    return out


def alg2(problem: Problem, rate: float | None, log: Log = lambda s: None) -> Plan:
    """Low node-affinity placement."""
    c = problem.cluster
    segs = alg2_segments(problem)
    if not segs:
        raise PlannerError(_no_fit_message(problem, "node-local prefill/decode"))
    tasks = {t for _, a, b in segs for t in (a, b)}
    t0 = time.perf_counter()
    res = evaluate(problem, list(tasks), "alg2 configs")
    log(
        f"evaluated {len(tasks)} single-instance configs for {len(segs)} unit shapes in {time.perf_counter() - t0:.1f}s"
    )
    viable = [
        (seg, tpk, tdk, min(seg.k_p * res[tpk].rate, seg.k_d * res[tdk].rate)) for seg, tpk, tdk in segs
    ]
    viable = [v for v in viable if v[3] > 0]
    if not viable:
        raise _unmet(problem, "prefill" if all(res[s[1]].rate == 0 for s in segs) else "decode")
    # With a target rate: the shapes serving it with the fewest GPUs; without: the most goodput the
    # cluster holds (idle GPUs count against a shape), then the best per-GPU goodput.
    scored: Scored = []
    for seg, tpk, tdk, unit_rate in viable:
        units = units_that_fit(c, seg) if rate is None else math.ceil(rate / unit_rate)
        if not 1 <= units <= units_that_fit(c, seg):
            continue
        gpus = units * seg.gpus
        score = (units * unit_rate, -gpus) if rate is None else (-gpus, unit_rate / seg.gpus)
        scored.append((score, Candidate(tpk, tdk, segment=seg, units=units, predicted=units * unit_rate)))
    if not scored:
        raise PlannerError(f"{rate} req/s does not fit in {c.num_gpus} GPUs with any node-local unit")
    settled = _joint_choice(problem, scored, rate, log)
    details: dict[str, object] = {
        "configs_evaluated": len(res),
        "unit_shapes": len(segs),
        "kv_link": "nvlink",
    }
    return _finish(problem, "alg2-low-affinity", settled, rate, res, details, log)


def plan(problem: Problem, affinity: str, rate: float | None, log: Log = lambda s: None) -> Plan:
    """Run the placement algorithm for `affinity` ("high" -> Alg. 1, "low" -> Alg. 2)."""
    if rate is not None and rate <= 0:
        raise PlannerError(f"the target rate must be positive, got {rate}")
    if affinity == "high":
        return alg1(problem, rate, log)
    if affinity == "low":
        return alg2(problem, rate, log)
    raise PlannerError(f"unknown affinity {affinity!r}: high or low")
