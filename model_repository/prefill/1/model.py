"""Triton model prefill: the prefill model of triton-disagg."""

from backends.prefill.model import TritonPythonModel  # noqa: F401
