"""The kernels of a forward pass: projections, RMSNorm, SwiGLU activation, rotary embedding, dense
decode attention.

``TorchKernels`` is the reference: PyTorch ops, any device and dtype. ``CompiledCpuKernels`` runs
the same ops as fused fp32 CPU kernels (csrc/), each one call instead of several small ops (at
batch 32 on a 2-core CPU those small ops cost more than the arithmetic), the projections as GEMMs
over weights packed once in MKL's layout, and a whole dense decode step in one call.
``kernels_for`` picks one. The compiled kernels are built on first use by torch's extension builder
(a C++ compiler and AVX2 are needed; ``python -m engine.kernels`` builds them ahead of
time) into ``csrc/build``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(str(path) for path in _CSRC.glob("*.cpp"))
# -ffp-contract=off: no fused multiply-add, so the rotary embedding rounds like the reference.
# -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: the kernels
# share PyTorch's intra-op thread pool (at::parallel_for) rather than starting a second one.
_CFLAGS = [
    "-O3",
    "-mavx2",
    "-mfma",
    "-mf16c",
    "-ffp-contract=off",
    "-fopenmp",
    "-DCPU_CAPABILITY=AVX2",
    "-DCPU_CAPABILITY_AVX2",
]


class DecoderDims(NamedTuple):
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float


class TorchKernels:
    """Reference implementations. Shapes: x [N, hidden]; gate_up [N, 2I]; rotary x
    [N, heads, D] with cos/sin [N, 1, D] from RotaryEmbedding.factors; dense attention as in
    ``dense_decode_attention``."""

    compiled = False

    def prepare_weight(self, weight_t: torch.Tensor) -> torch.Tensor:
        """A weight [in, out] in the form ``linear`` takes (here: as is)."""
        return weight_t

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, k: int, n: int, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """x [M, k] @ weight [k, n]; with a residual [M, n]: residual += x @ weight in place (the
        GEMM accumulates: beta = 1), returning it."""
        return x @ weight if residual is None else residual.addmm_(x, weight)

    def write_kv(
        self, cache: torch.Tensor, slots: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> None:
        """Writes one step's K/V of consecutive layers into the pool.

        cache: [layers, 2, num_blocks, block_size, kvH, D] (the pool or a slice of its layers);
        keys[i], values[i]: [N, kvH, D] of layer i, in the pool's dtype; slots: [N] long.
        """
        layers, _, blocks, block_size, kvh, d = cache.shape
        kv = torch.stack(
            [t for pair in zip(keys, values, strict=True) for t in pair]
        )  # [2 * layers, N, kvH, D]
        cache.view(layers, 2, blocks * block_size, kvh, d)[:, :, slots] = kv.view(layers, 2, -1, kvh, d)

    def dense_decoder(self, dims: DecoderDims, layers: list[list[torch.Tensor]]) -> Any | None:
        """An object whose ``forward(x, cos, sin, keys_t, values, lengths, pool, slots)`` runs all
        layers of a dense decode step at once, or None (run them one op at a time). ``layers``:
        per layer, input norm, qkv, qkv bias, o, o bias, post norm, gate_up, gate_up bias, down,
        down bias (weights from prepare_weight; an absent bias is an empty tensor)."""
        return None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dtype == torch.float32:  # fused kernel; same result as below when no cast is involved
            return F.rms_norm(x, weight.shape, weight, eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        i = gate_up.shape[-1] // 2
        return F.silu(gate_up[:, :i]) * gate_up[:, i:]

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The reference computes ``x * cos + cat(-x2, x1) * sin`` (x1, x2 the halves of x). The
        minus sign lives in the sin table and ``roll`` swaps the halves: bit-identical
        (negation is exact) in one op instead of four."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin

    def dense_decode_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keys_t: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor,
        key_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """Appends each sequence's K/V at position lengths[b] - 1 of row b, then attends.

        q [B, H, D]; k, v [B, kvH, D]; keys_t [rows, kvH, D, capacity] (transposed: for q @ K^T),
        values [rows, kvH, capacity, D] (sequence b is row b); lengths [B] long; key_bias
        [B * kvH, 1, L] additive mask, L = max(lengths) (0 = attend, -inf = masked: past the
        length or outside the sliding window). Returns [B, H, D].
        """
        assert key_bias is not None
        b, h, d = q.shape
        kvh, length = keys_t.shape[1], key_bias.shape[-1]
        rows = torch.arange(b, device=q.device)
        keys_t[rows, :, :, lengths - 1] = k
        values[rows, :, lengths - 1] = v
        # Grouped-query with (sequence, KV head) as the GEMM batch: the G query heads sharing a
        # KV head are its "query positions" ([B * kvH, G, D] @ [B * kvH, D, L]); query head h
        # reads KV head h // G, as in the reference. Scaling and mask in the same call.
        qg = q.reshape(b * kvh, h // kvh, d)
        keys = keys_t[:b, :, :, :length].reshape(b * kvh, d, length)  # a view: rows are contiguous
        scores = torch.baddbmm(key_bias, qg, keys, alpha=d**-0.5)
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, values[:b, :, :length].reshape(b * kvh, length, d)).view(b, h, d)


class CompiledCpuKernels(TorchKernels):
    """Fused fp32 CPU kernels; other dtypes and devices fall through to TorchKernels."""

    compiled = True

    def __init__(self, module: ModuleType, window: int | None) -> None:
        self._ops = module
        self._window = window or 0
        self._packed = bool(module.has_packed_gemm())

    def prepare_weight(self, weight_t: torch.Tensor) -> torch.Tensor:
        return self._ops.pack_weight(weight_t) if self._packed else weight_t

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, k: int, n: int, residual: torch.Tensor | None
    ) -> torch.Tensor:
        if not self._packed:
            return super().linear(x, weight, k, n, residual)
        return self._ops.packed_linear(x, weight, k, n, residual)

    def write_kv(
        self, cache: torch.Tensor, slots: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> None:
        self._ops.write_kv(cache, slots, keys, values)

    def dense_decoder(self, dims: DecoderDims, layers: list[list[torch.Tensor]]) -> Any | None:
        if not self._packed:
            return None
        return self._ops.DenseDecoder(*dims, self._window, layers)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._ops.rms_norm(x, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._ops.silu_mul(gate_up)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        self._ops.rotary_(x, cos, sin)  # in place: x is a fresh projection output
        return x

    def dense_decode_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keys_t: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor,
        key_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        return self._ops.dense_decode_attention(q, k, v, keys_t, values, lengths, self._window, scale)


def kernels_for(device: torch.device, dtype: torch.dtype, compiled: bool, window: int | None) -> TorchKernels:
    """The compiled kernels for fp32 on CPU when `compiled` and they build; else the reference."""
    if compiled and device.type == "cpu" and dtype == torch.float32:
        module = load_compiled()
        if module is not None:
            return CompiledCpuKernels(module, window)
    return TorchKernels()


def _build_directory() -> str | None:
    """csrc/build of this checkout, so that two checkouts on one machine do not rebuild each
    other's kernels; torch's shared cache ($TORCH_EXTENSIONS_DIR) where that is not writable."""
    build = _CSRC / "build"
    try:
        build.mkdir(exist_ok=True)
    except OSError:
        return None
    return str(build) if os.access(build, os.W_OK) else None


@functools.cache
def load_compiled() -> ModuleType | None:
    """Builds (first time) and loads the CPU kernels; None where they cannot be built."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.warning("CPU without AVX2: using PyTorch ops instead of the compiled kernels")
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="triton_disagg_cpu_kernels",
            sources=_SOURCES,
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=_build_directory(),
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: the reference ops still work
        log.warning("compiled CPU kernels unavailable, using PyTorch ops: %s", exc)
        return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    built = load_compiled()
    print("compiled CPU kernels:", "ready" if built is not None else "unavailable (PyTorch ops will be used)")
    raise SystemExit(0 if built is not None else 1)
