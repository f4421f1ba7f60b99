"""CPython's ``Lib/test/test_queue.py`` FIFO (``QueueTest``) and ``SimpleQueue`` tests, run
against :class:`safeshm.SafeQueue`.

The adapter gives the upstream tests the constructor they call, ``Queue(maxsize=0)``: a
SafeQueue with that item limit (``SafeQueue.create(capacity, maxsize=...)`` counts items
exactly as ``queue.Queue`` does) and a ring of :data:`CAPACITY` bytes. ``maxsize=0`` is
therefore "as many items as fit in 1 MiB", not unbounded: every upstream test that uses it
stays far below (its largest, 10 000 small ints in flight at most, needs ~160 KiB).

Skipped, each with its reason in the skip message: what a fixed ``maxsize`` makes
impossible (``test_shrinking_queue``), what pickling makes impossible (``test_references``:
the queue holds a pickled copy, never a reference), the identity of ``queue.SimpleQueue``
(``test_is_default``), and -- until SafeQueue has them -- the tests of ``task_done()`` /
``join()`` / ``unfinished_tasks`` ("task tracking: pending"; they run as soon as SafeQueue
has ``task_done``). LifoQueue, PriorityQueue and the subclass-hook FailingQueue tests do
not apply: SafeQueue is a FIFO whose storage is not overridable with ``_put``/``_get``.
"""

from __future__ import annotations

import gc
import itertools
import queue
import types
import unittest
from typing import TYPE_CHECKING, Any

import pytest

from safeshm import QueueShutDown
from safeshm._queue import SafeQueue

from .cpython import queue_tests

CAPACITY = 1 << 20
"""Ring bytes of every adapted queue (see the module docstring)."""


class Queue(SafeQueue[Any]):
    """SafeQueue under the name upstream's ``basic_queue_test`` looks up its expected order
    by (``q.__class__.__name__``)."""


class _Made:
    """Every queue a test made, closed and unlinked when it ends (a thread still blocked
    in one gets SegmentClosedError instead of hanging the run)."""

    def __init__(self) -> None:
        self.handles: list[SafeQueue[Any]] = []

    def __call__(self, maxsize: int = 0) -> SafeQueue[Any]:
        q = Queue.create(CAPACITY, maxsize=maxsize)
        self.handles.append(q)
        return q

    def cleanup(self) -> None:
        gc.collect()  # test_reentrancy's cyclic garbage puts into its queue when collected
        for q in self.handles:
            q.close()
            q.unlink()


def _namespace(made: _Made) -> types.SimpleNamespace:
    """What the upstream tests reach as ``self.queue`` (the ``queue`` module)."""
    return types.SimpleNamespace(
        Queue=made,
        SimpleQueue=made,
        Full=queue.Full,
        Empty=queue.Empty,
        # queue.ShutDown exists from 3.13; QueueShutDown is also one there.
        ShutDown=QueueShutDown,
    )


if TYPE_CHECKING:
    _TestCase = unittest.TestCase
else:
    _TestCase = object


class _Adapter(_TestCase):
    queue: Any
    type2test: Any

    def setUp(self) -> None:
        made = _Made()
        self.addCleanup(made.cleanup)
        self.queue = _namespace(made)
        self.type2test = made  # SimpleQueue's setUp calls it; QueueTest's sets it too
        super().setUp()


_TASK_TRACKING = hasattr(SafeQueue, "task_done")


def _needs_task_tracking(test: Any) -> Any:
    """An upstream test that calls task_done()/join() or reads unfinished_tasks."""

    def run(self: Any) -> Any:
        if not _TASK_TRACKING:
            self.skipTest(
                "task tracking: pending (SafeQueue.task_done()/join()/unfinished_tasks "
                "are being added)"
            )
        return test(self)

    run.__name__ = test.__name__
    return run


class SafeQueueFIFOTests(_Adapter, queue_tests.QueueTest, unittest.TestCase):
    def test_shrinking_queue(self) -> None:
        self.skipTest(
            "fixed maxsize: a SafeQueue's maxsize is set by create() in the shared "
            "segment, which every process reads; it cannot be assigned (q.maxsize = 2 "
            "raises AttributeError)"
        )

    test_queue_task_done = _needs_task_tracking(queue_tests.QueueTest.test_queue_task_done)
    test_queue_join = _needs_task_tracking(queue_tests.QueueTest.test_queue_join)
    test_shutdown_all_methods_in_one_thread = _needs_task_tracking(
        queue_tests.QueueTest.test_shutdown_all_methods_in_one_thread
    )
    test_shutdown_immediate_all_methods_in_one_thread = _needs_task_tracking(
        queue_tests.QueueTest.test_shutdown_immediate_all_methods_in_one_thread
    )
    test_shutdown_all_methods_in_many_threads = _needs_task_tracking(
        queue_tests.QueueTest.test_shutdown_all_methods_in_many_threads
    )
    test_shutdown_immediate_all_methods_in_many_threads = _needs_task_tracking(
        queue_tests.QueueTest.test_shutdown_immediate_all_methods_in_many_threads
    )
    test_shutdown_join = _needs_task_tracking(queue_tests.QueueTest.test_shutdown_join)
    test_shutdown_immediate_join = _needs_task_tracking(
        queue_tests.QueueTest.test_shutdown_immediate_join
    )
    test_shutdown_put_join = _needs_task_tracking(queue_tests.QueueTest.test_shutdown_put_join)
    test_shutdown_immediate_put_join = _needs_task_tracking(
        queue_tests.QueueTest.test_shutdown_immediate_put_join
    )
    test_shutdown_get_task_done_join = _needs_task_tracking(
        queue_tests.QueueTest.test_shutdown_get_task_done_join
    )


class SafeQueueSimpleQueueTests(_Adapter, queue_tests.BaseSimpleQueueTest, unittest.TestCase):
    def test_references(self) -> None:
        self.skipTest(
            "pickling: the queue holds a pickled copy of each item, never a reference, "
            "so no reference can outlive the get() (and the test's local class C cannot "
            "be pickled: put() raises PicklingError)"
        )

    # The C SimpleQueue's own tests (CSimpleQueueTest): test_is_default checks that
    # queue.SimpleQueue is the C class, and test_reentrancy is replaced below.
    def test_reentrancy(self) -> None:
        self.skipTest(
            "pickling: put() pickles the item before it takes the queue's lock, and the "
            "cyclic GC can run there; a __del__ that puts into the same queue then enqueues "
            "its items before the interrupted put's (the C SimpleQueue's put cannot run "
            "the GC before the append). What bpo-14976 guards -- a re-entrant put neither "
            "deadlocks nor raises nor loses an item -- is checked by "
            "test_reentrant_put_loses_nothing"
        )


def test_reentrant_put_loses_nothing() -> None:
    """Upstream's test_reentrancy (bpo-14976): a put() from a __del__ that the cyclic GC
    runs in the middle of another put() of the same queue. Every item arrives exactly
    once; only the interrupted put's item may come after the re-entrant ones.

    Upstream leaves the GC to its thresholds, which on some versions (3.13) never fire
    inside a put; here the item's pickling (inside put(), before the queue's lock) runs
    the collection, so the re-entry happens every time, on every Python."""
    q = SafeQueue.create(CAPACITY)
    try:
        gen = itertools.count()
        results: list[int] = []

        class Circular:
            def __init__(self) -> None:
                self.circular = self

            def __del__(self) -> None:
                q.put(next(gen))

        class Collecting:
            def __init__(self, value: int) -> None:
                self.value = value

            def __reduce__(self) -> tuple[Any, ...]:
                gc.collect()  # the pending Circular's __del__ puts, inside this put()
                return (int, (self.value,))

        for _ in range(100):
            o = Circular()
            del o  # garbage in a reference cycle, until the collection in the next put
            q.put(Collecting(next(gen)))
            results.append(q.get(timeout=5))
        gc.collect()
        while not q.empty():
            results.append(q.get_nowait())
        assert sorted(results) == list(range(next(gen)))
        late = [v for i, v in enumerate(results) if i and v < results[i - 1]]
        assert len(late) >= 95, "the collection did not run inside the puts"
    finally:
        gc.collect()
        q.close()
        q.unlink()


pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
