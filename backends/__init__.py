"""Triton python-backend models and the engine they run."""
