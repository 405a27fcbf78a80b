"""DistServe-style planner: latency profiles, a serving simulator, placement search and the
Triton model repository generator for disaggregated prefill/decode deployments."""

from __future__ import annotations


class PlannerError(ValueError):
    """Bad input to the planner (unknown model, malformed profile, infeasible request...).

    The message is meant for the user as is: the CLI prints it without a traceback."""
