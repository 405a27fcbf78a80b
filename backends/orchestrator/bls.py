"""Decoupled BLS calls from the orchestrator's worker threads, made safe for the 2.51 stub.

Two stub behaviours shape this file:

- Every stub call (exec, reading or dropping a response) is made under PB_LOCK (see triton_glue).
- A finished response iterator must not die on the stub's own thread. When an iterator yields its
  final response it asks the stub to forget it; the stub's stub-to-parent thread then erases it
  from a map that also references it, without holding the GIL. If Python had already dropped its
  own reference, that erase runs the iterator's destructor there, and the destructor frees the
  numpy arrays of every response the iterator kept: Python objects freed without the GIL, which
  corrupts the interpreter's allocator (the orchestrator's stub later segfaults in pymalloc). We
  saw it under gdb: about 2% of iterators were destroyed by `Stub::SendCleanupId`. RetiredIterators
  keeps our reference well past that erase, so the last reference is always ours, dropped under
  the GIL.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from backends.common import trace
from backends.common.stub_lock import PB_LOCK


class RetiredIterators:
    """Holds finished BLS response iterators for `hold_s` seconds, then drops them under PB_LOCK.

    The stub erases a finished iterator from its map within milliseconds of the last response;
    `hold_s` is that delay with a wide margin for a starved thread. Dropping happens in `keep`
    (expired entries go as new ones arrive) and in `clear`.
    """

    def __init__(self, hold_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if hold_s <= 0:
            raise ValueError(f"hold_s must be positive, got {hold_s}")
        self.hold_s = hold_s
        self._clock = clock
        self._items: deque[tuple[float, Any]] = deque()
        self._lock = threading.Lock()

    def keep(self, iterator: Any) -> None:
        now = self._clock()
        with self._lock:
            self._items.append((now + self.hold_s, iterator))
            expired = []
            while self._items and self._items[0][0] <= now:
                expired.append(self._items.popleft())
        self._drop(expired)

    def clear(self) -> None:
        with self._lock:
            expired = list(self._items)
            self._items.clear()
        self._drop(expired)

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def _drop(items: list[tuple[float, Any]]) -> None:
        if items:
            with PB_LOCK:  # an iterator's destructor frees its responses' shared memory
                items.clear()


class BLSResponses:
    """Iterates a decoupled BLS call's responses as dicts of numpy arrays (copies).

    A response with a Triton error (e.g. the callee's stub died) raises `error_type`.
    """

    def __init__(
        self,
        iterator: Any,
        names: list[str],
        retired: RetiredIterators,
        error_type: type[Exception] = RuntimeError,
    ) -> None:
        self._it = iterator
        self._names = names
        self._retired = retired
        self._error_type = error_type

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        import triton_python_backend_utils as pb_utils  # only inside the stub; the rest is testable

        try:
            for response in self._it:
                # Reading a response, and dropping it (which frees its shared memory), are stub
                # calls like any other: under PB_LOCK, with the arrays copied out first.
                with PB_LOCK:
                    error = response.error().message() if response.has_error() else None
                    out = {}
                    for name in self._names:
                        tensor = pb_utils.get_output_tensor_by_name(response, name)
                        if tensor is not None:
                            out[name] = np.array(tensor.as_numpy(), copy=True)
                    tensor = response = None
                    trace.mark("read")
                if error is not None:
                    raise self._error_type(error)
                if out:
                    yield out
        finally:
            self._retired.keep(self._it)
            self._it = None
