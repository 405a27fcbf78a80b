"""Replanning from observed traffic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from planner import PlannerError
from planner.cli import main
from planner.plan import load_plan
from planner.replan import decide, parse_success_count, read_log

WORKLOAD = "synthetic:prompt=uniform(50,400),output=uniform(50,300),n=4000"


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan")
    argv = ["plan", "--model", "opt-13b", "--nodes", "2", "--gpus-per-node", "8", "--ttft", "0.25", "--tpot", "0.1",
            "--workload", WORKLOAD, "--rate", "20", "--precision", "0.1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def write_log(path: Path, rate: float, n: int = 3000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    times = 1.7e9 + np.cumsum(rng.exponential(1 / rate, size=n))
    rows = [
        {"time": float(t), "prompt_tokens": int(p), "output_tokens": int(o)}
        for t, p, o in zip(times, rng.integers(50, 400, size=n), rng.integers(50, 300, size=n), strict=True)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_read_log(tmp_path: Path) -> None:
    obs = read_log(write_log(tmp_path / "log.jsonl", rate=5.0))
    assert obs.rate == pytest.approx(5.0, rel=0.08)
    assert obs.workload is not None and len(obs.workload.prompt_lens) == 3000
    recent = read_log(tmp_path / "log.jsonl", window_s=60)
    assert len(recent.workload.prompt_lens) < 600  # type: ignore[union-attr]
    (tmp_path / "bad.jsonl").write_text('{"prompt_tokens": 1, "output_tokens": 2}\n')
    with pytest.raises(PlannerError, match="time"):
        read_log(tmp_path / "bad.jsonl")


def test_parse_triton_metrics() -> None:
    text = (
        "# HELP nv_inference_request_success Number of successful inference requests\n"
        'nv_inference_request_success{model="orchestrator",version="1"} 120\n'
        'nv_inference_request_success{model="prefill",version="1"} 999\n'
    )
    assert parse_success_count(text) == 120
    with pytest.raises(PlannerError, match="decode"):
        parse_success_count(text, "decode")


def test_replan_scales_up_and_down(plan_dir: Path, tmp_path: Path) -> None:
    plan = load_plan(plan_dir / "plan.json")
    assert plan.target_rate == 20
    same = decide(plan, read_log(write_log(tmp_path / "same.jsonl", rate=20.0)))
    assert not same.change and same.current_attainment >= 0.9
    busy = decide(plan, read_log(write_log(tmp_path / "busy.jsonl", rate=50.0, seed=1)))
    assert busy.change and busy.current_attainment < 0.9
    assert busy.new_plan is not None and busy.new_plan.num_gpus > plan.num_gpus
    quiet = decide(plan, read_log(write_log(tmp_path / "quiet.jsonl", rate=3.0, seed=2)))
    assert quiet.change and quiet.new_plan is not None and quiet.new_plan.num_gpus < plan.num_gpus


def test_replan_cli(plan_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write_log(tmp_path / "log.jsonl", rate=50.0, seed=3)
    assert (
        main(
            ["replan", "--plan", str(plan_dir / "plan.json"), "--log", str(log), "--out", str(tmp_path / "n")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "CHANGE:" in out and (tmp_path / "n" / "plan.json").is_file()
    assert main(["replan", "--plan", str(plan_dir / "plan.json")]) == 2
    assert "--log or --metrics-url" in capsys.readouterr().err
