"""Colocated instances that allocate KV on demand and preempt by recomputation (vLLM's policy).

Admission into a prefill batch needs memory for the prompt and the first token only; each decode
step then takes one more token per sequence. When a step would not fit, the most recently admitted
sequences of the lane about to step are preempted: their KV is freed and they go back to the head of
the waiting queue, to be prefilled again over their prompt and every token generated so far (the
re-prefill also yields their next token). A request is never preempted while it is the only one
admitted: like the reserving instance, a request larger than the cache then runs over it.

KV held by an admitted request = prompt + tokens generated so far (the first token's slot is taken
at admission), so a request that finishes holds prompt + output, as in the reserving instance."""

from __future__ import annotations

import heapq

from planner.sim.colocated import ColocatedInstance
from planner.sim.lane import DecodeLane


class OnDemandColocatedInstance(ColocatedInstance):
    """ColocatedInstance with on-demand KV allocation and recompute preemption."""

    __slots__ = ("admit_order", "order", "preemptions", "resumed")
    # admit_order keeps entries of finished requests: it is only read for running ones.

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.resumed: dict[int, int] = {}  # preempted request -> tokens it had generated
        self.admit_order: dict[int, int] = {}  # admitted request -> admission number
        self.order = 0
        self.preemptions = 0

    def _prompt(self, i: int) -> int:
        """Tokens the (re-)prefill of request i computes."""
        return self.prompt_lens[i] + self.resumed.get(i, 0)

    def _growing(self, lane: DecodeLane | None) -> int:
        """KV tokens the decode segments in flight on other lanes will add when they end."""
        return sum(o.size * o.segment_steps for o in self.lanes if o is not lane and o.segment_steps > 0)

    def iterate(self, lane: DecodeLane, t: float) -> None:
        spec, waiting = self.spec, self.waiting
        capacity = spec.capacity_tokens
        free = capacity - self.kv_used - self._growing(lane)
        if (
            waiting
            and self.admitted < spec.max_batch
            and (self.admitted == 0 or self._prompt(waiting[0]) + 1 <= free)
        ):
            batch: list[int] = []
            tokens = sum_sq = 0
            while waiting and self.admitted < spec.max_batch:
                i = waiting[0]
                length = self._prompt(i)
                if batch and (tokens + length > self.token_budget or length + 1 > free):
                    break
                waiting.popleft()
                batch.append(i)
                self.kv_used += length + 1
                free -= length + 1
                self.admitted += 1
                self.order += 1
                self.admit_order[i] = self.order
                tokens += length
                sum_sq += length * length
            resumed = sum(1 for i in batch if i in self.resumed)
            self.outstanding -= tokens + resumed  # a re-prefill also yields the next token
            self.start_prefill(lane, t, batch, tokens, sum_sq)
        elif lane.size or lane.joining:
            self._make_room(lane)
            if lane.size or lane.joining:
                self.start_step(lane, t)

    def _make_room(self, lane: DecodeLane) -> None:
        """Preempt the lane's newest sequences until its next step fits in memory."""
        self._admit_joining(lane)
        capacity = self.spec.capacity_tokens
        while lane.size and self.admitted > 1 and self.kv_used + self._growing(lane) + lane.size > capacity:
            k = max(range(len(lane.finishing)), key=lambda j: self.admit_order[lane.finishing[j][1]])
            target, i = lane.finishing.pop(k)
            heapq.heapify(lane.finishing)
            generated = self.output_lens[i] - (target - lane.steps_done)
            lane.size -= 1
            lane.context_tokens -= self.prompt_lens[i] + generated - 1
            self.kv_used -= self.prompt_lens[i] + generated
            self.admitted -= 1
            del self.admit_order[i]
            self.outstanding += self.prompt_lens[i] + generated  # to be computed again
            self.resumed[i] = generated
            self.waiting.appendleft(i)
            self.preemptions += 1

    def _admit_joining(self, lane: DecodeLane) -> None:
        """Sequences that joined the lane enter its batch now (start_step would do it next)."""
        for i in lane.joining:
            generated = 1 + self.resumed.pop(i, 0)  # a re-prefill continues where the request was
            lane.size += 1
            lane.context_tokens += self.prompt_lens[i] + generated - 1
            heapq.heappush(lane.finishing, (lane.steps_done + self.output_lens[i] - generated, i))
        lane.joining.clear()

    def start_step(self, lane: DecodeLane, t: float) -> None:
        """A decode segment, cut to the steps whose new tokens fit in memory."""
        self._admit_joining(lane)
        super().start_step(lane, t)
        room = self.spec.capacity_tokens - self.kv_used - self._growing(lane)
        steps = max(1, room // lane.size) if lane.size else 1
        if lane.segment_steps > steps:
            lane.segment_steps = steps
            lane.version += 1
            self.loop.schedule(lane.segment_end(steps), self._on_step_done, (lane, lane.version))

    def finish_segment(self, lane: DecodeLane, t: float) -> bool:
        self.kv_used += lane.size * lane.segment_steps  # one token per running sequence per step
        return super().finish_segment(lane, t)

    def prefilled(self, lane: DecodeLane, t: float, batch: list[int]) -> bool:
        """Fresh requests as in the reserving instance; re-prefilled ones rejoin (their first token
        went out long ago) or, when the re-prefill yielded their last token, finish."""
        freed = False
        fresh = []
        for i in batch:
            if i not in self.resumed:
                fresh.append(i)
            elif self.resumed[i] + 1 >= self.output_lens[i]:
                del self.resumed[i]
                self.requests.complete(i, t)
                self.kv_used -= self.prompt_lens[i] + self.output_lens[i]
                self.admitted -= 1
                freed = True
            else:
                lane.joining.append(i)
        return super().prefilled(lane, t, fresh) or freed
