"""Benchmark arithmetic: records, attainment, goodput, arrivals, requests (no server needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from client.bench.plots import plot
from client.bench.requests import arrival_times, make_requests
from client.bench.stats import RequestRecord, attainment, goodput, record, summarize


def test_record_measures_from_send() -> None:
    r = record(10, send=100.0, arrivals=[100.5, 100.6, 100.9], tokens=3, error=None)
    assert r.ttft == pytest.approx(0.5) and r.tpot == pytest.approx(0.2) and r.latency == pytest.approx(0.9)
    failed = record(10, 100.0, [100.5], 1, "ServerError: boom")
    assert failed.error == "ServerError: boom" and math.isinf(failed.ttft)


def test_attainment_is_joint_and_scales() -> None:
    recs = [
        RequestRecord(1, 2, 0.5, 0.01, 1.0, None),  # meets both
        RequestRecord(1, 2, 2.0, 0.01, 3.0, None),  # misses TTFT
        RequestRecord(1, 2, 0.5, 0.05, 1.0, None),  # misses TPOT
        RequestRecord(1, 2, math.inf, math.inf, math.inf, "err"),
    ]
    assert attainment(recs, ttft_slo=1.0, tpot_slo=0.02) == 0.25
    assert attainment(recs, 1.0, 0.02, scale=2.5) == 0.75, "a failed request never meets an SLO"
    s = summarize(recs, rate=1.0, duration_s=2.0, ttft_slo=1.0, tpot_slo=0.02)
    assert s["errors"] == 1 and s["throughput_rps"] == 1.5 and s["ttft_attainment"] == 0.5
    assert s["ttft"]["p50"] == pytest.approx(0.5)


def test_goodput_is_the_largest_rate_before_the_first_miss() -> None:
    g = goodput([1, 2, 3, 4], [1.0, 0.95, 0.85, 0.92], target=0.9)
    assert g.tested == 2 and g.interpolated == pytest.approx(2.5)
    assert goodput([1, 2], [0.5, 0.4], 0.9) == (0.0, 0.0)
    assert goodput([2, 1], [0.95, 1.0], 0.9).tested == 2, "order of the rates does not matter"


def test_arrivals_scale_one_gap_sequence() -> None:
    a1, a2 = arrival_times(500, 1.0, 1.0, seed=3), arrival_times(500, 2.0, 1.0, seed=3)
    assert a1[0] == 0 and np.allclose(a1, 2 * a2), "common random numbers across rates"
    assert 0.85 < 500 / a1[-1] < 1.15, "mean rate close to the requested one"
    bursty = np.diff(arrival_times(2000, 1.0, 3.0, seed=3))
    assert 2.5 < bursty.std() / bursty.mean() < 3.5


def test_requests_fit_the_context(tiny_model_dir: Path) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    reqs = make_requests(
        "synthetic:prompt=uniform(1500,3000),output=fixed(700)", 50, 0, cfg["vocab_size"], 2048, None
    )
    assert all(len(r.prompt_ids) + r.output_len <= 2048 for r in reqs)
    assert all(3 <= t < cfg["vocab_size"] for r in reqs for t in r.prompt_ids)
    assert {r.output_len for r in reqs} == {700}


def test_plot_writes_png(tmp_path: Path) -> None:
    recs = {
        1.0: [RequestRecord(1, 2, 0.5, 0.01, 1.0, None)],
        2.0: [RequestRecord(1, 2, 2.0, 0.01, 1.0, None)],
    }
    out = plot(tmp_path / "a.png", {"orchestrator": recs, "colocated": recs}, 1.0, 0.02, 0.9, 1.0, "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
