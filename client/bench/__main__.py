"""Entry point of `python -m client.bench`."""

from __future__ import annotations

import sys

from client.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
