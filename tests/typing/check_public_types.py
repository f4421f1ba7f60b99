"""Types users see, checked by ``mypy --strict`` (not run by pytest).

Each ``assert_type`` pins what a type checker infers for user code.
"""

from __future__ import annotations

from typing import Any, assert_type

import safeshm
from safeshm import (
    ArrayStatistics,
    CounterStatistics,
    LockStatistics,
    SafeArray,
    SafeCounter,
    SafeFileStore,
    SafeLock,
    SafeQueue,
    ShardedCounter,
    ShardedCounterStatistics,
    StoreStatistics,
    Transaction,
)


def counters() -> None:
    c = SafeCounter.create()
    assert_type(c, SafeCounter)
    assert_type(SafeCounter.create(5, name="hits"), SafeCounter)
    assert_type(SafeCounter.create(sharded=False), SafeCounter)
    assert_type(SafeCounter.attach("hits"), SafeCounter)
    assert_type(SafeCounter.open("hits", 0), SafeCounter)
    assert_type(c.add(), int)
    assert_type(c.add(5), int)
    assert_type(c.value, int)
    assert_type(c.set(3), None)
    assert_type(c.exchange(3), int)
    assert_type(c.compare_and_set(3, 4), bool)
    assert_type(c.statistics(), CounterStatistics)
    assert_type(c.implementation, str)
    assert_type(c.name, str)
    assert_type(c.closed, bool)
    with SafeCounter.create() as inside:
        assert_type(inside, SafeCounter)
    c.close()
    c.unlink()


def sharded() -> None:
    s = SafeCounter.create(sharded=True)
    assert_type(s, ShardedCounter)
    assert_type(SafeCounter.create(0, name="m", sharded=True, slots=8), ShardedCounter)
    assert_type(SafeCounter.open("m", sharded=True), ShardedCounter)
    assert_type(ShardedCounter.create(), ShardedCounter)
    assert_type(ShardedCounter.attach("m"), ShardedCounter)
    assert_type(ShardedCounter.open("m"), ShardedCounter)
    assert_type(s.add(1), None)
    assert_type(s.value, int)
    assert_type(s.exchange(0), int)
    assert_type(s.statistics(), ShardedCounterStatistics)
    with ShardedCounter.create() as inside:
        assert_type(inside, ShardedCounter)


def locks() -> None:
    lock = SafeLock.create()
    assert_type(lock, SafeLock)
    assert_type(SafeLock.attach("l"), SafeLock)
    assert_type(SafeLock.open("l"), SafeLock)
    assert_type(lock.acquire(), bool)
    assert_type(lock.acquire(timeout=1.5), bool)
    assert_type(lock.acquire(blocking=False), bool)
    assert_type(lock.release(), None)
    assert_type(lock.locked(), bool)
    assert_type(lock.statistics(), LockStatistics)
    with lock as held:
        assert_type(held, SafeLock)
    with lock.acquired(timeout=2) as held2:
        assert_type(held2, SafeLock)


def arrays() -> None:
    a = SafeArray.create("q", 10)
    assert_type(a, SafeArray[int])
    assert_type(SafeArray.create("B", [1, 2, 3], name="bytes"), SafeArray[int])
    assert_type(SafeArray.create("d", 10), SafeArray[float])
    assert_type(SafeArray.create("f", [1.5]), SafeArray[float])
    assert_type(SafeArray.open("x", "i", 4), SafeArray[int])
    assert_type(SafeArray.open("y", "d", [0.5]), SafeArray[float])
    assert_type(SafeArray.attach("x", "q"), SafeArray[int])
    assert_type(SafeArray.attach("y", "d"), SafeArray[float])
    assert_type(a[0], int)
    assert_type(a[1:3], list[int])
    assert_type(a.add(0, 5), int)
    assert_type(a.compare_and_set(0, 5, 6), bool)
    assert_type(a.to_list(), list[int])
    assert_type(len(a), int)
    assert_type(a.typecode, str)
    assert_type(a.statistics(), ArrayStatistics)
    for x in a:
        assert_type(x, int)
    a[0] = 3
    a[0:2] = [1, 2]
    a.fill(0)
    f = SafeArray.create("d", 3)
    assert_type(f[0], float)
    assert_type(f.add(0, 0.5), float)
    f[0] = 1  # an int is a fine float
    with f.locked() as view:
        assert_type(view, memoryview)
    with SafeArray.create("h", 4) as inside:
        assert_type(inside, SafeArray[int])


def non_literal_arguments(typecode: str, flag: bool, raw: bool) -> None:
    # Arguments only known at run time get the widest honest type, not "no overload".
    assert_type(SafeArray.create(typecode, 10), SafeArray[Any])
    assert_type(SafeArray.open("x", typecode, 10), SafeArray[Any])
    assert_type(SafeArray.attach("x", typecode), SafeArray[Any])
    assert_type(SafeCounter.create(sharded=flag), SafeCounter | ShardedCounter)
    assert_type(SafeCounter.open("c", sharded=flag), SafeCounter | ShardedCounter)
    assert_type(SafeQueue.create(1024, raw=raw), SafeQueue[Any])
    assert_type(SafeQueue.open("q", 1024, raw=raw), SafeQueue[Any])


def queues() -> None:
    q = SafeQueue.create(1 << 16)
    assert_type(q, SafeQueue[Any])
    r = SafeQueue.create(1 << 16, name="frames", raw=True)
    assert_type(r, SafeQueue[bytes])
    assert_type(SafeQueue.open("frames", 1 << 16, raw=True), SafeQueue[bytes])
    assert_type(SafeQueue.attach("frames"), SafeQueue[Any])
    assert_type(r.get(), bytes)
    assert_type(r.get_many(10, timeout=1.0), list[bytes])
    assert_type(r.put(b"x", timeout=0.5), None)
    assert_type(q.qsize(), int)
    with SafeQueue.create(1024) as inside:
        assert_type(inside, SafeQueue[Any])


def errors() -> None:
    try:
        SafeCounter.attach("x")
    except safeshm.IncompatibleSegmentError as e:
        assert_type(e, safeshm.IncompatibleSegmentError)
        v: ValueError = e
        del v
    except safeshm.LockTimeoutError as e:
        t: TimeoutError = e
        del t
    except safeshm.SegmentNotFoundError as e:
        f: FileNotFoundError = e
        del f
    except safeshm.HandleClosedError as e:
        assert_type(e, safeshm.HandleClosedError)


def misuse() -> None:
    c = SafeCounter.create()
    c.add("1")  # type: ignore[arg-type]
    _ = c.vaule  # type: ignore[attr-defined]  # typos are caught: no __getattr__ on handles
    s = ShardedCounter.create()
    s.compare_and_set(1, 2)  # type: ignore[attr-defined]
    SafeCounter.create(slots=3)  # type: ignore[call-overload]
    SafeCounter.create(5, "hits")  # type: ignore[call-overload]  # name is keyword-only
    SafeArray.create("q", 3, "a")  # type: ignore[call-overload]
    SafeQueue.create(1024, "q")  # type: ignore[call-overload]
    SafeLock.create("l")  # type: ignore[call-arg]
    a = SafeArray.create("q", 3)
    a[0] = 1.5  # type: ignore[call-overload]
    a.add(0, "1")  # type: ignore[arg-type]


class _Point:
    name = "point"

    def dumps(self, value: tuple[int, int]) -> bytes:
        return f"{value[0]},{value[1]}".encode()

    def loads(self, data: bytes) -> tuple[int, int]:
        x, y = data.split(b",")
        return int(x), int(y)


def stores() -> None:
    j = SafeFileStore("/tmp/s")
    assert_type(j, SafeFileStore[Any])
    typed: SafeFileStore[dict[str, int]] = SafeFileStore("/tmp/s")
    assert_type(typed["k"], dict[str, int])
    assert_type(typed.get("k"), dict[str, int] | None)
    assert_type(typed.modify("k", lambda d: {**d, "n": 1}, {}), dict[str, int])
    b = SafeFileStore("/tmp/b", serializer="bytes")
    assert_type(b, SafeFileStore[bytes])
    assert_type(b["k"], bytes)
    assert_type(SafeFileStore.open("/tmp/b", serializer="bytes"), SafeFileStore[bytes])
    p = SafeFileStore("/tmp/p", serializer=_Point(), durable=False)
    assert_type(p, SafeFileStore[tuple[int, int]])
    assert_type(p.pop("k"), tuple[int, int])
    assert_type(p.pop("k", None), tuple[int, int] | None)
    assert_type(SafeFileStore.open("/tmp/p", serializer=_Point()), SafeFileStore[tuple[int, int]])
    with p.transaction() as tx:
        assert_type(tx, Transaction[tuple[int, int]])
        assert_type(tx["k"], tuple[int, int])
        tx["k"] = (1, 2)
    with SafeFileStore("/tmp/s") as s:
        assert_type(s, SafeFileStore[Any])
    assert_type(p.statistics(), StoreStatistics)
    assert_type(list(p.items()), list[tuple[str, tuple[int, int]]])
    assert_type(p.to_dict(), dict[str, tuple[int, int]])
    b["k"] = "text"  # type: ignore[assignment]
    p["k"] = 3  # type: ignore[assignment]
    p[3] = (1, 2)  # type: ignore[index]
    SafeFileStore("/tmp/x", serializer="yaml")  # type: ignore[call-overload]
    wrong: SafeFileStore[int] = SafeFileStore("/tmp/x", serializer="bytes")  # type: ignore[assignment]
    del wrong
