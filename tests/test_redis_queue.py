"""RedisQueue: the SafeQueue contract on Redis, and what only a remote queue does.

The contract tests run over both backends (``make`` builds a ``SafeQueue`` or a
``RedisQueue``), so the two cannot drift: FIFO, ``queue.Empty``/``queue.Full`` with
bounded timeouts, all-or-nothing ``put_many``, ``get_many``, raw mode, the same byte
accounting, argument errors, prompt wake-ups of blocked calls, many processes with nothing
lost or duplicated, leases. What differs -- a dead consumer is known by its lease running
out, leased items count against the capacity, network failures, the server's own crashes
-- is tested as a difference, against real redis-server processes.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import pickle
import queue
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import safeshm
from safeshm import _queue
from safeshm._errors import HolderDiedWarning

from ._helpers import JOIN_TIMEOUT, PROMPT, kill_and_reap, processes, run_all

redis = pytest.importorskip("redis")

from safeshm.redis import RedisCounter, RedisLease, RedisQueue  # noqa: E402 - after the importorskip

from ._redis_server import free_port, raw_client  # noqa: E402

SHORT = 0.5
"""A lease short enough to wait out in a test."""
WAKE_BOUND = 0.05
"""A generous bound on the median wake-up latency (the design: about one round trip, well
under a millisecond on loopback; a waiter that polled once per BLPOP slice would take
about 0.5 s)."""


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(params=["shm", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rcleanup(cleanup: Any) -> Iterator[Callable[[Any], Any]]:
    """``cleanup`` for both backends: a RedisQueue's keys are deleted, then it is closed."""
    handles: list[RedisQueue[Any]] = []

    def register(handle: Any) -> Any:
        if isinstance(handle, RedisQueue):
            handles.append(handle)
            return handle
        return cleanup(handle)

    yield register
    for h in reversed(handles):
        with contextlib.suppress(safeshm.SafeShmError):
            h.unlink()
        h.close()


@pytest.fixture
def make(backend: str, request: pytest.FixtureRequest, rcleanup: Any) -> Callable[..., Any]:
    """``make(capacity, maxsize=, raw=, leases=False)`` -> a new queue of the backend under
    test; ``leases=True``: a SafeQueue with lease slots, a RedisQueue delivering at least
    once."""

    def factory(capacity: int, *, leases: bool = False, **kw: Any) -> Any:
        if backend == "shm":
            if leases:
                kw.update(leases=8, lease_size=256)
            return rcleanup(safeshm.SafeQueue.create(capacity, **kw))
        url = request.getfixturevalue("redis_url")("q")
        if leases:
            kw["delivery"] = "at-least-once"
        return rcleanup(RedisQueue.open(url, capacity, **kw))

    return factory


def reopen(q: Any) -> Any:
    """Another handle on the same queue."""
    if isinstance(q, RedisQueue):
        return RedisQueue.open(q.url, q.capacity, raw=q.raw)
    return safeshm.SafeQueue.attach(q.name)


def until_waiting(q: Any, direction: str) -> None:
    """Until a caller of another process waits in ``get`` (or ``put``) on ``q``."""
    deadline = time.monotonic() + PROMPT
    while True:
        if isinstance(q, RedisQueue):
            s = q.statistics()
            if (s.waiting_getters if direction == "get" else s.waiting_putters) >= 1:
                break
        elif q._fw[_queue._NE_SLEEP if direction == "get" else _queue._NF_SLEEP]:
            break
        assert time.monotonic() < deadline, f"nobody went to wait in {direction}()"
        time.sleep(0.005)
    time.sleep(0.02)  # from registered to blocked in the server (or asleep in the kernel)


class _BadPickle:
    """Pickles fine; unpickling raises (as a class missing in the consumer would)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse, ())


def _refuse() -> None:
    raise RuntimeError("cannot be rebuilt here")


# -- worker processes -------------------------------------------------------------------------
def timed_get_worker(q: Any, ready: Any, woke: Any, rounds: int) -> None:
    """Block in get() ``rounds`` times; record when each returned (CLOCK_MONOTONIC is
    system-wide, so the parent can compare)."""
    for k in range(rounds):
        ready.set()
        item = q.get(timeout=JOIN_TIMEOUT)
        woke[k] = time.monotonic()
        assert item == k, item


def timed_put_worker(q: Any, ready: Any, woke: Any, rounds: int) -> None:
    """Block in put() on a full queue ``rounds`` times; record when each returned."""
    for k in range(rounds):
        ready.set()
        q.put(("second", k), timeout=JOIN_TIMEOUT)
        woke[k] = time.monotonic()


def producer_worker(q: Any, barrier: Any, producer: int, count: int, batch: int) -> None:
    barrier.wait(timeout=JOIN_TIMEOUT)
    seq = 0
    while seq < count:
        if batch > 1:
            items = [(producer, s) for s in range(seq, min(count, seq + batch))]
            q.put_many(items, timeout=JOIN_TIMEOUT)
            seq += len(items)
        else:
            q.put((producer, seq), timeout=JOIN_TIMEOUT)
            seq += 1


def consumer_worker(q: Any, barrier: Any, out: Any, batch: int) -> None:
    """Take items until a ``None`` sentinel (one per consumer); send them back in order."""
    barrier.wait(timeout=JOIN_TIMEOUT)
    got: list[Any] = []
    while True:
        taken = q.get_many(batch, timeout=JOIN_TIMEOUT) if batch > 1 else [q.get(timeout=60)]
        if None in taken:
            cut = taken.index(None)
            got += taken[:cut]
            extra = taken[cut + 1 :]  # other consumers' sentinels (nothing else follows)
            assert all(x is None for x in extra)
            if extra:
                q.put_many(extra)
            break
        got += taken
    out.send(got)
    out.close()


def lease_and_hold_worker(q: Any, ready: Any, lease: float) -> None:
    """Lease one item, say so, and wait for the SIGKILL."""
    item, _ = q.get_leased(timeout=JOIN_TIMEOUT, lease=lease)
    assert item == "job", item
    ready.set()
    time.sleep(JOIN_TIMEOUT)


def lease_and_ack_worker(q: Any, acked: Any, late: Any, ready: Any) -> None:
    """Lease and ack items until killed or stopped (``None``), counting each item before
    its ack (a kill between the two costs a duplicate, never a loss)."""
    warnings.simplefilter("ignore", HolderDiedWarning)  # a dead peer's items come back
    ready.set()
    while True:
        item, lease = q.get_leased(timeout=JOIN_TIMEOUT, lease=2.0)
        if item is None:
            lease.ack()
            return
        with acked.get_lock():
            acked[item] += 1
        try:
            lease.ack()
        except safeshm.LeaseExpiredError:
            with late.get_lock():
                late.value += 1


def blocked_get_worker(q: Any, ready: Any) -> None:
    ready.set()
    q.get(timeout=JOIN_TIMEOUT)


def spawned_consumer_worker(q: Any, out: Any) -> None:
    out.send(q.get(timeout=JOIN_TIMEOUT))
    out.close()


# -- the contract, on both backends -----------------------------------------------------------
def test_fifo_sizes_and_protocol(make: Any) -> None:
    q = make(4096)
    assert isinstance(q, safeshm.SharedQueue)
    assert q.empty() and q.qsize() == 0 and not q.full()
    items = [1, "two", {"three": 3}, [4.0], None, b"six", (7,)]
    for item in items:
        q.put(item)
    assert q.qsize() == len(items) and not q.empty()
    assert [q.get() for _ in items] == items
    assert q.empty()
    other = reopen(q)
    try:
        q.put("from one handle")
        assert other.get(timeout=PROMPT) == "from one handle"
    finally:
        other.close()


def test_nonblocking_and_timeouts_follow_queue_queue(make: Any) -> None:
    q = make(64, raw=True)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(block=False)
    with pytest.raises(queue.Empty):
        q.get(timeout=0)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    assert 0.18 <= time.monotonic() - t0 < PROMPT
    q.put(b"x" * 20)
    q.put(b"y" * 20)  # 2 x (8 + 20, padded to 32) = all 64 bytes, on both backends
    assert q.full()
    with pytest.raises(queue.Full):
        q.put_nowait(b"1")
    with pytest.raises(queue.Full):
        q.put(b"1", block=False)
    with pytest.raises(queue.Full):
        q.put(b"1", timeout=0)
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(b"1", timeout=0.2)
    assert 0.18 <= time.monotonic() - t0 < PROMPT
    with pytest.raises(ValueError, match="non-negative"):
        q.put(b"1", timeout=-1)
    assert q.get() == b"x" * 20
    # One validator, before anything happens: a bad timeout raises even when no wait
    # would be needed, and changes nothing.
    with pytest.raises(ValueError, match="non-negative"):
        q.put(b"1", timeout=-1)
    with pytest.raises(ValueError, match="non-negative"):
        q.put_many([b"1"], timeout=-1)
    with pytest.raises(ValueError, match="non-negative"):
        q.get(timeout=-1)
    with pytest.raises(ValueError, match="non-negative"):
        q.get_many(5, timeout=float("nan"))
    with pytest.raises(TypeError, match="timeout"):
        q.get(timeout="1")
    assert q.qsize() == 1
    assert q.get() == b"y" * 20


@pytest.mark.parametrize("bad", [-1, float("nan"), "1", True])
def test_timeout_is_checked_even_without_blocking(make: Any, bad: Any) -> None:
    q = make(4096)
    q.put(1)
    with pytest.raises((TypeError, ValueError)):
        q.get(block=False, timeout=bad)
    with pytest.raises((TypeError, ValueError)):
        q.put(2, block=False, timeout=bad)
    assert q.get_nowait() == 1  # nothing happened


def test_maxsize(make: Any) -> None:
    q = make(1 << 16, maxsize=2)
    q.put(1)
    q.put(2)
    assert q.full()
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    with pytest.raises(ValueError, match="maxsize"):
        q.put_many([1, 2, 3])
    assert q.get() == 1
    q.put(3)
    assert q.get_many(10) == [2, 3]


def test_same_byte_accounting(make: Any) -> None:
    """An item takes its size plus 8, rounded up to 8, on both backends: the same items
    fit the same capacity."""
    for size, fits in ((0, 32), (1, 16), (8, 16), (9, 10), (20, 8), (248, 1)):
        q = make(256, raw=True)
        n = 0
        with contextlib.suppress(queue.Full):
            while True:
                q.put_nowait(b"z" * size)
                n += 1
        assert n == fits, (size, n)


def test_too_big_fails_at_once_and_changes_nothing(make: Any) -> None:
    q = make(256)
    q.put("keep")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="can never fit"):
        q.put(b"x" * 300)  # a blocking put: must not wait for room that can never come
    with pytest.raises(ValueError, match="can never fit"):
        q.put_many([b"x" * 100] * 3)
    assert time.monotonic() - t0 < PROMPT
    assert q.qsize() == 1
    assert q.get() == "keep"
    r = make(256, raw=True)
    r.put(b"z" * 248)  # exactly capacity - 8
    assert r.get() == b"z" * 248
    with pytest.raises(ValueError, match="never fit"):
        r.put(b"z" * 249)


def test_unpicklable_item_raises_in_caller_and_changes_nothing(make: Any) -> None:
    q = make(4096)
    q.put(1)
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        q.put(threading.Lock())
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        q.put_many([2, lambda: 3])
    assert q.qsize() == 1
    assert q.get_many(10) == [1]


def test_raw_mode(make: Any) -> None:
    r = make(4096, raw=True)
    assert r.raw
    r.put(b"abc")
    r.put(bytearray(b"de"))
    r.put(memoryview(b"fghi")[1:3])
    r.put(memoryview(bytearray(16)).cast("q"))  # by its bytes
    r.put(b"")
    assert r.get() == b"abc"
    assert r.get_many(10) == [b"de", b"gh", bytes(16), b""]
    for bad in ("str", 1, [b"a"], None):
        with pytest.raises(TypeError, match="bytes"):
            r.put(bad)
    with pytest.raises(TypeError):
        r.put(memoryview(bytes(16))[::2])  # not contiguous
    assert r.empty()


def test_put_many_is_all_or_nothing_and_in_order(make: Any) -> None:
    q = make(1024)
    q.put_many([])
    q.put_many(range(5))
    q.put("x")
    assert q.get_many(3) == [0, 1, 2]
    assert q.get_many(100) == [3, 4, "x"]
    # Not enough room for the whole batch: none of it is put, waiting or not.
    q.put_many([b"a" * 100] * 6)
    with pytest.raises(queue.Full):
        q.put_many([b"b" * 100] * 4, block=False)
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.put_many([b"b" * 100] * 4, timeout=0.1)
    assert 0.09 <= time.monotonic() - t0 < PROMPT
    assert q.qsize() == 6
    assert q.get_many(100) == [b"a" * 100] * 6
    q.put_many([b"b" * 100] * 4)
    assert q.get_many(100) == [b"b" * 100] * 4


def test_big_batches(make: Any) -> None:
    """Batches longer than one Lua unpack() (the script pushes in chunks)."""
    q = make(1 << 20)
    q.put_many(range(2500))
    assert q.qsize() == 2500
    assert q.get_many(2400) == list(range(2400))
    assert q.get_many(1000) == list(range(2400, 2500))


def test_get_many_arguments_and_waiting(make: Any) -> None:
    q = make(1024)
    with pytest.raises(queue.Empty):
        q.get_many(5, block=False)
    with pytest.raises(queue.Empty):
        q.get_many(5, timeout=0.05)
    with pytest.raises(ValueError, match="max_items"):
        q.get_many(0)
    for bad in ("3", 1.5, True):
        with pytest.raises(TypeError):
            q.get_many(bad)
    # A blocked get_many returns as soon as there is one item.
    t = threading.Timer(0.1, lambda: q.put("one"))
    t.start()
    try:
        assert q.get_many(10, timeout=PROMPT) == ["one"]
    finally:
        t.join(JOIN_TIMEOUT)


def test_undecodable_items_are_handed_over(make: Any) -> None:
    q = make(4096)
    q.put(_BadPickle())
    with pytest.raises(safeshm.ItemDecodeError) as info:
        q.get(timeout=1)
    assert info.value.items == [] and len(info.value.undecodable) == 1
    q.put_many([1, _BadPickle(), 3])
    with pytest.raises(safeshm.ItemDecodeError) as info:
        q.get_many(10, timeout=1)
    assert info.value.items == [1, 3] and info.value.failed_at == [1]
    assert q.empty()


def test_open_checks_what_it_would_create(make: Any) -> None:
    q = make(4096, maxsize=3)
    if isinstance(q, RedisQueue):
        url = q.url

        def open_(capacity: int, **kw: Any) -> Any:
            return RedisQueue.open(url, capacity, **kw)

    else:
        name = q.name

        def open_(capacity: int, **kw: Any) -> Any:
            return safeshm.SafeQueue.open(name, capacity, **kw)

    with pytest.raises(safeshm.IncompatibleSegmentError, match="capacity"):
        open_(8192)
    with pytest.raises(safeshm.IncompatibleSegmentError, match="raw"):
        open_(4096, raw=True)
    with pytest.raises(safeshm.IncompatibleSegmentError, match="maxsize"):
        open_(4096, maxsize=4)
    for kw in ({}, {"maxsize": 3}):
        other = open_(4093, **kw)  # rounded up to 4096; maxsize None: any
        assert (other.capacity, other.maxsize) == (4096, 3)
        other.close()
    with pytest.raises(ValueError, match="capacity"):
        open_(8)
    with pytest.raises(TypeError):
        open_(4096.0)
    with pytest.raises(ValueError, match="maxsize"):
        open_(4096, maxsize=-1)


def test_blocked_get_wakes_promptly_on_put_in_another_process(make: Any) -> None:
    q = make(4096)
    ctx = multiprocessing.get_context("fork")
    rounds = 5
    ready = ctx.Event()
    woke = ctx.RawArray("d", rounds)
    latencies = []
    with processes("fork", timed_get_worker, [(q, ready, woke, rounds)]) as (p,):
        for k in range(rounds):
            assert ready.wait(JOIN_TIMEOUT)
            ready.clear()
            until_waiting(q, "get")
            put_at = time.monotonic()
            q.put(k)
            deadline = time.monotonic() + PROMPT
            while not woke[k]:
                assert time.monotonic() < deadline, "the blocked get did not wake"
                time.sleep(0.0005)
            latencies.append(woke[k] - put_at)
        p.join(timeout=JOIN_TIMEOUT)
        assert p.exitcode == 0
    assert statistics.median(latencies) < WAKE_BOUND, latencies


def test_blocked_put_wakes_promptly_when_room_frees(make: Any) -> None:
    q = make(4096, maxsize=1)
    q.put("first")
    ctx = multiprocessing.get_context("fork")
    rounds = 5
    ready = ctx.Event()
    woke = ctx.RawArray("d", rounds)
    latencies = []
    with processes("fork", timed_put_worker, [(q, ready, woke, rounds)]) as (p,):
        for k in range(rounds):
            assert ready.wait(JOIN_TIMEOUT)
            ready.clear()
            until_waiting(q, "put")
            got_at = time.monotonic()
            assert q.get() == ("first" if k == 0 else ("second", k - 1))
            deadline = time.monotonic() + PROMPT
            while not woke[k]:
                assert time.monotonic() < deadline, "the blocked put did not wake"
                time.sleep(0.0005)
            latencies.append(woke[k] - got_at)
        p.join(timeout=JOIN_TIMEOUT)
        assert p.exitcode == 0
    assert q.get(timeout=1) == ("second", rounds - 1)
    assert statistics.median(latencies) < WAKE_BOUND, latencies


def test_a_spawned_consumer_gets_what_is_put(make: Any) -> None:
    """The handle pickles (by reference) into a spawned process."""
    q = make(4096)
    ctx = multiprocessing.get_context("spawn")
    r, w = ctx.Pipe(duplex=False)
    with processes("spawn", spawned_consumer_worker, [(q, w)]) as (p,):
        q.put({"job": 1})
        assert r.poll(JOIN_TIMEOUT)
        assert r.recv() == {"job": 1}
        p.join(timeout=JOIN_TIMEOUT)
        assert p.exitcode == 0


@pytest.mark.parametrize(("pbatch", "cbatch"), [(1, 1), (7, 16)])
def test_mpmc_nothing_lost_or_duplicated_fifo_per_producer(
    make: Any, pbatch: int, cbatch: int
) -> None:
    """Producers and consumers released together on a small queue (so puts block too):
    every item arrives exactly once, and each producer's items in order."""
    producers, consumers, count = 2, 2, 150
    q = make(512)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(producers + consumers)
    pipes = [ctx.Pipe(duplex=False) for _ in range(consumers)]
    with processes("fork", consumer_worker, [(q, barrier, w, cbatch) for _, w in pipes]) as cons:
        run_all(
            "fork",
            producer_worker,
            [(q, barrier, p, count, pbatch) for p in range(producers)],
        )
        for _ in range(consumers):
            q.put(None, timeout=JOIN_TIMEOUT)
        received = []
        for r, _ in pipes:
            assert r.poll(JOIN_TIMEOUT), "a consumer did not finish"
            received.append(r.recv())
        for c in cons:
            c.join(timeout=JOIN_TIMEOUT)
            assert c.exitcode == 0
    everything = [item for got in received for item in got]
    assert sorted(everything) == sorted((p, s) for p in range(producers) for s in range(count))
    for got in received:
        for p in range(producers):
            seqs = [s for (pp, s) in got if pp == p]
            assert seqs == sorted(seqs)
    assert q.empty()


# -- leases, on both backends -------------------------------------------------------------------
def test_lease_ack_release_and_leased(make: Any) -> None:
    q = make(4096, leases=True)
    q.put_many(["a", "b", "c"])
    item, lease = q.get_leased(timeout=1)
    assert item == "a"
    lease.ack()
    with pytest.raises(safeshm.LeaseExpiredError, match="already ended by ack"):
        lease.ack()
    with pytest.raises(safeshm.LeaseExpiredError):
        lease.release()
    item, lease = q.get_leased(timeout=1)
    assert item == "b"
    lease.release()  # back at the front
    with q.leased(timeout=1) as item:
        assert item == "b"

    def fail_inside() -> None:
        with q.leased(timeout=1) as item:
            assert item == "c"
            raise KeyError(item)

    with pytest.raises(KeyError):
        fail_inside()
    assert q.get_nowait() == "c"  # released by the exception, at the front
    assert q.reclaim_leases() == 0
    with pytest.raises(queue.Empty):
        q.get_leased(timeout=0)
    with pytest.raises(ValueError, match="lease"):
        q.get_leased(timeout=0, lease=0)
    with pytest.raises(ValueError, match="non-negative"):
        q.get_leased(timeout=0, lease=float("nan"))


def test_leased_consumer_killed_item_comes_back_at_the_front(make: Any) -> None:
    """A consumer SIGKILLed holding a leased item: the item is delivered again with a
    HolderDiedWarning -- at once on shared memory (the kernel knows the process died),
    after the lease on Redis (only the lease can tell; a consumer blocked meanwhile wakes
    up for it)."""
    q = make(4096, leases=True)
    q.put("job")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with processes("fork", lease_and_hold_worker, [(q, ready, SHORT)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        taken_at = time.monotonic()
        kill_and_reap(p)
    with pytest.warns(HolderDiedWarning):
        item, lease = q.get_leased(timeout=PROMPT)
    waited = time.monotonic() - taken_at
    assert item == "job"
    lease.ack()
    assert q.empty()
    if isinstance(q, RedisQueue):
        assert waited >= SHORT * 0.9
    assert waited < SHORT + PROMPT


def test_expired_lease_is_delivered_again_once(make: Any) -> None:
    """A live holder's lease runs out: the item comes back at the front, once; the late
    ack is refused. SafeQueue knows the holder is alive and says nothing; RedisQueue
    cannot tell a slow consumer from a dead one and warns."""
    q = make(4096, leases=True)
    q.put_many(["a", "b"])
    item, lease = q.get_leased(timeout=1, lease=0.2)
    assert item == "a"
    time.sleep(0.3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert q.reclaim_leases() == 1
        assert q.reclaim_leases() == 0  # once per expiry
    assert len(seen) == (1 if isinstance(q, RedisQueue) else 0)
    with pytest.raises(safeshm.LeaseExpiredError):
        lease.ack()
    item2, lease2 = q.get_leased(timeout=1)
    assert item2 == "a"
    lease2.ack()
    assert q.get_nowait() == "b"


def test_expired_leases_come_back_in_their_order(make: Any) -> None:
    q = make(4096, leases=True)
    q.put_many(["a", "b", "c", "d"])
    # The later taken run out first; none runs out while the next is taken (a pause of
    # up to 0.8 s, on a loaded machine).
    leases = [q.get_leased(timeout=1, lease=0.8 + 0.2 * (2 - k))[1] for k in range(3)]
    assert q.qsize() == 1
    time.sleep(1.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HolderDiedWarning)
        assert q.reclaim_leases() == 3
    assert q.get_many(10) == ["a", "b", "c", "d"]  # in front of d, in the order taken
    for lease in leases:
        with pytest.raises(safeshm.LeaseExpiredError):
            lease.ack()


def test_at_least_once_with_a_consumer_killed_mid_stream(make: Any) -> None:
    """Two consumers lease and ack; one is SIGKILLed mid-stream: every item is acked at
    least once, and only the item in flight at the kill may be seen twice."""
    n = 120
    q = make(1 << 16, leases=True)
    ctx = multiprocessing.get_context("fork")
    acked = ctx.Array("i", n)
    late = ctx.Value("i", 0)
    ready = [ctx.Event(), ctx.Event()]
    with processes(
        "fork", lease_and_ack_worker, [(q, acked, late, ready[0]), (q, acked, late, ready[1])]
    ) as (victim, survivor):
        assert all(e.wait(JOIN_TIMEOUT) for e in ready)
        q.put_many(range(n))
        deadline = time.monotonic() + PROMPT
        while sum(1 for c in acked[:] if c) < n // 4:
            assert time.monotonic() < deadline, "the consumers made no progress"
            time.sleep(0.001)
        # Not while the victim holds one of these multiprocessing locks: they are not
        # robust, and the survivor (and this loop) would wait on them forever.
        with acked.get_lock(), late.get_lock():
            kill_and_reap(victim)
        deadline = time.monotonic() + JOIN_TIMEOUT
        while not all(acked[:]):
            assert time.monotonic() < deadline, f"lost: {[i for i, c in enumerate(acked) if not c]}"
            time.sleep(0.01)
        q.put(None)
        survivor.join(timeout=JOIN_TIMEOUT)
        assert survivor.exitcode == 0
    assert sum(acked[:]) <= n + 1 + late.value
    assert q.empty()


# -- Redis only --------------------------------------------------------------------------------
@pytest.fixture
def rq(redis_url: Callable[[str], str]) -> Iterator[Callable[..., RedisQueue[Any]]]:
    """``rq(capacity, **options)`` -> a new RedisQueue, unlinked and closed at the end."""
    made: list[RedisQueue[Any]] = []

    def make(capacity: int = 4096, **kw: Any) -> RedisQueue[Any]:
        q = RedisQueue.open(redis_url("rq"), capacity, **kw)
        made.append(q)
        return q

    yield make
    for q in made:
        with contextlib.suppress(safeshm.SafeShmError):
            q.unlink()
        q.close()


def test_guarantees_and_repr(rq: Any) -> None:
    g = RedisQueue.guarantees
    assert (g.backend, g.scope, g.holder_death, g.outcome_unknown) == (
        "redis",
        "network",
        "lease",
        True,
    )
    q = rq(100, raw=True, delivery="at-least-once")
    assert q.capacity == 104 and q.delivery == "at-least-once"
    assert repr(q).startswith(f"<RedisQueue {q.name!r} at redis://")
    assert "raw=True" in repr(q) and "(open)" in repr(q)


def test_delivery_option(rq: Any) -> None:
    q = rq()
    assert q.delivery == "at-most-once"
    q.put("x")
    with pytest.raises(ValueError, match="at-least-once"):
        q.get_leased(timeout=0)
    assert q.qsize() == 1  # nothing taken
    with pytest.raises(safeshm.IncompatibleKeyError, match="delivery"):
        RedisQueue.open(q.url, 4096, delivery="at-least-once")
    with pytest.raises(ValueError, match="delivery"):
        RedisQueue.open(q.url, 4096, delivery="exactly-once")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="delivery"):
        RedisQueue.open(q.url, 4096, delivery=1)  # type: ignore[arg-type]
    lq = rq(delivery="at-least-once")
    other = RedisQueue.open(lq.url, 4096)  # None: any when attaching
    assert other.delivery == "at-least-once"
    other.close()


def test_leased_items_count_against_the_capacity_until_acked(rq: Any) -> None:
    """A difference from SafeQueue (whose get_leased frees ring space): a leased item
    still counts, so a redelivery always finds room; the ack frees it and wakes a blocked
    put."""
    q = rq(64, raw=True, delivery="at-least-once")
    q.put_many([b"x" * 20, b"y" * 20])
    item, lease = q.get_leased(timeout=1)
    assert item == b"x" * 20 and q.qsize() == 1
    assert q.full()
    with pytest.raises(queue.Full):
        q.put_nowait(b"z")
    s = q.statistics()
    assert (s.items, s.leased, s.bytes_used) == (1, 1, 64)
    t = threading.Timer(0.2, lease.ack)
    t.start()
    try:
        t0 = time.monotonic()
        q.put(b"z" * 20, timeout=PROMPT)
        assert time.monotonic() - t0 < PROMPT
    finally:
        t.join(JOIN_TIMEOUT)
    assert q.get_many(5) == [b"y" * 20, b"z" * 20]
    assert q.statistics().bytes_used == 0


def test_blocked_get_wakes_for_an_expiring_lease(rq: Any) -> None:
    """A consumer blocked on an empty queue gets an expired lease's item as the lease ends
    (it times its wait to the next deadline), not a slice later."""
    q = rq(delivery="at-least-once")
    q.put("job")
    _, lease = q.get_leased(timeout=1, lease=0.3)
    t0 = time.monotonic()
    with pytest.warns(HolderDiedWarning):
        item, lease2 = q.get_leased(timeout=PROMPT)
    waited = time.monotonic() - t0
    assert item == "job"
    assert 0.25 <= waited < 0.3 + 0.5, waited
    lease2.ack()
    with pytest.raises(safeshm.LeaseExpiredError):
        lease.ack()


def test_acked_item_never_comes_back(rq: Any) -> None:
    q = rq(delivery="at-least-once")
    q.put_many(["a", "b"])
    _, lease = q.get_leased(timeout=1, lease=0.2)
    lease.ack()
    time.sleep(0.3)
    assert q.reclaim_leases() == 0
    assert q.get_many(10) == ["b"]
    assert q.statistics().leased == 0 and q.statistics().bytes_used == 0


def test_plain_get_redelivers_and_never_expiring_leases(rq: Any) -> None:
    q = rq(delivery="at-least-once")
    q.put_many(["a", "b", "c"])
    _, forever = q.get_leased(timeout=1, lease=math.inf)
    _, short = q.get_leased(timeout=1, lease=0.1)
    assert isinstance(short, RedisLease) and short.lease_id > forever.lease_id
    time.sleep(0.2)
    with pytest.warns(HolderDiedWarning):
        assert q.get_many(10) == ["b", "c"]  # a plain get puts expired items back first
    assert q.statistics().leased == 1
    forever.release()
    assert q.get_nowait() == "a"


def test_waiters_leave_no_registrations(rq: Any) -> None:
    q = rq(64, raw=True)
    for _ in range(3):
        with pytest.raises(queue.Empty):
            q.get(timeout=0.05)
    q.put_many([b"x" * 20, b"y" * 20])
    with pytest.raises(queue.Full):
        q.put(b"z" * 20, timeout=0.05)
    s = q.statistics()
    assert (s.waiting_getters, s.waiting_putters) == (0, 0)
    r = raw_client(q.url)
    try:
        for part in ("wake-get", "wake-put", "getters", "putters"):
            assert r.exists(f"safeshm:{{{q.name}}}:{part}") == 0, part
    finally:
        r.close()


def test_a_killed_waiter_does_not_hold_up_the_others(rq: Any) -> None:
    """Two consumers blocked in get; one is SIGKILLed; a put still wakes the other at
    once (its registration lingers a few seconds, but a dead BLPOP takes no token)."""
    q = rq()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with processes("fork", blocked_get_worker, [(q, ready)]) as (victim,):
        assert ready.wait(JOIN_TIMEOUT)
        until_waiting(q, "get")
        kill_and_reap(victim)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=PROMPT)))
    t.start()
    deadline = time.monotonic() + PROMPT
    while q.statistics().waiting_getters < 2:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    t0 = time.monotonic()
    q.put("x")
    t.join(JOIN_TIMEOUT)
    assert got == ["x"]
    assert time.monotonic() - t0 < 0.5  # not a BLPOP slice later


def test_big_capacity_counts_exactly(rq: Any) -> None:
    q = rq(1 << 50, raw=True)
    q.put(b"a" * 100)
    assert q.statistics().bytes_used == 112
    assert q.get() == b"a" * 100
    with pytest.raises(ValueError, match="2\\*\\*53"):
        rq((1 << 53) + 8)
    with pytest.raises(OverflowError):
        rq(1 << 64)


def test_foreign_data_under_the_name(rq: Any, redis_url: Callable[[str], str]) -> None:
    url = redis_url("foreign")
    name = url.rpartition("#")[2]
    r = raw_client(url)
    try:
        r.set(f"safeshm:{{{name}}}:items", "not a list")
        with pytest.raises(safeshm.IncompatibleKeyError, match="items"):
            RedisQueue.open(url, 4096)
        assert r.exists(f"safeshm:{{{name}}}") == 0  # nothing was changed
        r.delete(f"safeshm:{{{name}}}:items")
        c = RedisCounter.open(url)
        with pytest.raises(safeshm.IncompatibleKeyError, match="counter"):
            RedisQueue.open(url, 4096)
        c.unlink()
        c.close()
    finally:
        r.close()


def test_unreachable_server() -> None:
    with pytest.raises(safeshm.BackendUnavailableError):
        RedisQueue.open(f"redis://127.0.0.1:{free_port()}/0#nobody", 4096)


def test_closed_handle_pickle_and_unlink(rq: Any) -> None:
    q = rq(maxsize=5, delivery="at-least-once")
    q.put("kept")
    copy = pickle.loads(pickle.dumps(q))
    assert (copy.capacity, copy.maxsize, copy.delivery) == (4096, 5, "at-least-once")
    assert copy.get_nowait() == "kept"
    copy.close()
    copy.close()  # idempotent
    assert "(closed)" in repr(copy)
    with pytest.raises(safeshm.HandleClosedError):
        copy.put(1)
    with pytest.raises(safeshm.HandleClosedError):
        copy.qsize()
    with pytest.raises(safeshm.HandleClosedError):
        pickle.dumps(copy)
    q.put("gone")
    copy.unlink()  # from a closed handle too
    assert q.qsize() == 0


def test_closing_wakes_a_blocked_get_with_a_closed_error(rq: Any) -> None:
    q = rq()
    other = RedisQueue.open(q.url, 4096)
    out: list[BaseException] = []

    def run() -> None:
        try:
            other.get(timeout=JOIN_TIMEOUT)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    until_waiting(q, "get")
    other.close()
    q.put("wake")  # the closed handle's waiter may only notice at its next step
    t.join(PROMPT + 1)
    assert not t.is_alive()
    assert out and isinstance(out[0], safeshm.SafeShmError), out
    assert not isinstance(out[0], redis.RedisError)


# -- the server's own failures -----------------------------------------------------------------
def test_server_killed_mid_puts(fresh_redis: Any) -> None:
    """kill -9 the server while a thread puts: after a restart (AOF, appendfsync always)
    every acknowledged put is there, in order; the put in flight raised a typed error (and
    is there at most once: not at all if the error says the server was unreachable); the
    same handle works again."""
    q = RedisQueue.open(fresh_redis.url + "#crash", 1 << 20)
    acked = 0
    failure: list[BaseException] = []
    going = threading.Event()

    def producer() -> None:
        nonlocal acked
        while True:
            try:
                q.put(acked) if acked % 3 else q.put_many([acked])
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                failure.append(exc)
                return
            acked += 1
            if acked == 30:
                going.set()

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    try:
        assert going.wait(PROMPT)
        fresh_redis.kill()
        t.join(PROMPT)
        assert not t.is_alive()
        (exc,) = failure
        assert isinstance(exc, safeshm.OutcomeUnknownError | safeshm.BackendUnavailableError)
        assert not isinstance(exc, redis.RedisError)
        with pytest.raises(safeshm.BackendUnavailableError):
            q.qsize()
        with pytest.raises(safeshm.BackendUnavailableError):
            q.get_nowait()
        fresh_redis.start()
        got = q.get_many(1 << 20, timeout=PROMPT)  # the handle reconnects by itself
        expected = list(range(acked))
        if isinstance(exc, safeshm.OutcomeUnknownError) and len(got) == acked + 1:
            expected.append(acked)
        assert got == expected
        q.put("after")
        assert q.get(timeout=1) == "after"
        assert q.statistics().bytes_used == 0  # the byte count survived the crash exactly
    finally:
        q.close()


def test_server_killed_under_a_blocked_get(fresh_redis: Any) -> None:
    q = RedisQueue.open(fresh_redis.url + "#blocked", 4096)
    out: list[BaseException] = []

    def run() -> None:
        try:
            q.get(timeout=JOIN_TIMEOUT)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        until_waiting(q, "get")
        fresh_redis.kill()
        t.join(PROMPT)
        assert not t.is_alive()
        # The wait is pipelined with the get script that follows a wake-up, so a failure
        # while waiting cannot say that the script did not run: outcome unknown.
        assert len(out) == 1, out
        assert isinstance(out[0], safeshm.OutcomeUnknownError | safeshm.BackendUnavailableError)
        assert not isinstance(out[0], redis.RedisError)
        fresh_redis.start()
        q.put(1)
        assert q.get(timeout=1) == 1
    finally:
        q.close()
