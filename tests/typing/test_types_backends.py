"""Backend-neutral types, checked by ``mypy --strict`` (not run by pytest).

Code typed against the Protocols takes the shared-memory classes and the Redis ones;
``open_*(url)`` returns the Protocols.
"""

from __future__ import annotations

from typing import Any, assert_type

import safeshm
from safeshm import (
    SafeCounter,
    SafeFileStore,
    SafeLock,
    SafeQueue,
    ShardedCounter,
    SharedCounter,
    SharedLock,
    SharedQueue,
    SharedShardedCounter,
    SharedStore,
)


def count_jobs(jobs: SharedCounter) -> int:
    return jobs.add()


def lead(lock: SharedLock) -> bool:
    with lock:
        return lock.locked()


def drain(q: SharedQueue[int]) -> list[int]:
    return q.get_many(10, timeout=0.1)


def bump(store: SharedStore[int]) -> int:
    return store.modify("n", lambda n: n + 1, 0)


def shm_classes_satisfy_the_protocols() -> None:
    count_jobs(SafeCounter.create())
    lead(SafeLock.create())
    drain(SafeQueue[int].create(1024))
    bump(SafeFileStore[int]("state"))
    tally: SharedShardedCounter = ShardedCounter.create()
    tally.add(2)


def open_by_url() -> None:
    assert_type(safeshm.open_counter("shm://hits"), SharedCounter)
    assert_type(safeshm.open_counter("shm://hits", sharded=True), SharedShardedCounter)
    assert_type(safeshm.open_lock("redis://localhost:6379/0#lead"), SharedLock)
    assert_type(safeshm.open_queue("shm://jobs", 1 << 16), SharedQueue[Any])
    assert_type(safeshm.open_queue("shm://jobs", 1 << 16, raw=True), SharedQueue[bytes])
    assert_type(safeshm.open_store("file:///var/lib/app"), SharedStore[Any])
    assert_type(safeshm.open_store("file:///var/lib/app", serializer="bytes"), SharedStore[bytes])
    assert_type(safeshm.Guarantees, type[safeshm.Guarantees])
    assert_type(SafeCounter.guarantees, safeshm.Guarantees)


def what_is_promised(c: SharedCounter, q: SharedQueue[int], s: SharedStore[int]) -> bool:
    return c.guarantees.exact and q.guarantees.scope == "host" and s.guarantees.survives == "reboot"


def redis_classes_satisfy_the_protocols(url: str) -> None:
    from safeshm.redis import FleetCounter, RedisCounter, RedisLock, RedisQueue, RedisStore

    count_jobs(RedisCounter.open(url))
    lead(RedisLock.open(url, lease=10.0))
    drain(RedisQueue[int].open(url, 1024))
    bump(RedisStore[int].open(url))
    tally: SharedShardedCounter = FleetCounter.open(url)
    tally.add(2)
    assert_type(RedisCounter.open(url).add(), int)
