"""Tensor parallelism of the engine (engine/parallel/): TP=2 and TP=4 equal TP=1 on the default
model, and a worker rank that dies takes the engine out of service with a clear error."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine
from engine.errors import EngineDeadError
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from engine.sharding import ShardingError, TPShard

TEXTS = ["The quick brown fox", "Once upon a time there was a harbor town", "Memory holds the data", "A"]
NEW_TOKENS = 24
# fp32: a row-parallel projection sums per-rank partial products in another order than one GEMM,
# so logits differ from TP=1 by rounding: measured up to 8e-6 (logits up to 6.5 in magnitude).
LOGIT_ATOL = 1e-4


def run(model_dir: Path, tp: int, decode_attention: str) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of the batched prompts, and the logits of every step (prefill, then decode)."""
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    engine = LLMEngine(
        EngineConfig(
            model_dir=str(model_dir), num_blocks=128, block_size=4, tp_size=tp, num_threads=1,
            decode_attention=decode_attention,
        )
    )  # fmt: skip
    logits: list[torch.Tensor] = []
    sample = engine._sample_and_append

    def capture(seqs: list[Sequence], out: torch.Tensor) -> list[int]:
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].seq_id)  # rows in a fixed order
        logits.append(out[order].clone())
        return sample(seqs, out)

    engine._sample_and_append = capture  # type: ignore[method-assign]
    try:
        seqs = engine.generate([tok(t).input_ids for t in TEXTS], SamplingParams(max_tokens=NEW_TOKENS))
        assert engine.blocks.num_free == engine.blocks.num_blocks
        return [s.output_ids for s in seqs], logits
    finally:
        engine.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[str, tuple[list[list[int]], list[torch.Tensor]]]:
    return {mode: run(tiny_model_dir, 1, mode) for mode in ("dense", "paged")}


@pytest.mark.parametrize("decode_attention", ["dense", "paged"])
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_equals_tp1(
    tiny_model_dir: Path, reference: dict[str, Any], tp: int, decode_attention: str
) -> None:
    tokens, logits = run(tiny_model_dir, tp, decode_attention)
    ref_tokens, ref_logits = reference[decode_attention]
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits) > NEW_TOKENS / 2  # the prefill step, then the decode steps
    worst = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True))
    assert worst < LOGIT_ATOL, f"TP={tp} logits differ from TP=1 by up to {worst:.2e}"


def test_worker_ranks_open_the_pool_rank_0_made() -> None:
    from engine.kv_cache import KVLayout, KVPool
    from engine.parallel.pools import attach, describe
    from engine.shm_pool import ShmKVPool

    layout = KVLayout(2, 2, 8, 4, "float32")
    made = ShmKVPool.create(layout, 6)
    try:
        opened = attach(describe(made), layout, 6)
        assert isinstance(opened, KVPool)
        opened.tensor[1, 0, 5].fill_(3.0)  # a worker's write is rank 0's to read
        assert float(made.tensor[1, 0, 5].sum()) == 3.0 * 4 * 2 * 8
        assert attach(describe(None), layout, 6) is None
        with pytest.raises(ValueError, match="shared memory or on a CUDA device"):
            describe(KVPool.allocate(layout, 6))
    finally:
        made.close()


def test_sharding_refuses_what_does_not_divide(random_checkpoints: dict[str, Path]) -> None:
    config = ModelConfig.from_dir(random_checkpoints["qwen2"])  # 4 heads, 2 KV heads
    shard = TPShard.of(config, 1, 2)
    assert (shard.num_heads, shard.num_kv_heads) == (2, 1)
    assert shard.slice_for("model.layers.0.self_attn.o_proj.weight") == (1, 32, 64)
    assert shard.slice_for("model.layers.0.input_layernorm.weight") is None
    with pytest.raises(ShardingError, match="num_key_value_heads 2 is not divisible by tp_size 4"):
        TPShard.of(config, 0, 4)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_dead_worker_takes_the_engine_out_of_service(tiny_model_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir), num_blocks=64, tp_size=2, num_threads=1))
    try:
        seq = Sequence([1, 5, 9, 30], SamplingParams(max_tokens=32, ignore_eos=True))
        engine.prefill([seq])
        engine.decode_step([seq])
        (pid,) = engine.executor.worker_pids  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while engine.dead is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.dead is not None and "rank 1" in engine.dead and "-9" in engine.dead
        with pytest.raises(EngineDeadError, match="rank 1"):
            engine.decode_step([seq])
    finally:
        engine.close()
    assert not _alive(pid)


def test_close_stops_every_worker(tiny_model_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model_dir=str(tiny_model_dir), num_blocks=64, tp_size=4, num_threads=1))
    pids = engine.executor.worker_pids  # type: ignore[union-attr]
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    engine.close()
    assert not any(_alive(p) for p in pids)
    with pytest.raises(EngineDeadError, match="shut down"):
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (one per rank)")
def test_tp2_on_cuda_nccl_equals_tp1(tiny_model_dir: Path) -> None:
    """The same engine on two GPUs (NCCL all-reduce) gives TP=1's greedy tokens."""
    prompts = [[1, 5, 9, 30], [1, *range(40, 61)]]
    outputs = []
    for tp, ids in ((1, ()), (2, (0, 1))):
        config = EngineConfig(
            model_dir=str(tiny_model_dir), device="cuda:0" if tp == 1 else "cuda", dtype="float32",
            num_blocks=64, tp_size=tp, device_ids=ids, decode_attention="paged",
        )  # fmt: skip
        engine = LLMEngine(config)
        try:
            outputs.append([s.output_ids for s in engine.generate(prompts, SamplingParams(max_tokens=16))])
        finally:
            engine.close()
    assert outputs[0] == outputs[1]
