"""The host-contention model of the real-system check: its fixed point, its fit, and the simulator's
busy time it is built on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from measure.cpu_usage import CpuSnapshot, snapshot, usage
from planner import PlannerError
from planner.latency import PhaseLatency
from planner.profile import TpProfile
from planner.simulator import Instance, SimConfig, simulate
from planner.validation.host_cpu import HostCpu, Load, Probe, fit_host, fit_slowdown, solve

COEF = TpProfile((20.0, 0.1, 0.0), (10.0, 0.001, 0.05), (8.0, 0.001, 0.1), 32)


def test_slowdown_is_one_when_idle_grows_with_load_and_is_capped() -> None:
    host = HostCpu(cores=2, idle_cores=0.0, cpu_per_token_s=0.001, exponent=0.5)
    values = [host.slowdown(u) for u in (0.0, 0.3, 0.6, 0.9, 0.95, 2.0)]
    assert values[0] == 1.0
    assert all(a < b for a, b in itertools.pairwise(values[:5]))
    assert values[5] == values[4] == pytest.approx(0.05**-0.5)


def test_utilization_counts_idle_engine_and_streaming_work() -> None:
    host = HostCpu(cores=2, idle_cores=0.1, cpu_per_token_s=0.002, exponent=0.5)
    # 10 s: 6 s of engine compute (0.6 cores) and 1000 tokens (100/s * 2 ms = 0.2 cores)
    assert host.utilization(Load(6.0, 1000, 10.0)) == pytest.approx((0.1 + 0.6 + 0.2) / 2)


def test_solve_finds_the_fixed_point() -> None:
    host = HostCpu(cores=2, idle_cores=0.2, cpu_per_token_s=0.001, exponent=0.8)

    def load_at(s: float) -> Load:
        # Slower steps batch more: engine CPU per token falls as the slowdown grows.
        return Load(engine_cpu_s=8.0 / s**0.5, tokens=2000, span_s=10.0)

    found = solve(host, load_at)
    assert found.slowdown > 1.0 and not found.saturated
    assert found.slowdown == pytest.approx(host.slowdown(host.utilization(load_at(found.slowdown))), rel=1e-2)


def test_fit_host_recovers_the_model_through_its_probes() -> None:
    truth = HostCpu(cores=2, idle_cores=0.05, cpu_per_token_s=0.0015, exponent=0.4, scale=0.8)
    probes = []
    for load in (
        Load(engine_cpu_s=5.0, tokens=1500, span_s=15.0),
        Load(engine_cpu_s=12.0, tokens=4000, span_s=15.0),
    ):
        u = truth.utilization(load)
        probes.append(Probe(u * truth.cores, load, truth.slowdown(u)))
    fitted = fit_host(2, 0.05, probes)
    assert fitted.cpu_per_token_s == pytest.approx(truth.cpu_per_token_s)
    assert fitted.exponent == pytest.approx(truth.exponent)
    assert fitted.scale == pytest.approx(truth.scale)
    # One probe: the curve through it with scale 1.
    one = fit_host(2, 0.05, probes[1:])
    assert one.scale == 1.0 and one.slowdown(probes[1].cores_busy / 2) == pytest.approx(probes[1].slowdown)


def test_a_busier_probe_that_ran_no_slower_means_no_contention() -> None:
    light = Probe(0.6, Load(3.0, 1000, 10.0), 1.10)
    heavy = Probe(1.4, Load(9.0, 3000, 10.0), 1.05)
    fitted = fit_host(2, 0.0, [light, heavy])
    assert fitted.exponent == 0.0
    assert fitted.slowdown(0.1) == fitted.slowdown(0.9) == pytest.approx((1.10 * 1.05) ** 0.5)


def test_fit_slowdown_inverts_an_increasing_tpot() -> None:
    assert fit_slowdown(lambda s: 0.010 * s, 0.0155) == pytest.approx(1.55, rel=1e-6)
    # Measured faster than the calibrated model (its overheads were measured under load): below 1.
    assert fit_slowdown(lambda s: 0.010 * s, 0.005) == pytest.approx(0.5, rel=1e-6)
    assert fit_slowdown(lambda s: 0.010 * s, 0.001) == 0.25  # clamped


def test_bad_host_parameters_are_refused() -> None:
    with pytest.raises(PlannerError, match="at least one core"):
        HostCpu(cores=0, idle_cores=0.0, cpu_per_token_s=0.0, exponent=0.0)
    with pytest.raises(PlannerError, match="max_utilization"):
        HostCpu(cores=2, idle_cores=0.0, cpu_per_token_s=0.0, exponent=0.0, max_utilization=1.0)


def test_simulated_busy_time_is_the_work_done() -> None:
    lat = PhaseLatency(1, 1, COEF, 0.0)
    n, length, out = 200, 300, 5
    arrivals = np.arange(n) * 1.0  # far apart: every prefill alone, every decode alone
    cfg = SimConfig(prefill=(Instance(lat),), decode=(Instance(lat, 1 << 20, 64),), token_budget=length)
    res = simulate(cfg, arrivals, np.full(n, length), np.full(n, out))
    prefill_busy, decode_busy = res.busy_s
    assert prefill_busy == pytest.approx(n * lat.prefill_stage(length, length * length))
    steps = sum(lat.decode_full(length + k + 1, 1) for k in range(out - 1))  # KV grows by one per step
    assert decode_busy == pytest.approx(n * steps, rel=1e-6)


def test_cpu_usage_counts_stolen_cores_apart_from_other_processes() -> None:
    before = CpuSnapshot(wall=10.0, busy_s=100.0, ours_s=20.0, ours_wait_s=1.0, stolen_s=5.0)
    after = CpuSnapshot(wall=12.0, busy_s=103.6, ours_s=22.0, ours_wait_s=1.5, stolen_s=5.8)
    u = usage(before, after)
    assert u.cores_busy == pytest.approx(1.8) and u.cores_ours == pytest.approx(1.0)
    assert u.cores_stolen == pytest.approx(0.4) and u.cores_others == pytest.approx(0.4)
    assert u.slowdown == pytest.approx(1.25)
    now = snapshot()  # this machine's real counters
    assert now.stolen_s >= 0 and now.busy_s >= now.stolen_s and now.ours_s > 0
