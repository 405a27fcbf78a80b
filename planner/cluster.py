"""The cluster: nodes x GPUs, GPU memory and the links between GPUs (NVLink inside a node where
present, else PCIe; the network between nodes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from planner import PlannerError

GIB = 1 << 30


class Gpu(NamedTuple):
    """One GPU: node index and device id on that node."""

    node: int
    device: int


@dataclass(frozen=True)
class ClusterSpec:
    """Homogeneous cluster. Bandwidths in GB/s (10^9 bytes), one direction.

    Defaults describe DistServe's testbed class: A100-80GB SXM, NVLink 3 (300 GB/s per direction),
    PCIe 4 x16 (~25 GB/s) and 200 Gb/s InfiniBand (25 GB/s) between nodes."""

    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float = 80.0
    memory_utilization: float = 0.95
    nvlink: bool = True
    nvlink_gbps: float = 300.0
    pcie_gbps: float = 25.0
    network_gbps: float = 25.0
    link_latency_s: float = 20e-6

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise PlannerError(
                f"the cluster needs at least one node and one GPU per node "
                f"(got {self.nodes} nodes x {self.gpus_per_node} GPUs)"
            )
        if self.gpu_memory_gib <= 0 or not 0 < self.memory_utilization <= 1:
            raise PlannerError("GPU memory must be positive and memory utilization in (0, 1]")
        if min(self.nvlink_gbps, self.pcie_gbps, self.network_gbps) <= 0:
            raise PlannerError("link bandwidths must be positive")

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes_per_gpu(self) -> float:
        return self.gpu_memory_gib * GIB * self.memory_utilization

    def intra_node_gbps(self) -> float:
        return self.nvlink_gbps if self.nvlink else self.pcie_gbps

    def transfer_seconds(self, nbytes: float, same_node: bool) -> float:
        gbps = self.intra_node_gbps() if same_node else self.network_gbps
        return self.link_latency_s + nbytes / (gbps * 1e9)
