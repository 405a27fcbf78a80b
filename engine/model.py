"""LLaMA-family decoder (Llama, Mistral, Qwen2) over a paged KV cache.

Tokens of a step are flattened: every tensor below is ``[N, ...]`` for the N tokens of the step
(the prompt tokens of all sequences in prefill, one token per sequence in decode). Parameter names
match Hugging Face checkpoints so safetensors load by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.kernels import DecoderDims, TorchKernels
from engine.kv_cache import KVPool
from engine.sharding import Stage, TPShard, single, whole_model

# Sums a tensor over the tensor-parallel ranks, in place (row-parallel projections).
AllReduce = Callable[[torch.Tensor], None]


class PrefillStep(NamedTuple):
    """A prefill forward pass: the prompts of the batch, concatenated."""

    slot_mapping: torch.Tensor  # [N] long: block_id * block_size + offset, where each token's K/V goes
    cos: torch.Tensor  # [N, 1, head_dim] at each token's position, model dtype (RotaryEmbedding.factors)
    sin: torch.Tensor  # [N, 1, head_dim] in the model's dtype, first half negated
    prefill_lens: list[int]  # prompt length of each sequence
    last_token_index: torch.Tensor  # [B] index into N of each sequence's last token


class PagedDecodeStep(NamedTuple):
    """A decode step reading K/V from the paged pool (one token per sequence: N = B)."""

    slot_mapping: torch.Tensor  # [B]
    cos: torch.Tensor  # [B, 1, head_dim]
    sin: torch.Tensor  # [B, 1, head_dim]
    block_tables: torch.Tensor  # [B, max_blocks] long (padded with 0)
    key_mask: torch.Tensor  # [B, 1, 1, keys] bool, True = attend


class DenseDecodeStep(NamedTuple):
    """A decode step reading K/V from a DenseDecodeCache: sequence i of the batch is its row i."""

    slot_mapping: torch.Tensor  # [B]
    cos: torch.Tensor  # [B, 1, head_dim]
    sin: torch.Tensor  # [B, 1, head_dim]
    keys_t: torch.Tensor  # [layers, rows, kvH, D, capacity] (keys stored transposed)
    values: torch.Tensor  # [layers, rows, kvH, capacity, D]
    context_lens: torch.Tensor  # [B] each sequence's context length including this token
    # For TorchKernels an additive mask [B * kvH, 1, keys] (0 = attend, -inf = not); None for the
    # compiled kernel, which masks by length (and window) itself.
    key_bias: torch.Tensor | None = None


# What one forward pass needs besides token ids; built once per step, shared by all layers.
StepInput = PrefillStep | PagedDecodeStep | DenseDecodeStep


class RMSNorm(nn.Module):
    kernels: TorchKernels = TorchKernels()  # set by CausalLM.fuse()

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    qkv_proj: Projection  # set by fuse()
    kernels: TorchKernels = TorchKernels()  # set by CausalLM.fuse()

    def __init__(self, cfg: ModelConfig, layer: int, shard: TPShard, all_reduce: AllReduce | None) -> None:
        """`layer`: this layer's index in the stage's KV pool (its first layer is 0)."""
        super().__init__()
        self.layer = layer
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads, self.num_kv_heads, self.head_dim = shard.num_heads, shard.num_kv_heads, cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.all_reduce = all_reduce
        h, d = cfg.hidden_size, cfg.head_dim
        # Checkpoint-shaped projections (this rank's slice), replaced by fuse() once loaded.
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=cfg.o_proj_bias)

    def fuse(self, kernels: TorchKernels) -> None:
        """Replaces q/k/v projections by one concatenated projection (after weights are loaded)."""
        self.kernels = kernels
        self.qkv_proj = Projection(self.q_proj, self.k_proj, self.v_proj, kernels=kernels)
        self.o_proj = Projection(self.o_proj, kernels=kernels, all_reduce=self.all_reduce)  # type: ignore[assignment]
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor, step: StepInput, pool: KVPool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: normed hidden states [N, hidden]. Adds the attention output to `residual` in place
        and returns it, with the
        step's K [N, kvH, D] (rotated) and V [N, kvH, D], which the caller writes to the pool
        (paged decode excepted: it reads the pool, so its K/V are written here first)."""
        n = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        # Rotate q and k heads in one pass: [N, H + kvH, D].
        qk = self.kernels.rotary(qkv[:, : (h + kvh) * d].view(n, h + kvh, d), step.cos, step.sin)
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, (h + kvh) * d :].view(n, kvh, d)
        if isinstance(step, PrefillStep):
            out = self._prefill_attention(q, k, v, step.prefill_lens)
        elif isinstance(step, DenseDecodeStep):
            out = self._dense_decode_attention(q, k, v, step)
        else:
            self.kernels.write_kv(pool.tensor[self.layer : self.layer + 1], step.slot_mapping, [k], [v])
            out = self._decode_attention(q, pool.tensor[self.layer], step)
        return self.o_proj(out.reshape(n, h * d), residual), k, v

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

    def _decode_attention(self, q: torch.Tensor, cache: torch.Tensor, step: PagedDecodeStep) -> torch.Tensor:
        b, kvh, d = q.shape[0], self.num_kv_heads, self.head_dim
        # index_select copies whole blocks (rows); advanced indexing on dim 1 is ~30% slower here.
        kv = cache.index_select(1, step.block_tables.view(-1))  # [2, B * max_blocks, block_size, kvH, D]
        kv = kv.view(2, b, -1, kvh, d).transpose(2, 3)  # [2, B, kvH, L, D]
        # Grouped-query attention without copying K/V per query head: the G query heads sharing a
        # KV head become that head's "query positions" (the mask is per key, so no causality
        # between them is implied). Query head h uses KV head h // G, as in the reference.
        qg = q.reshape(b, kvh, self.num_heads // kvh, d)  # [B, kvH, G, D]
        o = F.scaled_dot_product_attention(qg, kv[0], kv[1], attn_mask=step.key_mask)  # [B, kvH, G, D]
        return o.reshape(b, self.num_heads, d)

    def _dense_decode_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: DenseDecodeStep
    ) -> torch.Tensor:
        keys_t, values = step.keys_t[self.layer], step.values[self.layer]
        return self.kernels.dense_decode_attention(q, k, v, keys_t, values, step.context_lens, step.key_bias)


class MLP(nn.Module):
    gate_up_proj: Projection  # set by fuse()
    kernels: TorchKernels = TorchKernels()  # set by CausalLM.fuse()

    def __init__(self, cfg: ModelConfig, shard: TPShard, all_reduce: AllReduce | None) -> None:
        super().__init__()
        inter = shard.intermediate_size  # this rank's columns
        self.all_reduce = all_reduce
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=cfg.mlp_bias)

    def fuse(self, kernels: TorchKernels) -> None:
        self.kernels = kernels
        self.gate_up_proj = Projection(self.gate_proj, self.up_proj, kernels=kernels)
        self.down_proj = Projection(self.down_proj, kernels=kernels, all_reduce=self.all_reduce)  # type: ignore[assignment]
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += MLP(x), in place; returns residual."""
        gate_up = self.gate_up_proj(x)  # [N, 2 * intermediate]
        return self.down_proj(self.kernels.silu_mul(gate_up), residual)


class Projection(nn.Module):
    """``x @ W.T + b`` for one or several concatenated nn.Linear (same input).

    The weight is kept in the form the kernels multiply fastest (``prepare_weight``): transposed,
    ``[in, out]``, for PyTorch (25-30% over nn.Linear's ``[out, in]`` for decode's skinny
    activations with MKL; cuBLAS takes either), MKL's packed layout for the compiled CPU kernels.
    """

    weight: torch.Tensor  # opaque: what kernels.prepare_weight returned
    bias: torch.Tensor | None  # [out]

    def __init__(
        self, *linears: nn.Linear, kernels: TorchKernels, all_reduce: AllReduce | None = None
    ) -> None:
        """`all_reduce`: this is a row-parallel projection, whose partial output is summed over the
        tensor-parallel ranks before its bias and the residual are added (each counted once)."""
        super().__init__()
        self.kernels = kernels
        self.all_reduce = all_reduce
        with torch.no_grad():
            weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # [out, in]
            self.out_features, self.in_features = weight.shape
            self.register_buffer("weight", kernels.prepare_weight(weight.t().contiguous()), persistent=False)
            biases = [lin.bias.detach() for lin in linears if lin.bias is not None]
            bias = torch.cat(biases, dim=0) if len(biases) == len(linears) else None
            self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ b), or with a residual: residual += x @ W.T (+ b) in place, returning it.
        Without a bias the GEMM accumulates into the residual itself (beta = 1), which rounds
        exactly like adding afterwards: no extra op, no new tensor."""
        k, n = self.in_features, self.out_features
        if self.all_reduce is not None:
            out = self.kernels.linear(x, self.weight, k, n, None)
            self.all_reduce(out)
            if self.bias is not None:
                out += self.bias
            return out if residual is None else residual.add_(out)
        if self.bias is None:
            return self.kernels.linear(x, self.weight, k, n, residual)
        out = self.kernels.linear(x, self.weight, k, n, None) + self.bias
        return out if residual is None else residual.add_(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, shard: TPShard, all_reduce: AllReduce | None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, shard, all_reduce)
        self.mlp = MLP(cfg, shard, all_reduce)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, step: StepInput, pool: KVPool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the layer's output and its K/V for this step (see Attention.forward)."""
        x, k, v = self.self_attn(self.input_layernorm(x), x, step, pool)
        return self.mlp(self.post_attention_layernorm(x), x), k, v


class Backbone(nn.Module):
    """The embedding (first stage), this stage's decoder layers, the final norm (last stage).

    Layers are keyed by their index in the checkpoint ("model.layers.12...") so that weights
    load by name; each uses its position within the stage as its index into the stage's KV pool."""

    def __init__(self, cfg: ModelConfig, shard: TPShard, stage: Stage, all_reduce: AllReduce | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if stage.is_first else None
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg, i - stage.first_layer, shard, all_reduce) for i in stage.layers}
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if stage.is_last else None


class CausalLM(nn.Module):
    """The decoder plus LM head. forward() returns logits of each sequence's last token only.
    Call fuse() once the weights are loaded, before the first forward().

    With tensor parallelism (`shard` of size > 1) this is one rank's share (see
    engine/sharding.py): `all_reduce` sums the row-parallel projections over the ranks, and only
    rank 0 has the LM head (it samples). With pipeline parallelism (`stage`) it holds the stage's
    layers: the first stage takes token ids, the others the previous stage's hidden states, and
    every stage but the last returns its hidden states. Ranks without the LM head return None."""

    kernels: TorchKernels = TorchKernels()  # set by fuse()
    dense_decoder: Any = None  # set by fuse() where the kernels run whole decode steps

    def __init__(
        self,
        cfg: ModelConfig,
        shard: TPShard | None = None,
        all_reduce: AllReduce | None = None,
        stage: Stage | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.shard = shard or single(cfg)
        self.stage = stage or whole_model(cfg)
        self.model = Backbone(cfg, self.shard, self.stage, all_reduce)
        self.lm_head: nn.Module | None = None
        if self.stage.is_last and self.shard.is_first:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings and self.model.embed_tokens is not None:
                self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return [layer for layer in self.model.layers.values() if isinstance(layer, DecoderLayer)]

    def fuse(self, kernels: TorchKernels) -> None:
        """Concatenates projections that read the same input into one weight each, prepared for
        `kernels` (see Projection), and makes every op of the forward pass run on `kernels`."""
        self.kernels = kernels
        for layer in self.decoder_layers:
            layer.self_attn.fuse(kernels)
            layer.mlp.fuse(kernels)
            layer.input_layernorm.kernels = layer.post_attention_layernorm.kernels = kernels
        if self.model.norm is not None:
            self.model.norm.kernels = kernels
        cfg = self.config
        if self.shard.size == 1:  # a whole-step decoder has no place for the ranks' all-reduces
            dims = DecoderDims(
                cfg.hidden_size,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                cfg.intermediate_size,
                cfg.rms_norm_eps,
            )
            self.dense_decoder = kernels.dense_decoder(
                dims, [_decoder_weights(layer) for layer in self.decoder_layers]
            )
        tied = cfg.tie_word_embeddings and self.model.embed_tokens is not None
        if isinstance(self.lm_head, nn.Linear) and not tied:  # tied: it would be a second copy
            self.lm_head = Projection(self.lm_head, kernels=kernels)

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, step: StepInput, pool: KVPool) -> torch.Tensor | None:
        """inputs: token ids [N] (first stage) or the previous stage's hidden states [N, hidden].
        Returns this stage's hidden states [N, hidden] (all but the last stage), or the logits
        [B, vocab] (fp32) of each sequence's last token (the last stage's rank 0), or None (the
        last stage's other tensor-parallel ranks, which only write their share of the KV)."""
        x = self.model.embed_tokens(inputs) if self.model.embed_tokens is not None else inputs
        if isinstance(step, DenseDecodeStep) and self.dense_decoder is not None:
            x = self.dense_decoder.forward(
                x,
                step.cos,
                step.sin,
                step.keys_t,
                step.values,
                step.context_lens,
                pool.tensor,
                step.slot_mapping,
            )
        else:
            keys, values = [], []
            for layer in self.decoder_layers:
                x, k, v = layer(x, step, pool)
                keys.append(k)
                values.append(v)
            if not isinstance(step, PagedDecodeStep):  # paged decode wrote its K/V layer by layer
                self.kernels.write_kv(pool.tensor, step.slot_mapping, keys, values)
        if not self.stage.is_last:
            return x
        if self.lm_head is None or self.model.norm is None:
            return None
        if isinstance(step, PrefillStep):
            x = x[step.last_token_index]
        logits = self.lm_head(self.model.norm(x))
        return logits if logits.dtype == torch.float32 else logits.float()


def _decoder_weights(layer: nn.Module) -> list[torch.Tensor]:
    """One layer's weights in the order TorchKernels.dense_decoder takes them."""
    assert isinstance(layer, DecoderLayer)
    attn, mlp = layer.self_attn, layer.mlp
    none = torch.empty(0)
    return [
        layer.input_layernorm.weight,
        attn.qkv_proj.weight,
        none if attn.qkv_proj.bias is None else attn.qkv_proj.bias,
        attn.o_proj.weight,
        none if attn.o_proj.bias is None else attn.o_proj.bias,
        layer.post_attention_layernorm.weight,
        mlp.gate_up_proj.weight,
        none if mlp.gate_up_proj.bias is None else mlp.gate_up_proj.bias,
        mlp.down_proj.weight,
        none if mlp.down_proj.bias is None else mlp.down_proj.bias,
    ]
