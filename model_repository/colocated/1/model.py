"""Triton model colocated: the colocated model of triton-disagg."""

from backends.colocated.model import TritonPythonModel  # noqa: F401
