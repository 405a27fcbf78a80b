"""Rotary position embeddings: default, linear, dynamic-NTK and llama3 frequency scaling.

Formulas follow the reference implementation exactly (same op order in fp32), because greedy
parity with transformers depends on bit-identical cos/sin tables.
"""

from __future__ import annotations

import math

import torch

from engine.config import RopeConfig


def inv_frequencies(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: int = 0
) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies; seq_len matters only for dynamic scaling."""
    base = rope.theta
    if rope.rope_type == "dynamic" and seq_len > max_position_embeddings:
        scale = (rope.factor * seq_len / max_position_embeddings) - (rope.factor - 1)
        base = base * scale ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope, max_position_embeddings)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig, max_position_embeddings: int) -> torch.Tensor:
    old_context = rope.original_max_position_embeddings or max_position_embeddings
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin lookup by position. Static scalings use one precomputed table; dynamic NTK
    depends on the sequence length, so its cos/sin are computed per call."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int, max_len: int) -> None:
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.dynamic = rope.rope_type == "dynamic"
        positions = torch.arange(max_len, dtype=torch.float)
        self._cos, self._sin = self._table(
            positions, inv_frequencies(rope, head_dim, max_position_embeddings)
        )

    @staticmethod
    def _table(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin (see TorchKernels.rotary), [P, D] fp32."""
        freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        sin = emb.sin()
        sin[:, : sin.shape[-1] // 2].neg_()
        return emb.cos(), sin

    def to(self, device: torch.device) -> RotaryEmbedding:
        self._cos, self._sin = self._cos.to(device), self._sin.to(device)
        return self

    def factors(
        self, positions: torch.Tensor, dtype: torch.dtype, seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin factors the rotary kernels take for N token positions: [N, 1, head_dim] in
        `dtype` (the reference also computes the tables in fp32 and casts them).

        seq_lens (dynamic scaling only): [N] length of the sequence each token belongs to in this
        forward pass (max position + 1), which sets that token's NTK base.
        """
        if not self.dynamic or seq_lens is None or int(seq_lens.max()) <= self.max_position_embeddings:
            cos, sin = self._cos[positions], self._sin[positions]
        else:
            cos = torch.empty(len(positions), self.head_dim, device=positions.device)
            sin = torch.empty_like(cos)
            for length in seq_lens.unique().tolist():
                mask = seq_lens == length
                inv = inv_frequencies(self.rope, self.head_dim, self.max_position_embeddings, int(length))
                c, s = self._table(positions[mask].float().cpu(), inv)
                cos[mask], sin[mask] = c.to(cos.device), s.to(sin.device)
        return cos[:, None].to(dtype), sin[:, None].to(dtype)
