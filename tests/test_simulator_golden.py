"""Golden results of the simulator: per-request values pinned bit for bit.

Each case runs a fixed-seed workload through one configuration and compares fingerprints of every
per-request array (a hash of the raw float64 bytes) and the busy seconds against values recorded
from the simulator as it was before its restructuring. Any change in event order, routing, admission
or step arithmetic changes a hash, so a refactor that passes here simulates exactly the same system.
If the model is changed ON PURPOSE, regenerate the pins with `python tests/test_simulator_golden.py`
and say why in the commit. The cases with pipeline stages were re-pinned when lanes began to
share their stages (a step waits at a stage another lane's step or a prefill holds); the pp=1
cases kept their pins through that change."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import numpy as np
import pytest

from planner.cluster import ClusterSpec
from planner.latency import PhaseLatency
from planner.profile import TpProfile
from planner.sim_stats import SimResult
from planner.simulator import Instance, SimConfig, simulate

# opt-13b at tp=1 from DistServe's A100 profile (ms), written out so the test does not move with it.
OPT13B = TpProfile(
    (18.10254647486372, 0.1019122572698738, 7.122264314252114e-06),
    (19.934702624895458, 0.0006269356524350583, 0.03850697740828398),
    (7.1661889468253595, 0.0005798000403396046, 0.15831096191764046),
    95,
)
ROUND = TpProfile((20.0, 0.1, 0.0), (10.0, 0.001, 0.05), (8.0, 0.001, 0.1), 32)
# Fits can come out with negative terms: small batches get clamped step times (<= 0), large ones
# step times that shrink as contexts grow. Both force the simulator's step-by-step fallback.
ODD = TpProfile((-5.0, 0.08, 1e-6), (-3.0, 0.002, 0.5), (40.0, -0.0004, 0.2), 4)
# No per-context term: every step of a constant batch takes the same time.
FLAT = TpProfile((20.0, 0.1, 0.0), (12.0, 0.0, 0.05), (8.0, 0.0, 0.1), 16)


def lat(coef: TpProfile, pp: int = 1, hop_ms: float = 0.0) -> PhaseLatency:
    return PhaseLatency(1, pp, coef, hop_ms)


def workload(
    n: int,
    rate: float,
    seed: int,
    max_prompt: int,
    max_output: int,
    grid_s: float = 0.0,
    huge_every: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poisson arrivals (snapped to a grid when grid_s > 0, so that many arrive at the same time
    and event ties matter), uniform lengths, every 29th request with a single output token and,
    when huge_every > 0, every huge_every-th prompt 7000 tokens long (beyond some KV caches)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    if grid_s > 0:
        arrivals = np.round(arrivals / grid_s) * grid_s
    prompts = rng.integers(1, max_prompt, n)
    outputs = rng.integers(1, max_output, n)
    outputs[::29] = 1
    if huge_every > 0:
        prompts[5::huge_every] = 7000
    return arrivals, prompts, outputs


def _joint_groups(**kw: object) -> SimConfig:
    """Two node-local units (groups 0 and 1) of mixed pp, KV pulled over NVLink or the network."""
    return SimConfig(
        prefill=(
            Instance(lat(OPT13B, 2, 1.0), node=0, group=0),
            Instance(lat(OPT13B), node=1, group=1),
            Instance(lat(OPT13B), node=1, group=1),
        ),
        decode=tuple(
            Instance(lat(OPT13B, pp, 1.0), 8000, 16, node=k % 2, group=k % 2)
            for k, pp in enumerate((1, 2, 4, 2))
        ),
        token_budget=700,
        kv_bytes_per_token=800_000,
        cluster=ClusterSpec(2, 8),
        **kw,  # type: ignore[arg-type]
    )


def _case_joint_memory() -> SimConfig:
    # The group-5 prefill instance has no decode instance in its group: its output goes anywhere.
    # Decode memory is tight (requests wait for admission) and a few prompts exceed it entirely.
    return SimConfig(
        prefill=(Instance(lat(OPT13B), node=0, group=0), Instance(lat(OPT13B, 2, 0.5), node=1, group=5)),
        decode=(Instance(lat(OPT13B), 6000, 48, node=0), Instance(lat(FLAT, 2, 0.5), 4000, 24, node=1)),
        token_budget=1024,
        kv_bytes_per_token=800_000,
        cluster=ClusterSpec(2, 8, nvlink=False),
    )


CASES: dict[str, tuple[Callable[[], SimConfig], tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    "joint-memory-limited": (_case_joint_memory, workload(400, 9.0, 11, 900, 260, huge_every=97)),
    "joint-groups-least-loaded": (_joint_groups, workload(400, 14.0, 12, 700, 300)),
    "joint-groups-round-robin": (
        lambda: _joint_groups(routing="round_robin"),
        workload(400, 14.0, 12, 700, 300),
    ),
    "joint-groups-step-by-step": (
        lambda: _joint_groups(max_steps_per_event=1),
        workload(300, 14.0, 13, 700, 300, grid_s=0.05),
    ),
    "prefill-only": (
        lambda: SimConfig(
            prefill=(Instance(lat(OPT13B)), Instance(lat(OPT13B, 2, 1.0))),
            token_budget=512,
            mode="prefill_only",
        ),
        workload(400, 25.0, 14, 800, 50),
    ),
    "decode-only-network": (
        lambda: SimConfig(
            decode=(Instance(lat(ROUND, 2, 1.0), 5000, 32, node=0), Instance(lat(ROUND), 30000, 64, node=1)),
            kv_bytes_per_token=400_000,
            cluster=ClusterSpec(2, 8),
            mode="decode_only",
            decode_only_same_node=False,
        ),
        workload(400, 30.0, 15, 600, 300),
    ),
    "colocated-pp2-pp1": (
        lambda: SimConfig(
            colocated=(Instance(lat(ROUND, 2, 1.0), 6000, 32), Instance(lat(ROUND), 9000, 8)),
            token_budget=512,
        ),
        workload(400, 7.0, 16, 600, 300, huge_every=89),
    ),
    "colocated-pp4-round-robin-step-by-step": (
        lambda: SimConfig(
            colocated=(Instance(lat(OPT13B, 4, 1.0), 20000, 64), Instance(lat(OPT13B, 2, 1.0), 4000, 16)),
            token_budget=1024,
            routing="round_robin",
            max_steps_per_event=1,
        ),
        workload(300, 10.0, 17, 700, 200, grid_s=0.1),
    ),
    "joint-odd-coefficients": (
        lambda: SimConfig(
            prefill=(Instance(lat(ODD)),),
            decode=(Instance(lat(ODD, 2, 0.5), 30000, 64), Instance(lat(ODD), 30000, 3)),
            token_budget=900,
        ),
        workload(300, 40.0, 18, 500, 150),
    ),
    # One stage everywhere: segments of closed-form steps, untouched by the shared-stage model.
    "joint-pp1": (
        lambda: SimConfig(
            prefill=(Instance(lat(OPT13B)), Instance(lat(OPT13B))),
            decode=(Instance(lat(OPT13B), 9000, 32), Instance(lat(FLAT), 5000, 16)),
            token_budget=800,
        ),
        workload(400, 12.0, 20, 800, 300, huge_every=101),
    ),
    "colocated-pp1": (
        lambda: SimConfig(
            colocated=(Instance(lat(OPT13B), 12000, 48), Instance(lat(ROUND), 6000, 16)), token_budget=700
        ),
        workload(400, 6.0, 21, 700, 250, grid_s=0.05),
    ),
    "colocated-odd-coefficients": (
        lambda: SimConfig(colocated=(Instance(lat(ODD, 2, 0.5), 12000, 40),), token_budget=600),
        workload(300, 8.0, 19, 500, 150, grid_s=0.02),
    ),
}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def fingerprint(res: SimResult) -> dict[str, object]:
    """Hashes of the per-request arrays (exact bytes) plus a few readable exact values."""
    return {
        "ttft": _sha(res.ttft),
        "tpot": _sha(res.tpot),
        "finish": _sha(res.finish),
        "completions": _sha(res.completions),
        "busy_s": tuple(float(x) for x in res.busy_s),
        "ttft_sum": float(res.ttft.sum()),
        "finish_last": float(res.finish[-1]),
        "tpot_max": float(res.tpot.max()),
    }


def run_case(name: str) -> SimResult:
    make, (arrivals, prompts, outputs) = CASES[name]
    return simulate(make(), arrivals, prompts, outputs)


# Recorded from the simulator before its restructuring (git 7a46a5f); do not edit by hand.
GOLDEN: dict[str, dict[str, object]] = {
    "colocated-odd-coefficients": {
        "ttft": "fa5cdf803f283579",
        "tpot": "635ca6e648298f26",
        "finish": "1d813a31a9d3e819",
        "completions": "1ba3f0cd46e5a905",
        "busy_s": (4.932759987999996, 38.74303160000023),
        "ttft_sum": 11.953459239998176,
        "finish_last": 40.91870263749998,
        "tpot_max": 0.0635298765000023,
    },
    "colocated-pp1": {
        "ttft": "e8e51df79d6f1fd7",
        "tpot": "46fa5389c27bb960",
        "finish": "bb80d6de70d6850e",
        "completions": "96319772da4c2b7c",
        "busy_s": (21.28733805785975, 115.15467398484755),
        "ttft_sum": 32.49408373004113,
        "finish_last": 65.67803000000005,
        "tpot_max": 0.0719776903769187,
    },
    "colocated-pp2-pp1": {
        "ttft": "9afcc8ed793529d4",
        "tpot": "fabedb8bd1045ddc",
        "finish": "d654f4c7b4ab96e4",
        "completions": "96319772da4c2b7c",
        "busy_s": (22.08240000000001, 151.37709500000008),
        "ttft_sum": 778.6317378747414,
        "finish_last": 63.84735180793831,
        "tpot_max": 0.04530599999999829,
    },
    "colocated-pp4-round-robin-step-by-step": {
        "ttft": "2f26e058e7eb0fbc",
        "tpot": "9ab3954cb23f24be",
        "finish": "e4514e4d6cdcc64a",
        "completions": "1ba3f0cd46e5a905",
        "busy_s": (15.615989277246529, 189.02044870726246),
        "ttft_sum": 1528.2182237286247,
        "finish_last": 49.93194255749376,
        "tpot_max": 0.04652512398365151,
    },
    "decode-only-network": {
        "ttft": "5a312281df4bd8df",
        "tpot": "190e2e64608a669b",
        "finish": "b491d96d14fdd689",
        "completions": "96319772da4c2b7c",
        "busy_s": (0.0, 95.06629499999995),
        "ttft_sum": 0.0,
        "finish_last": 33.5345241735636,
        "tpot_max": 12.192093264687859,
    },
    "joint-groups-least-loaded": {
        "ttft": "3285e41e8e3bebf4",
        "tpot": "c0228da2393f183d",
        "finish": "8ebb4ebfa57f94f9",
        "completions": "96319772da4c2b7c",
        "busy_s": (21.992433755390554, 311.223114154711),
        "ttft_sum": 22.49207451952421,
        "finish_last": 35.26198509612884,
        "tpot_max": 0.1356810205456771,
    },
    "joint-groups-round-robin": {
        "ttft": "88e042628a723698",
        "tpot": "6eb2f35487d1dff3",
        "finish": "315b84c2ebe73fc3",
        "completions": "96319772da4c2b7c",
        "busy_s": (21.876536301865432, 314.50258073794583),
        "ttft_sum": 22.17946386956899,
        "finish_last": 35.09055759368921,
        "tpot_max": 0.5072715416200282,
    },
    "joint-groups-step-by-step": {
        "ttft": "715e3bb823560941",
        "tpot": "a97e70704dc9cf84",
        "finish": "87997e0336de216e",
        "completions": "1ba3f0cd46e5a905",
        "busy_s": (16.07297816019018, 231.27263939924828),
        "ttft_sum": 16.89297664460824,
        "finish_last": 26.14305250134881,
        "tpot_max": 0.16302907354727925,
    },
    "joint-memory-limited": {
        "ttft": "b92690998bb36733",
        "tpot": "04de7feb9dc75bb0",
        "finish": "5372f4defcc2060e",
        "completions": "96319772da4c2b7c",
        "busy_s": (31.910833026971428, 196.27071504361726),
        "ttft_sum": 34.36096903705112,
        "finish_last": 71.97188902597016,
        "tpot_max": 3.818960685135842,
    },
    "joint-odd-coefficients": {
        "ttft": "c11b92f64b1f2b8a",
        "tpot": "0f1d60a96ab88459",
        "finish": "499354f45ead8d26",
        "completions": "1ba3f0cd46e5a905",
        "busy_s": (4.864628285000002, 6.991234000000669),
        "ttft_sum": 13.48189029926655,
        "finish_last": 7.583988246371813,
        "tpot_max": 0.0010695975000031277,
    },
    "joint-pp1": {
        "ttft": "d4e41bbecaa74b5f",
        "tpot": "fc1e1143667cfc39",
        "finish": "b489c582cd8f8394",
        "completions": "96319772da4c2b7c",
        "busy_s": (27.870585415087213, 118.82381120609084),
        "ttft_sum": 34.11902216217538,
        "finish_last": 57.99846358946843,
        "tpot_max": 3.3917078092222326,
    },
    "prefill-only": {
        "ttft": "994e5f319e6b56db",
        "tpot": "5a312281df4bd8df",
        "finish": "80c51d09fa7f1510",
        "completions": "96319772da4c2b7c",
        "busy_s": (24.686525365964446, 0.0),
        "ttft_sum": 32.44210164890231,
        "finish_last": 16.40132846323621,
        "tpot_max": 0.0,
    },
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_results_are_bit_identical_to_the_pinned_ones(name: str) -> None:
    res = run_case(name)
    assert np.all(res.completions == 1)
    assert fingerprint(res) == GOLDEN[name]


def test_step_by_step_case_agrees_with_segments() -> None:
    """The step-by-step cases pin the reference behaviour; their segmented twins must be close
    (segments sum step times in closed form, so bits may differ, values may not)."""
    make, (arrivals, prompts, outputs) = CASES["joint-groups-step-by-step"]
    ref = simulate(make(), arrivals, prompts, outputs)
    fast = simulate(dataclasses.replace(make(), max_steps_per_event=1 << 30), arrivals, prompts, outputs)
    assert np.allclose(ref.finish, fast.finish, rtol=1e-9, atol=1e-9)


if __name__ == "__main__":
    for case in sorted(CASES):
        print(f"    {case!r}: {fingerprint(run_case(case))!r},")
