"""CPython's ``Lib/test/lock_tests.py`` ConditionTests, run against
:class:`safeshm._condition.SafeCondition`.

``test_acquire`` runs over a :class:`SafeLock` instead of a ``threading.Lock`` (a
condition shared by processes needs a lock shared by processes: ``create()`` refuses a
``threading`` lock with ``TypeError``), and its "is the lock held?" probes run in another
thread: a SafeLock refuses re-entry from its holder with ``LockReentryError`` rather than
returning ``False``. Everything else runs as upstream.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from safeshm._condition import SafeCondition
from safeshm._lock import SafeLock

from .cpython import lock_tests


class _Made:
    def __init__(self) -> None:
        self.handles: list[Any] = []

    def condition(self, lock: Any = None) -> SafeCondition:
        c = SafeCondition.create(lock)
        self.handles.append(c)
        return c

    def lock(self) -> SafeLock:
        lock = SafeLock.create()
        self.handles.append(lock)
        return lock

    def cleanup(self) -> None:
        for h in reversed(self.handles):
            h.close()
            with contextlib.suppress(FileNotFoundError):
                h.unlink()


class SafeConditionTests(lock_tests.ConditionTests):
    def setUp(self) -> None:
        super().setUp()
        self.made = _Made()
        self.addCleanup(self.made.cleanup)
        self.condtype = self.made.condition  # type: ignore[method-assign]

    def test_acquire(self) -> None:
        cond = self.condtype()
        # By default an RLock: the condition can be acquired several times.
        cond.acquire()
        cond.acquire()
        cond.release()
        cond.release()
        lock = self.made.lock()  # upstream: threading.Lock()
        cond = self.condtype(lock)
        cond.acquire()
        assert not _elsewhere(lock.acquire, False)
        cond.release()
        assert lock.acquire(False)
        assert not _elsewhere(cond.acquire, False)
        lock.release()
        with cond:
            assert not _elsewhere(lock.acquire, False)


def _elsewhere(f: Any, *args: Any) -> Any:
    """``f(*args)`` in another thread (releasing a lock it got)."""
    out: list[Any] = []

    def run() -> None:
        got = f(*args)
        out.append(got)
        if got:
            f.__self__.release()

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    return out[0]
