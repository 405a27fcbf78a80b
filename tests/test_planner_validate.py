"""planner.validation.validate end to end, tiny: profile, a real tritonserver, calibration probes, one rate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tritonserver_fixture import require_tritonserver


@pytest.mark.timeout(240)
def test_validate_tiny_run(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from planner.validation.validate import main

    require_tritonserver()
    out = tmp_path / "v"
    rc = main(
        [
            "--model", str(tiny_model_dir), "--quick", "--rates", "4", "--num-requests", "8",
            "--ttft", "0.5", "--tpot", "0.03", "--probe-requests", "12", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "validation.json").read_text())
    assert (out / "profile.json").is_file() and (out / "model_repository" / "orchestrator").is_dir()
    (row,) = report["rows"]
    assert row["rate"] == 4.0
    assert 0.0 <= row["measured"] <= 1.0
    low, high = row["measured_ci95"]
    assert 0.0 <= low <= row["measured"] <= high <= 1.0
    assert isinstance(row["predicted"], float) and 0.0 <= row["predicted"] <= 1.0
    assert math.isclose(row["difference_points"], 100 * (row["predicted"] - row["measured"]))
    meas = row["measurement"]
    assert meas["requests"] == 8 and meas["errors"] == 0
    # Served requests cost more than the engine alone: the probes must find a positive overhead.
    cal = report["calibration"]
    assert cal["prefill_ms"] >= 0 and cal["decode_seq_ms"] >= 0
    assert cal["prefill_ms"] + cal["decode_step_ms"] + cal["decode_seq_ms"] > 0
    assert len(cal["probes"]["decode"]) == 2
    assert row["cpu"]["cores_busy"] > 0
    assert row["cpu"]["cores_stolen"] >= 0 and 1 <= row["attempts"] <= 3  # default --retries 2
    assert row["quiet_host"] == (row["cpu"]["cores_stolen"] <= 0.1) and "quiet_host" in report
    # The host probe ran with CPU accounting of the server it started, and the prediction used it.
    host = report["host"]
    assert [p["requests"] for p in host["probes"]] == [12, 12]
    assert all(p["cores_ours"] > host["idle_cores_ours"] >= 0 for p in host["probes"])
    assert host["exponent"] >= 0 and host["cpu_per_token_s"] >= 0
    assert row["host_slowdown"] > 0 and row["host_utilization"] > 0
    assert len(row["records"]) == 8
    printed = capsys.readouterr().out
    assert "| 4 |" in printed and "points" in printed
