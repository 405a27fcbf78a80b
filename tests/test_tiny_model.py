from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from engine.tiny import build

ROOT = Path(__file__).resolve().parent.parent


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_default_model_build_is_deterministic_and_loads_in_transformers(tmp_path: Path) -> None:
    a = build(tmp_path / "a")
    subprocess.run([sys.executable, "-m", "engine.tiny", str(tmp_path / "b")], check=True, cwd=ROOT)
    assert _digest(a) == _digest(tmp_path / "b")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(_digest(a))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(a)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n_params < 10_000_000
    tok = AutoTokenizer.from_pretrained(a)
    ids = tok("The harbor town woke before the sun.").input_ids
    assert ids[0] == tok.bos_token_id == 1
    assert len(ids) < 20, "the BPE merges learned from the corpus must compress its text"
