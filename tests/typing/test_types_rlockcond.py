"""Static checks (mypy) of SafeRLock's and SafeCondition's public types."""

from __future__ import annotations

from typing import assert_type

from safeshm._condition import ConditionStatistics, SafeCondition
from safeshm._lock import SafeLock
from safeshm._rlock import RLockStatistics, SafeRLock


def rlock_types() -> None:
    r = SafeRLock.create(name="x")
    assert_type(r, SafeRLock)
    assert_type(SafeRLock.attach("x"), SafeRLock)
    assert_type(SafeRLock.open("x"), SafeRLock)
    assert_type(r.acquire(), bool)
    assert_type(r.acquire(False), bool)
    assert_type(r.acquire(timeout=1.5), bool)
    assert_type(r.acquire(True, None), bool)
    assert_type(r.release(), None)
    assert_type(r.locked(), bool)
    assert_type(r.statistics(), RLockStatistics)
    assert_type(r.statistics().depth, int)
    assert_type(r.statistics().owner_pid, int | None)
    with r as held:
        assert_type(held, SafeRLock)


def condition_types(lock: SafeLock, rlock: SafeRLock) -> None:
    c = SafeCondition.create()
    assert_type(c, SafeCondition)
    assert_type(SafeCondition.create(lock, name="c"), SafeCondition)
    assert_type(SafeCondition.create(rlock), SafeCondition)
    assert_type(SafeCondition.attach("c"), SafeCondition)
    assert_type(SafeCondition.open("c"), SafeCondition)
    assert_type(c.lock, SafeLock | SafeRLock)
    assert_type(c.acquire(), bool)
    assert_type(c.acquire(False), bool)
    assert_type(c.release(), None)
    assert_type(c.wait(), bool)
    assert_type(c.wait(0.5), bool)
    assert_type(c.wait_for(lambda: 3, timeout=1.0), int)
    assert_type(c.notify(), None)
    assert_type(c.notify(2), None)
    assert_type(c.notify_all(), None)
    assert_type(c.statistics(), ConditionStatistics)
