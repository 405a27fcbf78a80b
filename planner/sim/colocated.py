"""Colocated instances: prefill and decode interleaved on the same GPUs (vLLM-like)."""

from __future__ import annotations

from collections import deque

from planner.sim.config import Instance
from planner.sim.events import EventLoop, Handler
from planner.sim.lane import ContinuousBatcher, DecodeLane
from planner.sim.ledger import BusyTime, Requests


class ColocatedInstance(ContinuousBatcher):
    """Each lane's next iteration is a prefill batch when the head of the waiting queue fits in
    memory (prefill has priority and stalls that lane's decodes), else a decode step. Memory is
    reserved for prompt + output at admission into a prefill batch, as in a decode instance. With
    several pipeline stages a prefill passes the shared stages like any step: the decode steps of
    the other lanes that reach a stage it holds wait for it."""

    __slots__ = ("_on_prefill_done", "pipeline_hops_s", "token_budget", "waiting")

    def __init__(
        self,
        spec: Instance,
        loop: EventLoop,
        requests: Requests,
        busy: BusyTime,
        max_steps: int,
        token_budget: int,
    ) -> None:
        super().__init__(spec, loop, requests, busy, max_steps)
        self.token_budget = token_budget
        self.waiting: deque[int] = deque()  # arrived, not prefilled yet (FIFO)
        lat = spec.latency
        self.pipeline_hops_s = lat.pp * lat.hop_ms / 1000.0
        self._on_prefill_done: Handler = self.on_prefill_done

    def accept(self, i: int, t: float) -> None:
        """Request i arrives at t."""
        self.waiting.append(i)
        # Outstanding tokens of a colocated instance: the prompt to prefill + the tokens to generate.
        self.outstanding += self.prompt_lens[i] + self.output_lens[i] - 1
        for lane in self.lanes:
            self.cut(lane, t)  # a running lane may take this prefill at its next step
        self.start_idle_lanes(t)

    def start_idle_lanes(self, t: float) -> None:
        for lane in self.lanes:
            if not lane.running:
                self.iterate(lane, t)

    def iterate(self, lane: DecodeLane, t: float) -> None:
        """Start the lane's next iteration at t: a prefill batch if one fits, else a decode step."""
        spec, prompt_lens, output_lens = self.spec, self.prompt_lens, self.output_lens
        capacity, max_batch = spec.capacity_tokens, spec.max_batch
        waiting = self.waiting
        head_fits = bool(waiting) and (
            self.kv_used == 0 or self.kv_used + prompt_lens[waiting[0]] + output_lens[waiting[0]] <= capacity
        )
        if head_fits and self.admitted < max_batch:
            batch: list[int] = []
            tokens = sum_sq = 0
            while waiting and self.admitted < max_batch:
                i = waiting[0]
                length, need = prompt_lens[i], prompt_lens[i] + output_lens[i]
                if batch and (tokens + length > self.token_budget or self.kv_used + need > capacity):
                    break
                waiting.popleft()
                batch.append(i)
                self.kv_used += need
                self.admitted += 1
                tokens += length
                sum_sq += length * length
            self.outstanding -= tokens
            self.start_prefill(lane, t, batch, tokens, sum_sq)
        elif lane.size or lane.joining:
            self.start_step(lane, t)

    def start_prefill(self, lane: DecodeLane, t: float, batch: list[int], tokens: int, sum_sq: int) -> None:
        """Run a prefill batch of `tokens` prompt tokens on the lane from t."""
        prefill_s = self.spec.latency.prefill_full(tokens, sum_sq)
        self.busy.prefill_s += prefill_s
        lane.running = True
        lane.segment_steps = 0
        if self.stages is not None:  # it holds each shared stage in turn, and what waits there waits
            end = self.stages.pass_through(t, prefill_s / len(self.lanes) + self.hop_s)
        else:
            end = t + prefill_s + self.pipeline_hops_s
        self.loop.schedule(end, self._on_prefill_done, (lane, batch))

    def on_prefill_done(self, t: float, lane_batch: tuple[DecodeLane, list[int]]) -> None:
        """A prefill batch ended at t; the lane goes on with its next iteration."""
        lane, batch = lane_batch
        freed = self.prefilled(lane, t, batch)
        lane.running = False
        self.iterate(lane, t)
        if freed:
            self.start_idle_lanes(t)

    def prefilled(self, lane: DecodeLane, t: float, batch: list[int]) -> bool:
        """First tokens out at t: the batch joins the lane's decodes at its next step. True when a
        request finished (memory freed)."""
        requests, prompt_lens, output_lens = self.requests, self.prompt_lens, self.output_lens
        freed = False
        for i in batch:
            requests.first_token_out(i, t)
            if output_lens[i] == 1:
                requests.complete(i, t)
                self.kv_used -= prompt_lens[i] + 1
                self.admitted -= 1
                freed = True
            else:
                lane.joining.append(i)
        return freed

    def on_step_done(self, t: float, lane_version: tuple[DecodeLane, int]) -> None:
        lane, version = lane_version
        if version != lane.version:
            return  # the segment was cut; a newer event ends it
        freed = self.finish_segment(lane, t)
        self.iterate(lane, t)
        if freed and self.waiting:
            for other in self.lanes:
                self.cut(other, t)  # memory freed: the waiting prefill may fit now
            self.start_idle_lanes(t)
