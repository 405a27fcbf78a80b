"""Joint choice of the deployment: a search space that contains another never plans worse."""

from __future__ import annotations

import dataclasses

import pytest

from planner.inputs import PlanInputs
from planner.joint import Candidate, top_per_pp_level
from planner.placement import plan
from planner.search import PhaseTask


def cand(pp_p: int, pp_d: int, n: int) -> Candidate:
    return Candidate(PhaseTask("prefill", 1, pp_p), PhaseTask("decode", 1, pp_d), n, n)


def test_the_candidates_of_a_smaller_search_space_are_kept() -> None:
    """Whatever the scores, the top-k of the pp <= 1 space (all a --max-pp 1 search would see)
    are among the candidates of the full space, however many deeper ones score better."""
    shallow = [((float(s),), cand(1, 1, s)) for s in range(1, 6)]
    deep = [((10.0 + s,), cand(pp, 2, s)) for s in range(1, 6) for pp in (1, 2)]
    narrow = top_per_pp_level(shallow, 2)
    wide = top_per_pp_level([*deep, *shallow], 2)
    assert narrow == [cand(1, 1, 5), cand(1, 1, 4)]
    assert set(narrow) <= set(wide) and len(wide) == 4
    # The order of enumeration does not matter.
    assert top_per_pp_level([*shallow, *deep][::-1], 2) == wide


@pytest.mark.slow
def test_a_larger_search_space_never_plans_worse() -> None:
    """OPT-13B on 1x4, low affinity, DistServe's ShareGPT processing: the default search (pp up to
    8) against --max-pp 1, on one fixed workload sample."""
    inputs = PlanInputs(
        model="opt-13b", nodes=1, gpus_per_node=4, ttft=0.25, tpot=0.1, affinity="low",
        workload="sharegpt-distserve", precision=0.05,
    )  # fmt: skip
    problem = inputs.problem()
    wide = plan(problem, "low", None)
    narrow = plan(dataclasses.replace(problem, max_pp=1), "low", None)
    assert max(r.pp for r in narrow.replicas) == 1
    assert wide.goodput >= narrow.goodput
    assert wide.per_gpu_goodput * wide.num_gpus >= narrow.per_gpu_goodput * narrow.num_gpus
    narrow_seen = {c["deployment"] for c in narrow.details["joint_candidates"]}
    assert narrow_seen <= {c["deployment"] for c in wide.details["joint_candidates"]}
