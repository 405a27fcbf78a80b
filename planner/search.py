"""The planning problem and parallel goodput evaluation of single-instance phase configurations."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from planner.cluster import ClusterSpec
from planner.goodput import Goodput, SearchSettings, Slo, search_goodput
from planner.latency import DEFAULT_HOP_MS, PhaseLatency, phase_latency
from planner.memory import CapacityTable, kv_capacity_tokens
from planner.model_spec import ModelSpec
from planner.pool import parallel_map
from planner.profile import TpProfile
from planner.sim_stats import Attainment
from planner.simulator import Instance, SimConfig
from workload import Workload


@dataclass(frozen=True, eq=False)
class ReferenceEngine:
    """Another engine to compare colocated serving with: its profile (tp -> coefficients), a name
    for reports (the profile file) and the deepest pipeline it serves with."""

    name: str
    profile: dict[int, TpProfile]
    max_pp: int = 1


@dataclass(frozen=True, eq=False)
class Problem:
    """Everything a placement search needs. `joint_candidates`: how many of the best candidates of
    each pipeline depth are simulated jointly before one is chosen (planner/joint.py)."""

    model: ModelSpec
    profile: dict[int, TpProfile]
    cluster: ClusterSpec
    workload: Workload
    slo: Slo
    settings: SearchSettings = field(default_factory=SearchSettings)
    capacity_table: CapacityTable | None = None
    token_budget: int = 2048
    max_batch: int = 256
    hop_ms: float = DEFAULT_HOP_MS
    routing: str = "least_loaded"
    workers: int = 0  # 0 = one per CPU core
    # Deeper pipelines only add hops once the weights fit; the cap keeps the search short.
    max_pp: int = 8
    joint_candidates: int = 3
    profile_name: str = "profile"  # where `profile` came from, for reports
    reference: ReferenceEngine | None = None  # the reference colocated baseline's engine
    colocated_kv: str = "reserve"  # KV policy of colocated instances (SimConfig.colocated_kv)

    @property
    def max_request_tokens(self) -> int:
        return int((self.workload.prompt_lens + self.workload.output_lens).max())

    def latency(self, tp: int, pp: int) -> PhaseLatency:
        return phase_latency(self.profile, tp, pp, self.hop_ms)

    def capacity(self, tp: int, pp: int) -> int:
        return kv_capacity_tokens(self.model, self.cluster, tp, pp, self.capacity_table)


class PhaseTask(NamedTuple):
    """One single-instance goodput search: kind is "prefill", "decode" or "colocated"."""

    kind: str
    tp: int
    pp: int
    same_node: bool = True

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


def phase_tasks(problem: Problem, kind: str, max_gpus: int, same_node: bool = True) -> list[PhaseTask]:
    """(tp, pp) candidates: tp divides the heads (and is profiled), fits in a node; pp divides the layers."""
    m, c = problem.model, problem.cluster
    out = []
    for tp in (t for t in m.tp_degrees(c.gpus_per_node) if t in problem.profile):
        for pp in m.pp_degrees(min(max_gpus // tp, problem.max_pp)):
            task = PhaseTask(kind, tp, pp, same_node)
            if fits(problem, task):
                out.append(task)
    return out


def instance_for(problem: Problem, kind: str, tp: int, pp: int, node: int = 0, group: int = 0) -> Instance:
    lat = problem.latency(tp, pp)
    if kind == "prefill":
        return Instance(lat, node=node, group=group)
    return Instance(lat, problem.capacity(tp, pp), problem.max_batch, node, group)


def task_config(problem: Problem, task: PhaseTask) -> SimConfig:
    inst = instance_for(problem, task.kind, task.tp, task.pp)
    common = {
        "token_budget": problem.token_budget,
        "kv_bytes_per_token": problem.model.kv_bytes_per_token,
        "cluster": problem.cluster,
        "routing": problem.routing,
    }
    if task.kind == "prefill":
        return SimConfig(prefill=(inst,), mode="prefill_only", **common)  # type: ignore[arg-type]
    if task.kind == "decode":
        return SimConfig(decode=(inst,), mode="decode_only", decode_only_same_node=task.same_node, **common)  # type: ignore[arg-type]
    return SimConfig(colocated=(inst,), colocated_kv=problem.colocated_kv, **common)  # type: ignore[arg-type]


def fits(problem: Problem, task: PhaseTask) -> bool:
    """Memory fit: the weights fit and the KV cache holds the longest request (or, for prefill, a
    full token budget)."""
    cap = problem.capacity(task.tp, task.pp)
    need = problem.token_budget if task.kind == "prefill" else problem.max_request_tokens
    return cap >= min(need, problem.max_request_tokens) and cap > 0


def rate_hint(problem: Problem, task: PhaseTask) -> float:
    """A rough rate to start the goodput search from (saves bracketing simulations).

    Prefill: a little above one mean-length prompt per stage time (batching raises it further). Decode/colocated: the batch that both
    fits the KV cache and keeps a step under the TPOT SLO, turning over once per mean output length."""
    w = problem.workload
    p_mean, o_mean = float(w.prompt_lens.mean()), float(w.output_lens.mean())
    lat = problem.latency(task.tp, task.pp)
    if task.kind == "prefill":
        return 1.2 / lat.prefill_stage(p_mean, p_mean * p_mean)
    batch = max(1.0, min(problem.max_batch, problem.capacity(task.tp, task.pp) / (p_mean + o_mean)) / task.pp)
    while batch > 1 and lat.decode_step(batch * (p_mean + o_mean / 2), int(batch)) > problem.slo.tpot:
        batch *= 0.8
    step = lat.decode_step(batch * (p_mean + o_mean / 2), int(batch))
    return 0.8 * batch * task.pp / (max(o_mean - 1, 1.0) * step)


def zero_load_attainment(problem: Problem, task: PhaseTask) -> float:
    """Fraction of the workload's requests that meet the task's SLO(s) on an otherwise idle
    instance. No rate does better, so when this misses the target the goodput is 0 (and the search,
    which would crawl down to tiny rates, is skipped)."""
    w = problem.workload
    p = w.prompt_lens.astype(np.float64)
    o = w.output_lens.astype(np.float64)
    lat = problem.latency(task.tp, task.pp)
    ok = np.ones(len(p), dtype=bool)
    if task.kind in ("prefill", "colocated"):
        a, b, c = lat.coef.prefill
        ttft = (np.maximum(a + b * p + c * p * p, 0.0) + lat.coef.overhead_ms + lat.pp * lat.hop_ms) / 1000.0
        ok &= ttft <= problem.slo.ttft
    if task.kind in ("decode", "colocated"):
        a, b, c = lat.coef.decode_small  # a batch of one is always in the small-batch regime
        # Mean step of a lone sequence: its context grows from p + 1 to p + o - 1.
        step = (
            np.maximum(a + b * (p + o / 2.0) + c, 0.0) + lat.coef.overhead_ms + lat.pp * lat.hop_ms
        ) / 1000.0
        xfer = np.zeros_like(p)
        if task.kind == "decode":
            c_ = problem.cluster
            gbps = c_.intra_node_gbps() if task.same_node else c_.network_gbps
            xfer = c_.link_latency_s + p * problem.model.kv_bytes_per_token / (gbps * 1e9)
        ok &= np.where(o > 1, step + xfer / np.maximum(o - 1, 1), 0.0) <= problem.slo.tpot
    return float(ok.mean())


def phase_goodput(p: Problem, task: PhaseTask) -> Goodput:
    """Single-instance goodput of one phase configuration."""
    if zero_load_attainment(p, task) < p.slo.attainment:
        return Goodput(0.0, Attainment(0.0, 0.0, 0.0, 0), 0)
    return search_goodput(task_config(p, task), p.workload, p.slo, p.settings, hint=rate_hint(p, task))


def evaluate(problem: Problem, tasks: Iterable[PhaseTask], desc: str = "goodput") -> dict[PhaseTask, Goodput]:
    """Goodput of each task, on a process pool (one worker per core); progress on stderr."""
    todo = sorted(set(tasks))
    return dict(zip(todo, parallel_map(problem, phase_goodput, todo, problem.workers, desc), strict=True))
