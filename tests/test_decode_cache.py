"""DenseDecodeCache: rows mirror the pool, survive batch changes, and decode like the paged path."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.sequence import Sequence


def _engine(model_dir: Path, mode: str) -> LLMEngine:
    config = EngineConfig(model_dir=str(model_dir), num_blocks=256, block_size=4, decode_attention=mode)
    return LLMEngine(config)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 11, 6, 17, 9, 25][:n]
    return [[1, *torch.randint(3, 1000, (k,), generator=g).tolist()] for k in lengths]


def _row_matches_pool(engine: LLMEngine, seq: Sequence) -> bool:
    assert engine.dense is not None
    row = engine.dense.order.index(seq.seq_id)
    n = seq.num_tokens - 1
    kv = engine.pool.gather(seq.block_table).flatten(2, 3)[:, :, :n]  # [L, 2, n, kvH, D]
    keys = engine.dense.keys_t[:, row, :, :, :n].permute(0, 3, 1, 2)  # [L, n, kvH, D]
    values = engine.dense.values[:, row, :, :n].transpose(1, 2)
    return torch.equal(keys, kv[:, 0]) and torch.equal(values, kv[:, 1])


def test_auto_is_dense_on_cpu(tiny_model_dir: Path) -> None:
    assert _engine(tiny_model_dir, "auto").dense is not None
    assert _engine(tiny_model_dir, "paged").dense is None
    with pytest.raises(ValueError, match="decode_attention"):
        EngineConfig(model_dir=str(tiny_model_dir), decode_attention="flash")


def test_rows_mirror_the_pool_through_joins_leaves_and_growth(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, "dense")
    assert engine.dense is not None
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    seqs = [Sequence(p, params) for p in _prompts(6)]
    engine.prefill(seqs)
    capacity_before = engine.dense.capacity
    batches = [seqs[:2], seqs[:5], [seqs[4], seqs[0], seqs[3]], seqs[1:], seqs]
    for batch in batches:
        for _ in range(14):
            engine.decode_step(batch)
        assert set(engine.dense.order) == {s.seq_id for s in batch}
        assert all(_row_matches_pool(engine, s) for s in batch)
    assert engine.dense.capacity > capacity_before, "contexts grew past the first capacity"
    for seq in seqs:
        engine.free(seq)
    assert engine.dense.order == []
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_row_is_reloaded_when_its_history_changed(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, "dense")
    assert engine.dense is not None
    seq = Sequence(_prompts(1)[0], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.prefill([seq])
    engine.decode_step([seq])
    # Rewind one token (as a caller re-running a step would): the cached row no longer matches.
    seq.output_ids.pop()
    engine.decode_step([seq])
    assert _row_matches_pool(engine, seq)
    with pytest.raises(ValueError, match="twice"):
        engine.decode_step([seq, seq])


def test_dense_decodes_exactly_like_paged_under_continuous_batching(tiny_model_dir: Path) -> None:
    """The same schedule of joins, leaves and reorders gives the same tokens in both modes."""
    outputs = {}
    for mode in ("dense", "paged"):
        engine = _engine(tiny_model_dir, mode)
        rng = random.Random(7)
        params = SamplingParams(max_tokens=60, ignore_eos=True, temperature=0.8, top_p=0.9, seed=5)
        seqs = [Sequence(p, params) for p in _prompts(6, seed=3)]
        engine.prefill(seqs[:3])
        running = list(seqs[:3])
        waiting = list(seqs[3:])
        for step in range(50):
            if waiting and step % 7 == 3:
                joining = waiting.pop(0)
                engine.prefill([joining])
                running.append(joining)
            rng.shuffle(running)
            engine.decode_step(running)
            for seq in [s for s in running if s.finished]:
                running.remove(seq)
                engine.free(seq)
        outputs[mode] = [s.output_ids for s in seqs]
    assert outputs["dense"] == outputs["paged"]
    assert all(len(o) > 10 for o in outputs["dense"])


def test_batches_over_the_memory_budget_decode_paged_and_come_back(tiny_model_dir: Path) -> None:
    """The dense cache may not outgrow the pool: a batch that would decodes over the pool, and
    sequences bound again afterwards are reloaded, with the same tokens as the paged engine."""
    outputs = {}
    for mode in ("dense", "paged"):
        config = EngineConfig(
            model_dir=str(tiny_model_dir), num_blocks=48, block_size=4, decode_attention=mode
        )
        engine = LLMEngine(config)  # a pool of 192 token slots
        g = torch.Generator().manual_seed(9)
        prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (30, 20, 10)]
        seqs = [Sequence(p, SamplingParams(max_tokens=60, ignore_eos=True)) for p in prompts]
        engine.prefill(seqs)
        fell_back = False
        for _ in range(40):
            longest = max(s.num_tokens for s in seqs)
            if engine.dense is not None and not engine.dense.fits(3, longest):
                fell_back = True
            engine.decode_step(seqs)
        for seq in seqs[1:]:
            engine.free(seq)
        for _ in range(9):
            engine.decode_step(seqs[:1])
        if engine.dense is not None:
            assert fell_back, "three rows padded to 128 tokens exceed 192 slots"
            assert engine.dense.order == [seqs[0].seq_id] and _row_matches_pool(engine, seqs[0])
            assert engine.dense.rows * engine.dense.capacity <= 192
        outputs[mode] = [s.output_ids for s in seqs]
    assert outputs["dense"] == outputs["paged"]
