"""LLMEngine: the model, its KV pool and block manager, and the two entry points.

Contract:
- ``prefill(seqs)``: for sequences with no KV yet, allocates blocks for their prompts, writes the
  prompt K/V into them, samples and appends the first output token of each. Returns those tokens;
  each sequence's ``block_table`` then holds its prompt's KV (``blocks_for(prompt_len)`` blocks).
- ``decode_step(seqs)``: for sequences whose KV holds every token but the last, writes the last
  token's K/V (growing the block table by one block when needed), samples and appends one token
  each. Returns those tokens. Sequences may differ from one call to the next (continuous batching).
- ``adopt(seq)``: allocates blocks for a sequence prefilled elsewhere (its ``output_ids`` hold the
  first token); once the prefill engine's blocks are copied into them, ``decode_step`` continues it
  exactly as the prefill engine would have.
Finished sequences (EOS, stop token, max_tokens) get ``status=FINISHED`` and a ``finish_reason``;
their blocks are freed by ``free()`` (``step()`` does it for sequences it scheduled).
Not thread-safe: one thread drives an engine.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.decode_cache import DenseDecodeCache
from engine.errors import RequestError
from engine.kernels import kernels_for
from engine.kv_cache import DTYPES, KVLayout, KVPool
from engine.model import CausalLM, DenseDecodeStep, PagedDecodeStep, PrefillStep, StepInput
from engine.rope import RotaryEmbedding
from engine.sampling import SamplingParams, sample
from engine.scheduler import Scheduler
from engine.sequence import Sequence, Status
from engine.weights import load_weights

log = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    seq: Sequence
    token: int


class StepResult(NamedTuple):
    kind: str  # "prefill" | "decode" | "idle"
    outputs: list[StepOutput]


def kv_layout_for(config: EngineConfig, model_config: ModelConfig | None = None) -> KVLayout:
    """The KV layout an engine with this config will have (to allocate its pool beforehand)."""
    mc = model_config or ModelConfig.from_dir(config.model_dir)
    dtype = mc.torch_dtype if config.dtype == "auto" else config.dtype
    return KVLayout(mc.num_layers, mc.num_kv_heads, mc.head_dim, config.block_size, dtype)


class LLMEngine:
    def __init__(self, config: EngineConfig, pool: KVPool | None = None) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model_dir)
        mc = self.model_config
        if config.num_threads is not None and config.device == "cpu":
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.dtype = DTYPES[mc.torch_dtype if config.dtype == "auto" else config.dtype]
        self.max_model_len = min(config.max_model_len or mc.derived_max_len, mc.derived_max_len)
        self.layout = kv_layout_for(config, mc)
        if pool is None:
            pool = KVPool.allocate(self.layout, config.num_blocks, self.device)
        elif pool.layout != self.layout or pool.num_blocks != config.num_blocks:
            raise ValueError(
                f"KV pool {pool.layout} x{pool.num_blocks} does not match {self.layout} x{config.num_blocks}"
            )
        self.pool = pool
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        with torch.device("meta"):
            model = CausalLM(mc)
        load_weights(model, config.model_dir, self.dtype, self.device)
        self.kernels = kernels_for(self.device, self.dtype, config.compiled_kernels, mc.sliding_window)
        log.info(
            "engine %s: %s kernels", config.model_dir, "compiled CPU" if self.kernels.compiled else "PyTorch"
        )
        model.fuse(self.kernels)
        self.model = model.eval()
        self.rotary = RotaryEmbedding(mc.rope, mc.head_dim, mc.max_position_embeddings, self.max_model_len)
        self.rotary.to(self.device)
        mode = config.decode_attention
        dense = mode == "dense" or (mode == "auto" and self.device.type == "cpu")
        # The dense cache may take as much memory as the pool itself, no more.
        self.dense = DenseDecodeCache(pool, self.max_model_len, pool.tensor.nbytes) if dense else None

    # ---- validation ------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises RequestError naming the problem; nothing is allocated."""
        if not prompt_ids:
            raise RequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} out of range [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(prompt_ids)} tokens; the context is {self.max_model_len} and must hold at least one new token"
            )
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {self.max_model_len}"
            )
        if self.blocks.blocks_for(len(prompt_ids) + params.max_tokens) > self.blocks.num_blocks:
            raise RequestError(f"request needs more KV blocks than the pool has ({self.blocks.num_blocks})")

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "") -> Sequence:
        self.validate(prompt_ids, params)
        return Sequence(list(prompt_ids), params, request_id=request_id)

    # ---- entry points ----------------------------------------------------------------------

    def prefill(self, seqs: list[Sequence]) -> list[int]:
        bs = self.config.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq in seqs:
            if seq.block_table or seq.output_ids:
                raise ValueError(f"sequence {seq.seq_id} was already prefilled")
            seq.block_table = self.blocks.allocate(self.blocks.blocks_for(seq.prompt_len))
            tokens += seq.prompt_ids
            positions += range(seq.prompt_len)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(seq.prompt_len)]
        lens = [s.prompt_len for s in seqs]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        seq_lens = torch.repeat_interleave(
            torch.tensor(lens, device=self.device), torch.tensor(lens, device=self.device)
        )
        cos, sin = self.rotary.factors(pos, self.dtype, seq_lens)
        last = torch.tensor(lens, device=self.device).cumsum(0) - 1
        step = PrefillStep(torch.tensor(slots, dtype=torch.long, device=self.device), cos, sin, lens, last)
        logits = self.model(torch.tensor(tokens, dtype=torch.long, device=self.device), step, self.pool)
        return self._sample_and_append(seqs, logits)

    def decode_step(self, seqs: list[Sequence]) -> list[int]:
        for seq in seqs:
            if not seq.output_ids:
                raise ValueError(f"sequence {seq.seq_id} has not been prefilled")
            while len(seq.block_table) < self.blocks.blocks_for(seq.num_tokens):
                seq.block_table += self.blocks.allocate(1)
        # The dense cache fixes the row (= batch position) of each sequence; a batch too large
        # for it decodes over the paged pool.
        dense = self.dense
        if dense is not None and not dense.fits(len(seqs), max(s.num_tokens for s in seqs)):
            dense = None
        batch = dense.bind(seqs) if dense is not None else seqs
        step = self._decode_input(batch, dense)
        ids = torch.tensor([s.last_token for s in batch], device=self.device)
        logits = self.model(ids, step, self.pool)
        if dense is not None:
            dense.advance()
        tokens = self._sample_and_append(batch, logits)
        if batch is seqs:
            return tokens
        by_id = {s.seq_id: t for s, t in zip(batch, tokens, strict=True)}
        return [by_id[s.seq_id] for s in seqs]

    def adopt(self, seq: Sequence) -> list[int]:
        """Allocates the blocks that will receive a sequence's prompt KV from a prefill engine."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already has blocks")
        seq.block_table = self.blocks.allocate(self.blocks.blocks_for(seq.prompt_len))
        return seq.block_table

    def free(self, seq: Sequence) -> None:
        if self.dense is not None:
            self.dense.drop(seq)
        if seq.block_table:
            self.blocks.free(seq.block_table)
            seq.block_table = []

    def abort(self, seq: Sequence) -> None:
        self.scheduler.abort(seq)
        if not seq.finished:
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
        self.free(seq)

    # ---- the step loop ---------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def step(self) -> StepResult:
        """Runs one scheduled batch and frees the blocks of the sequences it finished."""
        batch = self.scheduler.schedule()
        if batch.kind == "idle":
            return StepResult("idle", [])
        if batch.kind == "prefill":
            tokens = self.prefill(batch.seqs)
            self.scheduler.start(batch.seqs)
        else:
            tokens = self.decode_step(batch.seqs)
        for seq in batch.seqs:
            if seq.finished:
                self.free(seq)
        self.scheduler.retire_finished()
        return StepResult(batch.kind, [StepOutput(s, t) for s, t in zip(batch.seqs, tokens, strict=True)])

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Sequence]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.new_sequence(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        for seq in seqs:
            self.add(seq)
        while self.scheduler.has_work():
            self.step()
        return seqs

    # ---- internals -------------------------------------------------------------------------

    def _decode_input(self, batch: list[Sequence], dense: DenseDecodeCache | None) -> StepInput:
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
        keys = max(ctx) if dense is not None else self.blocks.blocks_for(max(ctx)) * bs
        key_pos = torch.arange(keys, device=self.device)[None, :]
        mask = key_pos < ctx_t[:, None]  # [B, keys]
        window = self.model_config.sliding_window
        if window is not None:
            mask &= key_pos > ctx_t[:, None] - 1 - window
        if dense is not None:  # an additive mask row per (sequence, KV head)
            bias = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~mask, float("-inf")
            )
            key_bias = bias.repeat_interleave(self.model_config.num_kv_heads, dim=0)[:, None, :]
            return DenseDecodeStep(slot_mapping, cos, sin, dense.keys_t, dense.values, ctx_t, key_bias)
        width = keys // bs
        tables = [s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in batch]
        block_tables = torch.tensor(tables, dtype=torch.long, device=self.device)
        return PagedDecodeStep(slot_mapping, cos, sin, block_tables, mask[:, None, None, :])

    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        tokens = sample(
            logits, [s.params for s in seqs], [s.seed for s in seqs], [len(s.output_ids) for s in seqs]
        )
        eos = set(self.model_config.eos_token_ids)
        for seq, tok in zip(seqs, tokens, strict=True):
            seq.output_ids.append(tok)
            if (not seq.params.ignore_eos and tok in eos) or tok in seq.params.stop_token_ids:
                seq.status, seq.finish_reason = Status.FINISHED, "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.status, seq.finish_reason = Status.FINISHED, "length"
        return tokens
