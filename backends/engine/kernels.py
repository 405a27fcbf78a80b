"""The non-GEMM ops of a forward pass: RMSNorm, SwiGLU activation, rotary embedding, dense decode
attention.

``TorchKernels`` is the reference: PyTorch ops, any device and dtype. ``CompiledCpuKernels``
runs the same ops as fused fp32 CPU kernels (csrc/cpu_kernels.cpp), each one call instead of
several small ops; at batch 32 on a 2-core CPU those small ops cost more than the arithmetic.
``kernels_for`` picks one. The compiled kernels are built on first use by torch's extension
builder (a C++ compiler and AVX2 are needed; ``python -m backends.engine.kernels`` builds them
ahead of time) and cached under ``$TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
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


class TorchKernels:
    """Reference implementations. Shapes: x [N, hidden]; gate_up [N, 2I]; rotary x
    [N, heads, D] with cos/sin [N, 1, D] from RotaryEmbedding.factors; dense attention as in
    ``dense_decode_attention``."""

    compiled = False

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
        values [rows, kvH, capacity, D] (sequence b is row b); lengths [B] long; key_bias [B * kvH, 1, L] additive mask, L = max(lengths) (0 =
        attend, -inf = masked: past the length or outside the sliding window). Returns [B, H, D].
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
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: the reference ops still work
        log.warning("compiled CPU kernels unavailable, using PyTorch ops: %s", exc)
        return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    built = load_compiled()
    print("compiled CPU kernels:", "ready" if built is not None else "unavailable (PyTorch ops will be used)")
    raise SystemExit(0 if built is not None else 1)
