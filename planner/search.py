"""The planning problem and parallel goodput evaluation of single-instance phase configurations."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from planner.cluster import ClusterSpec
from planner.goodput import Goodput, SearchSettings, Slo, search_goodput
from planner.latency import DEFAULT_HOP_MS, PhaseLatency, phase_latency
from planner.memory import CapacityTable, kv_capacity_tokens
from planner.model_spec import ModelSpec
from planner.profile import TpProfile
from planner.sim_stats import Attainment
from planner.simulator import Instance, SimConfig
from workload import Workload


@dataclass(frozen=True, eq=False)
class Problem:
    """Everything a placement search needs. `colocated_profile` (e.g. measured on vLLM) times the
    colocated baseline; it defaults to `profile`."""

    model: ModelSpec
    profile: dict[int, TpProfile]
    cluster: ClusterSpec
    workload: Workload
    slo: Slo
    settings: SearchSettings = field(default_factory=SearchSettings)
    capacity_table: CapacityTable | None = None
    colocated_profile: dict[int, TpProfile] | None = None
    token_budget: int = 2048
    max_batch: int = 256
    hop_ms: float = DEFAULT_HOP_MS
    routing: str = "least_loaded"
    workers: int = 0  # 0 = one per CPU core
    # Deeper pipelines only add hops once the weights fit; the cap keeps the search short.
    max_pp: int = 8

    @property
    def max_request_tokens(self) -> int:
        return int((self.workload.prompt_lens + self.workload.output_lens).max())

    def latency(self, tp: int, pp: int, colocated: bool = False) -> PhaseLatency:
        prof = self.colocated_profile if colocated and self.colocated_profile else self.profile
        return phase_latency(prof, tp, pp, self.hop_ms)

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


def instance_for(problem: Problem, kind: str, tp: int, pp: int, node: int = 0, group: int = 0) -> Instance:
    lat = problem.latency(tp, pp, colocated=kind == "colocated")
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
    return SimConfig(colocated=(inst,), **common)  # type: ignore[arg-type]


def fits(problem: Problem, task: PhaseTask) -> bool:
    """Memory fit: the weights fit and the KV cache holds the longest request (or, for prefill, a
    full token budget)."""
    cap = problem.capacity(task.tp, task.pp)
    need = problem.token_budget if task.kind == "prefill" else problem.max_request_tokens
    return cap >= min(need, problem.max_request_tokens) and cap > 0


_PROBLEM: Problem | None = None


def _init(problem: Problem) -> None:
    global _PROBLEM
    _PROBLEM = problem


def rate_hint(problem: Problem, task: PhaseTask) -> float:
    """A rough rate to start the goodput search from (saves bracketing simulations).

    Prefill: a little above one mean-length prompt per stage time (batching raises it further). Decode/colocated: the batch that both
    fits the KV cache and keeps a step under the TPOT SLO, turning over once per mean output length."""
    w = problem.workload
    p_mean, o_mean = float(w.prompt_lens.mean()), float(w.output_lens.mean())
    lat = problem.latency(task.tp, task.pp, colocated=task.kind == "colocated")
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
    lat = problem.latency(task.tp, task.pp, colocated=task.kind == "colocated")
    ok = np.ones(len(p), dtype=bool)
    if task.kind in ("prefill", "colocated"):
        a, b, c = lat.coef.prefill
        ttft = np.maximum(a + b * p + c * p * p, 0.0) / 1000.0 + lat.pp * lat.hop_ms / 1000.0
        ok &= ttft <= problem.slo.ttft
    if task.kind in ("decode", "colocated"):
        a, b, c = lat.coef.decode_small  # a batch of one is always in the small-batch regime
        # Mean step of a lone sequence: its context grows from p + 1 to p + o - 1.
        step = np.maximum(a + b * (p + o / 2.0) + c, 0.0) / 1000.0 + lat.pp * lat.hop_ms / 1000.0
        xfer = np.zeros_like(p)
        if task.kind == "decode":
            c_ = problem.cluster
            gbps = c_.intra_node_gbps() if task.same_node else c_.network_gbps
            xfer = c_.link_latency_s + p * problem.model.kv_bytes_per_token / (gbps * 1e9)
        ok &= np.where(o > 1, step + xfer / np.maximum(o - 1, 1), 0.0) <= problem.slo.tpot
    return float(ok.mean())


def _run(task: PhaseTask) -> tuple[PhaseTask, Goodput]:
    assert _PROBLEM is not None
    p = _PROBLEM
    if zero_load_attainment(p, task) < p.slo.attainment:
        return task, Goodput(0.0, Attainment(0.0, 0.0, 0.0, 0), 0)
    return task, search_goodput(task_config(p, task), p.workload, p.slo, p.settings, hint=rate_hint(p, task))


def evaluate(problem: Problem, tasks: Iterable[PhaseTask], desc: str = "goodput") -> dict[PhaseTask, Goodput]:
    """Goodput of each task, on a process pool (one worker per core); progress on stderr."""
    todo = sorted(set(tasks))
    if not todo:
        return {}
    workers = min(problem.workers or os.cpu_count() or 1, len(todo))
    results: dict[PhaseTask, Goodput] = {}
    bar = tqdm(total=len(todo), desc=desc, unit="config", leave=False, disable=None)
    try:
        if workers <= 1:
            _init(problem)
            for task in todo:
                results[task] = _run(task)[1]
                bar.update()
        else:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(problem,)) as pool:
                futures = [pool.submit(_run, t) for t in todo]
                for fut in as_completed(futures):
                    task, good = fut.result()
                    results[task] = good
                    bar.update()
    finally:
        bar.close()
    return results
