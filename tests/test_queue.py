"""SafeQueue: FIFO semantics, blocking and timeouts, MPMC stress, crashes, shutdown."""

from __future__ import annotations

import collections
import ctypes
import multiprocessing
import pickle
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import safeshm
from safeshm import _compat, _queue

from ._helpers import (
    JOIN_TIMEOUT,
    PROMPT,
    START_METHODS,
    Remote,
    blocked_getter_worker,
    check_patterned,
    hold_queue_lock_worker,
    kill_and_reap,
    patterned_producer_worker,
    processes,
    queue_consumer_worker,
    queue_producer_worker,
    run_all,
    timed_get_worker,
    timed_put_worker,
)


@pytest.fixture
def make(cleanup: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> safeshm.SafeQueue[Any]:
        return cleanup(safeshm.SafeQueue.create(*args, **kwargs))  # type: ignore[no-any-return]

    return factory


# -- semantics ------------------------------------------------------------------------------------
def test_fifo_and_sizes(make: Any) -> None:
    q = make(4096)
    assert q.empty() and q.qsize() == 0 and not q.full()
    items = [1, "two", {"three": 3}, [4.0], None, b"six", (7,)]
    for item in items:
        q.put(item)
    assert q.qsize() == len(items) and not q.empty()
    assert [q.get() for _ in items] == items
    assert q.empty()
    s = q.statistics()
    assert (s.items, s.puts, s.gets, s.capacity, s.raw) == (0, 7, 7, 4096, False)


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
    with pytest.raises(ValueError, match="non-negative"):
        q.get(timeout=-1)
    q.put(b"x" * 20)
    q.put(b"y" * 20)  # 2 x (8-byte header + 20, padded to 32) = the whole 64-byte ring
    with pytest.raises(queue.Full):
        q.put_nowait(b"1")
    with pytest.raises(queue.Full):
        q.put(b"1", block=False)
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


def test_too_big_fails_at_once_and_changes_nothing(make: Any) -> None:
    q = make(256)
    q.put("keep")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="can never fit"):
        q.put(b"x" * 300)  # blocking put: must not wait for room that can never come
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
    with pytest.raises(queue.Empty):
        q.get_many(5, block=False)
    with pytest.raises(queue.Empty):
        q.get_many(5, timeout=0.05)
    with pytest.raises(ValueError, match="max_items"):
        q.get_many(0)
    with pytest.raises(TypeError):
        q.get_many("3")  # type: ignore[arg-type]
    # Not enough room for the whole batch: none of it is put.
    q.put_many([b"a" * 100] * 6)
    with pytest.raises(queue.Full):
        q.put_many([b"b" * 100] * 4, timeout=0.05)
    assert q.qsize() == 6


def test_wraparound_in_every_way(make: Any) -> None:
    r = make(128, raw=True)
    model: collections.deque[bytes] = collections.deque()
    for size in list(range(121)) * 3:
        item = bytes([size % 256]) * size
        while True:
            try:
                r.put_nowait(item)
                model.append(item)
                break
            except queue.Full:
                assert r.get() == model.popleft()
    while model:
        assert r.get() == model.popleft()
    assert r.empty()


def test_shutdown(make: Any) -> None:
    q = make(4096)
    q.put_many([1, 2])
    q.shutdown()
    assert q.is_shutdown
    with pytest.raises(safeshm.QueueShutDown):
        q.put(3)
    with pytest.raises(safeshm.QueueShutDown):
        q.put_many([3])
    assert q.get() == 1  # what is left is still delivered
    assert q.get_many(10) == [2]
    with pytest.raises(safeshm.QueueShutDown):
        q.get()
    with pytest.raises(safeshm.QueueShutDown):
        q.get_nowait()
    import sys

    if sys.version_info >= (3, 13):
        assert issubclass(safeshm.QueueShutDown, queue.ShutDown)


def test_shutdown_immediate_discards(make: Any) -> None:
    q = make(4096)
    q.put_many([1, 2, 3])
    q.shutdown(immediate=True)
    assert q.qsize() == 0
    with pytest.raises(safeshm.QueueShutDown):
        q.get()


def test_shutdown_wakes_blocked_callers(make: Any) -> None:
    q = make(64, maxsize=1)
    results: list[Any] = []

    def getter() -> None:
        try:
            q.get(timeout=JOIN_TIMEOUT)
        except BaseException as e:  # noqa: BLE001
            results.append(type(e))

    t = threading.Thread(target=getter)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    q.shutdown()
    t.join(timeout=JOIN_TIMEOUT)
    assert results == [safeshm.QueueShutDown]
    assert time.monotonic() - t0 < PROMPT


def test_blocked_put_is_woken_by_shutdown(make: Any) -> None:
    q = make(4096, maxsize=1)
    q.put(1)
    results: list[Any] = []

    def putter() -> None:
        try:
            q.put(2, timeout=JOIN_TIMEOUT)
        except BaseException as e:  # noqa: BLE001
            results.append(type(e))

    t = threading.Thread(target=putter)
    t.start()
    time.sleep(0.2)
    q.shutdown()
    t.join(timeout=JOIN_TIMEOUT)
    assert results == [safeshm.QueueShutDown]


@pytest.mark.parametrize("bad", [0, 15, -1])
def test_bad_capacity(bad: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        safeshm.SafeQueue.create(bad)


@pytest.mark.parametrize("bad", [1.5, "10", None, True])
def test_bad_capacity_type(bad: Any) -> None:
    with pytest.raises(TypeError, match="capacity"):
        safeshm.SafeQueue.create(bad)


def test_open_checks_what_it_would_create(name: str, cleanup: Any) -> None:
    """One rule for every open(): an existing segment must match the parameters given."""
    cleanup(safeshm.SafeQueue.open(name, 1024, maxsize=5))
    with pytest.raises(safeshm.IncompatibleSegmentError, match="capacity 1024, expected 4096"):
        safeshm.SafeQueue.open(name, 4096)
    with pytest.raises(safeshm.IncompatibleSegmentError, match="maxsize 5, expected 6"):
        safeshm.SafeQueue.open(name, 1024, maxsize=6)
    with pytest.raises(safeshm.IncompatibleSegmentError, match="pickling"):
        safeshm.SafeQueue.open(name, 1024, raw=True)
    for same in (
        safeshm.SafeQueue.open(name, 1020),  # rounded up to 1024
        safeshm.SafeQueue.open(name, 1024, maxsize=5),
    ):
        assert (same.capacity, same.maxsize) == (1024, 5)
        same.close()


# -- across processes -------------------------------------------------------------------------
# The waits below run in forked children whose sleeps are 30 s long (patched before the
# fork): a waiter that wakes within seconds was woken by the other side, not by the end of
# a sleep -- a bound that also holds on a loaded machine.
@pytest.fixture
def long_sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Waiters sleep 30 s at a time. Both the slice and the timespec built from it at
    import are patched: patching the float alone left 100 ms sleeps, and the wake-up tests
    passed with the futex wake deleted. The compiled core has its own (a test hook)."""
    monkeypatch.setattr(_queue, "_WAIT_SLICE", 30.0)
    monkeypatch.setattr(_queue, "_SLICE_TIMESPEC", ctypes.byref(_compat.Timespec(30, 0)))
    if _compat.native is None:
        yield
        return
    before = _compat.native.queue_wait_slice(30.0)
    try:
        yield
    finally:
        _compat.native.queue_wait_slice(before)


def _until_a_waiter_sleeps(q: Any, word: int) -> None:
    """Wait (bounded) until a waiter has registered as a sleeper on ``q``'s futex word."""
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not q._fw[word]:
        assert time.monotonic() < deadline, "the waiter never went to sleep"
        time.sleep(0.01)


@pytest.mark.usefixtures("long_sleeps")
def test_blocked_get_wakes_promptly_on_put_in_another_process(make: Any) -> None:
    q = make(4096)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    woke = ctx.RawValue("d", 0.0)
    with processes("fork", timed_get_worker, [(q.name, ready, woke)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        _until_a_waiter_sleeps(q, _queue._NE_SLEEP)
        put_at = time.monotonic()
        q.put("wake up")
        p.join(timeout=JOIN_TIMEOUT)
        assert p.exitcode == 0
    assert woke.value - put_at < PROMPT


@pytest.mark.usefixtures("long_sleeps")
def test_blocked_put_wakes_promptly_on_get_in_another_process(make: Any) -> None:
    q = make(4096, maxsize=1)
    q.put("first")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    woke = ctx.RawValue("d", 0.0)
    with processes("fork", timed_put_worker, [(q.name, ready, woke)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        _until_a_waiter_sleeps(q, _queue._NF_SLEEP)
        got_at = time.monotonic()
        assert q.get() == "first"
        p.join(timeout=JOIN_TIMEOUT)
        assert p.exitcode == 0
    assert woke.value - got_at < PROMPT
    assert q.get(timeout=1) == "second"


def test_a_spawned_consumer_gets_what_is_put(make: Any) -> None:
    q = make(4096)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    woke = ctx.RawValue("d", 0.0)
    with processes("spawn", timed_get_worker, [(q.name, ready, woke)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        q.put("wake up")
        p.join(timeout=JOIN_TIMEOUT)
        assert p.exitcode == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", START_METHODS)
@settings(max_examples=4)
@given(data=st.data())
def test_mpmc_nothing_lost_or_duplicated_fifo_per_producer(
    method: str, data: st.DataObject
) -> None:
    producers = data.draw(st.integers(1, 3), label="producers")
    consumers = data.draw(st.integers(1, 3), label="consumers")
    count = data.draw(st.integers(50, 1500), label="items per producer")
    capacity = data.draw(st.sampled_from([512, 4096, 1 << 16]), label="capacity")
    # A batch must fit the ring: items need about 32 bytes each.
    pbatch = data.draw(st.sampled_from([1, 1, 7, 50]), label="put_many batch")
    pbatch = min(pbatch, capacity // 64)
    cbatch = data.draw(st.sampled_from([1, 1, 16]), label="get_many batch")
    q = safeshm.SafeQueue.create(capacity)
    ctx = multiprocessing.get_context(method)
    try:
        barrier = ctx.Barrier(producers + consumers)
        pipes = [ctx.Pipe(duplex=False) for _ in range(consumers)]
        with processes(
            method, queue_consumer_worker, [(q, barrier, w, cbatch) for _, w in pipes]
        ) as cons:
            run_all(
                method,
                queue_producer_worker,
                [(q, barrier, p, count, pbatch) for p in range(producers)],
            )
            q.shutdown()  # producers are done: consumers drain and stop
            received = []
            for r, _ in pipes:
                assert r.poll(JOIN_TIMEOUT), "a consumer did not finish"
                received.append(r.recv())
            for c in cons:
                c.join(timeout=JOIN_TIMEOUT)
                assert c.exitcode == 0
        everything = [item for got in received for item in got]
        assert sorted(everything) == sorted(
            (p, s) for p in range(producers) for s in range(count)
        )  # none lost, none twice
        for got in received:  # each consumer sees each producer's items in order
            for p in range(producers):
                seqs = [s for (pp, s) in got if pp == p]
                assert seqs == sorted(seqs)
    finally:
        q.close()
        q.unlink()


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_handles_reach_pool_workers(method: str, make: Any) -> None:
    q = make(1 << 16)
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        list(pool.map(_pool_put, [q] * 4, range(4), timeout=JOIN_TIMEOUT))
    assert sorted(q.get_many(10)) == [0, 1, 4, 9]


def _pool_put(q: safeshm.SafeQueue[int], i: int) -> None:
    q.put(i * i)


# -- crashes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", START_METHODS)
def test_producer_killed_mid_put_leaves_no_partial_item(method: str, make: Any) -> None:
    r = make(1 << 16, raw=True)
    ctx = multiprocessing.get_context(method)
    seen = 0
    for round_ in range(6):
        progress = ctx.RawValue("q", 0)
        ready = ctx.Event()
        with processes(method, patterned_producer_worker, [(r.name, progress, ready)]) as (p,):
            assert ready.wait(JOIN_TIMEOUT)
            deadline = time.monotonic() + 0.05 + 0.03 * round_
            while time.monotonic() < deadline:  # consume while it produces
                try:
                    check_patterned(r.get(timeout=0.01))
                    seen += 1
                except queue.Empty:
                    pass
            kill_and_reap(p)
        done = progress.value
        # Everything left is complete and in order; the item in flight when the producer
        # died is either whole (its seq is `done`) or absent -- never partial.
        left = (
            [check_patterned(item) for item in r.get_many(1 << 20, block=False)]
            if not r.empty()
            else []
        )
        assert left == sorted(left)
        assert not left or left[-1] in (done - 1, done)
        assert r.empty()
        r.put(b"still works")
        assert r.get(timeout=1) == b"still works"
    assert seen > 0


def test_lock_holder_killed_others_carry_on(make: Any) -> None:
    q = make(4096)
    q.put("before")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with processes("fork", hold_queue_lock_worker, [(q.name, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(q.get(timeout=JOIN_TIMEOUT)))
        t.start()
        time.sleep(0.2)
        assert got == []  # a live holder is never robbed
        kill_and_reap(p)
        t.join(timeout=PROMPT)
        assert got == ["before"]
    q.put("after")
    assert q.get(timeout=1) == "after"
    assert q.qsize() == 0


def test_timeouts_cover_the_internal_mutex(make: Any) -> None:
    """A stuck (SIGSTOPped) process holding the queue's mutex does not stretch a
    timeout= (issue 10.4): every timed call gives up at its deadline."""
    import os
    import signal

    q = make(4096)
    q.put("there")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with processes("fork", hold_queue_lock_worker, [(q.name, ready)]) as (p,):
        try:
            assert ready.wait(JOIN_TIMEOUT)
            os.kill(p.pid, signal.SIGSTOP)
            calls: list[tuple[type[Exception], Any]] = [
                (queue.Empty, lambda: q.get(timeout=0.3)),
                (queue.Empty, lambda: q.get_many(5, timeout=0.3)),
                (queue.Full, lambda: q.put("x", timeout=0.3)),
                (queue.Full, lambda: q.put_many(["x", "y"], timeout=0.3)),
                (queue.Empty, lambda: q.get(True, 0)),
            ]
            for expected, call in calls:
                t0 = time.monotonic()
                with pytest.raises(expected):
                    call()
                assert time.monotonic() - t0 < PROMPT
        finally:
            os.kill(p.pid, signal.SIGCONT)
            kill_and_reap(p)
    assert q.get(timeout=1) == "there"  # nothing was changed meanwhile
    assert q.qsize() == 0


def test_sleeper_killed_does_not_tax_later_puts(make: Any) -> None:
    """A consumer killed while asleep in get() leaves the sleepers flag up; the next put
    finds nobody to wake and lowers it again, so later puts pay for no system call."""
    q = make(4096)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with processes("fork", blocked_getter_worker, [(q.name, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        _until_a_waiter_sleeps(q, _queue._NE_SLEEP)  # the sleeper's token is up
        kill_and_reap(p)
    q.put(1)
    assert q._fw[_queue._NE_SLEEP] == 0
    assert q.get() == 1


def test_repair_recounts_after_a_death_between_commit_and_count(make: Any) -> None:
    q = make(4096)
    q.put_many([1, 2, 3])
    q._state[_queue._PUTS] -= 1  # as if a producer died between its commit and its count
    assert q.qsize() == 2
    q._repair()
    assert q.qsize() == 3
    assert q.get_many(10) == [1, 2, 3]
    assert q.empty()


# -- a model-based state machine ----------------------------------------------------------------
class QueueMachine(RuleBasedStateMachine):
    """A raw SafeQueue with a handle in a server process, against a deque, with item sizes
    drawn so the ring wraps every way (header at the end, payload split, exact fits)."""

    remote: Remote | None = None

    def __init__(self) -> None:
        super().__init__()
        self.q: safeshm.SafeQueue[bytes] | None = None
        self.model: collections.deque[bytes] = collections.deque()

    @initialize(capacity=st.integers(16, 300), maxsize=st.sampled_from([0, 0, 3]))
    def create(self, capacity: int, maxsize: int) -> None:
        self.q = safeshm.SafeQueue.create(capacity, maxsize=maxsize, raw=True)
        assert self.remote is not None
        self.remote.attach("SafeQueue", self.q.name)

    def _fits(self, items: list[bytes]) -> bool:
        assert self.q is not None
        used = sum(_queue._need(len(x)) for x in self.model)
        need = sum(_queue._need(len(x)) for x in items)
        if self.q.maxsize and len(self.model) + len(items) > self.q.maxsize:
            return False
        return used + need <= self.q.capacity

    @rule(size=st.integers(0, 310), remote=st.booleans())
    def put(self, size: int, remote: bool) -> None:
        assert self.q is not None and self.remote is not None
        item = bytes([size % 256, 7]) * (size // 2) + b"!" * (size % 2)
        if _queue._need(len(item)) > self.q.capacity:
            with pytest.raises(ValueError, match="never fit"):
                self.q.put_nowait(item)
        elif self._fits([item]):
            if remote:
                self.remote.call(self.q.name, "put_nowait", item)
            else:
                self.q.put_nowait(item)
            self.model.append(item)
        else:
            with pytest.raises(queue.Full):
                self.q.put_nowait(item)

    @rule(sizes=st.lists(st.integers(0, 60), max_size=5))
    def put_many(self, sizes: list[int]) -> None:
        assert self.q is not None
        items = [bytes([s]) * s for s in sizes]
        need = sum(_queue._need(len(x)) for x in items)
        if need > self.q.capacity or (self.q.maxsize and len(items) > self.q.maxsize):
            with pytest.raises(ValueError, match=r"never fit|maxsize"):
                self.q.put_many(items, block=False)
        elif self._fits(items):
            self.q.put_many(items, block=False)
            self.model.extend(items)
        elif items:
            with pytest.raises(queue.Full):
                self.q.put_many(items, block=False)

    @rule(remote=st.booleans())
    def get(self, remote: bool) -> None:
        assert self.q is not None and self.remote is not None
        if not self.model:
            with pytest.raises(queue.Empty):
                self.q.get_nowait()
            return
        got = self.remote.call(self.q.name, "get_nowait") if remote else self.q.get_nowait()
        assert got == self.model.popleft()

    @rule(k=st.integers(1, 6))
    def get_many(self, k: int) -> None:
        assert self.q is not None
        if not self.model:
            with pytest.raises(queue.Empty):
                self.q.get_many(k, block=False)
            return
        got = self.q.get_many(k, block=False)
        want = [self.model.popleft() for _ in range(min(k, len(self.model)))]
        assert got == want

    @invariant()
    def sizes_agree(self) -> None:
        if self.q is None:
            return
        assert self.q.qsize() == len(self.model)
        assert self.q.empty() == (not self.model)
        assert self.q.statistics().bytes_used == sum(_queue._need(len(x)) for x in self.model)

    def teardown(self) -> None:
        if self.q is not None:
            assert self.remote is not None
            self.remote.detach(self.q.name)
            self.q.close()
            self.q.unlink()


def test_state_machine(remote: Remote) -> None:
    QueueMachine.remote = remote
    try:
        QueueMachine.TestCase.settings = settings(stateful_step_count=40, max_examples=60)
        QueueMachine.TestCase().runTest()
    finally:
        QueueMachine.remote = None


def _refuse_to_load(tag: int) -> Any:
    raise LookupError(f"item {tag} cannot be loaded here")


class _Undecodable:
    """Pickles fine; unpickling raises (as a class missing in the consumer would)."""

    def __init__(self, tag: int) -> None:
        self.tag = tag

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, (self.tag,))


def test_get_many_loses_nothing_when_items_fail_to_unpickle(make: Any) -> None:
    q = make(1 << 16)
    q.put_many([0, 1, _Undecodable(2), 3, _Undecodable(4), 5])
    with pytest.raises(safeshm.ItemDecodeError, match="2 of 6 item") as info:
        q.get_many(10)
    e = info.value
    assert e.items == [0, 1, 3, 5]
    assert len(e.undecodable) == 2
    assert e.failed_at == [2, 4]  # where they stood: the batch's order can be rebuilt
    with pytest.raises(LookupError, match="item 2"):
        pickle.loads(e.undecodable[0])
    assert isinstance(e.__cause__, LookupError)
    assert isinstance(e, pickle.UnpicklingError)
    assert q.qsize() == 0
    again = pickle.loads(pickle.dumps(e))  # crosses a pool's process boundary intact
    assert (type(again), again.items, again.undecodable, again.failed_at) == (
        type(e),
        e.items,
        e.undecodable,
        e.failed_at,
    )


def test_get_hands_over_an_item_that_fails_to_unpickle(make: Any) -> None:
    q = make(1 << 16)
    q.put(_Undecodable(7))
    q.put("next")
    with pytest.raises(safeshm.ItemDecodeError) as info:
        q.get()
    assert info.value.items == []
    assert len(info.value.undecodable) == 1
    assert q.get(timeout=5) == "next"


def test_non_blocking_calls_do_not_wait_behind_a_stuck_holder(make: Any) -> None:
    """A process that keeps the queue's internal lock (stopped, stuck) makes the calls that
    must not block say they could not proceed, promptly, instead of hanging with it."""
    q = make(4096, maxsize=1)
    q.put("item")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with processes("fork", hold_queue_lock_worker, [(q.name, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        for call, exc in [
            (q.get_nowait, queue.Empty),
            (lambda: q.get(block=False), queue.Empty),
            (lambda: q.get_many(5, block=False), queue.Empty),
            (lambda: q.put_nowait("more"), queue.Full),
            (lambda: q.put_many(["more"], block=False), queue.Full),
        ]:
            t0 = time.monotonic()
            with pytest.raises(exc):
                call()
            assert time.monotonic() - t0 < PROMPT
        kill_and_reap(p)
    assert q.get_nowait() == "item"  # the holder's death is recovered; nothing lost


@pytest.mark.parametrize("bad", [-1, float("nan"), "1", True])
def test_timeout_is_checked_even_without_blocking(make: Any, bad: Any) -> None:
    q = make(4096)
    q.put(1)
    with pytest.raises((TypeError, ValueError)):
        q.get(block=False, timeout=bad)
    with pytest.raises((TypeError, ValueError)):
        q.put(2, block=False, timeout=bad)
    assert q.get_nowait() == 1  # nothing happened
