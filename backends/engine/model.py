"""LLaMA-family decoder (Llama, Mistral, Qwen2) over a paged KV cache.

Tokens of a step are flattened: every tensor below is ``[N, ...]`` for the N tokens of the step
(the prompt tokens of all sequences in prefill, one token per sequence in decode). Parameter names
match Hugging Face checkpoints so safetensors load by name.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from backends.engine.config import ModelConfig
from backends.engine.kv_cache import KVPool
from backends.engine.rope import apply_rotary


class StepInput(NamedTuple):
    """What one forward pass needs besides token ids; built once per step, shared by all layers."""

    positions: torch.Tensor  # [N] long
    slot_mapping: torch.Tensor  # [N] long: block_id * block_size + offset, where each token's K/V goes
    cos: torch.Tensor  # [N, head_dim]
    sin: torch.Tensor  # [N, head_dim]
    prefill_lens: list[int] | None  # prefill: prompt length of each sequence (tokens are concatenated)
    block_tables: torch.Tensor | None  # paged decode: [B, max_blocks] long (padded with 0)
    key_mask: torch.Tensor | None  # decode: [B, 1, 1, keys] bool, True = attend
    last_token_index: torch.Tensor  # [B] index into N of each sequence's last token
    # dense decode (DenseDecodeCache; sequence i of the batch is its row i): keys transposed
    # [layers, rows, kvH, D, capacity], values [layers, rows, kvH, capacity, D], and an additive
    # mask [B, 1, 1, keys] (0 = attend, -inf = not) instead of key_mask.
    dense_keys_t: torch.Tensor | None = None
    dense_values: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # fused kernel; same result as below when no cast is involved
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding_window = cfg.sliding_window
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.qkv_proj: Projection | None = None  # set by fuse(): one GEMM instead of three

    def fuse(self) -> None:
        """Replaces q/k/v projections by one concatenated projection (after weights are loaded)."""
        self.qkv_proj = Projection(self.q_proj, self.k_proj, self.v_proj)
        self.o_proj = Projection(self.o_proj)  # type: ignore[assignment]
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, step: StepInput, pool: KVPool) -> torch.Tensor:
        n = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        # Rotate q and k heads in one pass: [N, H + kvH, D].
        qk = apply_rotary(qkv[:, : (h + kvh) * d].view(n, h + kvh, d), step.cos, step.sin)
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, (h + kvh) * d :].view(n, kvh, d)
        cache = pool.tensor[self.layer]  # [2, num_blocks, block_size, kv_heads, head_dim]
        flat = cache.view(2, -1, self.num_kv_heads, self.head_dim)
        flat[0, step.slot_mapping] = k.to(cache.dtype)
        flat[1, step.slot_mapping] = v.to(cache.dtype)
        if step.prefill_lens is not None:
            out = self._prefill_attention(q, k, v, step.prefill_lens)
        elif step.dense_values is not None:
            out = self._dense_decode_attention(q, k, v, step)
        else:
            out = self._decode_attention(q, cache, step)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))

    def _expand(self, kv: torch.Tensor) -> torch.Tensor:
        """[B, kv_heads, L, D] -> [B, heads, L, D] (grouped-query attention)."""
        groups = self.num_heads // self.num_kv_heads
        return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)

    def _prefill_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]
    ) -> torch.Tensor:
        # One causal attention per sequence: no padding, so each row sees exactly its own prompt.
        outs = []
        start = 0
        for length in lens:
            qs = q[start : start + length].transpose(0, 1)[None]  # [1, H, S, D]
            ks = self._expand(k[start : start + length].transpose(0, 1)[None])
            vs = self._expand(v[start : start + length].transpose(0, 1)[None])
            if self.sliding_window is not None and length > self.sliding_window:
                i = torch.arange(length, device=q.device)
                dist = i[:, None] - i[None, :]
                mask = (dist >= 0) & (dist < self.sliding_window)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            outs.append(o[0].transpose(0, 1))  # [S, H, D]
            start += length
        return torch.cat(outs, dim=0)

    def _decode_attention(self, q: torch.Tensor, cache: torch.Tensor, step: StepInput) -> torch.Tensor:
        assert step.block_tables is not None and step.key_mask is not None
        b, kvh, d = q.shape[0], self.num_kv_heads, self.head_dim
        # index_select copies whole blocks (rows); advanced indexing on dim 1 is ~30% slower here.
        kv = cache.index_select(1, step.block_tables.view(-1))  # [2, B * max_blocks, block_size, kvH, D]
        kv = kv.view(2, b, -1, kvh, d).transpose(2, 3).to(q.dtype)  # [2, B, kvH, L, D]
        # Grouped-query attention without copying K/V per query head: the G query heads sharing a
        # KV head become that head's "query positions" (the mask is per key, so no causality
        # between them is implied). Query head h uses KV head h // G, as in the reference.
        qg = q.view(b, kvh, self.num_heads // kvh, d)  # [B, kvH, G, D]
        o = F.scaled_dot_product_attention(qg, kv[0], kv[1], attn_mask=step.key_mask)  # [B, kvH, G, D]
        return o.reshape(b, self.num_heads, d)

    def _dense_decode_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepInput
    ) -> torch.Tensor:
        assert step.dense_keys_t is not None and step.dense_values is not None
        assert step.key_bias is not None
        b, kvh, d = q.shape[0], self.num_kv_heads, self.head_dim
        keys_t, values = step.dense_keys_t[self.layer], step.dense_values[self.layer]
        rows = step.last_token_index  # decode: token i is sequence i is row i
        keys_t[rows, :, :, step.positions] = k.to(keys_t.dtype)
        values[rows, :, step.positions] = v.to(values.dtype)
        length = step.key_bias.shape[-1]
        # Grouped-query as in _decode_attention: [B, kvH, G, D] @ [B, kvH, D, L] -> [B, kvH, G, L].
        qg = q.view(b, kvh, self.num_heads // kvh, d)
        scores = torch.matmul(qg, keys_t[:b, :, :, :length].to(q.dtype))
        scores.mul_(d**-0.5).add_(step.key_bias)
        probs = torch.softmax(scores, dim=-1)
        o = torch.matmul(probs, values[:b, :, :length].to(q.dtype))  # [B, kvH, G, D]
        return o.reshape(b, self.num_heads, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_proj: Projection | None = None

    def fuse(self) -> None:
        self.gate_up_proj = Projection(self.gate_proj, self.up_proj)
        self.down_proj = Projection(self.down_proj)  # type: ignore[assignment]
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Projection(nn.Module):
    """``x @ W.T + b`` for one or several concatenated nn.Linear (same input), W stored transposed.

    [in, out] row-major is the layout MKL multiplies fastest for the skinny [tokens, in]
    activations of decode (25-30% over nn.Linear's [out, in] on CPU); cuBLAS takes either.
    """

    weight_t: torch.Tensor  # [in, out]
    bias: torch.Tensor | None  # [out]

    def __init__(self, *linears: nn.Linear) -> None:
        super().__init__()
        with torch.no_grad():
            weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # [out, in]
            self.register_buffer("weight_t", weight.t().contiguous(), persistent=False)
            biases = [lin.bias.detach() for lin in linears if lin.bias is not None]
            bias = torch.cat(biases, dim=0) if len(biases) == len(linears) else None
            self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, step: StepInput, pool: KVPool) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step, pool)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder plus LM head. forward() returns logits of each sequence's last token only."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse(self) -> None:
        """Concatenates projections that read the same input and stores projection weights
        transposed (see Projection); call once, after loading weights."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.fuse()
            layer.mlp.fuse()
        if not self.config.tie_word_embeddings:  # a tied head would need a second copy
            self.lm_head = Projection(self.lm_head)  # type: ignore[assignment]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, step: StepInput, pool: KVPool) -> torch.Tensor:
        """input_ids: [N] -> logits [B, vocab] (fp32) for the last token of each sequence."""
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, step, pool)
        x = self.model.norm(x[step.last_token_index])
        return self.lm_head(x).float()
