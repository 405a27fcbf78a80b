"""Prefill instances of a disaggregated deployment."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from planner.sim.config import Instance
from planner.sim.events import EventLoop, Handler
from planner.sim.ledger import BusyTime, Requests

if TYPE_CHECKING:
    from planner.sim.decode import DecodeInstance
    from planner.sim.router import Router


class PrefillInstance:
    """Batches queued prompts first-come-first-served up to a token budget (a prompt longer than the
    budget runs alone). A batch moves through the pipeline stages, each taking 1/pp of the model time
    plus a hop; a new batch starts when stage 0 is free. The first tokens are out when the last stage
    finishes; the requests then go to a decode instance chosen by `decode_router` (None: prefill-only
    simulation, the request is complete)."""

    __slots__ = (
        "_on_batch_done",
        "_on_stage0_free",
        "busy",
        "decode_router",
        "loop",
        "outstanding",
        "prompt_lens",
        "queue",
        "requests",
        "spec",
        "stage0_busy",
        "stage_free_at",
        "token_budget",
    )

    def __init__(
        self, spec: Instance, loop: EventLoop, requests: Requests, busy: BusyTime, token_budget: int
    ) -> None:
        self.spec = spec
        self.loop = loop
        self.requests = requests
        self.prompt_lens = requests.prompt_lens
        self.busy = busy
        self.token_budget = token_budget
        self.queue: deque[int] = deque()  # requests waiting for a batch
        self.outstanding = 0  # prompt tokens routed here and not prefilled yet (the router's load)
        self.stage_free_at = [0.0] * spec.latency.pp  # when each pipeline stage finishes its work
        self.stage0_busy = False
        self.decode_router: Router[DecodeInstance] | None = None
        self._on_stage0_free: Handler = self.on_stage0_free
        self._on_batch_done: Handler = self.on_batch_done

    def owed_tokens(self, t: float) -> int:
        """Prompt tokens routed here and not prefilled yet."""
        return self.outstanding

    def enqueue(self, i: int, t: float) -> None:
        """Request i arrives at t."""
        self.queue.append(i)
        self.outstanding += self.prompt_lens[i]
        if not self.stage0_busy:
            self.start_batch(t)

    def start_batch(self, t: float) -> None:
        """Take the head of the queue up to the token budget into the pipeline at t."""
        queue, prompt_lens, budget = self.queue, self.prompt_lens, self.token_budget
        batch: list[int] = []
        tokens = sum_sq = 0
        while queue:
            length = prompt_lens[queue[0]]
            if batch and tokens + length > budget:
                break
            batch.append(queue.popleft())
            tokens += length
            sum_sq += length * length
        stage_s = self.spec.latency.prefill_stage(tokens, sum_sq)
        free_at = self.stage_free_at
        self.busy.prefill_s += stage_s * len(free_at)
        # Each stage starts the batch when both the batch (previous stage) and the stage are free.
        s = t
        for k in range(len(free_at)):
            s = max(s, free_at[k]) + stage_s
            free_at[k] = s
        self.stage0_busy = True
        self.loop.schedule(free_at[0], self._on_stage0_free, None)
        self.loop.schedule(s, self._on_batch_done, batch)

    def on_stage0_free(self, t: float, _: None) -> None:
        self.stage0_busy = False
        if self.queue:
            self.start_batch(t)

    def on_batch_done(self, t: float, batch: list[int]) -> None:
        """First tokens out at t: hand each request to a decode instance, which pulls the KV cache
        when it has memory for it (admission after the whole batch is routed)."""
        requests, output_lens = self.requests, self.requests.output_lens
        router = self.decode_router
        receivers: list[DecodeInstance] = []
        for i in batch:
            self.outstanding -= self.prompt_lens[i]
            requests.first_token_out(i, t)
            if router is None or output_lens[i] == 1:
                requests.complete(i, t)
                continue
            decode = router.pick(t)
            decode.accept(i, self.spec.node)
            if decode not in receivers:
                receivers.append(decode)
        for decode in receivers:
            decode.admit_waiting(t)
