"""Simulator checks that can fail: queueing theory, conservation of requests, monotone attainment."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from planner.cluster import ClusterSpec
from planner.goodput import SearchSettings, Slo, attainment_at, search_goodput
from planner.latency import PhaseLatency
from planner.profile import TpProfile
from planner.simulator import Instance, SimConfig, simulate
from workload import ArrivalProcess, Workload

# Round numbers (ms): prefill 20 + 0.1*S, decode 10 + 0.001*T + 0.05*B, threshold 32.
COEF = TpProfile((20.0, 0.1, 0.0), (10.0, 0.001, 0.05), (8.0, 0.001, 0.1), 32)


def lat(pp: int = 1, hop_ms: float = 0.0) -> PhaseLatency:
    return PhaseLatency(1, pp, COEF, hop_ms)


def poisson(n: int, rate: float, seed: int = 1) -> np.ndarray:
    return np.cumsum(ArrivalProcess().unit_gaps(n, seed)) / rate


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.7, 0.85])
def test_prefill_matches_md1(rho: float) -> None:
    """One prefill instance, fixed prompt length, batch of one: mean TTFT = D + R*D^2 / (2(1 - R*D))."""
    length = 400
    d = lat().prefill_stage(length, length * length)
    rate = rho / d
    n = 40000
    cfg = SimConfig(prefill=(Instance(lat()),), token_budget=length, mode="prefill_only")
    res = simulate(cfg, poisson(n, rate, seed=3), np.full(n, length), np.full(n, 8))
    expected = d + rate * d * d / (2 * (1 - rate * d))
    measured = float(res.ttft[res.window()].mean())
    assert measured == pytest.approx(expected, rel=0.05)


def _mixed(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 600, size=n), rng.integers(1, 300, size=n)


@pytest.mark.parametrize(
    "cfg",
    [
        SimConfig(prefill=(Instance(lat()),), decode=(Instance(lat(), 20000, 64),), token_budget=1024),
        SimConfig(
            prefill=(Instance(lat(2, 1.0), node=0, group=0), Instance(lat(), node=1, group=1)),
            decode=tuple(
                Instance(lat(pp, 1.0), 8000, 16, node=k % 2, group=k % 2) for k, pp in enumerate((1, 2, 4))
            ),
            token_budget=700,
            kv_bytes_per_token=800_000,
            cluster=ClusterSpec(2, 8),
        ),
        SimConfig(colocated=(Instance(lat(2, 1.0), 6000, 32), Instance(lat(), 9000, 8)), token_budget=512),
        SimConfig(decode=(Instance(lat(), 5000, 32),), mode="decode_only"),
        SimConfig(prefill=(Instance(lat()),), decode=(Instance(lat(), 3000, 8),), routing="round_robin"),
    ],
    ids=["1p1d", "multi-replica-pp-groups", "colocated", "decode-only", "round-robin"],
)
def test_every_request_completes_exactly_once(cfg: SimConfig) -> None:
    n = 3000
    p, o = _mixed(n)
    res = simulate(cfg, poisson(n, 15.0), p, o)
    assert np.all(res.completions == 1)
    arrivals = poisson(n, 15.0)
    # Causality: nothing finishes before it arrives, first tokens come before the last ones.
    assert np.all(res.finish >= arrivals - 1e-12)
    assert np.all(np.isfinite(res.ttft)) and np.all(res.ttft >= 0)
    assert np.all(res.tpot >= 0)


def test_request_larger_than_cache_still_finishes() -> None:
    cfg = SimConfig(prefill=(Instance(lat()),), decode=(Instance(lat(), 100, 8),))
    res = simulate(cfg, np.array([0.0, 0.01]), np.array([300, 10]), np.array([50, 5]))
    assert list(res.completions) == [1, 1]


def test_decode_timing_matches_latency_model() -> None:
    """A lone request: TPOT equals one decode step at its growing context (the inlined hot path
    must agree with PhaseLatency)."""
    lp = lat(pp=2, hop_ms=1.0)
    prompt, out = 100, 21
    cfg = SimConfig(decode=(Instance(lp, 10000, 8),), mode="decode_only")
    res = simulate(cfg, np.array([0.0]), np.array([prompt]), np.array([out]))
    steps = [lp.decode_step(prompt + k + 1, 1) for k in range(out - 1)]
    assert res.tpot[0] == pytest.approx(sum(steps) / (out - 1), rel=1e-9)


def test_pipeline_latency_and_throughput() -> None:
    """pp stages: one batch takes t + pp*hop; back-to-back batches leave every t/pp + hop."""
    pp, hop = 4, 1.0
    lp = lat(pp, hop)
    n, length = 400, 500
    full = lp.prefill_full(length, length * length)
    cfg = SimConfig(prefill=(Instance(lp),), token_budget=length, mode="prefill_only")
    res = simulate(cfg, np.zeros(n), np.full(n, length), np.full(n, 2))
    assert res.ttft[0] == pytest.approx(full + pp * hop / 1000)
    spacing = np.diff(np.sort(res.finish))
    assert np.allclose(spacing, full / pp + hop / 1000)


def test_attainment_does_not_rise_with_rate() -> None:
    w = Workload("t", *_mixed(5000, seed=4))
    slo = Slo(0.3, 0.03, 0.9)
    settings = SearchSettings(min_requests=1500, max_requests=3000)
    cfg = SimConfig(prefill=(Instance(lat()),), decode=(Instance(lat(), 40000, 128),), token_budget=1024)
    values = [attainment_at(cfg, r, w, slo, settings).value for r in (1, 2, 4, 6, 8, 10, 14)]
    assert values[0] > 0.9 > values[-1]  # the range spans the SLO knee
    assert all(b <= a + 0.01 for a, b in itertools.pairwise(values)), values


def test_goodput_search_brackets_the_target() -> None:
    w = Workload("t", *_mixed(5000, seed=5))
    slo = Slo(0.3, 0.03, 0.9)
    settings = SearchSettings(precision=0.02, min_requests=1500, max_requests=3000)
    cfg = SimConfig(prefill=(Instance(lat()),), decode=(Instance(lat(), 40000, 128),), token_budget=1024)
    g = search_goodput(cfg, w, slo, settings, hint=1.0)
    assert g.rate > 0 and g.attainment.value >= 0.9
    assert attainment_at(cfg, g.rate * 1.1, w, slo, settings).value < 0.9 + 0.02
    assert g.attainment.ci_low <= g.attainment.value <= g.attainment.ci_high


def test_burstier_arrivals_lower_attainment() -> None:
    w = Workload("t", *_mixed(5000, seed=6))
    slo = Slo(0.15, 0.03, 0.9)
    cfg = SimConfig(prefill=(Instance(lat()),), decode=(Instance(lat(), 40000, 128),), token_budget=1024)
    smooth = attainment_at(cfg, 6.0, w, slo, SearchSettings(min_requests=3000, arrival_cv=1.0)).value
    bursty = attainment_at(cfg, 6.0, w, slo, SearchSettings(min_requests=3000, arrival_cv=4.0)).value
    assert bursty < smooth


def test_kv_transfer_over_network_is_slower_than_nvlink() -> None:
    """Same system, KV pulled across nodes: TPOT (which includes the pull) grows."""
    n = 500
    p, o = np.full(n, 1500), np.full(n, 4)
    near = SimConfig(
        prefill=(Instance(lat(), node=0),),
        decode=(Instance(lat(), 10**6, 64, node=0),),
        token_budget=2048,
        kv_bytes_per_token=800_000,
        cluster=ClusterSpec(2, 8),
    )
    far = dataclasses.replace(near, decode=(Instance(lat(), 10**6, 64, node=1),))
    arr = poisson(n, 2.0)
    t_near = simulate(near, arr, p, o).tpot.mean()
    t_far = simulate(far, arr, p, o).tpot.mean()
    xfer = 1500 * 800_000 * (1 / 25e9 - 1 / 300e9) / 3  # the extra pull time spread over 3 TPOT steps
    assert t_far - t_near == pytest.approx(xfer, rel=0.05)


@pytest.mark.parametrize("rate", [5.0, 40.0])
def test_step_segments_equal_token_by_token_stepping(rate: float) -> None:
    """Decode steps are simulated in segments; the result must equal one event per step."""
    cfgs = [
        SimConfig(
            prefill=(Instance(lat()), Instance(lat(2, 1.0))),
            decode=tuple(Instance(lat(pp, 1.0), 8000, 16) for pp in (1, 2, 4)),
            token_budget=700,
        ),
        SimConfig(colocated=(Instance(lat(2, 1.0), 6000, 32), Instance(lat(), 9000, 8)), token_budget=512),
        SimConfig(colocated=(Instance(lat(4, 1.0), 60000, 256),), token_budget=512),
    ]
    n = 3000
    p, o = _mixed(n, seed=9)
    arr = poisson(n, rate)
    for cfg in cfgs:
        ref = simulate(dataclasses.replace(cfg, max_steps_per_event=1), arr, p, o)
        fast = simulate(cfg, arr, p, o)
        assert np.allclose(ref.ttft, fast.ttft, rtol=1e-9, atol=1e-9)
        assert np.allclose(ref.tpot, fast.tpot, rtol=1e-9, atol=1e-9)
        assert np.allclose(ref.finish, fast.finish, rtol=1e-9, atol=1e-9)
