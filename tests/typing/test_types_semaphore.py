"""``assert_type`` checks for SafeSemaphore / SafeBoundedSemaphore (mypy checks this file)."""

from __future__ import annotations

from typing import assert_type

from safeshm._semaphore import SafeBoundedSemaphore, SafeSemaphore, SemaphoreStatistics


def check() -> None:
    sem = SafeSemaphore.create(2, name="x", processes=4)
    assert_type(sem, SafeSemaphore)
    assert_type(SafeSemaphore.attach("x"), SafeSemaphore)
    assert_type(SafeSemaphore.open("x", 2), SafeSemaphore)
    assert_type(sem.acquire(), bool)
    assert_type(sem.acquire(False), bool)
    assert_type(sem.acquire(timeout=0.5), bool)
    assert_type(sem.release(2), None)
    assert_type(sem.value, int)
    assert_type(sem.initial_value, int)
    assert_type(sem.statistics(), SemaphoreStatistics)
    assert_type(sem.statistics().holders, dict[int, int])
    with sem as held:
        assert_type(held, SafeSemaphore)
    bounded = SafeBoundedSemaphore.create(1)
    assert_type(bounded, SafeBoundedSemaphore)
    assert_type(SafeBoundedSemaphore.open("y"), SafeBoundedSemaphore)
    with bounded as b:
        assert_type(b, SafeBoundedSemaphore)
