"""The paper reproduction command (docs/planner.md): it runs, and its figures are consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.paper import main


@pytest.mark.slow
def test_opt13b_chatbot_reproduction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models", "opt-13b", "--precision", "0.1", "--out", str(tmp_path / "r.json")]) == 0
    (r,) = json.loads((tmp_path / "r.json").read_text())
    assert r["workload"]["name"] == "sharegpt-distserve"
    rows = r["per_gpu_goodput"]
    distserve = rows["DistServe's P(2,1) + D(1,1)"]
    assert distserve > 0
    # Our plan searches a space that holds DistServe's deployment: it does at least as well, up to
    # the goodput search's precision.
    ours = next(v for k, v in rows.items() if k.startswith("our plan"))
    assert ours >= distserve * 0.9
    # At DistServe's own goodput, scale 1 is met: the smallest scale is at most 1 (bisection: 2%).
    scales = r["slo_scale"]["min_scale"]
    assert scales["DistServe's P(2,1) + D(1,1)"] <= 1.02
    assert "smallest SLO scale met" in capsys.readouterr().out
