"""The compiled CPU kernels against the PyTorch reference ops they replace."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import EngineConfig, RopeConfig
from engine.engine import LLMEngine
from engine.kernels import CompiledCpuKernels, TorchKernels, kernels_for, load_compiled
from engine.rope import RotaryEmbedding
from engine.sampling import SamplingParams
from engine.sequence import Sequence

# What building the kernels needs; where all of it exists, they must build.
CAN_BUILD = (
    shutil.which("c++") is not None
    and (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()
    and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
)
pytestmark = pytest.mark.skipif(
    not CAN_BUILD, reason="needs a C++ compiler, Python's headers and an AVX2 CPU"
)


@pytest.fixture(scope="module")
def compiled() -> CompiledCpuKernels:
    module = load_compiled()
    assert module is not None, "the CPU kernels must build where a compiler and AVX2 exist"
    return CompiledCpuKernels(module, window=None)


def test_kernels_for_picks_compiled_only_for_fp32_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert kernels_for(cpu, torch.float32, True, None).compiled
    assert not kernels_for(cpu, torch.float32, False, None).compiled
    assert not kernels_for(cpu, torch.bfloat16, True, None).compiled


def test_rms_norm_and_silu_mul_match_reference(compiled: CompiledCpuKernels) -> None:
    ref = TorchKernels()
    g = torch.Generator().manual_seed(0)
    for rows in (1, 7, 300):  # 300 rows spread over threads
        x = torch.randn(rows, 200, generator=g) * 3
        w = torch.randn(200, generator=g)
        torch.testing.assert_close(
            compiled.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), rtol=2e-6, atol=1e-6
        )
        gate_up = torch.randn(rows, 2 * 90, generator=g) * 4
        torch.testing.assert_close(compiled.silu_mul(gate_up), ref.silu_mul(gate_up), rtol=2e-6, atol=1e-6)
    # Rows may be strided views (the norm reads a slice of a wider tensor).
    wide = torch.randn(5, 400, generator=g)
    torch.testing.assert_close(
        compiled.rms_norm(wide[:, :200], w, 1e-5), ref.rms_norm(wide[:, :200], w, 1e-5)
    )


def test_rotary_is_bit_identical_in_place(compiled: CompiledCpuKernels) -> None:
    rope = RotaryEmbedding(RopeConfig(theta=500000.0), head_dim=32, max_position_embeddings=256, max_len=256)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(9, 16 * 32, generator=g)
    cos, sin = rope.factors(torch.tensor([0, 1, 2, 50, 51, 100, 200, 254, 255]), torch.float32)
    view = qkv[:, : 12 * 32].view(9, 12, 32)  # q and k heads of a fused projection: strided rows
    expected = TorchKernels().rotary(view, cos, sin)
    out = compiled.rotary(view, cos, sin)
    assert out.data_ptr() == view.data_ptr()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("window", [None, 5])
def test_dense_decode_attention_matches_reference(window: int | None) -> None:
    module = load_compiled()
    assert module is not None
    ours, ref = CompiledCpuKernels(module, window), TorchKernels()
    g = torch.Generator().manual_seed(2)
    b, heads, kvh, d, cap = 6, 8, 2, 16, 40
    lengths = torch.tensor([1, 3, 9, 17, 33, 40])
    q = torch.randn(b, heads, d, generator=g)
    k, v = torch.randn(b, kvh, d, generator=g), torch.randn(b, kvh, d, generator=g)
    keys_t, values = (
        torch.randn(b + 2, kvh, d, cap, generator=g),
        torch.randn(b + 2, kvh, cap, d, generator=g),
    )
    ref_keys_t, ref_values = keys_t.clone(), values.clone()
    key_pos = torch.arange(int(lengths.max()))[None, :]
    mask = key_pos < lengths[:, None]
    if window is not None:
        mask &= key_pos > lengths[:, None] - 1 - window
    bias = (
        torch.zeros(mask.shape).masked_fill_(~mask, float("-inf")).repeat_interleave(kvh, dim=0)[:, None, :]
    )
    out = ours.dense_decode_attention(q, k, v, keys_t, values, lengths, None)
    expected = ref.dense_decode_attention(q, k, v, ref_keys_t, ref_values, lengths, bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(keys_t, ref_keys_t) and torch.equal(values, ref_values), "both append K/V in place"


def test_bad_inputs_raise_clear_errors(compiled: CompiledCpuKernels) -> None:
    with pytest.raises(RuntimeError, match="float32"):
        compiled.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        compiled.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    keys_t, values = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 8, 4)
    q, kv = torch.zeros(1, 2, 4), torch.zeros(1, 1, 4)
    with pytest.raises(RuntimeError, match="length 9 outside"):
        compiled.dense_decode_attention(q, kv, kv, keys_t, values, torch.tensor([9]), None)


@pytest.mark.parametrize("rows", [1, 5, 32, 300])
def test_packed_linear_matches_matmul_and_accumulates_in_place(
    compiled: CompiledCpuKernels, rows: int
) -> None:
    g = torch.Generator().manual_seed(3)
    weight_t = torch.randn(96, 136, generator=g)
    packed = compiled.prepare_weight(weight_t)
    x = torch.randn(rows, 96, generator=g)
    torch.testing.assert_close(compiled.linear(x, packed, 96, 136, None), x @ weight_t)
    residual = torch.randn(rows, 136, generator=g)
    expected = residual + x @ weight_t
    out = compiled.linear(x, packed, 96, 136, residual)
    assert out.data_ptr() == residual.data_ptr(), "the residual is accumulated into, not copied"
    torch.testing.assert_close(out, expected)


def test_write_kv_matches_reference(compiled: CompiledCpuKernels) -> None:
    g = torch.Generator().manual_seed(4)
    layers, blocks, block_size, kvh, d, n = 3, 6, 4, 2, 8, 5
    pool = torch.zeros(layers, 2, blocks, block_size, kvh, d)
    ref_pool = pool.clone()
    slots = torch.tensor([0, 7, 8, 23, 13])
    qkv = torch.randn(layers, n, 3 * kvh * d, generator=g)  # K and V as views of a fused projection
    keys = [qkv[i, :, : kvh * d].view(n, kvh, d) for i in range(layers)]
    values = [qkv[i, :, kvh * d : 2 * kvh * d].view(n, kvh, d) for i in range(layers)]
    compiled.write_kv(pool, slots, keys, values)
    TorchKernels().write_kv(ref_pool, slots, keys, values)
    assert torch.equal(pool, ref_pool) and pool.abs().sum() > 0
    with pytest.raises(RuntimeError, match="outside the pool"):
        compiled.write_kv(pool, torch.tensor([0, 1, 2, 3, 24]), keys, values)


def test_dense_decoder_computes_what_the_per_op_forward_does(random_checkpoints: dict[str, Path]) -> None:
    """The whole-step decoder runs the same kernels in the same order as the model's Python
    forward: the same logits, bit for bit (biases, GQA and a sliding window included)."""
    for name in ("llama-bias", "mistral-window"):
        logits: dict[bool, list[torch.Tensor]] = {}
        for fused in (True, False):
            engine = LLMEngine(
                EngineConfig(model_dir=str(random_checkpoints[name]), num_blocks=128, block_size=4)
            )
            assert engine.runner.kernels.compiled and engine.runner.model.dense_decoder is not None
            if not fused:
                engine.runner.model.dense_decoder = None
            seen = logits.setdefault(fused, [])
            sample = engine._sample_and_append

            def capture(
                seqs: list[Sequence], out: torch.Tensor, sample: Any = sample, seen: Any = seen
            ) -> list[int]:
                seen.append(out.clone())
                return sample(seqs, out)

            engine._sample_and_append = capture  # type: ignore[method-assign]
            engine.generate(
                [[1, 5, 9, 30], [1, *range(40, 61)]], SamplingParams(max_tokens=12, ignore_eos=True)
            )
        assert len(logits[True]) == len(logits[False]) > 10
        assert all(torch.equal(a, b) for a, b in zip(logits[True], logits[False], strict=True))
