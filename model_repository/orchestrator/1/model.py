"""Triton model orchestrator: the orchestrator model of triton-disagg."""

from backends.orchestrator.model import TritonPythonModel  # noqa: F401
