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


@dataclass(frozen=True)
class Plan:
    """Result of a placement search. `goodput` is the simulated joint goodput of the whole deployment
    (req/s at which >= attainment of requests meet both SLOs); `colocated` the best colocated config
    (tp, pp, goodput of one instance)."""

    algorithm: str
    model: str
    prefill: PhaseChoice
    decode: PhaseChoice
    replicas: tuple[Replica, ...]
    goodput: float
    attainment: float
    target_rate: float | None
    colocated: PhaseChoice | None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_gpus(self) -> int:
        return sum(len(r.gpus) for r in self.replicas)

    @property
    def per_gpu_goodput(self) -> float:
        return self.goodput / self.num_gpus if self.num_gpus else 0.0

    @property
    def colocated_per_gpu(self) -> float:
        c = self.colocated
        return c.goodput / c.gpus if c else 0.0

    def role_replicas(self, role: str) -> list[Replica]:
        return [r for r in self.replicas if r.role == role]

    def to_json(self) -> dict[str, Any]:
        def choice(c: PhaseChoice | None) -> dict[str, Any] | None:
            return None if c is None else {"tp": c.tp, "pp": c.pp, "goodput": c.goodput}

        ratio = self.per_gpu_goodput / self.colocated_per_gpu if self.colocated_per_gpu else None
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
            "per_gpu_goodput": self.per_gpu_goodput,
            "attainment": self.attainment,
            "target_rate": self.target_rate,
            "colocated": choice(self.colocated),
            "colocated_per_gpu_goodput": self.colocated_per_gpu,
            "disaggregated_over_colocated": ratio,
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
                colocated=choice(data.get("colocated")),
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
