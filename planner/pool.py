"""Running independent simulations of one planning problem on a process pool."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from tqdm import tqdm

P = TypeVar("P")
T = TypeVar("T")
R = TypeVar("R")

# The problem of the running map, set once per worker process at its start.
_PROBLEM: Any = None


def _init(problem: object) -> None:
    global _PROBLEM
    _PROBLEM = problem


def _call(fn: Callable[[Any, T], R], k: int, item: T) -> tuple[int, R]:
    return k, fn(_PROBLEM, item)


def parallel_map(problem: P, fn: Callable[[P, T], R], items: Sequence[T], workers: int, desc: str) -> list[R]:
    """[fn(problem, item) for item in items], on `workers` processes (0: one per core), with a
    progress bar on stderr. `fn` must be a module-level function (it is sent to the workers by name);
    the problem is handed to each worker once, at its start."""
    if not items:
        return []
    workers = min(workers or os.cpu_count() or 1, len(items))
    out: list[R | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="config", leave=False, disable=None)
    try:
        if workers <= 1:
            for k, item in enumerate(items):
                out[k] = fn(problem, item)
                bar.update()
        else:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(problem,)) as pool:
                for fut in as_completed([pool.submit(_call, fn, k, item) for k, item in enumerate(items)]):
                    k, result = fut.result()
                    out[k] = result
                    bar.update()
    finally:
        bar.close()
    return out  # type: ignore[return-value]  # every slot was filled
