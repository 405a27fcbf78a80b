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

The engine schedules, allocates blocks and samples; the forward pass is a step plan that a
ModelRunner runs (engine/runner.py), or, with ``tp_size`` x ``pp_size`` > 1, every rank of a
parallel executor (engine/parallel/), which raises EngineDeadError once a rank has died.
``launch_prefill``/``launch_decode`` and ``complete`` split a step in two: with pipeline
parallelism a step launched into stage 0 runs on while the next one is launched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.decode_cache import DenseDecodeCache
from engine.errors import RequestError, check_context
from engine.kv_cache import KVPool
from engine.parallel.executor import InFlight, ParallelExecutor
from engine.runner import ForwardOutput, ModelRunner, kv_layout_for
from engine.sampling import Draw, SamplingParams, sample
from engine.scheduler import Scheduler
from engine.sequence import Sequence, Status
from engine.sharding import single
from engine.step_plan import StepKind, StepPlan

__all__ = ["LLMEngine", "Step", "StepOutput", "StepResult", "kv_layout_for"]

log = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    seq: Sequence
    token: int


class StepResult(NamedTuple):
    kind: str  # "prefill" | "decode" | "idle"
    outputs: list[StepOutput]


@dataclass(eq=False)
class Step:
    """A launched forward pass over `seqs`, until complete() samples its tokens."""

    seqs: list[Sequence]
    flight: InFlight | None = None  # a parallel engine's
    output: ForwardOutput | None = None  # a single-process engine's (already computed)
    stage_times: list[tuple[float, float]] = field(default_factory=list)  # set by complete()


class LLMEngine:
    def __init__(self, config: EngineConfig, pools: KVPool | list[KVPool] | None = None) -> None:
        """`pools`: the KV pool of each rank (one KVPool for a single-process engine); allocated
        by the engine when None. With several ranks the pools of ranks 1.. must be in shared
        memory or on their rank's GPU, for the workers to open (engine.parallel.pools)."""
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model_dir)
        if config.num_threads is not None and config.device == "cpu":
            torch.set_num_threads(config.num_threads)
        given = [pools] if isinstance(pools, KVPool) else pools
        self.executor: ParallelExecutor | None = None
        if config.world_size > 1:
            self.executor = ParallelExecutor(config, given)
            self.runner = self.executor.runner
        else:
            device = torch.device(config.device)
            self.runner = ModelRunner(config, single(self.model_config), device, given[0] if given else None)
        self.device = self.runner.device
        self.max_model_len = self.runner.max_model_len
        self.layout = self.runner.layout
        self.pool = self.runner.pool  # rank 0's
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self._dropped: list[int] = []  # left since the last step: the other ranks drop them then

    @property
    def dense(self) -> DenseDecodeCache | None:
        """Rank 0's dense decode cache (None when decode attention reads the paged pool)."""
        return self.runner.dense

    @property
    def dead(self) -> str | None:
        """Why the engine can run no more steps (a worker rank died), or None."""
        return self.executor.dead if self.executor is not None else None

    def close(self) -> None:
        """Stops the worker ranks, if any."""
        if self.executor is not None:
            self.executor.close()

    # ---- validation ------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises RequestError naming the problem; nothing is allocated."""
        if not prompt_ids:
            raise RequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} out of range [0, {vocab})")
        check_context(len(prompt_ids), params.max_tokens, self.max_model_len)
        if self.blocks.blocks_for(len(prompt_ids) + params.max_tokens) > self.blocks.num_blocks:
            raise RequestError(f"request needs more KV blocks than the pool has ({self.blocks.num_blocks})")

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "") -> Sequence:
        self.validate(prompt_ids, params)
        return Sequence(list(prompt_ids), params, request_id=request_id)

    # ---- entry points ----------------------------------------------------------------------

    def prefill(self, seqs: list[Sequence]) -> list[int]:
        return self.complete(self.launch_prefill(seqs))

    def decode_step(self, seqs: list[Sequence]) -> list[int]:
        return self.complete(self.launch_decode(seqs))

    def launch_prefill(self, seqs: list[Sequence]) -> Step:
        """Starts prefill of `seqs` (their blocks allocated now); complete() gives the tokens."""
        for seq in seqs:
            if seq.block_table or seq.output_ids:
                raise ValueError(f"sequence {seq.seq_id} was already prefilled")
            seq.block_table = self.blocks.allocate(self.blocks.blocks_for(seq.prompt_len))
        tokens = [t for s in seqs for t in s.prompt_ids]
        return self._launch(seqs, self._plan(StepKind.PREFILL, seqs, tokens, [s.prompt_len for s in seqs]))

    def launch_decode(self, seqs: list[Sequence]) -> Step:
        """Starts a decode step of `seqs`; complete() gives the tokens. With pipeline parallelism
        this returns once stage 0 has run, so another micro-batch (of other sequences) can be
        launched while the later stages work on this one."""
        for seq in seqs:
            if not seq.output_ids:
                raise ValueError(f"sequence {seq.seq_id} has not been prefilled")
            while len(seq.block_table) < self.blocks.blocks_for(seq.num_tokens):
                seq.block_table += self.blocks.allocate(1)
        tokens = [s.last_token for s in seqs]
        return self._launch(seqs, self._plan(StepKind.DECODE, seqs, tokens, [s.num_tokens for s in seqs]))

    def complete(self, step: Step) -> list[int]:
        """Waits for a launched step (steps complete in launch order), samples and appends one
        token to each of its sequences; returns them in the sequences' order."""
        out = step.output
        if step.flight is not None:
            assert self.executor is not None
            out = self.executor.complete(step.flight)
        assert out is not None and out.logits is not None
        step.stage_times = out.stage_times or []
        # The runner may have reordered the batch (dense decode rows): sample in its order.
        by_id = {s.seq_id: s for s in step.seqs}
        batch = [by_id[i] for i in out.seq_ids]
        tokens = dict(zip(out.seq_ids, self._sample_and_append(batch, out.logits), strict=True))
        return [tokens[s.seq_id] for s in step.seqs]

    def adopt(self, seq: Sequence) -> list[int]:
        """Allocates the blocks that will receive a sequence's prompt KV from a prefill engine."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already has blocks")
        seq.block_table = self.blocks.allocate(self.blocks.blocks_for(seq.prompt_len))
        return seq.block_table

    def free(self, seq: Sequence) -> None:
        # Rank 0 drops the sequence's dense row now; the other ranks with the next plan, before
        # anything else touches their caches, which keeps every rank's rows in the same order.
        self.runner.drop([seq.seq_id])
        if self.executor is not None:
            self._dropped.append(seq.seq_id)
        if seq.block_table:
            # A table only grows until it is freed, so its size now is the most it ever held.
            seq.blocks_held = max(seq.blocks_held, len(seq.block_table))
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

    def _plan(
        self, kind: StepKind, seqs: list[Sequence], tokens: list[int], num_tokens: list[int]
    ) -> StepPlan:
        plan = StepPlan(
            kind,
            tuple(s.seq_id for s in seqs),
            tuple(tokens),
            tuple(num_tokens),
            tuple(tuple(s.block_table) for s in seqs),
            tuple(self._dropped),
        )
        self._dropped.clear()
        return plan

    def _launch(self, seqs: list[Sequence], plan: StepPlan) -> Step:
        if self.executor is not None:
            return Step(seqs, flight=self.executor.launch(plan))
        return Step(seqs, output=self.runner.run(plan))

    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        draws = [Draw(s.params, s.seed, s.prompt_ids, s.output_ids) for s in seqs]
        tokens, logprobs = sample(logits, draws, self.model_config.eos_token_ids)
        eos = set(self.model_config.eos_token_ids)
        for seq, tok, logprob in zip(seqs, tokens, logprobs, strict=True):
            seq.output_ids.append(tok)
            if logprob is not None:
                seq.output_logprobs.append(logprob)
            if (not seq.params.ignore_eos and tok in eos) or tok in seq.params.stop_token_ids:
                seq.status, seq.finish_reason = Status.FINISHED, "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.status, seq.finish_reason = Status.FINISHED, "length"
        return tokens
