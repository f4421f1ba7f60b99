"""CPython's ``Lib/test/lock_tests.py`` BaseLockTests and LockTests, run against
:class:`safeshm.SafeLock`.

SafeLock is ``threading.Lock`` with one difference of kind: it is *owned* by the thread
that acquired it (an error-checking robust mutex: that is what lets the kernel hand a dead
holder's lock to the next acquirer). So the tests that release a lock from another thread,
or that block on re-acquiring it from the holding thread, cannot apply; every skip below
says why.
"""

from __future__ import annotations

import threading
import unittest
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from safeshm import LockNotHeldError, LockReentryError
from safeshm._lock import SafeLock
from safeshm._segment import Segment

from .cpython import lock_tests


class _Made:
    """Every segment a test made, unlinked when it ends. Handles are held weakly (the
    upstream weakref tests check that a dropped lock is freed) and closed if still alive."""

    def __init__(self) -> None:
        self.made: list[tuple[weakref.ref[SafeLock], Segment]] = []

    def __call__(self) -> SafeLock:
        lock = SafeLock.create()
        self.made.append((weakref.ref(lock), lock._seg))
        return lock

    def cleanup(self) -> None:
        for ref, seg in self.made:
            lock = ref()
            if lock is not None:
                lock.close()
            seg.unlink()


if TYPE_CHECKING:
    _TestCase = unittest.TestCase
else:
    _TestCase = object


class _SafeLockMixin(_TestCase):
    locktype: Any

    def setUp(self) -> None:
        super().setUp()
        made = _Made()
        self.addCleanup(made.cleanup)
        self.locktype = made

    def test_repr(self) -> None:
        self.skipTest("repr wording: safeshm.SafeLock(name=..., locked=False), not <unlocked ...>")

    def test_locked_repr(self) -> None:
        self.skipTest("repr wording: safeshm.SafeLock(name=..., locked=True), not <locked ...>")


class SafeLockLockTests(_SafeLockMixin, lock_tests.LockTests):
    """LockTests: every BaseLockTests test, and those of non-recursive locks."""

    def test_reacquire(self) -> None:
        self.skipTest(
            "owned lock: acquiring it again from the holding thread raises "
            "LockReentryError (an error-checking mutex) instead of blocking until another "
            "thread releases it (test_reacquire_from_holder_is_refused checks that)"
        )

    def test_different_thread(self) -> None:
        self.skipTest(
            "owned lock: only the acquiring thread may release it (the kernel hands a "
            "dead holder's lock on by its thread id); another thread's release raises "
            "LockNotHeldError (test_release_from_other_thread_is_refused checks that)"
        )

    def test_state_after_timeout(self) -> None:
        self.skipTest(
            "owned lock: the holder's acquire(timeout=0.01) raises LockReentryError at "
            "once instead of timing out; the property it guards (issue 11618: the lock's "
            "state after a timed-out acquire) is checked with the timeout in another thread "
            "by test_state_after_timeout_in_another_thread"
        )

    def test_at_fork_reinit(self) -> None:
        self.skipTest(
            "threading.Lock internals (_at_fork_reinit): a shared lock lives in its "
            "segment, which a fork does not copy; a child that forked while a thread held "
            "it sees it held by that (now absent) thread"
        )


# -- what replaces the skipped upstream tests -------------------------------------------------


@pytest.fixture
def lock() -> Any:
    lk = SafeLock.create()
    yield lk
    lk.close()
    lk.unlink()


def test_reacquire_from_holder_is_refused(lock: SafeLock) -> None:
    assert lock.acquire()
    calls: list[Callable[[], bool]] = [
        lock.acquire,
        lambda: lock.acquire(False),
        lambda: lock.acquire(timeout=0.01),
    ]
    for call in calls:
        with pytest.raises(LockReentryError):
            call()
    assert lock.locked()
    lock.release()
    assert not lock.locked()


def test_release_from_other_thread_is_refused(lock: SafeLock) -> None:
    assert lock.acquire()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            lock.release()
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=10)
    assert len(errors) == 1 and isinstance(errors[0], LockNotHeldError)
    assert lock.locked()
    lock.release()


def test_timeouts_beyond_timeout_max_overflow_as_threading(lock: SafeLock) -> None:
    """As threading.Lock.acquire (upstream's test_timeout): a timeout beyond
    ``threading.TIMEOUT_MAX`` is an OverflowError, even on a free lock, which stays free."""
    for huge in (1e100, threading.TIMEOUT_MAX + 1, float("inf"), 2**70):
        with pytest.raises(OverflowError):
            threading.Lock().acquire(timeout=huge)
        with pytest.raises(OverflowError, match="too large"):
            lock.acquire(timeout=huge)
        assert not lock.locked()
    assert lock.acquire(timeout=threading.TIMEOUT_MAX)
    lock.release()


def test_state_after_timeout_in_another_thread(lock: SafeLock) -> None:
    """Upstream's test_state_after_timeout, with the timed-out acquire in a second thread."""
    assert lock.acquire()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=0.01)))
    t.start()
    t.join(timeout=10)
    assert got == [False]
    lock.release()
    assert not lock.locked()
    assert lock.acquire(blocking=False)
    lock.release()


_NAN = float("nan")
# (args, kwargs) of acquire() that threading.Lock and SafeLock must treat alike.
_CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((), {}),
    ((True,), {}),
    ((False,), {}),
    ((1,), {}),
    ((0,), {}),
    ((True, 0.05), {}),
    ((True, 0), {}),
    ((True, -1), {}),
    ((False, -1), {}),
    ((False, 1), {}),
    ((False, 0), {}),
    ((False, 0.5), {}),
    ((), {"timeout": 0.05}),
    ((), {"timeout": 0}),
    ((), {"timeout": -1}),
    ((), {"timeout": -1.0}),
    ((), {"timeout": -2}),
    ((), {"timeout": -0.5}),
    ((), {"timeout": -100}),
    ((), {"timeout": _NAN}),
    ((), {"timeout": "1"}),
    ((), {"timeout": [1]}),
    ((), {"blocking": False}),
    ((), {"blocking": True}),
    ((), {"blocking": False, "timeout": 1}),
    ((), {"blocking": False, "timeout": -1}),
    ((), {"blocking": True, "timeout": 0.05}),
    ((True, 1, 2), {}),
    ((), {"block": True}),
    ((True,), {"blocking": True}),
]


def _outcome(acquire: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return acquire(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the outcome compared
        return type(exc)


@pytest.mark.parametrize(("args", "kwargs"), _CALLS, ids=repr)
def test_acquire_arguments_as_threading(
    lock: SafeLock, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Every acquire() signature gets threading.Lock's outcome: True, False or the same
    exception type -- on a free lock, and from another thread on a held one."""
    reference = threading.Lock()
    free = (_outcome(reference.acquire, args, kwargs), _outcome(lock.acquire, args, kwargs))
    assert free[1] == free[0]
    if free[0] is True:
        reference.release()
        lock.release()
    assert not lock.locked()
    blocking = kwargs.get("blocking", args[0] if args else True)
    timeout = kwargs.get("timeout", args[1] if len(args) > 1 else -1)
    if free[0] is True and blocking and timeout == -1:
        return  # would wait forever on a held lock (test_acquire_contended covers it)
    reference.acquire()
    lock.acquire()
    held: list[Any] = []

    def other() -> None:
        held.append(_outcome(reference.acquire, args, kwargs))
        held.append(_outcome(lock.acquire, args, kwargs))

    t = threading.Thread(target=other, daemon=True)
    t.start()
    t.join(timeout=10)
    assert len(held) == 2 and held[1] == held[0]
    assert held[0] is not True  # nothing here waits forever
    lock.release()
