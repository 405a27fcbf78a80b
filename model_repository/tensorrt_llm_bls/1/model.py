"""Triton model tensorrt_llm_bls: the orchestrator model of triton-disagg."""

from backends.orchestrator.model import TritonPythonModel  # noqa: F401
