"""Placement search (DistServe Alg. 1 and Alg. 2) and the colocated baseline.

Alg. 1 (high node-affinity): the best prefill config and the best decode config by single-instance
per-GPU goodput, chosen independently; replica counts then serve the target rate with the fewest
GPUs (or, without a target rate, the most rate the cluster holds).
Alg. 2 (low node-affinity): a unit spans `inter_op` nodes; on each node it holds k_p prefill and k_d
decode segments of the same layers, so KV moves over NVLink. Segments are enumerated jointly.
Every final plan is checked with a joint simulation of the whole deployment (both SLOs at once)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping

from planner import PlannerError
from planner.goodput import Goodput, Slo, attainment_at, search_goodput
from planner.gpu_assign import Replica, Segment, pack_independent, pack_units, units_that_fit
from planner.plan import PhaseChoice, Plan
from planner.search import PhaseTask, Problem, evaluate, fits, instance_for
from planner.simulator import SimConfig

Log = Callable[[str], None]
MAX_FIXUPS = 16


def phase_tasks(problem: Problem, kind: str, max_gpus: int, same_node: bool = True) -> list[PhaseTask]:
    """(tp, pp) candidates: tp divides the heads (and is profiled), fits in a node; pp divides the layers."""
    m, c = problem.model, problem.cluster
    tps = [t for t in m.tp_degrees(c.gpus_per_node) if t in problem.profile]
    if kind == "colocated" and problem.colocated_profile:
        tps = [t for t in tps if t in problem.colocated_profile]
    out = []
    for tp in tps:
        for pp in m.pp_degrees(min(max_gpus // tp, problem.max_pp)):
            task = PhaseTask(kind, tp, pp, same_node)
            if fits(problem, task):
                out.append(task)
    return out


def _best(results: dict[PhaseTask, Goodput], tasks: list[PhaseTask]) -> PhaseTask | None:
    good = [t for t in tasks if results[t].rate > 0]
    return max(good, key=lambda t: (results[t].rate / t.gpus, -t.gpus)) if good else None


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


def joint_config(problem: Problem, replicas: list[Replica]) -> SimConfig:
    pre = tuple(
        instance_for(problem, "prefill", r.tp, r.pp, r.node, r.group) for r in replicas if r.role == "prefill"
    )
    dec = tuple(
        instance_for(problem, "decode", r.tp, r.pp, r.node, r.group) for r in replicas if r.role == "decode"
    )
    return SimConfig(
        prefill=pre,
        decode=dec,
        token_budget=problem.token_budget,
        kv_bytes_per_token=problem.model.kv_bytes_per_token,
        cluster=problem.cluster,
        routing=problem.routing,
    )


def colocated_search(problem: Problem, phase: dict[PhaseTask, Goodput], log: Log) -> PhaseChoice | None:
    """Best colocated (tp, pp) by per-GPU goodput. A colocated instance cannot beat the prefill-only
    or the decode-only instance of the same shape on the same engine (interference only adds
    delay), so min(prefill, decode goodput) bounds it: configs are tried best bound first, in waves
    of one per worker, and the ones whose bound cannot beat the best found are skipped."""
    tasks = phase_tasks(problem, "colocated", problem.cluster.num_gpus)

    def bound(t: PhaseTask) -> float:
        if problem.colocated_profile is not None:
            return math.inf  # timed by another engine's profile: no bound from ours
        rates = [g.rate for k, g in phase.items() if (k.tp, k.pp) == (t.tp, t.pp)]
        kinds = {k.kind for k in phase if (k.tp, k.pp) == (t.tp, t.pp)}
        return min(rates) if kinds == {"prefill", "decode"} else math.inf

    todo = sorted(tasks, key=lambda t: (-bound(t) / t.gpus, t.gpus))
    best: tuple[float, PhaseTask] | None = None
    wave = max(1, problem.workers or os.cpu_count() or 1)
    done = 0
    while todo:
        batch, todo = todo[:wave], todo[wave:]
        res = evaluate(problem, batch, "colocated")
        done += len(batch)
        for t, g in res.items():
            if g.rate > 0 and (best is None or (g.rate / t.gpus, -t.gpus) > (best[0], -best[1].gpus)):
                best = (g.rate / t.gpus, t)
        if best is not None:
            todo = [t for t in todo if bound(t) / t.gpus > best[0]]
    log(f"colocated baseline: {done} of {len(tasks)} configs simulated")
    if best is None:
        return None
    t = best[1]
    return PhaseChoice(t.tp, t.pp, best[0] * t.gpus)


def _finish(
    problem: Problem,
    algorithm: str,
    replicas: list[Replica],
    prefill: PhaseChoice,
    decode: PhaseChoice,
    predicted: float,
    rate: float | None,
    colocated: PhaseChoice | None,
    details: Mapping[str, object],
    log: Log,
    units: int = 1,
) -> Plan:
    """Joint goodput of the deployment. With `units` > 1 (Alg. 2) the units are identical and the
    router balances requests across them, so one unit is simulated at 1/units of the rate: a far
    longer run (closer to steady state) for the same cost."""
    sim = [r for r in replicas if r.group == 0] if units > 1 else replicas
    log(
        f"joint simulation of {len(sim)} instances on {sum(len(r.gpus) for r in sim)} GPUs"
        + (f" (one of {units} units)" if units > 1 else "")
    )
    good = search_goodput(
        joint_config(problem, sim), problem.workload, problem.slo, problem.settings, predicted / units
    )
    details = {
        **details,
        "predicted_goodput": predicted,
        "joint_ci": [good.attainment.ci_low, good.attainment.ci_high],
        "simulated_units": 1 if units > 1 else None,
    }
    return Plan(algorithm, problem.model.name, prefill, decode, tuple(replicas), good.rate * units,
                good.attainment.value, rate, colocated, details)  # fmt: skip


def _verify_rate(problem: Problem, replicas: list[Replica], rate: float) -> tuple[float, float]:
    """TTFT-only and TPOT-only attainment of the deployment at `rate` (joint simulation)."""
    cfg = joint_config(problem, replicas)
    slo = problem.slo
    a = attainment_at(cfg, rate, problem.workload, slo, problem.settings)
    if a.value >= slo.attainment:
        return 1.0, 1.0
    ttft_only = attainment_at(
        cfg, rate, problem.workload, Slo(slo.ttft, 1e9, slo.attainment), problem.settings
    )
    tpot_only = attainment_at(
        cfg, rate, problem.workload, Slo(1e9, slo.tpot, slo.attainment), problem.settings
    )
    return ttft_only.value, tpot_only.value


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
    bp, bd, n_p, n_d = _choose_pair(problem, res, tp_, td_, rate)
    gp, gd = res[bp].rate, res[bd].rate
    replicas = _pack_or_fail(problem, bp, bd, n_p, n_d, rate)
    if rate is not None:
        for _ in range(MAX_FIXUPS):
            a_ttft, a_tpot = _verify_rate(problem, replicas, rate)
            if min(a_ttft, a_tpot) >= problem.slo.attainment:
                break
            if a_ttft < a_tpot:
                n_p += 1
            else:
                n_d += 1
            log(
                f"joint check at {rate:g} req/s missed (ttft {a_ttft:.3f}, tpot {a_tpot:.3f}): {n_p}P + {n_d}D"
            )
            replicas = _pack_or_fail(problem, bp, bd, n_p, n_d, rate)
    pre, dec = PhaseChoice(bp.tp, bp.pp, gp), PhaseChoice(bd.tp, bd.pp, gd)
    details = {"configs_evaluated": len(res), "kv_link": "nvlink" if same else "network"}
    return _finish(problem, "alg1-high-affinity", replicas, pre, dec, min(n_p * gp, n_d * gd), rate,
                   colocated_search(problem, res, log), details, log)  # fmt: skip


def _choose_pair(
    problem: Problem,
    res: dict[PhaseTask, Goodput],
    tp_: list[PhaseTask],
    td_: list[PhaseTask],
    rate: float | None,
) -> tuple[PhaseTask, PhaseTask, int, int]:
    """Prefill and decode configs (each searched on its own, by single-instance goodput) and their
    replica counts: the pair serving the target rate with the fewest GPUs, or without a target the
    pair whose replicas fill the cluster with the most rate."""
    ps = sorted((t for t in tp_ if res[t].rate > 0), key=lambda t: (-res[t].rate / t.gpus, t.gpus))
    ds = sorted((t for t in td_ if res[t].rate > 0), key=lambda t: (-res[t].rate / t.gpus, t.gpus))
    if not ps:
        raise _unmet(problem, "prefill")
    if not ds:
        raise _unmet(problem, "decode")
    best: tuple[float, float, PhaseTask, PhaseTask, int, int] | None = None
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
            # With a target: fewest GPUs, then per-GPU goodput; filling the cluster: most rate, then
            # fewest GPUs. Replica counts are whole, so the per-GPU best configs chosen on their own
            # (Alg. 1 as published) can lose to a pair whose counts round better.
            score = (-gpus, served / gpus) if rate is not None else (served, -gpus)
            key = (*score, bp, bd, n_p, n_d)
            if best is None or key[:2] > best[:2]:
                best = key
    if best is None:
        c = min(ps, key=lambda t: t.gpus), min(ds, key=lambda t: t.gpus)
        want = f"{rate} req/s" if rate is not None else "one prefill and one decode instance"
        raise PlannerError(
            f"{want} does not fit in {problem.cluster.num_gpus} GPUs (the smallest SLO-meeting prefill "
            f"instance takes {c[0].gpus} GPUs, decode {c[1].gpus})"
        )
    return best[2], best[3], best[4], best[5]


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


def _pack_or_fail(
    problem: Problem, bp: PhaseTask, bd: PhaseTask, n_p: int, n_d: int, rate: float | None
) -> list[Replica]:
    placed = pack_independent(problem.cluster, _wanted(bp, bd, n_p, n_d))
    if placed is None:
        need = n_p * bp.gpus + n_d * bd.gpus
        raise PlannerError(
            f"serving {rate} req/s needs {n_p} prefill (tp={bp.tp}, pp={bp.pp}) and {n_d} decode "
            f"(tp={bd.tp}, pp={bd.pp}) instances, {need} GPUs; the cluster has {problem.cluster.num_gpus}"
        )
    return placed


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

    def unit_rate(s: tuple[Segment, PhaseTask, PhaseTask]) -> float:
        return min(s[0].k_p * res[s[1]].rate, s[0].k_d * res[s[2]].rate)

    viable = [s for s in segs if unit_rate(s) > 0]
    if not viable:
        raise _unmet(problem, "prefill" if all(res[s[1]].rate == 0 for s in segs) else "decode")

    def units_for(s: tuple[Segment, PhaseTask, PhaseTask]) -> int:
        return units_that_fit(c, s[0]) if rate is None else math.ceil(rate / unit_rate(s))

    # With a target rate: the shape serving it with the fewest GPUs; without: the most goodput the
    # cluster holds (idle GPUs count against a shape), then the best per-GPU goodput.
    placeable = [s for s in viable if 1 <= units_for(s) <= units_that_fit(c, s[0])]
    if not placeable:
        raise PlannerError(f"{rate} req/s does not fit in {c.num_gpus} GPUs with any node-local unit")
    if rate is None:
        seg, tpk, tdk = max(placeable, key=lambda s: (units_for(s) * unit_rate(s), -units_for(s) * s[0].gpus))
    else:
        seg, tpk, tdk = min(placeable, key=lambda s: (units_for(s) * s[0].gpus, -unit_rate(s) / s[0].gpus))
    g_unit = unit_rate((seg, tpk, tdk))
    units = units_for((seg, tpk, tdk))
    replicas = _pack_units_or_fail(problem, seg, units, rate)
    if rate is not None:
        for _ in range(MAX_FIXUPS):
            unit = [r for r in replicas if r.group == 0]
            a_ttft, a_tpot = _verify_rate(problem, unit, rate / units)
            if min(a_ttft, a_tpot) >= problem.slo.attainment:
                break
            units += 1
            log(f"joint check at {rate:g} req/s missed (ttft {a_ttft:.3f}, tpot {a_tpot:.3f}): {units} units")
            replicas = _pack_units_or_fail(problem, seg, units, rate)
    pre, dec = PhaseChoice(tpk.tp, tpk.pp, res[tpk].rate), PhaseChoice(tdk.tp, tdk.pp, res[tdk].rate)
    details = {"configs_evaluated": len(res), "unit_shapes": len(segs), "units": units, "segment": seg._asdict(),
               "kv_link": "nvlink"}  # fmt: skip
    return _finish(problem, "alg2-low-affinity", replicas, pre, dec, units * g_unit, rate,
                   colocated_search(problem, res, log), details, log, units)  # fmt: skip


def _pack_units_or_fail(problem: Problem, seg: Segment, units: int, rate: float | None) -> list[Replica]:
    placed = pack_units(problem.cluster, seg, units)
    if placed is None or units < 1:
        raise PlannerError(
            f"serving {rate} req/s needs {units} units of {seg.gpus} GPUs ({seg}); "
            f"{units_that_fit(problem.cluster, seg)} fit in the cluster"
        )
    return placed


def plan(problem: Problem, affinity: str, rate: float | None, log: Log = lambda s: None) -> Plan:
    """Run the placement algorithm for `affinity` ("high" -> Alg. 1, "low" -> Alg. 2)."""
    if rate is not None and rate <= 0:
        raise PlannerError(f"the target rate must be positive, got {rate}")
    if affinity == "high":
        return alg1(problem, rate, log)
    if affinity == "low":
        return alg2(problem, rate, log)
    raise PlannerError(f"unknown affinity {affinity!r}: high or low")
