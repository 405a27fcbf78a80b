from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generate_json_matches_transformers(tiny_model_dir: Path) -> None:
    prompts = ["The quick brown fox", "Once upon a time"]
    cmd = [
        sys.executable,
        "-m",
        "engine",
        "generate",
        "--model",
        str(tiny_model_dir),
        "--max-tokens",
        "33",
        "--json",
    ]
    for p in prompts:
        cmd += ["--prompt", p]
    out = (
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()
    )
    rows = [json.loads(line) for line in out]
    assert [r["prompt"] for r in rows] == prompts

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for row in rows:
        ids = tok(row["prompt"], return_tensors="pt").input_ids
        expected = model.generate(ids, max_new_tokens=33, do_sample=False)[0, ids.shape[1] :].tolist()
        assert row["output_ids"] == expected
        assert row["text"] == tok.decode(expected, skip_special_tokens=True)


def test_bad_arguments_exit_with_a_clear_error(tiny_model_dir: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "engine",
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "x",
        "--max-tokens",
        "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "max_tokens must be a positive integer" in proc.stderr
