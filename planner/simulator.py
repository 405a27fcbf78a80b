"""Discrete-event simulation of a disaggregated (or colocated) serving system.

Model of the system (the same as the serving code's design):
- prefill instances batch queued prompts first-come-first-served up to a token budget (a prompt
  longer than the budget runs alone); a batch moves through the pipeline stages, a stage taking
  1/pp of the model time plus a hop; the first token is out when the last stage finishes (TTFT);
- the decode instance chosen by the router PULLS the KV cache when it has memory for the whole
  request (prompt + output tokens reserved at admission, so there is never a preemption; the
  prefill instance's memory is the queue buffer); the pull takes bytes / link bandwidth;
- decode instances run continuous batching; with pp stages there are pp micro-batches in flight
  (lanes), each lane's step taking the whole-model time of its batch plus pp hops;
- colocated instances (vLLM-like) interleave prefill batches (which have priority, stalling the
  running decodes) and decode steps on the same GPUs.
TPOT of a request = (last token time - first token time) / (output tokens - 1)."""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from planner import PlannerError
from planner.cluster import ClusterSpec
from planner.latency import PhaseLatency
from planner.sim_stats import SimResult

ARRIVAL, STAGE0_FREE, PREFILL_DONE, JOIN, STEP_DONE, CO_PREFILL_DONE = range(6)


class Instance(NamedTuple):
    """One simulated instance. `group` restricts routing: prefill output goes to a decode instance of
    the same group when one exists (low node-affinity placements keep KV on NVLink)."""

    latency: PhaseLatency
    capacity_tokens: int = 1 << 40  # KV capacity; only decode and colocated instances use it
    max_batch: int = 1 << 30
    node: int = 0
    group: int = 0


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. mode: "joint" (prefill -> transfer -> decode, or colocated), "prefill_only"
    (TTFT of the prefill instances), "decode_only" (requests enter decode at arrival, their KV coming
    over the link given by `decode_only_same_node`)."""

    prefill: tuple[Instance, ...] = ()
    decode: tuple[Instance, ...] = ()
    colocated: tuple[Instance, ...] = ()
    token_budget: int = 2048
    kv_bytes_per_token: int = 0
    cluster: ClusterSpec | None = None
    routing: str = "least_loaded"
    mode: str = "joint"
    decode_only_same_node: bool = True
    max_steps_per_event: int = 1 << 30  # 1: one event per decode step (the reference behaviour)

    def __post_init__(self) -> None:
        if self.mode not in ("joint", "prefill_only", "decode_only"):
            raise PlannerError(f"unknown simulation mode {self.mode!r}")
        if self.routing not in ("least_loaded", "round_robin"):
            raise PlannerError(f"unknown routing {self.routing!r}: least_loaded or round_robin")
        if self.colocated and (self.prefill or self.decode):
            raise PlannerError("simulate either colocated instances or prefill/decode instances")
        need_p = self.mode in ("joint", "prefill_only") and not self.colocated
        if need_p and not self.prefill:
            raise PlannerError("the simulation needs at least one prefill instance")
        if self.mode in ("joint", "decode_only") and not self.colocated and not self.decode:
            raise PlannerError("the simulation needs at least one decode instance")
        if self.token_budget < 1:
            raise PlannerError("the prefill token budget must be >= 1")
        if self.max_steps_per_event < 1:
            raise PlannerError("max_steps_per_event must be >= 1")


class _Lane:
    """One continuous batch (a pipeline micro-batch of a decode or colocated instance).

    Steps run in segments: while nothing joins or leaves, the batch is constant and each step is
    longer than the previous by b*B (every context grew by one), so the end of step j of a segment
    is t0 + j*d0 + inc*j*(j-1)/2 and one event covers up to the next finish. Anything that would
    act at the next step boundary (a join; in colocated instances, a prefill that could start)
    cuts the segment there, so the result equals stepping one token at a time."""

    __slots__ = ("count", "d0", "fin", "inc", "k", "pending", "running", "step", "sum_ctx", "t0", "version")

    def __init__(self) -> None:
        self.count = 0
        self.sum_ctx = 0  # sum of KV lengths of the running sequences
        self.step = 0  # completed steps
        self.fin: list[tuple[int, int]] = []  # heap of (step at which it finishes, request)
        self.pending: list[int] = []  # joined during a step; enter at the next one
        self.running = False
        self.t0 = 0.0  # segment start
        self.d0 = 0.0  # first step of the segment
        self.inc = 0.0  # growth of the step time per step
        self.k = 0  # steps in the segment (0: not in a decode segment)
        self.version = 0  # bumps when the segment's end event is replaced

    def end(self, j: int) -> float:
        return self.t0 + j * self.d0 + self.inc * j * (j - 1) * 0.5

    def done_by(self, t: float) -> int:
        """Steps of the current segment completed by time t."""
        if self.k <= 1:
            return 0
        x = t - self.t0
        if self.inc > 0:
            h = self.d0 - 0.5 * self.inc
            j = int((-h + math.sqrt(h * h + 2.0 * self.inc * x)) / self.inc) if x > 0 else 0
        else:
            j = int(x / self.d0) if self.d0 > 0 else 0
        j = min(max(j, 0), self.k)
        while j < self.k and self.end(j + 1) <= t:
            j += 1
        while j > 0 and self.end(j) > t:
            j -= 1
        return j


class _Inst:
    __slots__ = (
        "busy",
        "coef",
        "count",
        "id",
        "lanes",
        "queue",
        "queued",
        "spec",
        "stage_free",
        "used",
        "waiting",
    )

    def __init__(self, idx: int, spec: Instance) -> None:
        self.id = idx
        self.spec = spec
        self.queue: deque[int] = deque()
        self.queued = 0
        self.stage_free = [0.0] * spec.latency.pp
        self.busy = False
        self.waiting: deque[int] = deque()
        self.used = 0
        self.count = 0
        self.lanes = [_Lane() for _ in range(spec.latency.pp)]
        lat = spec.latency
        # Decode step coefficients in seconds, unpacked once: the step is the simulator's hot path.
        # Must equal PhaseLatency.decode_step (checked by the tests).
        self.coef = (
            *(x / 1000.0 for x in lat.coef.decode_small),
            *(x / 1000.0 for x in lat.coef.decode_large),
            lat.coef.threshold,
            lat.pp * lat.hop_ms / 1000.0,
        )


def simulate(cfg: SimConfig, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray) -> SimResult:
    """Run the simulation to completion of every request; times in seconds."""
    n = len(arrivals)
    if not (len(prompts) == len(outputs) == n):
        raise PlannerError("arrivals, prompts and outputs must have the same length")
    arr = arrivals.tolist()
    plen = [int(x) for x in prompts]
    olen = [int(x) for x in outputs]
    ttft = [float("nan")] * n
    first = [0.0] * n
    finish = [float("nan")] * n
    done = [0] * n
    src = [-1] * n
    budget = cfg.token_budget
    max_steps = cfg.max_steps_per_event
    kvb = cfg.kv_bytes_per_token
    cluster = cfg.cluster
    prefill_only = cfg.mode == "prefill_only"
    decode_only = cfg.mode == "decode_only"
    rr = cfg.routing == "round_robin"
    pre = [_Inst(k, s) for k, s in enumerate(cfg.prefill)]
    dec = [_Inst(k, s) for k, s in enumerate(cfg.decode)]
    col = [_Inst(k, s) for k, s in enumerate(cfg.colocated)]
    by_group: dict[int, list[_Inst]] = {}
    for d in dec:
        by_group.setdefault(d.spec.group, []).append(d)
    pre_groups: dict[int, list[_Inst]] = {}
    for p_ in pre:
        if p_.spec.group in by_group:
            pre_groups.setdefault(p_.spec.group, []).append(p_)
    heap: list[tuple[float, int, int, _Inst | None, object]] = []
    seq = 0
    rr_next = [0, 0]
    busy = [0.0, 0.0]  # seconds the instances spent computing: prefill (stage time), decode steps

    def push(t: float, kind: int, inst: _Inst | None, arg: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, inst, arg))

    def complete(i: int, t: float) -> None:
        finish[i] = t
        done[i] += 1

    def start_prefill(p: _Inst, t: float) -> None:
        q = p.queue
        batch: list[int] = []
        tokens = sq = 0
        while q:
            ln = plen[q[0]]
            if batch and tokens + ln > budget:
                break
            batch.append(q.popleft())
            tokens += ln
            sq += ln * ln
        dt = p.spec.latency.prefill_stage(tokens, sq)
        busy[0] += dt * len(p.stage_free)
        s = t
        free = p.stage_free
        for k in range(len(free)):
            s = max(s, free[k]) + dt
            free[k] = s
        p.busy = True
        push(free[0], STAGE0_FREE, p, None)
        push(s, PREFILL_DONE, p, batch)

    def pick(insts: list[_Inst], which: int, t: float) -> _Inst:
        if len(insts) == 1:
            return insts[0]
        if rr:
            k = rr_next[which] % len(insts)
            rr_next[which] += 1
            return insts[k]
        # The orchestrator's router: fewest outstanding tokens (prompt tokens not yet prefilled for
        # prefill, tokens still to generate for decode); ties go to the first instance.
        if which == 0:
            return min(insts, key=lambda x: x.queued)
        return min(insts, key=lambda x: x.queued - sum(ln.count * ln.done_by(t) for ln in x.lanes))

    def group_load(g: int, t: float) -> float:
        ds = by_group[g]
        owed = sum(x.queued - sum(ln.count * ln.done_by(t) for ln in x.lanes) for x in ds)
        prompts = sum(x.queued for x in pre_groups[g])
        return (owed + prompts) / len(ds)

    def try_admit(d: _Inst, t: float) -> None:
        cap, mb = d.spec.capacity_tokens, d.spec.max_batch
        w = d.waiting
        while w:
            i = w[0]
            need = plen[i] + olen[i]
            # A request larger than the whole cache runs alone rather than deadlocking.
            if (d.used + need > cap and d.used > 0) or d.count >= mb:
                break
            w.popleft()
            d.used += need
            d.count += 1
            x = 0.0
            if cluster is not None and kvb:
                x = cluster.transfer_seconds(plen[i] * kvb, src[i] == d.spec.node)
            push(t + x, JOIN, d, i)

    def start_step(d: _Inst, lane: _Lane, t: float) -> None:
        for i in lane.pending:
            lane.count += 1
            lane.sum_ctx += plen[i]
            heapq.heappush(lane.fin, (lane.step + olen[i] - 1, i))
        lane.pending.clear()
        b = lane.count
        lane.running = True
        a0, b0, c0, a1, b1, c1, thr, hops = d.coef
        tt = lane.sum_ctx + b
        if b <= thr:
            dt, inc = a0 + b0 * tt + c0 * b, b0 * b
        else:
            dt, inc = a1 + b1 * tt + c1 * b, b1 * b
        k = lane.fin[0][0] - lane.step
        if dt <= 0.0 or inc < 0.0 or k < 1:
            k = 1  # clamped or shrinking step times: step by step
        lane.t0, lane.d0, lane.inc = t, (dt if dt > 0.0 else 0.0) + hops, inc
        lane.k = min(k, max_steps)
        lane.version += 1
        push(lane.end(lane.k), STEP_DONE, d, (lane, lane.version))

    def cut(d: _Inst, lane: _Lane, t: float) -> None:
        """End the lane's segment at the first step boundary after t."""
        if lane.running and lane.k > 1:
            nk = lane.done_by(t) + 1
            if nk < lane.k:
                lane.k = nk
                lane.version += 1
                push(lane.end(nk), STEP_DONE, d, (lane, lane.version))

    def step_done(d: _Inst, lane: _Lane, t: float) -> bool:
        k = lane.k
        busy[1] += t - lane.t0
        lane.k = 0
        lane.step += k
        lane.sum_ctx += lane.count * k
        d.queued -= lane.count * k  # one token per running sequence per step
        fin = lane.fin
        freed = False
        while fin and fin[0][0] <= lane.step:
            i = heapq.heappop(fin)[1]
            complete(i, t)
            lane.count -= 1
            lane.sum_ctx -= plen[i] + olen[i] - 1
            d.used -= plen[i] + olen[i]
            d.count -= 1
            freed = True
        lane.running = False
        return freed

    def co_iterate(c: _Inst, lane: _Lane, t: float) -> None:
        """Next iteration of a colocated lane: a prefill batch if one fits (vLLM's prefill priority)."""
        w = c.waiting
        head_fits = bool(w) and (c.used == 0 or c.used + plen[w[0]] + olen[w[0]] <= c.spec.capacity_tokens)
        if head_fits and c.count < c.spec.max_batch:
            batch: list[int] = []
            tokens = sq = 0
            while w and c.count < c.spec.max_batch:
                i = w[0]
                ln, need = plen[i], plen[i] + olen[i]
                if batch and (tokens + ln > budget or c.used + need > c.spec.capacity_tokens):
                    break
                w.popleft()
                batch.append(i)
                c.used += need
                c.count += 1
                tokens += ln
                sq += ln * ln
            c.queued -= tokens
            lat = c.spec.latency
            busy[0] += lat.prefill_full(tokens, sq)
            lane.running = True
            lane.k = 0
            push(
                t + lat.prefill_full(tokens, sq) + lat.pp * lat.hop_ms / 1000.0,
                CO_PREFILL_DONE,
                c,
                (lane, batch),
            )
        elif lane.count or lane.pending:
            start_step(c, lane, t)

    def co_kick(c: _Inst, t: float) -> None:
        for lane in c.lanes:
            if not lane.running:
                co_iterate(c, lane, t)

    for i in range(n):
        push(arr[i], ARRIVAL, None, i)

    while heap:
        t, _, kind, inst, arg = heapq.heappop(heap)
        if kind == ARRIVAL:
            i = arg  # type: ignore[assignment]
            assert isinstance(i, int)
            if col:
                # outstanding tokens of a colocated instance: prompts to prefill + tokens to generate
                c = pick(col, 1, t)
                c.waiting.append(i)
                c.queued += plen[i] + olen[i] - 1
                for lane in c.lanes:
                    cut(c, lane, t)  # a running lane may take this prefill at its next step
                co_kick(c, t)
            elif decode_only:
                ttft[i] = 0.0
                first[i] = t
                if olen[i] == 1:
                    complete(i, t)
                    continue
                d = pick(dec, 1, t)
                src[i] = d.spec.node if cfg.decode_only_same_node else -1
                d.waiting.append(i)
                d.queued += olen[i] - 1
                try_admit(d, t)
            else:
                if len(pre_groups) > 1 and not rr:
                    # Node-local units: the unit whose decode instances owe the fewest tokens each,
                    # then its least-loaded prefill instance (else every tie would go to unit 0).
                    g = min(pre_groups, key=lambda k: group_load(k, t))
                    p = pick(pre_groups[g], 0, t)
                else:
                    p = pick(pre, 0, t)
                p.queue.append(i)
                p.queued += plen[i]
                if not p.busy:
                    start_prefill(p, t)
        elif kind == STAGE0_FREE:
            assert inst is not None
            inst.busy = False
            if inst.queue:
                start_prefill(inst, t)
        elif kind == PREFILL_DONE:
            assert inst is not None and isinstance(arg, list)
            touched: list[_Inst] = []
            for i in arg:
                inst.queued -= plen[i]
                ttft[i] = t - arr[i]
                first[i] = t
                if prefill_only or olen[i] == 1:
                    complete(i, t)
                    continue
                cands = dec if rr else by_group.get(inst.spec.group, dec)
                d = pick(cands, 1, t)
                src[i] = inst.spec.node
                d.waiting.append(i)
                d.queued += olen[i] - 1
                if d not in touched:
                    touched.append(d)
            for d in touched:
                try_admit(d, t)
        elif kind == JOIN:
            assert inst is not None and isinstance(arg, int)
            lane = min(inst.lanes, key=lambda x: x.count + len(x.pending))
            lane.pending.append(arg)
            if not lane.running:
                start_step(inst, lane, t)
            else:
                cut(inst, lane, t)
        elif kind == STEP_DONE:
            assert inst is not None and isinstance(arg, tuple)
            lane, version = arg
            if version != lane.version:
                continue  # the segment was cut; a newer event ends it
            freed = step_done(inst, lane, t)
            if col:
                co_iterate(inst, lane, t)
                if freed and inst.waiting:
                    for other in inst.lanes:
                        cut(inst, other, t)  # memory freed: the waiting prefill may fit now
                    co_kick(inst, t)
                continue
            if freed:
                try_admit(inst, t)
            if lane.count or lane.pending:
                start_step(inst, lane, t)
        else:  # CO_PREFILL_DONE
            assert inst is not None and isinstance(arg, tuple)
            lane, batch = arg
            freed = False
            for i in batch:
                ttft[i] = t - arr[i]
                first[i] = t
                if olen[i] == 1:
                    complete(i, t)
                    inst.used -= plen[i] + 1
                    inst.count -= 1
                    freed = True
                else:
                    lane.pending.append(i)
            lane.running = False
            co_iterate(inst, lane, t)
            if freed:
                co_kick(inst, t)

    fin_arr = np.array(finish)
    first_arr = np.array(first)
    out = np.asarray(outputs, dtype=np.float64)
    tpot = np.where(out > 1, (fin_arr - first_arr) / np.maximum(out - 1, 1), 0.0)
    if prefill_only:
        tpot = np.zeros(n)
    return SimResult(np.array(ttft), tpot, fin_arr, np.array(done, dtype=np.int64), (busy[0], busy[1]))
