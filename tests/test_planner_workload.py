"""Workloads: ShareGPT (as is and cut as DistServe cuts it), length files, synthetic specs and
arrival processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workload import (
    ArrivalProcess,
    Workload,
    WorkloadError,
    load_workload,
    sharegpt,
    sharegpt_distserve,
    sources,
    synthetic,
)

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny-llama"
SMOLLM2 = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"


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


@pytest.fixture(scope="module")
def distserve0() -> Workload:
    return load_workload("sharegpt-distserve", max_len=2048, seed=0)


def test_sharegpt_distserve_lengths(distserve0: Workload) -> None:
    w = distserve0
    assert w.name == "sharegpt-distserve" and "bytes / 4" in w.note
    assert len(w.prompt_lens) > 10000
    # DistServe's filter: prompt + output < 2048, and never both sides under 4 tokens.
    assert int((w.prompt_lens + w.output_lens).max()) < 2048
    assert not np.any((w.prompt_lens < 4) & (w.output_lens < 4))
    # DistServe reports ShareGPT means of about 770 prompt and 200 output tokens with OPT's
    # tokenizer; bytes/4 gives 764 and 207 on the packaged file.
    assert 650 < w.prompt_lens.mean() < 900
    assert 160 < w.output_lens.mean() < 260
    # Prompts carry the conversation so far: far longer than first questions.
    first_turns = sharegpt(None, max_len=2048)
    assert w.prompt_lens.mean() > 3 * first_turns.prompt_lens.mean()
    assert w.output_lens.mean() < first_turns.output_lens.mean()


def test_sharegpt_distserve_is_seeded(distserve0: Workload) -> None:
    again = sharegpt_distserve(None, max_len=2048, seed=0)
    assert np.array_equal(again.prompt_lens, distserve0.prompt_lens)
    assert np.array_equal(again.output_lens, distserve0.output_lens)
    other = sharegpt_distserve(None, max_len=2048, seed=1)
    assert not np.array_equal(np.sort(other.prompt_lens), np.sort(distserve0.prompt_lens))


def test_sharegpt_distserve_cuts_conversations_as_distserve() -> None:
    convs = [[str(m.get("value", "")) for m in c] for c in sources._iter_sharegpt_conversations()]
    convs = [c for c in convs if len(c) >= 3]
    pairs = sources._distserve_pairs(seed=0)
    assert len(pairs) == len(convs)
    cuts = []
    for texts, (prompt, output) in zip(convs, pairs, strict=True):
        ks = [k for k in range(1, len(texts)) if "\n".join(texts[:k]) == prompt and texts[k] == output]
        assert ks, "the prompt is not a newline-joined prefix followed by its next message"
        cuts.append(ks[0])
    # Any message can end the prompt, not only the first human turn (k = 1).
    assert sum(k == 1 for k in cuts) < 0.6 * len(cuts) and max(cuts) > 10


def test_sharegpt_distserve_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = [
        ("ab", "cd"),  # both under 4 tokens: dropped
        ("ab", "x" * 400),  # short prompt, long answer: kept (vLLM's rule would drop it)
        ("x" * 400, ""),  # empty answer counts as 1 token: kept
        ("x" * 4000, "y" * 4188),  # 1000 + 1047 = 2047 tokens: kept
        ("x" * 4000, "y" * 4192),  # 1000 + 1048 = 2048 tokens: dropped
    ]
    monkeypatch.setattr(sources, "_distserve_pairs", lambda seed: pairs)
    w = sharegpt_distserve(None, max_len=None)
    assert w.prompt_lens.tolist() == [1, 100, 1000] and w.output_lens.tolist() == [100, 1, 1047]
    # A model context under 2048 still bounds the requests.
    assert sharegpt_distserve(None, max_len=1024).prompt_lens.tolist() == [1, 100]


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(), reason="needs the SmolLM2 tokenizer")
def test_sharegpt_distserve_with_the_model_tokenizer() -> None:
    w = sharegpt_distserve(str(SMOLLM2), max_len=8192, limit=400)
    assert "tokenized with" in w.note and w.name == "sharegpt-distserve"
    assert int((w.prompt_lens + w.output_lens).max()) < 2048
    assert 500 < w.prompt_lens.mean() < 1100 and 120 < w.output_lens.mean() < 320


def test_unknown_workload_names_the_choices() -> None:
    with pytest.raises(WorkloadError, match="sharegpt-distserve"):
        load_workload("sharegpt-distserv")


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
