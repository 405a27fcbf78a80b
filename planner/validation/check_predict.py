"""The prediction side of the real-system check: simulate the default deployment (one prefill and
one decode instance) on the requests the benchmark sends, and measure the host's CPU contention
with a load probe (planner.validation.host_cpu)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from backends.common.params import EngineParams
from measure.cpu_usage import snapshot, usage
from planner import PlannerError
from planner.latency import PhaseLatency
from planner.profile import TpProfile
from planner.sim_stats import SimResult
from planner.simulator import Instance, SimConfig, simulate
from planner.validation.host_cpu import Contention, HostCpu, Load, Probe, fit_host, fit_slowdown, solve


class Requests(NamedTuple):
    """The requests of one run: prompt and output lengths, and send offsets in seconds."""

    prompts: np.ndarray
    outputs: np.ndarray
    times: np.ndarray


class Prediction(NamedTuple):
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    ttft_mean: float
    tpot_mean: float


def simulate_check(tp: TpProfile, engine: EngineParams, reqs: Requests) -> SimResult:
    """Simulate one prefill and one decode instance (the engine limits of `engine`) on these requests."""
    lat = PhaseLatency(1, 1, tp, hop_ms=0.0)  # no pipeline: one process per phase
    cfg = SimConfig(
        prefill=(Instance(lat, max_batch=engine.max_num_seqs),),
        decode=(Instance(lat, engine.num_blocks * engine.block_size, engine.max_num_seqs),),
        token_budget=engine.max_num_batched_tokens,
    )
    return simulate(cfg, reqs.times, reqs.prompts, reqs.outputs)


def attainment(res: SimResult, ttft_slo: float, tpot_slo: float) -> Prediction:
    """Over all requests, as the benchmark counts it (no warm-up window)."""
    ok_t, ok_o = res.ttft <= ttft_slo, res.tpot <= tpot_slo
    return Prediction(
        float((ok_t & ok_o).mean()), float(ok_t.mean()), float(ok_o.mean()), float(res.ttft.mean()),
        float(res.tpot.mean()),
    )  # fmt: skip


def predict(
    tp: TpProfile, engine: EngineParams, reqs: Requests, ttft_slo: float, tpot_slo: float
) -> Prediction:
    return attainment(simulate_check(tp, engine, reqs), ttft_slo, tpot_slo)


def load_of(res: SimResult, reqs: Requests, slowdown: float) -> Load:
    """The host load of a run simulated with latencies scaled by `slowdown`: engine CPU at the
    unscaled speed, over the span from the first arrival to the last finish."""
    span = float(np.max(res.finish) - reqs.times[0])
    return Load(sum(res.busy_s) / slowdown, int(reqs.outputs.sum()), span)


def predict_contended(
    served: TpProfile, host: HostCpu, engine: EngineParams, reqs: Requests, ttft_slo: float, tpot_slo: float
) -> tuple[Prediction, Contention]:
    """The prediction at the host's contention fixed point (planner.validation.host_cpu.solve)."""

    def run(s: float) -> SimResult:
        return simulate_check(scaled(served, s), engine, reqs)

    found = solve(host, lambda s: load_of(run(s), reqs, s))
    return attainment(run(found.slowdown), ttft_slo, tpot_slo), found


def scaled(tp: TpProfile, factor: float) -> TpProfile:
    """Every latency of the profile multiplied by `factor` (a slower share of the CPU)."""

    def mul(c: tuple[float, float, float]) -> tuple[float, float, float]:
        return (c[0] * factor, c[1] * factor, c[2] * factor)

    return TpProfile(mul(tp.prefill), mul(tp.decode_small), mul(tp.decode_large), tp.threshold)


class ProbeRun(NamedTuple):
    """One load probe: `send()` runs the benchmark's `reqs` against the server and returns the records."""

    send: Callable[[], Sequence[Any]]
    reqs: Requests


class HostProbe(NamedTuple):
    host: HostCpu
    details: dict[str, Any]


def probe_host(
    server_pgid: int, served: TpProfile, engine: EngineParams, runs: Sequence[ProbeRun], idle_s: float = 3.0
) -> HostProbe:
    """Fit the host model: CPU of the idle deployment over `idle_s`, then each load probe with CPU
    accounting of this process and the server's process group. Probe requests are not the check's."""
    before = snapshot(server_pgid)
    time.sleep(idle_s)
    idle = usage(before, snapshot(server_pgid))
    probes, details = [], []
    for run in runs:
        before = snapshot(server_pgid)
        records = run.send()
        load = usage(before, snapshot(server_pgid))
        good = [r for r in records if r.error is None and r.output_len > 1]
        if not good:
            raise PlannerError("a host load probe got no complete multi-token response")
        measured_tpot = float(np.mean([r.tpot for r in good]))

        def sim(s: float, run: ProbeRun = run) -> SimResult:
            return simulate_check(scaled(served, s), engine, run.reqs)

        slowdown = fit_slowdown(lambda s: float(sim(s).tpot.mean()), measured_tpot)
        probe_load = load_of(sim(slowdown), run.reqs, slowdown)
        probes.append(Probe(load.cores_ours, probe_load, slowdown))
        details.append(
            {
                "rate": len(records) / max(float(run.reqs.times[-1]), 1e-9),
                "requests": len(records),
                "cores_ours": load.cores_ours,
                "cores_others": load.cores_others,
                "cores_stolen": load.cores_stolen,
                "tpot_mean_measured": measured_tpot,
                "tpot_mean_at_calibration": float(sim(1.0).tpot.mean()),
                "slowdown": slowdown,
                "engine_cores": probe_load.engine_cpu_s / max(probe_load.span_s, 1e-9),
            }
        )
    host = fit_host(idle.cores, idle.cores_ours, probes)
    return HostProbe(host, {"idle_cores_ours": idle.cores_ours, "probes": details, **host.__dict__})
