"""PB_LOCK: the one lock around calls into the python backend's stub (no pb_utils import here, so
code that only needs the lock stays importable, and testable, outside the stub)."""

from __future__ import annotations

import threading

# The 2.51 stub's message queue to the server is not safe for concurrent use: responses sent and
# BLS requests started from several threads at once corrupt it (the server then aborts). Every
# such call in this process takes this lock; none of them blocks for long. Reentrant: execute()
# holds it while it may send error responses.
PB_LOCK = threading.RLock()
