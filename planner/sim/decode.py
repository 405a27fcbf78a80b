"""Decode instances of a disaggregated deployment."""

from __future__ import annotations

from collections import deque

from planner.cluster import ClusterSpec
from planner.sim.config import Instance
from planner.sim.events import EventLoop, Handler
from planner.sim.lane import ContinuousBatcher, DecodeLane
from planner.sim.ledger import BusyTime, Requests


class DecodeInstance(ContinuousBatcher):
    """Admits a routed request when it has KV memory for all of it (prompt + output tokens reserved
    at admission, so there is never a preemption; a request larger than the whole cache runs alone),
    then pulls its KV cache (bytes / link bandwidth) and runs it in the least loaded lane."""

    __slots__ = ("_on_kv_arrived", "cluster", "kv_bytes_per_token", "waiting")

    def __init__(
        self,
        spec: Instance,
        loop: EventLoop,
        requests: Requests,
        busy: BusyTime,
        max_steps: int,
        cluster: ClusterSpec | None,
        kv_bytes_per_token: int,
    ) -> None:
        super().__init__(spec, loop, requests, busy, max_steps)
        self.cluster = cluster
        self.kv_bytes_per_token = kv_bytes_per_token  # 0 or no cluster: the KV pull is instantaneous
        self.waiting: deque[int] = deque()  # routed here, not admitted yet (FIFO, no overtaking)
        self._on_kv_arrived: Handler = self.on_kv_arrived

    def accept(self, i: int, kv_source_node: int) -> None:
        """Request i is routed here; its KV cache is on kv_source_node (-1: another node)."""
        self.requests.kv_source_node[i] = kv_source_node
        self.waiting.append(i)
        self.outstanding += self.output_lens[i] - 1

    def admit_waiting(self, t: float) -> None:
        """Admit waiting requests in order while memory and the batch limit allow; start their pulls."""
        spec, prompt_lens, output_lens = self.spec, self.prompt_lens, self.output_lens
        cluster, kv_bytes = self.cluster, self.kv_bytes_per_token
        waiting = self.waiting
        while waiting:
            i = waiting[0]
            need = prompt_lens[i] + output_lens[i]
            # A request larger than the whole cache runs alone rather than deadlocking.
            if (
                self.kv_used + need > spec.capacity_tokens and self.kv_used > 0
            ) or self.admitted >= spec.max_batch:
                break
            waiting.popleft()
            self.kv_used += need
            self.admitted += 1
            pull_s = 0.0
            if cluster is not None and kv_bytes:
                same_node = self.requests.kv_source_node[i] == spec.node
                pull_s = cluster.transfer_seconds(prompt_lens[i] * kv_bytes, same_node)
            self.loop.schedule(t + pull_s, self._on_kv_arrived, i)

    def on_kv_arrived(self, t: float, i: int) -> None:
        """Request i's KV cache is here: it joins the lane with the fewest sequences."""
        lane = min(self.lanes, key=lambda x: x.size + len(x.joining))
        lane.joining.append(i)
        if not lane.running:
            self.start_step(lane, t)
        else:
            self.cut(lane, t)  # it joins at the next step boundary

    def on_step_done(self, t: float, lane_version: tuple[DecodeLane, int]) -> None:
        lane, version = lane_version
        if version != lane.version:
            return  # the segment was cut; a newer event ends it
        if self.finish_segment(lane, t):
            self.admit_waiting(t)
        if lane.size or lane.joining:
            self.start_step(lane, t)
