"""``safeshm.open_counter(url)`` and its siblings: the backend picked by the URL."""

from __future__ import annotations

import os
import queue
from pathlib import Path
from typing import Any

import pytest

import safeshm
from safeshm import (
    InvalidNameError,
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


def _name(stem: str) -> str:
    return f"{stem}-{os.getpid()}-{id(object())}"


def test_shm_counter_is_the_segment_by_that_name() -> None:
    name = _name("c")
    c = safeshm.open_counter(f"shm://{name}", 5)
    try:
        assert isinstance(c, SafeCounter) and isinstance(c, SharedCounter)
        assert c.add() == 6
        with SafeCounter.attach(name) as same:
            assert same.value == 6
        assert safeshm.open_counter(f"shm://{name}", 99).value == 6  # initial: creation only
    finally:
        c.unlink()


def test_shm_sharded_counter() -> None:
    name = _name("s")
    c = safeshm.open_counter(f"shm://{name}", sharded=True)
    try:
        assert isinstance(c, ShardedCounter) and isinstance(c, SharedShardedCounter)
        c.add(3)
        assert c.value == 3
    finally:
        c.unlink()


def test_shm_lock_and_queue() -> None:
    lock = safeshm.open_lock(f"shm://{_name('l')}")
    q = safeshm.open_queue(f"shm://{_name('q')}", 4096)
    try:
        assert isinstance(lock, SafeLock) and isinstance(lock, SharedLock)
        with lock:
            assert lock.locked()
        assert isinstance(q, SafeQueue) and isinstance(q, SharedQueue)
        q.put({"job": 1})
        assert q.get(timeout=1) == {"job": 1}
        with pytest.raises(queue.Empty):
            q.get(timeout=0.01)
    finally:
        lock.unlink()
        q.unlink()


def test_shm_raw_queue() -> None:
    q = safeshm.open_queue(f"shm://{_name('q')}", 4096, raw=True)
    try:
        q.put(b"x")
        assert q.get_nowait() == b"x"
        assert q.raw  # type: ignore[attr-defined]
    finally:
        q.unlink()


@pytest.mark.parametrize("scheme", ["file://", "shm://"])
def test_store_in_a_directory(tmp_path: Path, scheme: str) -> None:
    with safeshm.open_store(f"{scheme}{tmp_path}/state", durable=False) as s:  # type: ignore[attr-defined]
        assert isinstance(s, SafeFileStore) and isinstance(s, SharedStore)
        s["a"] = 1
        assert s.modify("a", lambda v: v + 1) == 2
        assert not s.durable
        assert s.guarantees.survives == "host"
    with safeshm.open_store(f"file://{tmp_path}/state") as s:  # type: ignore[attr-defined]
        assert s["a"] == 2
        assert s.guarantees.survives == "reboot"


@pytest.mark.parametrize(
    ("call", "url"),
    [
        (safeshm.open_counter, "shm://a/b"),
        (safeshm.open_counter, "shm://a?x=1"),
        (safeshm.open_counter, "shm://a#b"),
        (safeshm.open_counter, "shm://"),
        (safeshm.open_counter, "jobs"),
        (safeshm.open_counter, "http://localhost/#jobs"),
        (safeshm.open_counter, "file:///tmp/x"),
        (safeshm.open_lock, "ftp://x"),
        (safeshm.open_store, "file://"),
        (safeshm.open_store, "shm://jobs"),
        (safeshm.open_store, "file://jobs"),
        (safeshm.open_store, "file://host/tmp/x"),
        (safeshm.open_store, "file:///tmp/x?durable=1"),
        (safeshm.open_counter, "redis://localhost:6379/0"),  # no #NAME
    ],
)
def test_bad_urls_are_value_errors(call: Any, url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        call(url)


def test_bad_names_and_types() -> None:
    with pytest.raises(InvalidNameError):
        safeshm.open_counter("shm://.hidden")
    with pytest.raises(InvalidNameError):
        safeshm.open_counter("redis://localhost:6379/0#{braces}")
    with pytest.raises(TypeError):
        safeshm.open_counter(b"shm://x")  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        safeshm.open_lock("shm://x", lease=3)
    with pytest.raises(TypeError):
        safeshm.open_counter("shm://x", flush_interval=3, sharded=True)


def test_guarantees_are_data() -> None:
    g = SafeCounter.guarantees
    assert (g.backend, g.scope, g.holder_death, g.outcome_unknown) == (
        "shm",
        "host",
        "immediate",
        False,
    )
    assert SafeLock.guarantees == SafeQueue.guarantees == ShardedCounter.guarantees == g
    with pytest.raises(AttributeError):
        g.backend = "redis"  # type: ignore[misc]


def test_redis_urls_open_the_redis_classes(redis_url: Any, tmp_path: Path) -> None:
    del tmp_path
    from safeshm.redis import FleetCounter, RedisCounter, RedisLock, RedisQueue, RedisStore

    c = safeshm.open_counter(redis_url("c"), 5)
    assert isinstance(c, RedisCounter) and isinstance(c, SharedCounter)
    assert c.add() == 6 and c.guarantees.backend == "redis"
    f = safeshm.open_counter(redis_url("f"), sharded=True, flush_interval=None)
    assert isinstance(f, FleetCounter) and isinstance(f, SharedShardedCounter)
    f.add(2)
    f.flush()
    assert f.value == 2
    lock = safeshm.open_lock(redis_url("l"), lease=5.0)
    assert isinstance(lock, RedisLock) and isinstance(lock, SharedLock)
    with lock:
        assert lock.locked()
    q = safeshm.open_queue(redis_url("q"), 4096)
    assert isinstance(q, RedisQueue) and isinstance(q, SharedQueue)
    q.put_many([1, 2])
    assert q.get_many(5, timeout=1) == [1, 2]
    s = safeshm.open_store(redis_url("s"), durable=True)
    assert isinstance(s, RedisStore) and isinstance(s, SharedStore)
    s["k"] = [1]
    assert s.modify("k", lambda v: [*v, 2]) == [1, 2]
    for x in (c, f, lock, q, s):
        x.unlink()
        x.close()
