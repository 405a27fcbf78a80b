"""Pipeline semantics of the simulator: an instance's stages are shared servers.

A step or a prefill batch takes 1/pp of the whole-model time plus a hop at each stage and waits at a
stage that is busy with other work. These tests pin that on hand-made timelines."""

from __future__ import annotations

import numpy as np
import pytest

from planner.latency import PhaseLatency
from planner.profile import TpProfile
from planner.simulator import Instance, SimConfig, simulate

# prefill 2 + 0.01*S ms; decode 12 + 0.05*B ms with no per-context term, so every decode step of
# one sequence takes the same time and timelines can be computed by hand.
FLAT = TpProfile((2.0, 0.01, 0.0), (12.0, 0.0, 0.05), (12.0, 0.0, 0.05), 64)
HOP_MS = 0.5


def colocated(pp: int, token_budget: int) -> SimConfig:
    return SimConfig(
        colocated=(Instance(PhaseLatency(1, pp, FLAT, HOP_MS), 100_000, 64),), token_budget=token_budget
    )


def test_colocated_pp2_prefills_run_at_most_at_the_slowest_stage_rate() -> None:
    """A burst of single-token requests: one prefill per batch, so batches leave the last stage one
    stage time apart (the pipeline's rate), not two at a time as two private lanes would."""
    n, length = 40, 400
    lat = PhaseLatency(1, 2, FLAT, HOP_MS)
    stage_s = lat.prefill_stage(length, length * length)
    res = simulate(colocated(2, length), np.zeros(n), np.full(n, length), np.ones(n, dtype=np.int64))
    finish = np.sort(res.finish)
    gaps = np.diff(finish)
    assert gaps.min() >= stage_s * (1 - 1e-9)  # never faster than the stage
    assert gaps.mean() == pytest.approx(stage_s, rel=1e-9)  # and the pipeline sustains that rate
    assert finish[0] == pytest.approx(2 * stage_s, rel=1e-9)  # the first one passes both stages


def test_a_prefill_holding_a_stage_delays_the_decode_micro_batch_waiting_for_it() -> None:
    """Request A decodes alone on one micro-batch. B (one output token) arrives just before A's
    next step wants stage 0; B's prefill takes stage 0 on the other micro-batch, and A's step waits
    there for B's stage time. The prefill stage is shorter than a decode stage, so A does not wait
    again at stage 1 and all of A's later tokens move by that wait."""
    lat = PhaseLatency(1, 2, FLAT, HOP_MS)
    a_prompt, a_output, b_prompt = 50, 40, 100
    decode_stage_s = lat.decode_full(a_prompt + 1, 1) / 2 + HOP_MS / 1000
    prefill_stage_s = lat.prefill_stage(b_prompt, b_prompt * b_prompt)
    assert prefill_stage_s < decode_stage_s

    alone = simulate(colocated(2, 1000), np.zeros(1), np.array([a_prompt]), np.array([a_output]))
    # A's steps end at finish - k * step (the step passes both stages, nothing else runs).
    step_s = 2 * decode_stage_s
    a_step_end = float(alone.finish[0]) - 10 * step_s
    early = 1e-6  # B arrives this much before A's step ends and takes the free stage 0 first
    both = simulate(
        colocated(2, 1000),
        np.array([0.0, a_step_end - early]),
        np.array([a_prompt, b_prompt]),
        np.array([a_output, 1]),
    )
    assert both.ttft[0] == alone.ttft[0]  # B came later
    assert both.finish[1] == pytest.approx(a_step_end - early + 2 * prefill_stage_s, abs=1e-9)
    delay = float(both.finish[0] - alone.finish[0])
    assert delay == pytest.approx(prefill_stage_s - early, abs=1e-9)


@pytest.mark.parametrize("pp", [1, 2])
def test_the_serving_overhead_is_added_to_every_step(pp: int) -> None:
    """A lone request: its TTFT grows by one overhead (one prefill batch), and every decode step,
    hence its TPOT, by one overhead too."""
    prompt, output, overhead_ms = 30, 25, 0.8
    slow = TpProfile(FLAT.prefill, FLAT.decode_small, FLAT.decode_large, FLAT.threshold, overhead_ms)
    runs = [
        simulate(
            SimConfig(
                colocated=(Instance(PhaseLatency(1, pp, coef, HOP_MS), 100_000, 64),), token_budget=1000
            ),
            np.zeros(1),
            np.array([prompt]),
            np.array([output]),
        )
        for coef in (FLAT, slow)
    ]
    assert runs[1].ttft[0] - runs[0].ttft[0] == pytest.approx(overhead_ms / 1000, rel=1e-9)
    assert runs[1].tpot[0] - runs[0].tpot[0] == pytest.approx(overhead_ms / 1000, rel=1e-9)


def test_one_micro_batch_alone_takes_the_whole_pipeline_per_step() -> None:
    """With pp=2 and one running sequence, each token costs both stages plus both hops (the other
    stage idles: a bubble), so the sequence decodes no faster than at pp=1 plus the hops."""
    prompt, output = 30, 25
    one = simulate(colocated(1, 1000), np.zeros(1), np.array([prompt]), np.array([output]))
    two = simulate(colocated(2, 1000), np.zeros(1), np.array([prompt]), np.array([output]))
    lat1 = PhaseLatency(1, 1, FLAT, HOP_MS)
    step1 = lat1.decode_full(prompt + 1, 1) + HOP_MS / 1000
    assert one.tpot[0] == pytest.approx(step1, rel=1e-9)
    assert two.tpot[0] == pytest.approx(step1 + HOP_MS / 1000, rel=1e-9)
