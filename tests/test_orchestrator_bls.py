"""RetiredIterators: finished BLS iterators outlive the stub's own reference (see bls.py)."""

from __future__ import annotations

import gc
import weakref

import pytest

from backends.orchestrator.bls import RetiredIterators


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Iterator:
    """Stands in for a stub ResponseIterator: only its lifetime matters here."""


def test_an_iterator_is_kept_until_hold_s_has_passed() -> None:
    clock = Clock()
    retired = RetiredIterators(hold_s=10.0, clock=clock)
    first = Iterator()
    alive = weakref.ref(first)
    retired.keep(first)
    del first
    gc.collect()
    clock.now = 9.9
    retired.keep(Iterator())  # dropping happens as new iterators arrive
    assert alive() is not None and len(retired) == 2
    clock.now = 10.0
    retired.keep(Iterator())
    gc.collect()
    assert alive() is None
    assert len(retired) == 2


def test_iterators_are_dropped_in_arrival_order_and_clear_drops_all() -> None:
    clock = Clock()
    retired = RetiredIterators(hold_s=1.0, clock=clock)
    refs = []
    for t in range(5):
        clock.now = float(t) * 0.5
        it = Iterator()
        refs.append(weakref.ref(it))
        retired.keep(it)
        del it
    gc.collect()
    # at t=2.0 those kept at 0.0, 0.5 and 1.0 are due; those kept at 1.5 and 2.0 remain
    assert [r() is None for r in refs] == [True, True, True, False, False]
    retired.clear()
    gc.collect()
    assert all(r() is None for r in refs) and len(retired) == 0


def test_hold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="hold_s must be positive"):
        RetiredIterators(hold_s=0)
