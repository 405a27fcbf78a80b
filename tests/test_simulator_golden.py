"""Golden results of the simulator: per-request values pinned bit for bit.

Each case runs a fixed-seed workload through one configuration and compares fingerprints of every
per-request array (a hash of the raw float64 bytes) and the busy seconds against values recorded
from the simulator as it was before its restructuring. Any change in event order, routing, admission
or step arithmetic changes a hash, so a refactor that passes here simulates exactly the same system.
If the model is changed ON PURPOSE, regenerate the pins with `python tests/test_simulator_golden.py`
and say why in the commit."""

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
        "ttft": "05477a8fff2c016a",
        "tpot": "0899b9facb81ccd7",
        "finish": "6c665b11d94bd92b",
        "completions": "1ba3f0cd46e5a905",
        "busy_s": (4.8789910419999964, 20.96742199999867),
        "ttft_sum": 5.202681284999391,
        "finish_last": 39.59580523999969,
        "tpot_max": 0.002147321428570897,
    },
    "colocated-pp2-pp1": {
        "ttft": "05a3ad19d9bfd844",
        "tpot": "f3f999e566dd5eb7",
        "finish": "5a5efe9e4de5b8ff",
        "completions": "96319772da4c2b7c",
        "busy_s": (22.162400000000016, 159.22309500000034),
        "ttft_sum": 1166.2855439494244,
        "finish_last": 65.00705862581155,
        "tpot_max": 0.04938600000000193,
    },
    "colocated-pp4-round-robin-step-by-step": {
        "ttft": "4007b27afed9abbd",
        "tpot": "bae09ba713d74941",
        "finish": "d190a89afd8f6ddb",
        "completions": "1ba3f0cd46e5a905",
        "busy_s": (15.61598927724653, 207.0588227021825),
        "ttft_sum": 1373.844222859857,
        "finish_last": 47.677569452589594,
        "tpot_max": 0.04441058215926361,
    },
    "decode-only-network": {
        "ttft": "5a312281df4bd8df",
        "tpot": "5b9bae2176dc7688",
        "finish": "295bcff0eae0f64a",
        "completions": "96319772da4c2b7c",
        "busy_s": (0.0, 96.20589499999994),
        "ttft_sum": 0.0,
        "finish_last": 33.80332619299495,
        "tpot_max": 11.859468890675332,
    },
    "joint-groups-least-loaded": {
        "ttft": "d5528e58bdbee89a",
        "tpot": "e194174d65cd45e8",
        "finish": "fd5520416a426dff",
        "completions": "96319772da4c2b7c",
        "busy_s": (21.962331208915696, 311.6468082072086),
        "ttft_sum": 22.45966289800053,
        "finish_last": 35.23067923231824,
        "tpot_max": 0.22687479162119573,
    },
    "joint-groups-round-robin": {
        "ttft": "88e042628a723698",
        "tpot": "301ef298bc20e781",
        "finish": "fadc371735d74a39",
        "completions": "96319772da4c2b7c",
        "busy_s": (21.876536301865432, 314.07949490119694),
        "ttft_sum": 22.17946386956899,
        "finish_last": 35.09055759368921,
        "tpot_max": 0.39818927539041127,
    },
    "joint-groups-step-by-step": {
        "ttft": "75e2eb58ca404b35",
        "tpot": "ef5ad48a7f6771e7",
        "finish": "2f1f65c6aa295854",
        "completions": "1ba3f0cd46e5a905",
        "busy_s": (16.07508070666503, 234.73328133523424),
        "ttft_sum": 16.785826297818883,
        "finish_last": 26.088927723259175,
        "tpot_max": 0.10018240744688889,
    },
    "joint-memory-limited": {
        "ttft": "b92690998bb36733",
        "tpot": "cf95515763c83c0d",
        "finish": "75dba5c47c7ea813",
        "completions": "96319772da4c2b7c",
        "busy_s": (31.910833026971428, 197.42745366547922),
        "ttft_sum": 34.36096903705112,
        "finish_last": 70.95740911763097,
        "tpot_max": 3.6359531019081617,
    },
    "joint-odd-coefficients": {
        "ttft": "c11b92f64b1f2b8a",
        "tpot": "1b36cb29729453d8",
        "finish": "240d5e08e073b8e3",
        "completions": "1ba3f0cd46e5a905",
        "busy_s": (4.864628285000002, 6.993234000000899),
        "ttft_sum": 13.48189029926655,
        "finish_last": 7.583988246371813,
        "tpot_max": 0.0010384615384615393,
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
