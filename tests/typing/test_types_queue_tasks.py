"""SafeQueue task tracking: the types users see (checked by ``mypy --strict``)."""

from __future__ import annotations

from typing import Any, assert_type

from safeshm import Lease, QueueStatistics, SafeQueue


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


def leases() -> None:
    q: SafeQueue[int] = SafeQueue.create(4096, leases=8, lease_size=256)
    item, lease = q.get_leased(timeout=1.0, lease=30.0)
    assert_type(item, int)
    assert_type(lease, Lease)
    assert_type(lease.ack(), None)
    assert_type(lease.release(), None)
    with q.leased(timeout=None) as got:
        assert_type(got, int)
    assert_type(q.reclaim_leases(), int)
    assert_type(q.statistics().leased, int)
