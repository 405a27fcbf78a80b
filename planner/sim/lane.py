"""Continuous batching of decode steps, by pipeline micro-batch (lane).

An instance with pp stages keeps pp micro-batches (lanes) in flight. The stages are shared servers:
a lane's step passes them in order, each taking 1/pp of the whole-model step time of the lane's
batch plus a hop, and waits at a stage while it works on another lane's step or, in a colocated
instance, on a prefill (Stages: each stage serves in the order work reached it). Uneven lanes
leave bubbles. Such steps are simulated one at a time.

With one stage nothing is shared, and steps run in segments: while nothing joins or leaves the
lane, its batch is constant and each step is longer than the previous by b*B (every context grew
by one token), so step j of a segment ends at t0 + j*d0 + growth*j*(j-1)/2 and one event covers
the segment up to the next finish. Anything that would act at the next step boundary (a join; in
colocated instances, a prefill that could start) cuts the segment there, so the result equals
stepping one token at a time."""

from __future__ import annotations

import heapq
import math

from planner.sim.config import Instance
from planner.sim.events import EventLoop, Handler
from planner.sim.ledger import BusyTime, Requests


class Stages:
    """The pipeline stages of an instance, each a server that takes work in arrival order."""

    __slots__ = ("free_at",)

    def __init__(self, count: int) -> None:
        self.free_at = [0.0] * count  # when each stage finishes the work it has taken

    def pass_through(self, t: float, stage_s: float) -> float:
        """Work of `stage_s` per stage entering stage 0 at t: each stage takes it once it is free
        and the previous stage is done with it. Reserves the stages; returns when it leaves the last."""
        free = self.free_at
        end = t
        for k in range(len(free)):
            end = (free[k] if free[k] > end else end) + stage_s
            free[k] = end
        return end


class DecodeLane:
    """One continuous batch: the running sequences of one pipeline micro-batch and its segment."""

    __slots__ = (
        "compute_s",
        "context_tokens",
        "finishing",
        "first_step_s",
        "joining",
        "running",
        "segment_start",
        "segment_steps",
        "size",
        "step_growth_s",
        "steps_done",
        "version",
    )

    def __init__(self) -> None:
        self.size = 0  # running sequences
        self.context_tokens = 0  # sum of the KV lengths of the running sequences
        self.steps_done = 0  # completed steps, over the lane's whole life
        self.finishing: list[tuple[int, int]] = []  # heap of (step at which it finishes, request)
        self.joining: list[int] = []  # arrived during a step; enter the batch at the next one
        self.running = False  # a decode segment (or, colocated, a prefill batch) is in progress
        self.segment_start = 0.0
        self.first_step_s = 0.0  # the segment's first step
        self.step_growth_s = 0.0  # each further step is longer by this much
        self.segment_steps = 0  # steps in the segment (0: not in a decode segment)
        self.compute_s = 0.0  # a pipelined step's time on the stages (its span also holds waits)
        self.version = 0  # bumps when the segment's end event is replaced; older ones are stale

    def segment_end(self, j: int) -> float:
        """Time at which step j of the current segment ends."""
        return self.segment_start + j * self.first_step_s + self.step_growth_s * j * (j - 1) * 0.5

    def steps_done_by(self, t: float) -> int:
        """Steps of the current segment completed by time t."""
        k = self.segment_steps
        if k <= 1:
            return 0
        t0, d0, growth = self.segment_start, self.first_step_s, self.step_growth_s
        x = t - t0
        if growth > 0:
            # Invert the quadratic end time, then fix rounding by stepping to the exact boundary.
            h = d0 - 0.5 * growth
            j = int((-h + math.sqrt(h * h + 2.0 * growth * x)) / growth) if x > 0 else 0
        else:
            j = int(x / d0) if d0 > 0 else 0
        j = min(max(j, 0), k)
        # segment_end inlined (same expression, so the same floats): this is the router's hot path.
        while j < k and t0 + (j + 1) * d0 + growth * (j + 1) * j * 0.5 <= t:
            j += 1
        while j > 0 and t0 + j * d0 + growth * j * (j - 1) * 0.5 > t:
            j -= 1
        return j


class ContinuousBatcher:
    """An instance that runs decode steps on its lanes: the common part of decode and colocated
    instances. It owns the KV memory accounting of its admitted requests."""

    __slots__ = (
        "_on_step_done",
        "admitted",
        "busy",
        "hop_s",
        "kv_used",
        "lanes",
        "loop",
        "max_steps",
        "output_lens",
        "outstanding",
        "prompt_lens",
        "requests",
        "spec",
        "stages",
        "step_model",
    )

    def __init__(
        self, spec: Instance, loop: EventLoop, requests: Requests, busy: BusyTime, max_steps: int
    ) -> None:
        self.spec = spec
        self.loop = loop
        self.requests = requests
        self.prompt_lens = requests.prompt_lens
        self.output_lens = requests.output_lens
        self.busy = busy
        self.max_steps = max_steps  # cap on the steps one event covers (1: step by step)
        self.lanes = [DecodeLane() for _ in range(spec.latency.pp)]
        # With several stages the lanes share them (None: one stage, one lane, nothing shared).
        self.stages = Stages(spec.latency.pp) if spec.latency.pp > 1 else None
        self.hop_s = spec.latency.hop_ms / 1000.0
        self.outstanding = 0  # tokens still owed to the requests routed here (the router's load)
        self.kv_used = 0  # KV tokens reserved: prompt + output of every admitted request
        self.admitted = 0  # admitted requests, prefilled or not
        lat = spec.latency
        # Decode step coefficients in seconds, unpacked once: the step is the simulator's hot path.
        # Must equal PhaseLatency.decode_step (checked by the tests).
        self.step_model = (
            *(x / 1000.0 for x in lat.coef.decode_small),
            *(x / 1000.0 for x in lat.coef.decode_large),
            lat.coef.threshold,
            lat.pp * lat.hop_ms / 1000.0,
            lat.coef.overhead_ms / 1000.0,
        )
        self._on_step_done: Handler = self.on_step_done  # bound once, scheduled many times

    def on_step_done(self, t: float, lane_version: tuple[DecodeLane, int]) -> None:
        """A lane's segment ended (if the version is current); the role decides what runs next."""
        raise NotImplementedError

    def owed_tokens(self, t: float) -> int:
        """Tokens still owed as of t (steps completed inside running segments deducted)."""
        owed = self.outstanding
        for lane in self.lanes:
            if lane.segment_steps > 1:  # else no step of a segment can be complete
                owed -= lane.size * lane.steps_done_by(t)
        return owed

    def start_step(self, lane: DecodeLane, t: float) -> None:
        """Let the joining sequences in and start a segment of decode steps at t."""
        output_lens = self.output_lens
        for i in lane.joining:
            lane.size += 1
            lane.context_tokens += self.prompt_lens[i]
            heapq.heappush(lane.finishing, (lane.steps_done + output_lens[i] - 1, i))
        lane.joining.clear()
        batch = lane.size
        lane.running = True
        a0, b0, c0, a1, b1, c1, threshold, hops, overhead = self.step_model
        tokens = lane.context_tokens + batch  # T of the profile: sum over the batch of context + 1
        if batch <= threshold:
            dt, growth = a0 + b0 * tokens + c0 * batch, b0 * batch
        else:
            dt, growth = a1 + b1 * tokens + c1 * batch, b1 * batch
        if self.stages is not None:  # one step through the shared stages
            stage_s = ((dt if dt > 0.0 else 0.0) + overhead) / len(self.lanes) + self.hop_s
            end = self.stages.pass_through(t, stage_s)
            lane.segment_start, lane.first_step_s, lane.step_growth_s = t, end - t, 0.0
            lane.segment_steps, lane.compute_s = 1, stage_s * len(self.lanes)
            lane.version += 1
            self.loop.schedule(end, self._on_step_done, (lane, lane.version))
            return
        k = lane.finishing[0][0] - lane.steps_done  # steps until the first finish
        if dt <= 0.0 or growth < 0.0 or k < 1:
            k = 1  # clamped or shrinking step times: the closed form does not hold, step by step
        lane.segment_start = t
        lane.first_step_s = (dt if dt > 0.0 else 0.0) + overhead + hops
        lane.step_growth_s = growth
        lane.segment_steps = min(k, self.max_steps)
        lane.version += 1
        self.loop.schedule(lane.segment_end(lane.segment_steps), self._on_step_done, (lane, lane.version))

    def cut(self, lane: DecodeLane, t: float) -> None:
        """End the lane's segment at the first step boundary after t."""
        if lane.running and lane.segment_steps > 1:
            steps = lane.steps_done_by(t) + 1
            if steps < lane.segment_steps:
                lane.segment_steps = steps
                lane.version += 1
                self.loop.schedule(lane.segment_end(steps), self._on_step_done, (lane, lane.version))

    def finish_segment(self, lane: DecodeLane, t: float) -> bool:
        """Account for the segment that ended at t; True when a request finished (memory freed)."""
        k = lane.segment_steps
        self.busy.decode_s += lane.compute_s if self.stages is not None else t - lane.segment_start
        lane.segment_steps = 0
        lane.steps_done += k
        lane.context_tokens += lane.size * k
        self.outstanding -= lane.size * k  # one token per running sequence per step
        finishing = lane.finishing
        prompt_lens, output_lens = self.prompt_lens, self.output_lens
        freed = False
        while finishing and finishing[0][0] <= lane.steps_done:
            i = heapq.heappop(finishing)[1]
            self.requests.complete(i, t)
            lane.size -= 1
            lane.context_tokens -= prompt_lens[i] + output_lens[i] - 1
            self.kv_used -= prompt_lens[i] + output_lens[i]
            self.admitted -= 1
            freed = True
        lane.running = False
        return freed
