"""The model of one rank over its KV pool: runs the step plans rank 0 decides.

A ModelRunner holds what a forward pass needs (the weights of this rank's shard, its KV pool, the
rotary tables, the dense decode cache) and nothing of scheduling or sampling. Every rank of a
tensor-parallel engine runs the same plans in the same order, so their pools and dense decode
rows stay identical in layout; only rank 0 computes logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from engine.config import EngineConfig, ModelConfig
from engine.decode_cache import DenseDecodeCache
from engine.kernels import kernels_for
from engine.kv_cache import DTYPES, KVLayout, KVPool
from engine.model import CausalLM, DenseDecodeStep, PagedDecodeStep, PrefillStep, StepInput
from engine.rope import RotaryEmbedding
from engine.sharding import Stage, TPShard, whole_model
from engine.step_plan import StepKind, StepPlan
from engine.weights import load_weights

log = logging.getLogger(__name__)

AllReduce = Callable[[torch.Tensor], None]


class SeqView(NamedTuple):
    """What the dense decode cache needs of a sequence (it never reads tokens)."""

    seq_id: int
    num_tokens: int
    block_table: list[int]


class ForwardOutput(NamedTuple):
    """What a step produced on this rank, with the sequence ids in their row order: the logits
    ([B, vocab] fp32; the last stage's rank 0), or the hidden states for the next stage ([N,
    hidden]; every rank of the other stages), or neither."""

    logits: torch.Tensor | None
    seq_ids: list[int]
    hidden: torch.Tensor | None = None
    stage_times: list[tuple[float, float]] | None = None  # (start, end) per stage, from the executor


def kv_layout_for(config: EngineConfig, model_config: ModelConfig | None = None, stage: int = 0) -> KVLayout:
    """The KV layout of one rank's pool: its share of the KV heads, of its stage's layers."""
    mc = model_config or ModelConfig.from_dir(config.model_dir)
    dtype = mc.torch_dtype if config.dtype == "auto" else config.dtype
    layers = len(Stage.of(mc.num_layers, stage, config.pp_size).layers)
    layout = KVLayout(layers, mc.num_kv_heads, mc.head_dim, config.block_size, dtype)
    return layout.tp_shard(config.tp_size)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        shard: TPShard,
        device: torch.device,
        pool: KVPool | None = None,
        all_reduce: AllReduce | None = None,
        stage: Stage | None = None,
    ) -> None:
        """`pool`: this rank's KV pool (allocated here when None). `all_reduce` sums a tensor over
        the stage's tensor-parallel ranks in place (required when shard.size > 1). `stage`: the
        pipeline stage whose layers this rank runs (all of them when None)."""
        mc = ModelConfig.from_dir(config.model_dir)
        if shard.size > 1 and all_reduce is None:
            raise ValueError("a tensor-parallel rank needs an all-reduce")
        self.config, self.model_config, self.shard, self.device = config, mc, shard, device
        self.stage = stage or whole_model(mc)
        self.all_reduce = all_reduce if shard.size > 1 else None
        self.dtype = DTYPES[mc.torch_dtype if config.dtype == "auto" else config.dtype]
        self.max_model_len = min(config.max_model_len or mc.derived_max_len, mc.derived_max_len)
        self.layout = kv_layout_for(config, mc, self.stage.index)
        if pool is None:
            pool = KVPool.allocate(self.layout, config.num_blocks, device)
        elif pool.layout != self.layout or pool.num_blocks != config.num_blocks:
            raise ValueError(
                f"KV pool {pool.layout} x{pool.num_blocks} does not match {self.layout} x{config.num_blocks}"
            )
        self.pool = pool
        with torch.device("meta"):
            model = CausalLM(mc, shard, all_reduce, self.stage)
        load_weights(model, config.model_dir, self.dtype, device)
        self.kernels = kernels_for(device, self.dtype, config.compiled_kernels, mc.sliding_window)
        log.info(
            "engine %s stage %d/%d (layers %d-%d) rank %d/%d: %s kernels",
            config.model_dir,
            self.stage.index,
            self.stage.count,
            self.stage.first_layer,
            self.stage.end_layer - 1,
            shard.rank,
            shard.size,
            "compiled CPU" if self.kernels.compiled else "PyTorch",
        )
        model.fuse(self.kernels)
        self.model = model.eval()
        self.rotary = RotaryEmbedding(mc.rope, mc.head_dim, mc.max_position_embeddings, self.max_model_len)
        self.rotary.to(device)
        mode = config.decode_attention
        dense = mode == "dense" or (mode == "auto" and device.type == "cpu")
        # The dense cache may take as much memory as the pool itself, no more.
        self.dense = DenseDecodeCache(pool, self.max_model_len, pool.tensor.nbytes) if dense else None

    def drop(self, seq_ids: tuple[int, ...] | list[int]) -> None:
        """Sequences that left the engine leave the dense cache (unknown ids are ignored)."""
        if self.dense is not None:
            for seq_id in seq_ids:
                self.dense.drop_id(seq_id)

    def run(
        self, plan: StepPlan, hidden: torch.Tensor | None = None, order: list[int] | None = None
    ) -> ForwardOutput:
        """One forward pass of this stage; a plan's dropped sequences leave the dense cache first.
        A stage after the first takes the previous stage's `hidden` states, whose rows hold the
        sequences `order` (decode; prefill rows follow the plan). With tensor parallelism it
        returns once every rank of the stage has finished the step, its KV writes included: rank 0
        then hands blocks to KV transfer (which reads or writes the other ranks' pools) and frees
        blocks for reuse, and the next stage starts, so no rank may still be writing them."""
        self.drop(plan.dropped)
        if self.stage.is_first == (hidden is not None):
            raise ValueError("the first stage takes token ids, the others the previous stage's hidden states")
        if plan.kind == StepKind.PREFILL:
            out = self._prefill(plan, hidden)
        elif plan.kind == StepKind.DECODE:
            out = self._decode(plan, hidden, order)
        else:
            raise ValueError(f"a model runner runs prefill and decode plans, not {plan.kind.name}")
        if self.all_reduce is not None:
            self.all_reduce(torch.zeros(1, device=self.device))  # the end-of-step barrier
        return out

    def _prefill(self, plan: StepPlan, hidden: torch.Tensor | None) -> ForwardOutput:
        bs = self.config.block_size
        positions: list[int] = []
        slots: list[int] = []
        for n, table in zip(plan.num_tokens, plan.block_tables, strict=True):
            positions += range(n)
            slots += [table[p // bs] * bs + p % bs for p in range(n)]
        lens = list(plan.num_tokens)
        lens_t = torch.tensor(lens, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        cos, sin = self.rotary.factors(pos, self.dtype, torch.repeat_interleave(lens_t, lens_t))
        step = PrefillStep(
            torch.tensor(slots, dtype=torch.long, device=self.device), cos, sin, lens, lens_t.cumsum(0) - 1
        )
        inputs = (
            hidden
            if hidden is not None
            else torch.tensor(plan.token_ids, dtype=torch.long, device=self.device)
        )
        return self._output(self.model(inputs, step, self.pool), list(plan.seq_ids))

    def _output(self, out: torch.Tensor | None, seq_ids: list[int]) -> ForwardOutput:
        if out is not None and not self.stage.is_last:
            return ForwardOutput(None, seq_ids, out)
        return ForwardOutput(out, seq_ids)

    def _decode(self, plan: StepPlan, hidden: torch.Tensor | None, order: list[int] | None) -> ForwardOutput:
        views = [
            SeqView(s, n, list(t))
            for s, n, t in zip(plan.seq_ids, plan.num_tokens, plan.block_tables, strict=True)
        ]
        last = dict(zip(plan.seq_ids, plan.token_ids, strict=True))
        # The dense cache fixes the row (= batch position) of each sequence; a batch too large
        # for it decodes over the paged pool.
        dense = self.dense
        if dense is not None and not dense.fits(len(views), max(v.num_tokens for v in views)):
            dense = None
        batch = views
        if dense is not None:
            by_id = {v.seq_id: v for v in views}
            batch = [by_id[seq_id] for seq_id in dense.bind(views)]
        step = self._decode_input(batch, dense)
        if hidden is None:
            inputs = torch.tensor([last[v.seq_id] for v in batch], device=self.device)
        else:  # the previous stage's rows, in this stage's order (the same unless caches differ)
            row = {seq_id: i for i, seq_id in enumerate(order or plan.seq_ids)}
            wanted = [row[v.seq_id] for v in batch]
            same = wanted == list(range(len(wanted)))
            inputs = hidden if same else hidden[torch.tensor(wanted, device=hidden.device)]
        out = self.model(inputs, step, self.pool)
        if dense is not None:
            dense.advance()
        return self._output(out, [v.seq_id for v in batch])

    def _decode_input(self, batch: list[SeqView], dense: DenseDecodeCache | None) -> StepInput:
        """The input of a decode step over `batch` (with `dense`, bound to its rows)."""
        bs = self.config.block_size
        ctx = [s.num_tokens for s in batch]
        pos = torch.tensor([n - 1 for n in ctx], dtype=torch.long, device=self.device)
        slots = [s.block_table[(n - 1) // bs] * bs + (n - 1) % bs for s, n in zip(batch, ctx, strict=True)]
        slot_mapping = torch.tensor(slots, device=self.device)
        ctx_t = torch.tensor(ctx, device=self.device)
        cos, sin = self.rotary.factors(pos, self.dtype, ctx_t)
        if dense is not None and self.kernels.compiled:  # the kernel masks by length and window itself
            return DenseDecodeStep(slot_mapping, cos, sin, dense.keys_t, dense.values, ctx_t)
        keys = max(ctx) if dense is not None else -(-max(ctx) // bs) * bs
        key_pos = torch.arange(keys, device=self.device)[None, :]
        mask = key_pos < ctx_t[:, None]  # [B, keys]
        window = self.model_config.sliding_window
        if window is not None:
            mask &= key_pos > ctx_t[:, None] - 1 - window
        if dense is not None:  # an additive mask row per (sequence, KV head)
            bias = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~mask, float("-inf")
            )
            key_bias = bias.repeat_interleave(self.layout.num_kv_heads, dim=0)[:, None, :]
            return DenseDecodeStep(slot_mapping, cos, sin, dense.keys_t, dense.values, ctx_t, key_bias)
        width = keys // bs
        tables = [s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in batch]
        block_tables = torch.tensor(tables, dtype=torch.long, device=self.device)
        return PagedDecodeStep(slot_mapping, cos, sin, block_tables, mask[:, None, None, :])
