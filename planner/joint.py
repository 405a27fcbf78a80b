"""Joint simulation of candidate deployments before one is chosen.

Single-instance goodputs rank the (prefill, decode) pairs of Alg. 1 and the unit shapes of Alg. 2,
but they do not compose: how prefill batches feed a decode instance, and how decode memory pushes
back on prefill, only show when both phases run together. So the best few candidates of each
pipeline depth are simulated whole (prefill -> KV transfer -> decode, both SLOs at once), and the
choice is made on those figures. Candidates are the top `k` of every search space "pp <= L" for each
pipeline depth L in the search, so a search space that contains another (a larger --max-pp)
simulates a superset of its candidates and can never choose a worse one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from planner.goodput import Goodput, Slo, attainment_at, search_goodput
from planner.gpu_assign import Replica, Segment, pack_independent, pack_units
from planner.pool import parallel_map
from planner.search import PhaseTask, Problem, instance_for
from planner.simulator import Instance, SimConfig

MAX_FIXUPS = 16


@dataclass(frozen=True, order=True)
class Candidate:
    """A deployment: Alg. 1 places n_p prefill and n_d decode replicas anywhere; Alg. 2 places
    `units` copies of `segment`. `predicted` is the goodput the per-phase figures promise (req/s)."""

    prefill: PhaseTask
    decode: PhaseTask
    n_p: int = 0
    n_d: int = 0
    segment: Segment | None = None
    units: int = 1
    predicted: float = 0.0

    @property
    def max_pp(self) -> int:
        return max(self.prefill.pp, self.decode.pp)

    @property
    def gpus(self) -> int:
        if self.segment is not None:
            return self.units * self.segment.gpus
        return self.n_p * self.prefill.gpus + self.n_d * self.decode.gpus

    def replicas(self, problem: Problem) -> list[Replica] | None:
        """The placed replicas; None when they do not fit the cluster."""
        if self.segment is not None:
            return pack_units(problem.cluster, self.segment, self.units) if self.units >= 1 else None
        wanted = [("prefill", self.prefill.tp, self.prefill.pp)] * self.n_p
        wanted += [("decode", self.decode.tp, self.decode.pp)] * self.n_d
        return pack_independent(problem.cluster, wanted)

    def grown(self, short_of_ttft: bool) -> Candidate:
        """One more unit, or one more replica of the phase that misses its SLO."""
        if self.segment is not None:
            return replace(self, units=self.units + 1)
        return replace(self, n_p=self.n_p + 1) if short_of_ttft else replace(self, n_d=self.n_d + 1)

    def describe(self) -> str:
        p, d = self.prefill, self.decode
        if self.segment is not None:
            s = self.segment
            return (
                f"{self.units} x [prefill ({s.tp_p},{p.pp}) x {s.k_p} + decode ({s.tp_d},{d.pp}) x {s.k_d}]"
            )
        return f"prefill ({p.tp},{p.pp}) x {self.n_p} + decode ({d.tp},{d.pp}) x {self.n_d}"

    def to_json(self) -> dict[str, object]:
        return {"deployment": self.describe(), "gpus": self.gpus, "predicted_goodput": self.predicted}


class Settled(NamedTuple):
    """A candidate after its joint simulation: the counts it ended with, its replicas, and its joint
    goodput (whole deployment); `fixups` lists what a target rate made it add."""

    candidate: Candidate
    replicas: tuple[Replica, ...]
    goodput: Goodput
    fixups: tuple[str, ...]


def top_per_pp_level(scored: Sequence[tuple[tuple[float, ...], Candidate]], k: int) -> list[Candidate]:
    """The union, over every pipeline depth L present, of the k best-scored candidates whose
    phases have pp <= L (higher score first; ties broken by the candidate, so the order never
    depends on how the candidates were enumerated)."""
    ranked = sorted(scored, key=lambda sc: (sc[0], sc[1]), reverse=True)
    out: list[Candidate] = []
    for level in sorted({c.max_pp for _, c in scored}):
        for c in [c for _, c in ranked if c.max_pp <= level][:k]:
            if c not in out:
                out.append(c)
    return out


def joint_config(problem: Problem, replicas: Sequence[Replica]) -> SimConfig:
    """The simulator's view of a set of placed replicas."""

    def instances(role: str) -> tuple[Instance, ...]:
        return tuple(
            instance_for(problem, role, r.tp, r.pp, r.node, r.group) for r in replicas if r.role == role
        )

    return SimConfig(
        prefill=instances("prefill"),
        decode=instances("decode"),
        token_budget=problem.token_budget,
        kv_bytes_per_token=problem.model.kv_bytes_per_token,
        cluster=problem.cluster,
        routing=problem.routing,
    )


def simulated_part(replicas: Sequence[Replica], units: int) -> list[Replica]:
    """What is simulated: the whole deployment, or one of `units` identical, balanced units (a far
    longer run, closer to steady state, for the same cost)."""
    return [r for r in replicas if r.group == 0] if units > 1 else list(replicas)


def attainment_split(problem: Problem, replicas: Sequence[Replica], rate: float) -> tuple[float, float]:
    """TTFT-only and TPOT-only attainment of the replicas at `rate` (both 1.0 when the joint one
    meets the target)."""
    cfg = joint_config(problem, replicas)
    slo = problem.slo
    if attainment_at(cfg, rate, problem.workload, slo, problem.settings).value >= slo.attainment:
        return 1.0, 1.0
    only_ttft = Slo(slo.ttft, 1e9, slo.attainment)
    only_tpot = Slo(1e9, slo.tpot, slo.attainment)
    return (
        attainment_at(cfg, rate, problem.workload, only_ttft, problem.settings).value,
        attainment_at(cfg, rate, problem.workload, only_tpot, problem.settings).value,
    )


def settle(problem: Problem, item: tuple[Candidate, float | None]) -> Settled | None:
    """Joint goodput of a candidate; with a target rate, first add replicas (units) until the joint
    attainment at that rate meets the SLOs. None when it stops fitting the cluster."""
    cand, rate = item
    placed = cand.replicas(problem)
    fixups: list[str] = []
    if placed is None:
        return None
    for _ in range(MAX_FIXUPS if rate is not None else 0):
        assert rate is not None
        a_ttft, a_tpot = attainment_split(problem, simulated_part(placed, cand.units), rate / cand.units)
        if min(a_ttft, a_tpot) >= problem.slo.attainment:
            break
        cand = cand.grown(short_of_ttft=a_ttft < a_tpot)
        fixups.append(
            f"joint check at {rate:g} req/s missed (ttft {a_ttft:.3f}, tpot {a_tpot:.3f}): {cand.describe()}"
        )
        placed = cand.replicas(problem)
        if placed is None:
            return None
    part = simulated_part(placed, cand.units)
    cfg = joint_config(problem, part)
    good = search_goodput(cfg, problem.workload, problem.slo, problem.settings, cand.predicted / cand.units)
    return Settled(cand, tuple(placed), good.scaled(cand.units), tuple(fixups))


def simulate_candidates(
    problem: Problem, candidates: Sequence[Candidate], rate: float | None, log: Callable[[str], None]
) -> list[Settled]:
    """Settle every candidate on the process pool; the ones that no longer fit are dropped."""
    done = parallel_map(problem, settle, [(c, rate) for c in candidates], problem.workers, "joint")
    settled = [s for s in done if s is not None]
    for s in settled:
        for line in s.fixups:
            log(line)
    return settled


def best_settled(settled: Sequence[Settled], rate: float | None) -> Settled:
    """Filling the cluster: the most joint goodput, then the fewest GPUs. With a target rate: the
    fewest GPUs, then the most joint goodput per GPU."""

    def gpus(s: Settled) -> int:
        return sum(len(r.gpus) for r in s.replicas)

    def key(s: Settled) -> tuple[float, float, Candidate]:
        if rate is None:
            return (s.goodput.rate, -gpus(s), s.candidate)
        return (-gpus(s), s.goodput.rate / gpus(s), s.candidate)

    return max(settled, key=key)
