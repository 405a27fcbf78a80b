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
TPOT of a request = (last token time - first token time) / (output tokens - 1).

This module is the entry point: it wires the parts in planner.sim (one class per instance role, the
routers, the event loop) for the configuration's mode and runs them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from planner import PlannerError
from planner.sim.colocated import ColocatedInstance
from planner.sim.config import Instance, SimConfig
from planner.sim.decode import DecodeInstance
from planner.sim.events import EventLoop
from planner.sim.ledger import BusyTime, Requests
from planner.sim.on_demand import OnDemandColocatedInstance
from planner.sim.prefill import PrefillInstance
from planner.sim.router import NodeUnit, Router, UnitRouter
from planner.sim_stats import SimResult

__all__ = ["Instance", "SimConfig", "SimResult", "simulate"]

ArrivalHandler = Callable[[float, int], None]


def simulate(cfg: SimConfig, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray) -> SimResult:
    """Run the simulation to completion of every request; times in seconds.

    arrivals: arrival times; prompts, outputs: token counts (outputs >= 1), one per request."""
    n = len(arrivals)
    if not (len(prompts) == len(outputs) == n):
        raise PlannerError("arrivals, prompts and outputs must have the same length")
    requests = Requests(arrivals, prompts, outputs)
    busy = BusyTime()
    loop = EventLoop()
    # Colocated instances serve every mode (the mode only decides which metrics count).
    if cfg.colocated:
        on_arrival = _colocated(cfg, loop, requests, busy)
    elif cfg.mode == "decode_only":
        on_arrival = _decode_only(cfg, loop, requests, busy)
    else:
        on_arrival = _disaggregated(cfg, loop, requests, busy)
    loop.run(requests.arrivals, on_arrival)
    return requests.result(outputs, busy, cfg.mode == "prefill_only")


def _decode_instances(
    cfg: SimConfig, loop: EventLoop, requests: Requests, busy: BusyTime
) -> list[DecodeInstance]:
    return [
        DecodeInstance(s, loop, requests, busy, cfg.max_steps_per_event, cfg.cluster, cfg.kv_bytes_per_token)
        for s in cfg.decode
    ]


def _colocated(cfg: SimConfig, loop: EventLoop, requests: Requests, busy: BusyTime) -> ArrivalHandler:
    kind = OnDemandColocatedInstance if cfg.colocated_kv == "on_demand" else ColocatedInstance
    instances = [
        kind(s, loop, requests, busy, cfg.max_steps_per_event, cfg.token_budget) for s in cfg.colocated
    ]
    router = Router(instances, cfg.routing == "round_robin")

    def arrive(t: float, i: int) -> None:
        router.pick(t).accept(i, t)

    return arrive


def _decode_only(cfg: SimConfig, loop: EventLoop, requests: Requests, busy: BusyTime) -> ArrivalHandler:
    """Requests skip prefill: first token at arrival, KV from this node or another one."""
    router = Router(_decode_instances(cfg, loop, requests, busy), cfg.routing == "round_robin")
    output_lens = requests.output_lens
    same_node = cfg.decode_only_same_node

    def arrive(t: float, i: int) -> None:
        requests.ttft[i] = 0.0
        requests.first_token[i] = t
        if output_lens[i] == 1:
            requests.complete(i, t)
            return
        decode = router.pick(t)
        decode.accept(i, decode.spec.node if same_node else -1)
        decode.admit_waiting(t)

    return arrive


def _disaggregated(cfg: SimConfig, loop: EventLoop, requests: Requests, busy: BusyTime) -> ArrivalHandler:
    """Prefill instances, then (unless prefill-only) decode instances, routed by node group."""
    round_robin = cfg.routing == "round_robin"
    prefill = [PrefillInstance(s, loop, requests, busy, cfg.token_budget) for s in cfg.prefill]
    # Decode instances exist in prefill-only runs too: their groups still shape prefill routing.
    decode = _decode_instances(cfg, loop, requests, busy)
    decode_by_group: dict[int, list[DecodeInstance]] = {}
    for d in decode:
        decode_by_group.setdefault(d.spec.group, []).append(d)
    # Node-local units: the prefill instances of groups that have decode instances.
    prefill_by_group: dict[int, list[PrefillInstance]] = {}
    for p in prefill:
        if p.spec.group in decode_by_group:
            prefill_by_group.setdefault(p.spec.group, []).append(p)

    if cfg.mode != "prefill_only":
        any_decode = Router(decode, round_robin)
        by_group = {g: Router(ds, round_robin=False) for g, ds in decode_by_group.items()}
        for p in prefill:
            # Round robin ignores groups; least-loaded stays in the group when it has decode instances.
            p.decode_router = any_decode if round_robin else by_group.get(p.spec.group, any_decode)

    prefill_router: Router[PrefillInstance] | UnitRouter[PrefillInstance, DecodeInstance]
    if len(prefill_by_group) > 1 and not round_robin:
        prefill_router = UnitRouter([NodeUnit(ps, decode_by_group[g]) for g, ps in prefill_by_group.items()])
    else:
        prefill_router = Router(prefill, round_robin)

    def arrive(t: float, i: int) -> None:
        prefill_router.pick(t).enqueue(i, t)

    return arrive
