"""Colocated instances with on-demand KV and recompute preemption (SimConfig.colocated_kv)."""

from __future__ import annotations

import numpy as np
import pytest

from planner.latency import PhaseLatency
from planner.profile import TpProfile
from planner.simulator import Instance, SimConfig, SimResult, simulate

COEF = TpProfile((20.0, 0.1, 0.0), (10.0, 0.001, 0.05), (8.0, 0.001, 0.1), 32)


def run(
    kv: str, capacity: int, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray, pp: int = 1
) -> SimResult:
    inst = Instance(PhaseLatency(1, pp, COEF, 0.5), capacity, 64)
    return simulate(
        SimConfig(colocated=(inst,), token_budget=1024, colocated_kv=kv), arrivals, prompts, outputs
    )


def workload(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(0.08, n)), rng.integers(1, 500, n), rng.integers(1, 300, n)


@pytest.mark.parametrize("pp", [1, 2])
def test_with_memory_to_spare_it_is_the_reserving_instance(pp: int) -> None:
    a, p, o = workload(600, 1)
    reserve, on_demand = run("reserve", 10**9, a, p, o, pp), run("on_demand", 10**9, a, p, o, pp)
    assert np.array_equal(reserve.ttft, on_demand.ttft) and np.array_equal(reserve.finish, on_demand.finish)


@pytest.mark.parametrize("pp", [1, 2])
def test_under_memory_pressure_every_request_completes_once(pp: int) -> None:
    a, p, o = workload(800, 2)
    p[::97] = 3000  # larger than the whole cache: runs alone, over it, never preempting itself
    res = run("on_demand", 2500, a, p, o, pp)
    assert np.all(res.completions == 1)
    assert np.all(res.finish >= a + res.ttft - 1e-12)


def test_a_preempted_request_is_recomputed_later() -> None:
    """Two requests of 40 + 50 tokens in a 100-token cache. Reserving, the second waits for the
    first to finish. On demand both start (41 tokens each at admission), the cache fills after nine
    steps, the newer one is preempted, and it resumes by prefilling 40 + 10 tokens once the first
    finishes: an earlier first token, a later last token."""
    a, p, o = np.zeros(2), np.array([40, 40]), np.array([50, 50])
    reserve, on_demand = run("reserve", 100, a, p, o), run("on_demand", 100, a, p, o)
    assert np.all(on_demand.completions == 1)
    assert on_demand.ttft[1] < reserve.ttft[1]  # admitted at once instead of after the first request
    # It decoded 9 tokens, waited about 40 steps of the first request, then decoded 39 more.
    assert on_demand.tpot[1] > 1.5 * on_demand.tpot[0]
    lat = PhaseLatency(1, 1, COEF, 0.5)
    # The resumed request: a prefill of prompt + 10 generated tokens once the first one is done.
    resume = lat.prefill_full(50, 50 * 50) + 0.0005
    assert on_demand.finish[1] > on_demand.finish[0] + resume
