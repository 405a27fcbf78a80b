"""Memory fit: does a (TP, PP) instance hold the weights, and how many tokens of KV cache fit.

Capacities come from a measured table (max_num_tokens.csv: model,tp,pp,max_num_tokens) when it has
the entry, else from the model size and the GPU memory."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from planner import PlannerError
from planner.cluster import GIB, ClusterSpec
from planner.model_spec import ModelSpec
from planner.profile import PROFILE_DIR

DEFAULT_CAPACITY_TABLE = PROFILE_DIR / "max_num_tokens.csv"
# Activations, CUDA graphs and allocator slack per GPU; calibrated so the computed capacities of
# OPT-13B/66B land within a few percent of the published table.
RESERVED_BYTES_PER_GPU = 1.5 * GIB


@dataclass(frozen=True)
class CapacityTable:
    """Measured KV capacity in tokens per (model, tp, pp)."""

    entries: dict[tuple[str, int, int], int] = field(default_factory=dict)

    def lookup(self, model: str, tp: int, pp: int) -> int | None:
        short = model.split("/")[-1].lower()
        for (name, t, p), tokens in self.entries.items():
            if t == tp and p == pp and name.split("/")[-1].lower() == short:
                return tokens
        return None

    def has_model(self, model: str) -> bool:
        short = model.split("/")[-1].lower()
        return any(name.split("/")[-1].lower() == short for name, _, _ in self.entries)


def load_capacity_table(path: str | Path = DEFAULT_CAPACITY_TABLE) -> CapacityTable:
    p = Path(path)
    entries: dict[tuple[str, int, int], int] = {}
    try:
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"model", "tp", "pp", "max_num_tokens"} <= set(
                reader.fieldnames
            ):
                raise PlannerError(f"{p}: expected the columns model,tp,pp,max_num_tokens")
            for row in reader:
                entries[(row["model"], int(row["tp"]), int(row["pp"]))] = int(row["max_num_tokens"])
    except FileNotFoundError as exc:
        raise PlannerError(f"capacity table {p} not found") from exc
    except (ValueError, TypeError) as exc:
        raise PlannerError(f"{p}: malformed row ({exc})") from exc
    return CapacityTable(entries)


def computed_capacity_tokens(model: ModelSpec, cluster: ClusterSpec, tp: int, pp: int) -> int:
    """KV tokens an instance of tp*pp GPUs holds after the weights (0 when the weights do not fit).

    Each GPU holds 1/(tp*pp) of the weights and the same share of every token's KV."""
    gpus = tp * pp
    free = cluster.usable_bytes_per_gpu - model.param_bytes / gpus - RESERVED_BYTES_PER_GPU
    if free <= 0:
        return 0
    return int(free // (model.kv_bytes_per_token / gpus))


def kv_capacity_tokens(
    model: ModelSpec, cluster: ClusterSpec, tp: int, pp: int, table: CapacityTable | None = None
) -> int:
    """KV capacity of an instance: the table's measurement for an 80 GB GPU when it has one (and the
    cluster's GPUs are 80 GB), else computed. 0 means the model does not fit."""
    if table is not None and abs(cluster.gpu_memory_gib - 80.0) < 1e-9 and table.has_model(model.name):
        # The table lists every configuration that fits; a missing (tp, pp) did not fit.
        return table.lookup(model.name, tp, pp) or 0
    return computed_capacity_tokens(model, cluster, tp, pp)
