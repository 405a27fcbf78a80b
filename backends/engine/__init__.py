"""Only the old module path of the engine benchmark (see bench.py); the engine is `engine/`."""
