"""Code shared by the Triton models: request parsing, text streaming, engine loops, metrics.

Nothing here imports triton_python_backend_utils: the model.py files own every pb_utils call,
so this package is testable without a server.
"""
