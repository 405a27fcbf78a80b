"""A placement plan: what to run where, its simulated goodput, and its JSON form (plan.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from planner import PlannerError
from planner.cluster import Gpu
from planner.gpu_assign import Replica


class PhaseChoice(NamedTuple):
    """A phase's chosen parallelism and its single-instance goodput (req/s)."""

    tp: int
    pp: int
    goodput: float

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


class Baseline(NamedTuple):
    """A labelled colocated baseline: the best colocated config of `engine` (a profile) and its
    single-instance goodput with a 95% interval (`low`, `high`, req/s); `choice` None when no
    colocated config meets the SLOs."""

    label: str
    engine: str
    choice: PhaseChoice | None
    low: float = 0.0
    high: float = 0.0

    @property
    def per_gpu(self) -> float:
        return self.choice.goodput / self.choice.gpus if self.choice else 0.0

    def to_json(self) -> dict[str, Any]:
        c = self.choice
        return {
            "label": self.label,
            "engine": self.engine,
            "colocated": None if c is None else {"tp": c.tp, "pp": c.pp, "goodput": c.goodput},
            "goodput_ci": [self.low, self.high],
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Baseline:
        c = d["colocated"]
        choice = None if c is None else PhaseChoice(int(c["tp"]), int(c["pp"]), float(c["goodput"]))
        low, high = (float(x) for x in d["goodput_ci"])
        return Baseline(str(d["label"]), str(d["engine"]), choice, low, high)


class Ratio(NamedTuple):
    """Disaggregated over colocated per-GPU goodput, with a conservative 95% interval (the low end
    divides the disaggregated low end by the colocated high end, and the other way round)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Plan:
    """Result of a placement search. `goodput` is the simulated joint goodput of the whole deployment
    (req/s at which >= attainment of requests meet both SLOs), within [`goodput_low`,
    `goodput_high`] at 95%; `baselines` the labelled colocated baselines (same engine first)."""

    algorithm: str
    model: str
    prefill: PhaseChoice
    decode: PhaseChoice
    replicas: tuple[Replica, ...]
    goodput: float
    attainment: float
    target_rate: float | None
    baselines: tuple[Baseline, ...] = ()
    goodput_low: float = 0.0
    goodput_high: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_gpus(self) -> int:
        return sum(len(r.gpus) for r in self.replicas)

    @property
    def per_gpu_goodput(self) -> float:
        return self.goodput / self.num_gpus if self.num_gpus else 0.0

    def ratio(self, baseline: Baseline) -> Ratio | None:
        """Per-GPU goodput over the baseline's; None when no colocated config meets the SLOs."""
        c = baseline.choice
        if c is None or c.goodput <= 0 or not self.num_gpus:
            return None
        gpus = self.num_gpus
        return Ratio(
            self.per_gpu_goodput / baseline.per_gpu,
            (self.goodput_low / gpus) / (baseline.high / c.gpus) if baseline.high > 0 else 0.0,
            (self.goodput_high / gpus) / (baseline.low / c.gpus) if baseline.low > 0 else float("inf"),
        )

    def role_replicas(self, role: str) -> list[Replica]:
        return [r for r in self.replicas if r.role == role]

    def to_json(self) -> dict[str, Any]:
        def choice(c: PhaseChoice | None) -> dict[str, Any] | None:
            return None if c is None else {"tp": c.tp, "pp": c.pp, "goodput": c.goodput}

        def compared(b: Baseline) -> dict[str, Any]:
            r = self.ratio(b)
            ratio = None if r is None else {"value": r.value, "ci": [r.low, r.high]}
            return {**b.to_json(), "per_gpu_goodput": b.per_gpu, "disaggregated_over_colocated": ratio}

        return {
            "algorithm": self.algorithm,
            "model": self.model,
            "prefill": choice(self.prefill),
            "decode": choice(self.decode),
            "replicas": [
                {
                    "role": r.role,
                    "tp": r.tp,
                    "pp": r.pp,
                    "group": r.group,
                    "gpus": [[g.node, g.device] for g in r.gpus],
                }
                for r in self.replicas
            ],
            "num_gpus": self.num_gpus,
            "goodput": self.goodput,
            "goodput_ci": [self.goodput_low, self.goodput_high],
            "per_gpu_goodput": self.per_gpu_goodput,
            "attainment": self.attainment,
            "target_rate": self.target_rate,
            "baselines": [compared(b) for b in self.baselines],
            "details": self.details,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Plan:
        try:

            def choice(d: dict[str, Any] | None) -> PhaseChoice | None:
                return None if d is None else PhaseChoice(int(d["tp"]), int(d["pp"]), float(d["goodput"]))

            pre, dec = choice(data["prefill"]), choice(data["decode"])
            assert pre is not None and dec is not None
            replicas = tuple(
                Replica(
                    str(r["role"]),
                    int(r["tp"]),
                    int(r["pp"]),
                    tuple(Gpu(int(n), int(d)) for n, d in r["gpus"]),
                    int(r.get("group", 0)),
                )
                for r in data["replicas"]
            )
            return Plan(
                algorithm=str(data["algorithm"]),
                model=str(data["model"]),
                prefill=pre,
                decode=dec,
                replicas=replicas,
                goodput=float(data["goodput"]),
                attainment=float(data["attainment"]),
                target_rate=None if data.get("target_rate") is None else float(data["target_rate"]),
                baselines=tuple(Baseline.from_json(b) for b in data.get("baselines", [])),
                goodput_low=float(data.get("goodput_ci", [0.0, 0.0])[0]),
                goodput_high=float(data.get("goodput_ci", [0.0, 0.0])[1]),
                details=dict(data.get("details", {})),
            )
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise PlannerError(f"malformed plan: {exc!r}") from exc


def save_plan(plan: Plan, path: str | Path) -> None:
    Path(path).write_text(json.dumps(plan.to_json(), indent=2, sort_keys=True) + "\n")


def load_plan(path: str | Path) -> Plan:
    p = Path(path)
    try:
        return Plan.from_json(json.loads(p.read_text()))
    except FileNotFoundError as exc:
        raise PlannerError(f"plan {p} not found") from exc
    except json.JSONDecodeError as exc:
        raise PlannerError(f"plan {p} is not valid JSON: {exc}") from exc
