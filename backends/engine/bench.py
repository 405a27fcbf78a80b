"""`python -m backends.engine.bench`: the engine benchmark under the module path it had before the
engine became the top-level package `engine` (scripts and the TP/PP acceptance commands use it).
It is `python -m engine.bench`, arguments and output unchanged."""

from engine.bench import main

if __name__ == "__main__":
    main()
