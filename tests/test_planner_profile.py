"""Profiles (the published format), capacities, model specs and the coefficient fits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from planner import PlannerError
from planner.cluster import ClusterSpec
from planner.fit import DecodeSample, PrefillSample, fit_decode, fit_prefill
from planner.latency import phase_latency
from planner.memory import computed_capacity_tokens, kv_capacity_tokens, load_capacity_table
from planner.model_spec import from_hf_config, lookup_known, resolve_model
from planner.profile import DEFAULT_PROFILE, PROFILE_DIR, load_profile, parse_profile, save_profile

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "distserve-a100"


def test_packaged_profiles_are_the_published_ones() -> None:
    for name in ("profiler-a100-80g.distserve.json", "profiler-a100-80g.vllm.json", "max_num_tokens.csv"):
        ref = REFERENCE / name
        if ref.is_file():
            assert (PROFILE_DIR / name).read_bytes() == ref.read_bytes()
    prof = load_profile(DEFAULT_PROFILE)
    assert sorted(prof.models) == ["facebook/opt-13b", "facebook/opt-66b"]
    assert sorted(prof.for_model("opt-66b")) == [2, 3, 4, 8]


def test_profile_round_trip(tmp_path: Path) -> None:
    prof = load_profile(DEFAULT_PROFILE)
    save_profile(prof, tmp_path / "p.json")
    again = load_profile(tmp_path / "p.json")
    assert again.models == prof.models
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(DEFAULT_PROFILE.read_text())


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, "non-empty object"),
        ({"m": {"x": {}}}, "positive integer"),
        ({"m": {"1": {"prefill": [1, 2, 3]}}}, "missing"),
        (
            {
                "m": {
                    "1": {
                        "prefill": [1, 2],
                        "decoding_smallbs": [1, 2, 3],
                        "decoding_largebs": [1, 2, 3],
                        "decoding_large_small_bs_threshold": 95,
                    }
                }
            },
            "three numbers",
        ),
        (
            {
                "m": {
                    "1": {
                        "prefill": [1, 2, 3],
                        "decoding_smallbs": [1, 2, 3],
                        "decoding_largebs": [1, "a", 3],
                        "decoding_large_small_bs_threshold": 95,
                    }
                }
            },
            "decoding_largebs",
        ),
    ],
)
def test_malformed_profile_is_named(data: object, message: str) -> None:
    with pytest.raises(PlannerError, match=message):
        parse_profile(data, "x.json")


def test_serving_overhead_is_an_optional_profile_field(tmp_path: Path) -> None:
    entry = {"prefill": [1, 2, 3], "decoding_smallbs": [1, 2, 3], "decoding_largebs": [1, 2, 3],
             "decoding_large_small_bs_threshold": 8}  # fmt: skip
    assert parse_profile({"m": {"1": entry}}).for_model("m")[1].overhead_ms == 0.0
    prof = parse_profile({"m": {"1": {**entry, "serving_overhead_ms": 0.75}}})
    assert prof.for_model("m")[1].overhead_ms == 0.75
    save_profile(prof, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json").models == prof.models
    with pytest.raises(PlannerError, match="serving_overhead_ms must be a number"):
        parse_profile({"m": {"1": {**entry, "serving_overhead_ms": "1"}}})
    with pytest.raises(PlannerError, match=">= 0"):
        parse_profile({"m": {"1": {**entry, "serving_overhead_ms": -1}}})
    # The latency model adds it to every prefill batch and decode step.
    lat0, lat1 = (
        phase_latency({1: parse_profile({"m": {"1": entry}}).for_model("m")[1]}, 1, 1),
        phase_latency(prof.for_model("m"), 1, 1),
    )
    assert lat1.prefill_full(10, 100) - lat0.prefill_full(10, 100) == pytest.approx(0.00075)
    assert lat1.decode_step(100, 4) - lat0.decode_step(100, 4) == pytest.approx(0.00075)


def test_profile_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlannerError, match="not valid JSON"):
        load_profile(bad)
    with pytest.raises(PlannerError, match="not found"):
        load_profile(tmp_path / "missing.json")
    with pytest.raises(PlannerError, match="no entry for model 'facebook/opt-175b'"):
        load_profile(DEFAULT_PROFILE).for_model("facebook/opt-175b")


def test_latency_model_follows_the_profile() -> None:
    prof = load_profile(DEFAULT_PROFILE).for_model("opt-13b")
    a, b, c = prof[1].prefill
    lat = phase_latency(prof, 1, 2, hop_ms=1.0)
    assert lat.prefill_full(512, 512**2) == pytest.approx((a + b * 512 + c * 512**2) / 1000)
    assert lat.prefill_stage(512, 512**2) == pytest.approx(lat.prefill_full(512, 512**2) / 2 + 0.001)
    small, large = prof[1].decode_small, prof[1].decode_large
    assert lat.decode_full(1000, 95) == pytest.approx((small[0] + small[1] * 1000 + small[2] * 95) / 1000)
    assert lat.decode_full(1000, 96) == pytest.approx((large[0] + large[1] * 1000 + large[2] * 96) / 1000)
    with pytest.raises(PlannerError, match="no coefficients for tp=8"):
        phase_latency(prof, 8, 1)


def test_computed_capacity_matches_the_measured_table() -> None:
    table = load_capacity_table()
    cluster = ClusterSpec(1, 8)
    for name in ("opt-13b", "opt-66b"):
        model = lookup_known(name)
        for (full, tp, pp), tokens in table.entries.items():
            if full.endswith(name) and tokens > 20000:
                assert computed_capacity_tokens(model, cluster, tp, pp) == pytest.approx(tokens, rel=0.05)
    opt66 = lookup_known("opt-66b")
    assert kv_capacity_tokens(opt66, cluster, 1, 1, table) == 0  # 132 GB of weights on one GPU
    assert computed_capacity_tokens(opt66, cluster, 1, 1) == 0


def test_model_specs() -> None:
    opt13 = lookup_known("OPT-13B")
    assert opt13 is resolve_model("facebook/opt-13b")
    assert 12.5e9 < opt13.num_params < 13.2e9
    assert opt13.kv_bytes_per_token == 2 * 40 * 5120 * 2
    assert opt13.tp_degrees(8) == [1, 2, 4, 5, 8] and opt13.pp_degrees(8) == [1, 2, 4, 5, 8]
    assert 6.5e9 < lookup_known("Llama-2-7b-hf").num_params < 6.9e9
    with pytest.raises(PlannerError, match="unknown model 'gpt-5'"):
        resolve_model("gpt-5")


def test_model_spec_from_hf_config(tmp_path: Path) -> None:
    cfg = {"model_type": "llama", "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
           "hidden_size": 256, "intermediate_size": 688, "vocab_size": 1024, "torch_dtype": "float32"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = from_hf_config(tmp_path)
    assert spec.kv_bytes_per_token == 2 * 4 * 4 * 32 * 4
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PlannerError, match="missing field 'hidden_size'"):
        from_hf_config(tmp_path)


def test_prefill_fit_recovers_coefficients() -> None:
    rng = np.random.default_rng(0)
    truth = (5.0, 0.05, 2e-5)
    samples = []
    for b in (1, 2, 4, 8):
        for n in (16, 64, 128, 256, 512):
            s, s2 = b * n, b * n * n
            ms = (truth[0] + truth[1] * s + truth[2] * s2) * (1 + rng.normal(0, 0.01))
            samples.append(PrefillSample(s, s2, ms))
    coef, err = fit_prefill(samples)
    assert coef == pytest.approx(truth, rel=0.1)
    assert err.mean < 0.02


def test_decode_fit_finds_the_regime_change() -> None:
    small, large, thr = (10.0, 0.001, 0.05), (4.0, 0.001, 0.2), 16
    samples = []
    for b in (1, 2, 4, 8, 16, 32, 64, 128):
        for ctx in (32, 128, 512):
            t = b * (ctx + 1)
            a, bb, c = small if b <= thr else large
            samples.append(DecodeSample(t, b, a + bb * t + c * b))
    prof, err = fit_decode(samples)
    assert prof.threshold == thr
    assert prof.decode_small == pytest.approx(small, rel=1e-6)
    assert prof.decode_large == pytest.approx(large, rel=1e-6)
    assert err.max < 1e-9


def test_fits_never_go_negative_on_noisy_timings() -> None:
    """Flat, noisy decode timings (a host where per-step noise swamps the per-token cost) used to
    tilt an unconstrained fit negative; the fitted step time must still grow with work."""
    rng = np.random.default_rng(3)
    samples = [
        DecodeSample(b * (ctx + 1), b, 9.0 - 0.02 * b + float(rng.normal(0, 0.3)))
        for b in (1, 2, 4, 8, 16)
        for ctx in (32, 128)
        for _ in range(2)
    ]
    prof, _ = fit_decode(samples)
    for coef in (prof.decode_small, prof.decode_large):
        assert min(coef) >= 0
    pre, _ = fit_prefill([PrefillSample(n, n * n, 3.0 - 1e-3 * n) for n in (16, 64, 128, 256)])
    assert min(pre) >= 0
