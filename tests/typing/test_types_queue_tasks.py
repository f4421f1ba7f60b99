"""SafeQueue task tracking: the types users see (checked by ``mypy --strict``)."""

from __future__ import annotations

from typing import Any, assert_type

from safeshm._queue import QueueStatistics, SafeQueue


def tasks() -> None:
    q = SafeQueue.create(4096, processes=16)
    assert_type(q, SafeQueue[Any])
    assert_type(SafeQueue.create(4096, raw=True, processes=4), SafeQueue[bytes])
    assert_type(SafeQueue.open("jobs", 4096, processes=None), SafeQueue[Any])
    assert_type(q.task_done(), None)
    assert_type(q.join(), bool)
    assert_type(q.join(timeout=1.5), bool)
    assert_type(q.join(None), bool)
    assert_type(q.unfinished_tasks, int)
    s = q.statistics()
    assert_type(s, QueueStatistics)
    assert_type(s.unfinished_tasks, int)
    assert_type(s.consumers, int)
    assert_type(s.processes, int)
