"""The planning problem as the user states it: what `planner plan` is asked, recorded in plan.json
(details.inputs) so that `planner replan` can pose the same problem again on new traffic."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner import PlannerError
from planner.cluster import ClusterSpec
from planner.goodput import SearchSettings, Slo
from planner.memory import DEFAULT_CAPACITY_TABLE, load_capacity_table
from planner.model_spec import resolve_model
from planner.profile import DEFAULT_PROFILE, VLLM_PROFILE, load_profile
from planner.search import Problem, ReferenceEngine
from workload import Workload, load_workload


@dataclass(frozen=True)
class PlanInputs:
    """Model, hardware, workload, SLOs and search settings (the options of `planner plan`)."""

    model: str  # a known model name (opt-13b, ...) or a Hugging Face folder
    nodes: int
    gpus_per_node: int
    ttft: float  # TTFT SLO, seconds
    tpot: float  # TPOT SLO, seconds
    attainment: float = 0.9
    profile: str = str(DEFAULT_PROFILE)
    colocated_profile: str | None = None  # the reference baseline's engine (see reference_profile)
    capacity_table: str = str(DEFAULT_CAPACITY_TABLE)  # or "none"
    gpu_memory_gib: float = 80.0
    nvlink_gbps: float = 300.0
    no_nvlink: bool = False
    network_gbps: float = 25.0
    affinity: str = "high"
    workload: str = "sharegpt"
    tokenizer: str | None = None
    rate: float | None = None
    arrival_cv: float = 1.0
    token_budget: int = 2048
    max_batch: int = 256
    max_pp: int = 8
    joint_candidates: int = 3
    colocated_kv: str = "reserve"
    precision: float = 0.03
    workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise PlannerError(
                f"need at least one node and one GPU per node (got {self.nodes} x {self.gpus_per_node})"
            )
        if min(self.token_budget, self.max_batch, self.max_pp, self.joint_candidates) < 1:
            raise PlannerError("--token-budget, --max-batch, --max-pp and --joint-candidates must be >= 1")
        if self.colocated_kv not in ("reserve", "on-demand"):
            raise PlannerError(f"--colocated-kv must be reserve or on-demand, got {self.colocated_kv!r}")
        if self.affinity not in ("high", "low"):
            raise PlannerError(f"affinity must be high or low, got {self.affinity!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PlanInputs:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PlanInputs:
        """The inputs recorded in a plan."""
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise PlannerError(f"the plan's recorded inputs hold unknown fields: {', '.join(unknown)}")
        return cls(**raw)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def reference_profile(self) -> str | None:
        """The reference baseline's profile: --colocated-profile, else vLLM's measured A100 profile
        when planning with DistServe's published one (the paper's comparison), else none."""
        if self.colocated_profile:
            return self.colocated_profile
        return str(VLLM_PROFILE) if Path(self.profile).resolve() == DEFAULT_PROFILE.resolve() else None

    def problem(self, workload: Workload | None = None) -> Problem:
        """The search problem: profiles, cluster and workload loaded (`workload` replaces the
        stated one, e.g. the traffic observed by replan)."""
        model = resolve_model(self.model)
        profile = load_profile(self.profile).for_model(model.name)
        ref_path = self.reference_profile()
        reference = None
        if ref_path is not None:
            ref_pp = 1 if Path(ref_path).resolve() == VLLM_PROFILE.resolve() else self.max_pp
            reference = ReferenceEngine(
                Path(ref_path).name, load_profile(ref_path).for_model(model.name), ref_pp
            )
        table = None if self.capacity_table == "none" else load_capacity_table(self.capacity_table)
        cluster = ClusterSpec(
            self.nodes, self.gpus_per_node, self.gpu_memory_gib, nvlink=not self.no_nvlink,
            nvlink_gbps=self.nvlink_gbps, network_gbps=self.network_gbps,
        )  # fmt: skip
        tokenizer = self.tokenizer or (self.model if Path(self.model).is_dir() else None)
        stated = workload or load_workload(self.workload, tokenizer, model.max_position_embeddings, self.seed)
        return Problem(
            model=model,
            profile=profile,
            cluster=cluster,
            workload=stated,
            slo=Slo(self.ttft, self.tpot, self.attainment),
            settings=SearchSettings(precision=self.precision, seed=self.seed, arrival_cv=self.arrival_cv),
            capacity_table=table,
            profile_name=Path(self.profile).name,
            reference=reference,
            joint_candidates=self.joint_candidates,
            colocated_kv=self.colocated_kv.replace("-", "_"),
            token_budget=self.token_budget,
            max_batch=self.max_batch,
            workers=self.workers,
            max_pp=self.max_pp,
        )


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of PlanInputs (shared by plan and replan)."""
    d = PlanInputs(model="", nodes=1, gpus_per_node=1, ttft=1.0, tpot=1.0)
    ap.add_argument("--profile", default=d.profile, help="latency profile JSON (DistServe format)")
    ap.add_argument(
        "--colocated-profile",
        help="engine of the reference colocated baseline (default: the vLLM A100 profile when --profile "
        "is DistServe's, else no reference baseline; the same-engine baseline always uses --profile)",
    )
    ap.add_argument("--capacity-table", default=d.capacity_table, help="KV capacity CSV, or 'none'")
    ap.add_argument("--model", required=True, help="known model name (opt-13b, ...) or a Hugging Face folder")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu-memory-gib", type=float, default=d.gpu_memory_gib)
    ap.add_argument("--nvlink-gbps", type=float, default=d.nvlink_gbps)
    ap.add_argument("--no-nvlink", action="store_true", help="GPUs of a node talk over PCIe")
    ap.add_argument(
        "--network-gbps", type=float, default=d.network_gbps, help="bandwidth between nodes (GB/s)"
    )
    ap.add_argument("--affinity", choices=("high", "low"), default=d.affinity)
    ap.add_argument("--ttft", type=float, required=True, help="TTFT SLO, seconds")
    ap.add_argument("--tpot", type=float, required=True, help="TPOT SLO, seconds")
    ap.add_argument("--attainment", type=float, default=d.attainment)
    ap.add_argument(
        "--workload",
        default=d.workload,
        help="sharegpt (first human turn + answer) | sharegpt-distserve (DistServe's multi-turn cut; "
        "use for the paper's figures) | FILE | synthetic:prompt=DIST,output=DIST",
    )
    ap.add_argument("--tokenizer", help="folder with tokenizer.json (default: --model when it is a folder)")
    ap.add_argument("--rate", type=float, help="target rate (req/s); default: as much as the cluster serves")
    ap.add_argument("--arrival-cv", type=float, default=d.arrival_cv, help="arrival burstiness (1 = Poisson)")
    ap.add_argument("--token-budget", type=int, default=d.token_budget, help="prefill batch token budget")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help="max sequences in a decode batch")
    ap.add_argument("--max-pp", type=int, default=d.max_pp, help="deepest pipeline searched")
    ap.add_argument(
        "--colocated-kv",
        choices=("reserve", "on-demand"),
        default=d.colocated_kv,
        help="KV of the colocated baselines: reserved for prompt + output at admission (as our engine "
        "does), or allocated on demand with recompute preemption (as vLLM does)",
    )
    ap.add_argument(
        "--joint-candidates",
        type=int,
        default=d.joint_candidates,
        help="best candidates per pipeline depth simulated jointly before choosing",
    )
    ap.add_argument(
        "--precision", type=float, default=d.precision, help="relative precision of goodput searches"
    )
    ap.add_argument("--workers", type=int, default=d.workers, help="search processes (0 = one per core)")
    ap.add_argument("--seed", type=int, default=d.seed)
