"""Code shared by the Triton models: parameters, text streaming, engine loops, the outbox, metrics.

Only triton_glue.py imports triton_python_backend_utils (it exists only inside the stub); the rest
of this package is testable without a server.
"""
