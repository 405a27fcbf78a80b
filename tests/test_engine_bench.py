"""The engine benchmark under both module paths (python -m engine.bench and the older
python -m backends.engine.bench that the TP/PP commands name): one small TP=2 run prints its row."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_old_module_path_runs_the_tp_bench(tiny_model_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "backends.engine.bench", "--model", str(tiny_model_dir), "--tp", "2",
         "--batches", "2", "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert "TP=1 on 2 threads vs TP=2 on 2 processes" in out
    row = re.search(r"^\s+2 \|\s+(\d+)\s+(\d+)\s+[\d.]+ \|\s+(\d+)\s+(\d+)", out, re.MULTILINE)
    assert row is not None, out
    assert all(int(v) > 0 for v in row.groups())  # tokens/s of both sides, prefill and decode
