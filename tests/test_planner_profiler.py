"""The profiler on our own engine (tiny default model): its output is a profile the planner reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from planner.cli import main
from planner.latency import phase_latency
from planner.profile import load_profile

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny-llama"
needs_model = pytest.mark.skipif(not (TINY / "config.json").is_file(), reason="run `make model` first")


def run_profiler(folder: Path, device: str, tp: int = 1, pp: int = 1) -> tuple[Path, Path]:
    out, samples = folder / "profile.json", folder / "samples.json"
    argv = ["profile", "--model", str(TINY), "--device", device, "--out", str(out), "--quick",
            "--samples", str(samples), "--tp", str(tp), "--pp", str(pp)]  # fmt: skip
    assert main(argv) == 0
    return out, samples


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return run_profiler(tmp_path_factory.mktemp("profile"), "cpu")


def check(out: Path, samples: Path, tp: int = 1, name: str = "tiny-llama") -> None:
    prof = load_profile(out)  # the published format: the planner's own loader accepts it
    assert list(prof.models) == [name] and list(prof.models[name]) == [tp]
    lat = phase_latency(prof.for_model(name), tp, 1)
    # Physically necessary: more prompt tokens, or more context, cost more time.
    assert lat.prefill_full(1024, 4 * 256**2) > lat.prefill_full(16, 16**2) > 0
    assert lat.decode_full(16 * 200, 16) > lat.decode_full(1 * 40, 1) > 0
    # The step loop's overhead was measured (a clamped median: >= 0) and is written in the file
    # whenever it is positive; a few ms would mean the loop does far more than schedule and retire.
    raw = json.loads(out.read_text())[name][str(tp)]
    assert 0 <= prof.for_model(name)[tp].overhead_ms == raw.get("serving_overhead_ms", 0.0) < 5
    rows = json.loads(samples.read_text())
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    assert all(r["ms"] > 0 for r in rows)


@needs_model
def test_profile_cpu_engine(cpu_profile: tuple[Path, Path]) -> None:
    check(*cpu_profile)


@needs_model
def test_profile_cpu_engine_at_tp2(tmp_path: Path) -> None:
    """A TP=2 instance (two processes) profiled into the same format, under tp 2."""
    check(*run_profiler(tmp_path, "cpu", tp=2), tp=2)


@needs_model
def test_profile_cpu_engine_at_pp2(tmp_path: Path) -> None:
    """A PP=2 instance: whole-pipeline step times, in the same format, under the name "...@pp2"."""
    check(*run_profiler(tmp_path, "cpu", pp=2), name="tiny-llama@pp2")


@needs_model
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_cuda_engine(tmp_path: Path) -> None:
    check(*run_profiler(tmp_path, "cuda"))


@needs_model
def test_plan_from_a_measured_profile(tmp_path: Path, cpu_profile: tuple[Path, Path]) -> None:
    """Profile -> plan on 'GPUs' of the tiny model: the two kinds of profile are interchangeable."""
    prof = cpu_profile[0]
    out = tmp_path / "plan"
    argv = ["plan", "--profile", str(prof), "--capacity-table", "none", "--model", str(TINY), "--nodes", "1",
            "--gpus-per-node", "2", "--ttft", "2", "--tpot", "0.5", "--workload",
            "synthetic:prompt=uniform(16,128),output=uniform(8,64),n=2000", "--precision", "0.1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"] == "tiny-llama" and plan["num_gpus"] == 2
    cfg = (out / "model_repository" / "prefill" / "config.pbtxt").read_text()
    assert "tiny-llama" in cfg
