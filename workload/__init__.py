"""Workloads: request length distributions (ShareGPT as is or cut as DistServe cuts it, a file of
lengths, synthetic) and arrival processes (Poisson, or gamma inter-arrival times with a coefficient
of variation for bursts).

Below both the planner (which simulates them) and the client benchmark (which sends them); imports
nothing of the project."""

from workload.distribution import ArrivalProcess, Workload, WorkloadError
from workload.sources import from_file, from_rows, load_workload, sharegpt, sharegpt_distserve, synthetic

__all__ = [
    "ArrivalProcess",
    "Workload",
    "WorkloadError",
    "from_file",
    "from_rows",
    "load_workload",
    "sharegpt",
    "sharegpt_distserve",
    "synthetic",
]
