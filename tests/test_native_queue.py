"""SafeQueue's compiled core (src/native/queue.c): what only C can get wrong.

Mixed processes (one of each implementation on one queue at the same time, wake-ups both
ways, SIGKILL of either kind), differential tests of the two implementations on one
handle, reference leaks, close() and fork() while a call is blocked, Ctrl-C, and argument
errors identical to the ctypes path's.
"""

from __future__ import annotations

import contextlib
import fractions
import functools
import gc
import json
import math
import mmap
import os
import pickle
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeshm
from safeshm import _compat, _queue

from ._helpers import JOIN_TIMEOUT, PROMPT
from ._impls import IMPLEMENTATION, env_for, needs_native, other, skip_rss_under_asan

native_here = pytest.mark.skipif(
    IMPLEMENTATION != "native", reason="this process uses the ctypes implementation"
)


@pytest.fixture
def make(cleanup: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> safeshm.SafeQueue[Any]:
        return cleanup(safeshm.SafeQueue.create(*args, **kwargs))  # type: ignore[no-any-return]

    return factory


@contextlib.contextmanager
def long_sleeps() -> Iterator[None]:
    """Waiters in this process sleep 30 s at a time (both implementations): a waiter
    that wakes within seconds was woken by the other side, not by the end of a slice."""
    saved = (_queue._WAIT_SLICE, _queue._SLICE_TIMESPEC)
    _queue._WAIT_SLICE = 30.0  # type: ignore[misc]
    _queue._SLICE_TIMESPEC = __import__("ctypes").byref(_compat.Timespec(30, 0))  # type: ignore[misc]
    before = None if _compat.native is None else _compat.native.queue_wait_slice(30.0)
    try:
        yield
    finally:
        _queue._WAIT_SLICE, _queue._SLICE_TIMESPEC = saved  # type: ignore[misc]
        if _compat.native is not None:
            _compat.native.queue_wait_slice(before)


# -- a worker of either implementation, in a subprocess -------------------------------------
# Run as ``python -c WORKER SPEC`` with env_for(kind). Every call it makes is bounded; it
# exits 3 if one timed out (a lost wake-up shows as that, or as the caller's deadline).
WORKER = r"""
import json, mmap, os, queue, struct, sys, time
import safeshm
from safeshm import _compat, _queue

spec = json.loads(sys.argv[1])
if spec.get("slice"):
    s = spec["slice"]
    import ctypes
    _queue._WAIT_SLICE = s
    _queue._SLICE_TIMESPEC = ctypes.byref(_compat.Timespec(int(s), 0))
    if _compat.native is not None:
        _compat.native.queue_wait_slice(float(s))
q = safeshm.SafeQueue.attach(spec["name"])
T = spec.get("timeout", 30.0)
role = spec["role"]
out = {"implementation": safeshm.implementation()}


def fail(what):
    print(json.dumps({"error": what}), flush=True)
    os._exit(3)


if spec.get("progress"):
    fd = os.open(spec["progress"], os.O_RDWR)
    board = mmap.mmap(fd, 0)
    words = memoryview(board).cast("q")

if role == "produce":
    tag, count, batch = spec["tag"], spec["count"], spec["batch"]
    seq = 0
    while seq < count:
        items = [[tag, s] for s in range(seq, min(seq + batch, count))]
        try:
            if len(items) == 1:
                q.put(items[0], timeout=T)
            else:
                q.put_many(items, timeout=T)
        except queue.Full:
            fail("put timed out")
        seq += len(items)
    q.put(None, timeout=T)
    out["put_at"] = time.monotonic()
elif role == "consume":
    batch = spec["batch"]
    got = []
    times = []
    while True:
        try:
            items = [q.get(timeout=T)] if batch == 1 else q.get_many(batch, timeout=T)
        except queue.Empty:
            fail("get timed out")
        times.append(time.monotonic())
        if None in items:
            i = items.index(None)
            got += items[:i]
            rest = items[i + 1:]  # another consumer's: back they go (at the end)
            if rest:
                q.put_many(rest)
            break
        got += items
    out["got"] = got
    out["times"] = times[:3]
elif role == "wait_get":
    print(json.dumps({"ready": True}), flush=True)
    item = q.get(timeout=T)
    out["woke"] = time.monotonic()
    out["item"] = item
elif role == "wait_put":
    print(json.dumps({"ready": True}), flush=True)
    q.put("second", timeout=T)
    out["woke"] = time.monotonic()
elif role == "churn_put":  # raw patterned items, forever; words[0] = items whose put returned
    size = spec["size"]
    seq = 0
    print(json.dumps({"ready": True}), flush=True)
    while True:
        body = seq.to_bytes(8, "little") * (size // 8)
        try:
            if seq % 3 == 2:
                q.put_many([body, (seq + 1).to_bytes(8, "little") * (size // 8)], timeout=0.05)
                seq += 2
            else:
                q.put(body, timeout=0.05)
                seq += 1
            words[0] = seq
        except queue.Full:
            pass
elif role == "churn_get":  # forever; words[1:] = seqs taken, words[0] = how many
    n = 0
    print(json.dumps({"ready": True}), flush=True)
    while True:
        try:
            got = [q.get(timeout=0.05)] if n % 2 else q.get_many(3, timeout=0.05)
        except queue.Empty:
            continue
        for item in got:
            words[1 + n] = int.from_bytes(item[:8], "little")
            n += 1
        words[0] = n
q.close()
print(json.dumps(out), flush=True)
"""


def start(kind: str, **spec: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(spec)],
        env=env_for(kind),
        stdout=subprocess.PIPE,
        text=True,
    )


def wait_ready(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    line = p.stdout.readline()  # bounded: the worker prints it at once (or dies)
    assert json.loads(line) == {"ready": True}, line


def finish(p: subprocess.Popen[str], timeout: float = JOIN_TIMEOUT) -> dict[str, Any]:
    try:
        stdout, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("a worker hung (a lost wake-up?)") from None
    assert p.returncode == 0, stdout
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def kill(p: subprocess.Popen[str]) -> None:
    p.kill()
    p.communicate(timeout=JOIN_TIMEOUT)


# -- processes of both kinds on one queue, at the same time ------------------------------------
@needs_native
@pytest.mark.slow
@pytest.mark.parametrize("capacity", [256, 4096])
def test_mixed_producers_and_consumers_every_item_exactly_once(make: Any, capacity: int) -> None:
    """This process (one kind) produces and consumes in threads while two subprocesses
    of the other kind do the same, on a ring small enough that every side waits often.
    Every wait sleeps 30 s per slice and every call is bounded: a lost wake-up between
    the implementations fails the test instead of being papered over by a slice."""
    q = make(capacity)
    count = 1500
    with long_sleeps():
        theirs = [
            start(other(), role="produce", name=q.name, tag=1, count=count, batch=3, slice=30),
            start(other(), role="consume", name=q.name, batch=1, slice=30),
        ]
        mine: list[Any] = []
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                for lo in range(0, count, 2):
                    if lo % 4:
                        q.put([0, lo], timeout=JOIN_TIMEOUT)
                        q.put([0, lo + 1], timeout=JOIN_TIMEOUT)
                    else:
                        q.put_many([[0, lo], [0, lo + 1]], timeout=JOIN_TIMEOUT)
                q.put(None, timeout=JOIN_TIMEOUT)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        def consume() -> None:
            try:
                while True:
                    items = q.get_many(4, timeout=JOIN_TIMEOUT)
                    if None in items:
                        i = items.index(None)
                        mine.extend(items[:i])
                        if items[i + 1 :]:
                            q.put_many(items[i + 1 :], timeout=JOIN_TIMEOUT)
                        return
                    mine.extend(items)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
        for t in threads:
            t.start()
        results = [finish(p) for p in theirs]
        for t in threads:
            t.join(timeout=JOIN_TIMEOUT)
            assert not t.is_alive(), "a thread of this process hung (a lost wake-up?)"
    assert not errors, errors
    assert {r["implementation"] for r in results} == {other()}
    got = [tuple(x) for x in mine + results[1]["got"]]
    expected = [(tag, s) for tag in (0, 1) for s in range(count)]
    assert sorted(got) == expected  # every item, exactly once
    assert q.empty() and q.qsize() == 0
    assert q.statistics().puts == q.statistics().gets


@needs_native
@pytest.mark.parametrize("waiter", ["here", "there"])
@pytest.mark.parametrize("direction", ["get", "put"])
def test_wake_ups_cross_the_implementations(make: Any, waiter: str, direction: str) -> None:
    """A waiter of one kind, asleep (30 s slices), is woken promptly by the other kind."""
    q = make(4096, maxsize=1)
    if direction == "put":
        q.put("first")
    word = _queue._NE_SLEEP if direction == "get" else _queue._NF_SLEEP
    with long_sleeps():
        if waiter == "there":
            p = start(other(), role=f"wait_{direction}", name=q.name, slice=30)
            wait_ready(p)
            _until_a_waiter_sleeps(q, word)
            acted = time.monotonic()
            if direction == "get":
                q.put("wake up")
            else:
                assert q.get() == "first"
            result = finish(p)
            assert result["woke"] - acted < PROMPT
            if direction == "get":
                assert result["item"] == "wake up"
            else:
                assert q.get(timeout=1) == "second"
            return
        woke: list[float] = []
        got: list[Any] = []

        def wait() -> None:
            if direction == "get":
                got.append(q.get(timeout=JOIN_TIMEOUT))
            else:
                q.put("second", timeout=JOIN_TIMEOUT)
            woke.append(time.monotonic())

        t = threading.Thread(target=wait)
        t.start()
        _until_a_waiter_sleeps(q, word)
        if direction == "get":  # it puts None, which the waiter here takes
            result = finish(start(other(), role="produce", name=q.name, tag=7, count=0, batch=1))
            t.join(timeout=JOIN_TIMEOUT)
            assert got == [None]
            assert woke[0] - result["put_at"] < PROMPT
        else:  # it takes "first", then "second" once the waiter here could put it
            p = start(other(), role="consume", name=q.name, batch=1)
            t.join(timeout=JOIN_TIMEOUT)
            assert not t.is_alive()
            q.put(None)
            result = finish(p)
            assert result["got"] == ["first", "second"]
            assert woke[0] - result["times"][0] < PROMPT
        assert not t.is_alive()


def _until_a_waiter_sleeps(q: Any, word: int) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not q._fw[word]:
        assert time.monotonic() < deadline, "the waiter never went to sleep"
        time.sleep(0.005)


# -- SIGKILL of either kind, at any moment ------------------------------------------------------
def _board(tmp_path: Path, words: int) -> tuple[str, memoryview]:
    path = tmp_path / "board"
    path.write_bytes(bytes(8 * words))
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, 0)
    finally:
        os.close(fd)
    return str(path), memoryview(mm).cast("q")


def _seq_of(item: bytes, size: int) -> int:
    seq = int.from_bytes(item[:8], "little")
    assert len(item) == size and item == seq.to_bytes(8, "little") * (size // 8), "partial item"
    return seq


@needs_native
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["native", "ctypes"])
def test_producer_of_either_kind_killed_mid_put(make: Any, tmp_path: Path, kind: str) -> None:
    """A producer SIGKILLed at random moments (mid-put, holding the mutex or not) while
    this process consumes: never a partial item, nothing out of order, and the queue
    (and its mutex, recovered from the dead holder) works for everyone after."""
    size = 120
    q = make(2048, raw=True)
    rng = random.Random(1234)
    path, words = _board(tmp_path, 1)
    for _ in range(5):
        words[0] = 0
        p = start(kind, role="churn_put", name=q.name, size=size, progress=path)
        wait_ready(p)
        seen: list[int] = []
        deadline = time.monotonic() + rng.uniform(0.02, 0.25)
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen += [_seq_of(x, size) for x in q.get_many(4, timeout=0.01)]
        kill(p)
        done = words[0]
        left = [_seq_of(x, size) for x in q.get_many(1 << 20, block=False)] if q.qsize() else []
        taken = seen + left
        assert taken == list(range(len(taken)))  # in order, none twice, none skipped
        # what was acknowledged is there; at most the batch in flight beyond it
        assert done <= len(taken) <= done + 2
        assert q.empty() and q.statistics().items == 0
        q.put(b"x" * 8)
        assert q.get(timeout=PROMPT) == b"x" * 8


@needs_native
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["native", "ctypes"])
def test_consumer_of_either_kind_killed_mid_get(make: Any, tmp_path: Path, kind: str) -> None:
    """A consumer SIGKILLed at random moments while this process also takes items: an
    item is taken at most once, what is left is whole and in order, at most the batch
    it was taking when it died is lost, and the queue works after."""
    size = 40
    n = 300
    q = make(1 << 16, raw=True)
    rng = random.Random(99)
    path, words = _board(tmp_path, n + 1)
    for _ in range(5):
        q.put_many([s.to_bytes(8, "little") * (size // 8) for s in range(n)])
        words[0] = 0
        p = start(kind, role="churn_get", name=q.name, progress=path)
        wait_ready(p)
        mine: list[int] = []
        deadline = time.monotonic() + rng.uniform(0.0, 0.05)
        while time.monotonic() < deadline and not q.empty():
            with contextlib.suppress(queue.Empty):
                mine.append(_seq_of(q.get(timeout=0.01), size))
        kill(p)
        theirs = [words[1 + i] for i in range(words[0])]
        left = [_seq_of(x, size) for x in q.get_many(1 << 20, block=False)] if q.qsize() else []
        assert left == sorted(left) and (not left or left[-1] == n - 1)
        everything = mine + theirs + left
        assert len(everything) == len(set(everything))  # none twice
        assert n - 3 <= len(everything) <= n  # at most its last get_many(3) lost
        assert q.empty() and q.statistics().items == 0
        q.put(b"y" * 8)
        assert q.get(timeout=PROMPT) == b"y" * 8


# -- the two implementations on one handle ------------------------------------------------------
def _impls(q: Any) -> dict[str, Callable[..., Any]]:
    """name -> the ctypes method bound to ``q`` (the class's), for the differential tests."""
    cls = type(q)
    names = ("put", "put_nowait", "put_many", "get", "get_nowait", "get_many")
    return {n: functools.partial(getattr(cls, n), q) for n in names}


def _outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    try:
        return "ok", call(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - compared
        return type(e).__name__, str(e)


_ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "put_nowait", "put_many", "get", "get_nowait", "get_many"]),
        st.booleans(),  # native or ctypes
        st.lists(st.binary(max_size=70), min_size=0, max_size=4),
        st.integers(1, 5),
    ),
    max_size=40,
)


@native_here
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, capacity=st.sampled_from([16, 64, 136, 512]), raw=st.booleans())
def test_differential_one_handle_against_a_model(
    ops: list[tuple[str, bool, list[bytes], int]], capacity: int, raw: bool
) -> None:
    """Random operations, each by the compiled core or the ctypes code on ONE handle,
    against a model: the same results, the same errors; every wrap of the ring."""
    q: Any = safeshm.SafeQueue.create(capacity, raw=raw, maxsize=0)
    try:
        ct = _impls(q)
        model: list[Any] = []

        def size(x: Any) -> int:
            return _queue._need(len(x if raw else pickle.dumps(x, pickle.HIGHEST_PROTOCOL)))

        for op, use_native, items, m in ops:
            impl = getattr(q, op) if use_native else ct[op]
            other_impl = ct[op] if use_native else getattr(q, op)
            used = sum(size(x) for x in model)
            args: tuple[Any, ...]
            kwargs: dict[str, Any] = {}
            if op in ("put", "put_nowait", "put_many"):
                batch = items if op == "put_many" else items[:1] or [b""]
                args = (batch,) if op == "put_many" else (batch[0],)
                kwargs = {"put": {"timeout": 0}, "put_many": {"block": False}}.get(op, {})
                need = sum(size(x) for x in batch)
                if not batch or need <= q.capacity - used:
                    assert _outcome(impl, *args, **kwargs) == ("ok", None)
                    model.extend(batch)
                else:  # too big for ever (ValueError) or for now (Full): the same both ways
                    a = _outcome(impl, *args, **kwargs)
                    assert a == _outcome(other_impl, *args, **kwargs)
                    assert a[0] == ("ValueError" if need > q.capacity else "Full")
            else:
                args = {"get": (True, 0), "get_nowait": (), "get_many": (m, False)}[op]
                if model:
                    k = m if op == "get_many" else 1
                    want = model[:k] if op == "get_many" else model[0]
                    assert _outcome(impl, *args) == ("ok", want)
                    del model[:k]
                else:
                    a = _outcome(impl, *args)
                    assert a == _outcome(other_impl, *args) == ("Empty", "")
            assert q.qsize() == len(model)
            assert q.statistics().bytes_used == sum(size(x) for x in model)
    finally:
        q.close()
        q.unlink()


@native_here
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 200), min_size=1, max_size=30),
    capacity=st.integers(16, 700),
    start=st.integers(0, 100),
)
def test_differential_ring_bytes_are_identical(sizes: list[int], capacity: int, start: int) -> None:
    """Two queues in the same state, one driven by each implementation: after the same
    puts and gets their segments hold the same bytes (records, positions, counts,
    sequence words) -- the layout is the same, byte for byte."""
    qs = [safeshm.SafeQueue.create(capacity, raw=True) for _ in range(2)]
    try:
        for k, q in enumerate(qs):
            put = q.put_nowait if k == 0 else functools.partial(type(q).put_nowait, q)
            get = q.get_nowait if k == 0 else functools.partial(type(q).get_nowait, q)
            for i in range(start % 50):  # move the positions round the ring
                with contextlib.suppress(queue.Full, ValueError):
                    put(bytes([i % 256]) * (i % 9))
                with contextlib.suppress(queue.Empty):
                    get()
            for i, n in enumerate(sizes):
                with contextlib.suppress(queue.Full, ValueError):
                    put(bytes([(i * 7 + j) % 256 for j in range(n)]))
                if i % 3 == 2:
                    with contextlib.suppress(queue.Empty):
                        get()
        a, b = (bytes(q._seg.mm[128:256]) for q in qs)
        # state line and futex line (the sleepers tokens are 0: nobody slept)
        assert a == b
        ra, rb = (q._hot[2] for q in qs)
        assert ra.tobytes() == rb.tobytes()
    finally:
        for q in qs:
            q.close()
            q.unlink()


@native_here
def test_undecodable_items_same_error_both_ways(make: Any) -> None:
    q = make(1 << 16)
    ct = _impls(q)
    messages = []
    for get in (q.get, ct["get"]):
        q.put_many([_Undecodable(), 2])
        with pytest.raises(safeshm.ItemDecodeError) as info:
            get()
        e = info.value
        assert isinstance(e.__cause__, ZeroDivisionError)
        assert (e.items, e.failed_at, len(e.undecodable)) == ([], [0], 1)
        messages.append(str(e))
        assert get() == 2
    for get_many in (q.get_many, ct["get_many"]):
        q.put_many([1, _Undecodable(), 3, _Undecodable()])
        with pytest.raises(safeshm.ItemDecodeError) as info:
            get_many(10)
        e = info.value
        assert isinstance(e.__cause__, ZeroDivisionError)
        assert (e.items, e.failed_at, len(e.undecodable)) == ([1, 3], [1, 3], 2)
        messages.append(str(e))
        assert q.empty()
    assert messages[0] == messages[1]
    assert (
        messages[2]
        == messages[3]
        == (
            f"2 of 4 item(s) taken from SafeQueue {q.name!r} could not be unpickled (first: "
            "ZeroDivisionError: division by zero); they are off the queue: the pickled bytes "
            "are in .undecodable, the 2 other item(s) in .items"
        )
    )


def _boom() -> None:
    1 / 0  # noqa: B018 - raises on purpose


# -- reference leaks ----------------------------------------------------------------------------
def _rss() -> int:
    skip_rss_under_asan()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _leak_loop(q: Any, item: Any, timeout: float, rounds: int) -> None:
    put, get, put_many, get_many = q.put, q.get, q.put_many, q.get_many
    get_nowait, put_nowait = q.get_nowait, q.put_nowait
    batch = [item] * 10
    for _ in range(rounds):
        put(item)
        get()
        put(item, True, timeout)
        get(timeout=timeout)
        put_nowait(item)
        get_nowait()
        put_many(batch, timeout=timeout)
        get_many(10, True, timeout)


def _error_loop(q: Any, raw_q: Any, item: Any, timeout: float, rounds: int) -> None:
    for _ in range(rounds):
        with contextlib.suppress(queue.Empty):
            q.get_nowait()
        with contextlib.suppress(queue.Empty):
            q.get_many(5, timeout=0)
        with contextlib.suppress(ValueError):
            q.get(timeout=-timeout)
        with contextlib.suppress(TypeError):
            q.put(item, timeout="x")
        with contextlib.suppress(TypeError):
            q.get_many(item)
        with contextlib.suppress(TypeError):
            raw_q.put(item)
        with contextlib.suppress(ValueError):
            raw_q.put(b"z" * 100)
        with contextlib.suppress(TypeError):
            q.put()
        raw_q.put(b"a")
        with contextlib.suppress(queue.Full):
            raw_q.put(bytearray(b"b"), timeout=0)
        raw_q.get()
        q.put(_Undecodable())
        with contextlib.suppress(safeshm.ItemDecodeError):
            q.get()


class _Undecodable:
    def __reduce__(self) -> Any:
        return (_boom, ())


@native_here
@pytest.mark.slow
def test_no_reference_leaks_over_a_million_calls(make: Any) -> None:
    q = make(1 << 12)
    raw_q = make(16, raw=True)  # one 8-byte item fills it
    item = (1, "x" * 10)
    timeout = 5.5  # a float object of ours: its count must not move
    _leak_loop(q, item, timeout, 2_000)
    _error_loop(q, raw_q, item, timeout, 200)
    gc.collect()

    def counts() -> tuple[int, ...]:
        # None, True and False too: not immortal on 3.11 (an abi3 module built with newer
        # headers once stole a reference to None per call there)
        return tuple(sys.getrefcount(x) for x in (item, timeout, q._core, None, True, False, 5.5))

    before_counts = counts()
    before = _rss()
    _leak_loop(q, item, timeout, 125_000)  # 10^6 calls
    _error_loop(q, raw_q, item, timeout, 20_000)  # 240 000 calls that raise
    gc.collect()
    grown = _rss() - before
    assert counts() == before_counts
    # One leaked bytes object per call would be 30+ MB.
    assert grown < 4 * 1024 * 1024, f"RSS grew by {grown} bytes"
    assert q.empty() and raw_q.empty()


# -- close(), fork() and signals while a call is blocked -----------------------------------------
@pytest.mark.parametrize("call", ["get", "get_many", "put", "lock"])
def test_close_from_another_thread_while_blocked(make: Any, call: str) -> None:
    """A call blocked in the futex wait (or in the mutex wait, the mutex held elsewhere)
    raises SegmentClosedError when another thread closes the handle; never a crash, and
    the queue is fine for other handles."""
    if call == "lock" and IMPLEMENTATION != "native":
        pytest.skip("ctypes: a call waiting for the mutex waits for it, then sees the close")
    q = make(4096, maxsize=1)
    other_handle = safeshm.SafeQueue.attach(q.name)
    hold = contextlib.nullcontext()
    if call == "put":
        q.put("full")
    if call == "lock":
        hold = other_handle._mutex_held()
    got: list[BaseException] = []
    fn = {
        "get": lambda: q.get(timeout=JOIN_TIMEOUT),
        "get_many": lambda: q.get_many(3, timeout=JOIN_TIMEOUT),
        "put": lambda: q.put("x", timeout=JOIN_TIMEOUT),
        "lock": lambda: q.put("x", timeout=JOIN_TIMEOUT),
    }[call]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - checked below
            got.append(e)

    with hold:
        t = threading.Thread(target=run)
        t.start()
        if call == "lock":
            time.sleep(0.2)
        else:
            _until_a_waiter_sleeps(q, _queue._NF_SLEEP if call == "put" else _queue._NE_SLEEP)
        closed_at = time.monotonic()
        q.close()
        t.join(timeout=PROMPT)
        assert not t.is_alive()
    assert time.monotonic() - closed_at < PROMPT
    assert len(got) == 1 and isinstance(got[0], safeshm.SegmentClosedError), got
    assert str(got[0]) == f"SafeQueue {q.name!r} is closed on this handle"
    with pytest.raises(safeshm.SegmentClosedError):
        q.get_nowait()
    if call == "put":
        assert other_handle.get_nowait() == "full"
    assert other_handle.empty()
    other_handle.put("after", timeout=PROMPT)
    assert other_handle.get(timeout=PROMPT) == "after"
    assert not other_handle._mutex.locked()
    other_handle.close()


def test_a_hoisted_method_after_close_raises(make: Any) -> None:
    q = make(4096)
    put, get, get_many = q.put, q.get, q.get_many
    q.close()
    for call in (lambda: put(1), get, lambda: get_many(2)):
        with pytest.raises(safeshm.SegmentClosedError, match="is closed on this handle"):
            call()


def test_fork_while_another_thread_is_blocked_in_get(make: Any) -> None:
    """The child of a fork taken while a thread is asleep in get() has the queue: its
    put wakes the parent's sleeper, and it gets what the parent puts next."""
    q = make(4096)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=JOIN_TIMEOUT)))
    t.start()
    _until_a_waiter_sleeps(q, _queue._NE_SLEEP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by its exit status
        code = 1
        try:
            q.put("from the child")
            deadline = time.monotonic() + JOIN_TIMEOUT
            while q.statistics().gets == 0:  # until the parent's sleeper has taken it
                assert time.monotonic() < deadline
                time.sleep(0.01)
            code = 0 if q.get(timeout=JOIN_TIMEOUT) == "to the child" else 2
            q.close()
        finally:
            os._exit(code)
    try:
        t.join(timeout=JOIN_TIMEOUT)
        assert got == ["from the child"]
        q.put("to the child")
    finally:
        _, status = _waitpid(pid)
    assert os.waitstatus_to_exitcode(status) == 0
    assert q.empty() and not q._mutex.locked()


def _waitpid(pid: int) -> tuple[int, int]:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return done, status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)
        time.sleep(0.01)


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="needs the main thread"
)
@pytest.mark.parametrize("call", ["get", "get_many", "put", "lock"])
def test_ctrl_c_interrupts_a_blocked_call_promptly(make: Any, call: str) -> None:
    """SIGINT while the main thread is blocked (30 s sleeps: only the signal can end
    them soon): KeyboardInterrupt promptly, the mutex not held, nothing lost."""
    q = make(4096, maxsize=1)
    if call == "put":
        q.put("full")
    holder = safeshm.SafeQueue.attach(q.name)
    release = threading.Event()
    holding = threading.Event()

    def hold() -> None:  # another thread holds the queue's mutex until told
        with holder._mutex_held():
            holding.set()
            release.wait(JOIN_TIMEOUT)

    keeper = threading.Thread(target=hold)
    if call == "lock":
        keeper.start()
        assert holding.wait(JOIN_TIMEOUT)
    main = threading.get_ident()
    sent: list[float] = []

    def interrupt() -> None:
        if call == "lock":
            time.sleep(0.3)
        else:
            _until_a_waiter_sleeps(q, _queue._NF_SLEEP if call == "put" else _queue._NE_SLEEP)
            time.sleep(0.05)
        sent.append(time.monotonic())
        signal.pthread_kill(main, signal.SIGINT)

    fn = {
        "get": lambda: q.get(),
        "get_many": lambda: q.get_many(5),
        "put": lambda: q.put("x"),
        "lock": lambda: q.get(timeout=JOIN_TIMEOUT),
    }[call]
    t = threading.Thread(target=interrupt)
    try:
        with long_sleeps():
            t.start()
            with pytest.raises(KeyboardInterrupt):
                fn()
            raised = time.monotonic()
            t.join(timeout=JOIN_TIMEOUT)
    finally:
        release.set()
        if call == "lock":
            keeper.join(timeout=JOIN_TIMEOUT)
    assert raised - sent[0] < PROMPT
    assert not q._mutex.locked()
    # nothing held, nothing lost: the queue is as it was
    if call == "put":
        assert q.get_nowait() == "full"
    assert q.empty()
    q.put("after")
    assert holder.get(timeout=PROMPT) == "after"
    holder.close()


# -- argument errors: the ctypes path's, word for word -------------------------------------------
class _Index:
    def __index__(self) -> int:
        return 3


_BAD_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("put", (), {}),
    ("put", (1, True, None, 4), {}),
    ("put", (1,), {"bogus": 1}),
    ("put", (1, True), {"block": False}),
    ("put", (1,), {"timeout": "1"}),
    ("put", (1,), {"timeout": True}),
    ("put", (1,), {"timeout": -1}),
    ("put", (1,), {"timeout": math.nan}),
    ("put", (1,), {"timeout": 2**2000}),
    ("put", (1,), {"timeout": __import__("decimal").Decimal(1)}),
    ("put", (lambda: 0,), {}),
    ("put", (lambda: 0,), {"timeout": -1}),
    ("put", (b"x" * 5000,), {}),
    ("put", (b"x" * 5000,), {"timeout": -1}),
    ("put_nowait", (), {}),
    ("put_nowait", (1, 2), {}),
    ("put_nowait", (), {"item": 1, "block": True}),
    ("put_many", (), {}),
    ("put_many", (5,), {}),
    ("put_many", ([1, lambda: 0],), {}),
    ("put_many", ([],), {"timeout": -1}),
    ("put_many", ([1],), {"timeout": -1}),
    ("put_many", ([b"y" * 3000, b"y" * 3000],), {}),
    ("put_many", ([1] * 5,), {}),
    ("get", (1, 2, 3), {}),
    ("get", (), {"timeout": "soon"}),
    ("get", (), {"timeout": -0.5}),
    ("get", (), {"block": True, "blok": 1}),
    ("get", (True,), {"block": True}),
    ("get_nowait", (1,), {}),
    ("get_nowait", (), {"block": True}),
    ("get_many", (), {}),
    ("get_many", (True,), {}),
    ("get_many", (1.5,), {}),
    ("get_many", (_Index(),), {}),
    ("get_many", ("3",), {}),
    ("get_many", (0,), {}),
    ("get_many", (-(10**30),), {}),
    ("get_many", (3,), {"timeout": -1}),
    ("get_many", (3, True, 1, 4), {}),
    ("get_many", (), {"block": True}),
]


@native_here
@pytest.mark.parametrize(("method", "args", "kwargs"), _BAD_CALLS)
def test_argument_errors_match_the_ctypes_path(
    make: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    q = make(4096, maxsize=4)
    native = getattr(q, method)
    ctypes_ = functools.partial(getattr(type(q), method), q)
    a = _outcome(native, *args, **kwargs)
    b = _outcome(ctypes_, *args, **kwargs)
    if sys.version_info >= (3, 13) and ". Did you mean" in str(b[1]):
        # 3.13's own suggestion for a misspelt keyword, which sn_parse does not make
        b = (b[0], b[1].partition(". Did you mean")[0])
    assert a == b
    assert a[0] != "ok" or args == ([],)  # an empty batch returns before any check
    assert q.empty()


@native_here
@pytest.mark.parametrize(
    "item",
    [5, "text", memoryview(b"abcdef")[::2], memoryview(np.zeros((2, 4), "u1").T)],
    ids=["int", "str", "strided", "transposed"],
)
def test_raw_item_errors_match(make: Any, item: Any) -> None:
    q = make(4096, raw=True)
    with pytest.raises(TypeError) as a:
        q.put(item)
    with pytest.raises(TypeError) as b:
        type(q).put(q, item)
    assert str(a.value) == str(b.value)
    with pytest.raises(TypeError) as c:
        q.put_many([b"ok", item])
    assert str(c.value) == str(b.value)
    assert q.empty()


@native_here
def test_raw_bytes_likes_and_huge_counts(make: Any) -> None:
    import array

    q = make(4096, raw=True)
    q.put(bytearray(b"ba"))
    q.put(memoryview(b"mv"))
    q.put(memoryview(array.array("i", [1, 2])))  # by its bytes
    q.put_many([b"x", bytearray(b"y"), memoryview(b"zz")[1:]])
    assert q.get_many(2**70) == [b"ba", b"mv", bytes(array.array("i", [1, 2])), b"x", b"y", b"z"]
    with pytest.raises(queue.Empty):
        q.get(timeout=fractions.Fraction(1, 100))
    q.put(b"a", timeout=1e300)  # beyond any clock: forever, and it fits at once
    assert q.get(timeout=2**100) == b"a"


@native_here
def test_a_damaged_wake_up_word_is_a_typed_error_with_the_ctypes_message(cleanup: Any) -> None:
    """A wake-up sequence word above its mask (only damage puts it there): a waiting get
    raises SegmentCorruptedError, with the ctypes path's message (the C message's format
    once raised SystemError: PyUnicode_FromFormat has no '#' flag)."""
    q = cleanup(safeshm.SafeQueue.create(4096))
    q._fw[_queue._NE_SEQ] = 0x80000001
    messages = []
    for get in (q.get, functools.partial(type(q).get, q)):
        with pytest.raises(safeshm.SegmentCorruptedError) as info:
            get(timeout=0.01)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert "holds 0x80000001, above 0x7fffffff" in messages[0]
