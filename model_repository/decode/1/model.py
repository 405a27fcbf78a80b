"""Triton model decode: the decode model of triton-disagg."""

from backends.decode.model import TritonPythonModel  # noqa: F401
