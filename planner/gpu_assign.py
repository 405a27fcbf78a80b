"""Assigning GPUs to instances. A pipeline stage's tp GPUs always sit in one node (tensor
parallelism needs NVLink); stages of one instance may sit on different nodes."""

from __future__ import annotations

from typing import NamedTuple

from planner.cluster import ClusterSpec, Gpu


class Replica(NamedTuple):
    """A placed instance: role (prefill/decode), parallelism, GPUs in stage order, routing group."""

    role: str
    tp: int
    pp: int
    gpus: tuple[Gpu, ...]
    group: int = 0

    @property
    def node(self) -> int:
        return self.gpus[0].node if self.gpus else 0


def pack_independent(cluster: ClusterSpec, wanted: list[tuple[str, int, int]]) -> list[Replica] | None:
    """Alg. 1 placement: instances (role, tp, pp) placed largest first, each stage on the node of the
    previous stage when it has room, else on the node with the most free GPUs. None if they do not fit."""
    free = [list(range(cluster.gpus_per_node)) for _ in range(cluster.nodes)]
    order = sorted(range(len(wanted)), key=lambda k: (-wanted[k][1] * wanted[k][2], k))
    placed: dict[int, Replica] = {}
    for k in order:
        role, tp, pp = wanted[k]
        gpus: list[Gpu] = []
        prev = -1
        for _ in range(pp):
            if prev >= 0 and len(free[prev]) >= tp:
                node = prev
            else:
                node = max(range(cluster.nodes), key=lambda n: (len(free[n]), -n))
                if len(free[node]) < tp:
                    return None
            ids, free[node] = free[node][:tp], free[node][tp:]
            gpus.extend(Gpu(node, d) for d in ids)
            prev = node
        placed[k] = Replica(role, tp, pp, tuple(gpus))
    return [placed[k] for k in range(len(wanted))]


class Segment(NamedTuple):
    """Alg. 2 unit: per node, k_p prefill segments of (tp_p x pp_p) GPUs and k_d decode segments of
    (tp_d x pp_d); the unit spans `inter_op` nodes (pipeline across nodes)."""

    inter_op: int
    tp_p: int
    pp_p: int
    k_p: int
    tp_d: int
    pp_d: int
    k_d: int

    @property
    def gpus_per_node(self) -> int:
        return self.k_p * self.tp_p * self.pp_p + self.k_d * self.tp_d * self.pp_d

    @property
    def gpus(self) -> int:
        return self.inter_op * self.gpus_per_node


def units_that_fit(cluster: ClusterSpec, seg: Segment) -> int:
    if seg.gpus_per_node > cluster.gpus_per_node or seg.inter_op > cluster.nodes:
        return 0
    return (cluster.nodes // seg.inter_op) * (cluster.gpus_per_node // seg.gpus_per_node)


def pack_units(cluster: ClusterSpec, seg: Segment, units: int) -> list[Replica] | None:
    """Alg. 2 placement: units fill node groups of `inter_op` nodes; the prefill and decode stages
    holding the same layers share a node, and every unit is its own routing group."""
    if units > units_that_fit(cluster, seg):
        return None
    per_group = cluster.gpus_per_node // seg.gpus_per_node
    out: list[Replica] = []
    for u in range(units):
        first_node = (u // per_group) * seg.inter_op
        base = (u % per_group) * seg.gpus_per_node
        offset = base
        for role, tp, pp, k in (
            ("prefill", seg.tp_p, seg.pp_p, seg.k_p),
            ("decode", seg.tp_d, seg.pp_d, seg.k_d),
        ):
            for _ in range(k):
                gpus = tuple(
                    Gpu(first_node + q, offset + j) for q in range(seg.inter_op) for j in range(tp * pp)
                )
                out.append(Replica(role, tp, pp * seg.inter_op, gpus, group=u))
                offset += tp * pp
    return out
