"""CPython's ``Lib/test/lock_tests.py`` RLockTests (with the BaseLockTests they include),
run against :class:`safeshm._rlock.SafeRLock`.

Skipped, with reasons: the two repr tests (safeshm's repr wording).
"""

from __future__ import annotations

import contextlib

from safeshm._rlock import SafeRLock

from .cpython import lock_tests


class _Names:
    """The names of every lock a test made; each is unlinked when the test ends. Only
    names are kept, so that a handle the test drops can be garbage-collected (the
    weakref tests)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def make(self) -> SafeRLock:
        lock = SafeRLock.create()
        self.names.append(lock.name)
        return lock

    def cleanup(self) -> None:
        for name in self.names:
            with contextlib.suppress(FileNotFoundError):
                SafeRLock.attach(name).unlink()


class SafeRLockTests(lock_tests.RLockTests):
    def setUp(self) -> None:
        super().setUp()
        names = _Names()
        self.addCleanup(names.cleanup)
        self.locktype = names.make  # type: ignore[method-assign]

    def test_repr(self) -> None:
        self.skipTest("repr wording: safeshm.SafeRLock(name=..., locked=...)")

    def test_locked_repr(self) -> None:
        self.skipTest("repr wording: safeshm.SafeRLock(name=..., locked=...)")
