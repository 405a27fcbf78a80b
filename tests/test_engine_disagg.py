"""Engine-level disaggregation: prefill in one process, copy the KV blocks into another engine
(at different block ids), decode there: the same tokens as one engine doing both phases."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.sequence import Sequence

PROMPTS = [[1, 11, 12, 13, 14, 15, 16, 17, 18, 19], [1, 200, 201], [1, *range(300, 340)]]
PARAMS = [
    {"max_tokens": 32, "ignore_eos": True},
    {"max_tokens": 32, "temperature": 0.8, "top_p": 0.9, "seed": 11, "ignore_eos": True},
    # Penalties and min_tokens read the sequence's history: prefill's first token counts in decode.
    {"max_tokens": 32, "repetition_penalty": 1.4, "presence_penalty": 0.5, "frequency_penalty": 0.3,
     "min_tokens": 8, "logprobs": True},
]  # fmt: skip


def _prefill_process(model_dir: str, out_dir: str) -> None:
    engine = LLMEngine(EngineConfig(model_dir=model_dir, num_blocks=64, block_size=8))
    seqs = [Sequence(p, SamplingParams(**kw)) for p, kw in zip(PROMPTS, PARAMS, strict=True)]
    engine.prefill(seqs)
    meta = []
    for i, seq in enumerate(seqs):
        np.save(Path(out_dir) / f"kv{i}.npy", engine.pool.gather(seq.block_table).numpy())
        meta.append({"first_token": seq.output_ids[0], "seed": seq.seed, "blocks": seq.block_table})
    (Path(out_dir) / "meta.json").write_text(json.dumps(meta))


def test_prefill_in_one_process_decode_in_another(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc = mp.get_context("spawn").Process(target=_prefill_process, args=(str(tiny_model_dir), str(tmp_path)))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 0
    meta = json.loads((tmp_path / "meta.json").read_text())

    decoder = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir), num_blocks=64, block_size=8))
    decoder.blocks.allocate(5)  # so the receiving block ids differ from the sender's
    seqs = []
    for i, (prompt, kw) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        seq = Sequence(prompt, SamplingParams(**kw), seed=meta[i]["seed"])
        seq.output_ids.append(meta[i]["first_token"])
        dst = decoder.adopt(seq)
        assert dst != meta[i]["blocks"]
        decoder.pool.scatter(dst, torch.from_numpy(np.load(tmp_path / f"kv{i}.npy")))
        seqs.append(seq)
    while not all(s.finished for s in seqs):
        decoder.decode_step([s for s in seqs if not s.finished])

    colocated = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir), num_blocks=64, block_size=8))
    expected = colocated.generate(
        PROMPTS,
        [SamplingParams(**kw) for kw in PARAMS[:1]]
        + [SamplingParams(**PARAMS[1])]
        + [SamplingParams(**PARAMS[2])],
    )
    assert [s.output_ids for s in seqs] == [s.output_ids for s in expected]
