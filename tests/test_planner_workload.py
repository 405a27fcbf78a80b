"""Workloads: ShareGPT, length files, synthetic specs and arrival processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workload import ArrivalProcess, WorkloadError, load_workload, sharegpt, synthetic

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny-llama"


def test_sharegpt_approximate_lengths() -> None:
    w = sharegpt(None, max_len=2048, limit=3000)
    assert len(w.prompt_lens) > 2000
    assert int((w.prompt_lens + w.output_lens).max()) <= 2048
    assert int(w.prompt_lens.min()) >= 4 and int(w.output_lens.min()) >= 4
    # ShareGPT replies are longer than the questions on average.
    assert w.output_lens.mean() > w.prompt_lens.mean()
    assert "bytes / 4" in w.note


@pytest.mark.skipif(not (TINY / "tokenizer.json").is_file(), reason="run `make model` for the tiny tokenizer")
def test_sharegpt_with_the_model_tokenizer() -> None:
    w = sharegpt(str(TINY), max_len=2048, limit=500)
    assert "tokenized with" in w.note
    approx = sharegpt(None, max_len=2048, limit=500)
    assert not np.array_equal(np.sort(w.prompt_lens), np.sort(approx.prompt_lens))


def test_synthetic_spec() -> None:
    w = synthetic("prompt=uniform(64,128),output=fixed(32),n=500")
    assert len(w.prompt_lens) == 500
    assert w.prompt_lens.min() >= 64 and w.prompt_lens.max() <= 128
    assert set(w.output_lens.tolist()) == {32}
    lognorm = synthetic("prompt=lognormal(200,0.5),output=exponential(100)")
    assert 150 < np.median(lognorm.prompt_lens) < 250
    for bad in ("prompt=fixed(10)", "prompt=gauss(1),output=fixed(1)", "prompt=uniform(9,1),output=fixed(1)"):
        with pytest.raises(WorkloadError):
            synthetic(bad)


def test_length_files(tmp_path: Path) -> None:
    csv = tmp_path / "lens.csv"
    csv.write_text("prompt_len,output_len\n10,20\n30,40\n5000,10\n")
    w = load_workload(str(csv), max_len=2048)
    assert w.prompt_lens.tolist() == [10, 30] and w.output_lens.tolist() == [20, 40]
    jl = tmp_path / "lens.jsonl"
    jl.write_text(
        "\n".join(json.dumps({"prompt_tokens": p, "output_tokens": o}) for p, o in [(1, 2), (3, 4)])
    )
    assert load_workload(str(jl)).output_lens.tolist() == [2, 4]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_tokens": 3}\n')
    with pytest.raises(WorkloadError, match="output_len"):
        load_workload(str(bad))
    with pytest.raises(WorkloadError, match="not found"):
        load_workload(str(tmp_path / "none.csv"))


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_arrivals_have_the_requested_burstiness(cv: float) -> None:
    gaps = ArrivalProcess(cv).unit_gaps(200_000, seed=1)
    assert gaps.mean() == pytest.approx(1.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    with pytest.raises(WorkloadError):
        ArrivalProcess(0.0)
