"""What safeshm reads from shared memory is checked before it is trusted (issue 10.13).

Damage -- a byte changed by a stray writer, or by hand -- is a typed
:class:`safeshm.SegmentCorruptedError` naming the segment, never garbage returned as data, a
builtin error from deep inside, or a crash; and bad sizes are refused before anything is
created.
"""

from __future__ import annotations

import multiprocessing
import os
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import safeshm
from safeshm import _compat, _segment

from ._helpers import JOIN_TIMEOUT, STRUCTURES, create

# Offsets into the segments (docs/design.md): the header is 128 bytes, parameters at 64.
QUEUE_PARAMS_RAW = 64 + 16
QUEUE_HEAD, QUEUE_TAIL, QUEUE_SHUT = 128, 136, 160
QUEUE_RING = 384
SHARDED_HIGH = 136
MUTEX_KIND = 16  # glibc's __kind, inside every mutex
MUTEX_AT = {
    "SafeCounter": 192,
    "ShardedCounter": 192,
    "SafeLock": 128,
    "SafeArray": 192,
    "SafeQueue": 256,
    # The synchronization primitives (_sync.MUTEX_OFFSET; SafeRLock's own mutex).
    "SafeEvent": 128,
    "SafeSemaphore": 128,
    "SafeBoundedSemaphore": 128,
    "SafeBarrier": 128,
    "SafeRLock": 128,
    "SafeCondition": 128,
    "SafeRWLock": 128,
}


def path_of(name: str) -> str:
    return os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name)


def poke(name: str, offset: int, fmt: str, value: Any) -> None:
    """Write ``value`` at ``offset``. In the header, also fix its checksum: these tests are
    about the checks behind it (test_segment.py checks the checksum itself)."""
    with open(path_of(name), "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
        if offset < _segment.HEADER_SIZE:
            f.seek(0)
            header = f.read(_segment.HEADER_SIZE)
            f.seek(48)
            f.write(struct.pack("=I", _segment._header_crc(header)))


def peek(name: str, offset: int, fmt: str) -> Any:
    with open(path_of(name), "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


# -- sizes beyond what a segment can hold ----------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: safeshm.SafeQueue.create(2**64),
        lambda: safeshm.SafeQueue.create(4096, maxsize=2**64),
        lambda: safeshm.SafeQueue.create(2**63 - 1),
        lambda: safeshm.SafeArray.create("q", 2**64),
        lambda: safeshm.SafeArray.create("d", 2**60),
    ],
    ids=["queue-capacity", "queue-maxsize", "queue-capacity-int64", "array-2**64", "array-2**60"],
)
def test_sizes_beyond_a_segment_are_overflow_errors_before_anything_is_created(make: Any) -> None:
    before = set(os.listdir(_compat.SHM_DIR))
    with pytest.raises(OverflowError, match="nothing was created"):
        make()
    assert set(os.listdir(_compat.SHM_DIR)) == before


# -- queues ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (QUEUE_PARAMS_RAW, "=I", 7, "raw=7"),
        (QUEUE_HEAD, "=q", 3, "read position 3"),
        (QUEUE_TAIL, "=q", 1 << 40, "write position"),
        (QUEUE_HEAD, "=q", -8, "read position -8"),
        (QUEUE_SHUT, "=q", 99, "shutdown flag 99"),
    ],
)
def test_damaged_queue_state_is_refused_at_attach(
    name: str, offset: int, fmt: str, value: Any, message: str
) -> None:
    q = safeshm.SafeQueue.create(4096, name=name)
    try:
        q.put("x")
        poke(name, offset, fmt, value)
        with pytest.raises(safeshm.SegmentCorruptedError, match=f"{name!r}.*{message}"):
            safeshm.SafeQueue.attach(name)
        with pytest.raises(safeshm.IncompatibleSegmentError):  # the base users may catch
            safeshm.SafeQueue.open(name, 4096)
    finally:
        q.close()
        q.unlink()


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (QUEUE_RING + 4, 0x12345678),  # the record header's marker (its high half)
        (QUEUE_RING, 3000),  # a length beyond what was put
        (QUEUE_RING, 0xFFFFFFF0),  # a length beyond the ring
    ],
    ids=["marker", "beyond-what-was-put", "beyond-the-ring"],
)
def test_a_damaged_record_is_never_returned(name: str, raw: bool, offset: int, value: int) -> None:
    q: Any = safeshm.SafeQueue.create(4096, name=name, raw=raw)
    try:
        items = [b"first", b"second"] if raw else ["first", "second"]
        q.put_many(items)
        poke(name, offset, "=I", value)  # after attaching: found when it is read
        for take in (q.get_nowait, lambda: q.get_many(10, block=False)):
            with pytest.raises(safeshm.SegmentCorruptedError, match=f"{name!r} is damaged"):
                take()
            assert q.qsize() == 2  # nothing was taken
        q.put(items[0])  # and a put is not lost either
    finally:
        q.close()
        q.unlink()


@pytest.mark.parametrize("length", [8, 48, 56], ids=["shortened", "grown", "grown-more"])
@pytest.mark.parametrize("many", [False, True], ids=["get", "get_many"])
def test_a_record_resized_within_what_was_put_is_caught_by_its_successor(
    name: str, length: int, many: bool
) -> None:
    q = safeshm.SafeQueue.create(4096, name=name, raw=True)
    try:
        q.put_many([b"a" * 40, b"b" * 8, b"c" * 8])
        # The first record (40 bytes) now claims another length: where its successor
        # should start there is data, or the middle of a record.
        poke(name, QUEUE_RING, "=I", length)
        with pytest.raises(safeshm.SegmentCorruptedError):
            q.get_many(10, block=False) if many else q.get_nowait()
        assert q.qsize() == 3
        poke(name, QUEUE_RING, "=I", 40)
        assert q.get_many(10, block=False) == [b"a" * 40, b"b" * 8, b"c" * 8]
    finally:
        q.close()
        q.unlink()


# -- sharded counters -----------------------------------------------------------------------
@pytest.mark.parametrize("high", [10**9, -1, 257])
def test_damaged_sharded_high_water_mark(name: str, high: int) -> None:
    c = safeshm.ShardedCounter.create(5, name=name)
    try:
        c.add(1)
        poke(name, SHARDED_HIGH, "=q", high)
        for use in (
            lambda: c.value,
            c.statistics,
            lambda: c.exchange(0),
            lambda: safeshm.ShardedCounter.attach(name).value,
        ):
            with pytest.raises(safeshm.SegmentCorruptedError, match="high-water mark"):
                use()
        poke(name, SHARDED_HIGH, "=q", 1)
        assert c.value == 6
    finally:
        c.close()
        c.unlink()


def test_a_slot_owner_pid_beyond_any_pid_is_dead_not_a_crash(name: str) -> None:
    assert not _compat.process_alive(2**40, 0, _compat.pid_namespace())
    assert not _compat.process_alive(2**63 - 1, 0, _compat.pid_namespace())


# -- mutexes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", STRUCTURES)
@pytest.mark.parametrize(
    ("word", "value", "message"),
    [
        (MUTEX_KIND, 0, "mutex has type 0"),  # would make it a plain, non-robust mutex
        (MUTEX_KIND, 999, "mutex has type 999"),  # EINVAL on every lock
        (0, 0x3FFFFFFF, "owner thread"),  # a holder tid no Linux thread can have
        # "Waiters" with no owner, not marked dead: never a state of a robust mutex (an
        # unlock stores 0, a death adds FUTEX_OWNER_DIED); every acquire without a
        # timeout would wait forever on it.
        (0, -0x80000000, "no owner"),
    ],
)
def test_damaged_mutex_is_refused_at_attach(
    cls: Any, word: int, value: int, message: str, name: str
) -> None:
    if not _compat.GLIBC:  # pragma: no cover
        pytest.skip("the mutex layout is glibc's")
    h = create(cls, name)
    try:
        poke(name, MUTEX_AT[cls.__name__] + word, "=i", value)
        with pytest.raises(safeshm.SegmentCorruptedError, match=f"{name!r}.*{message}"):
            cls.attach(name)
    finally:
        h.close()
        h.unlink()


def test_mutex_damaged_after_attach_is_a_typed_error_on_use(name: str) -> None:
    if not _compat.GLIBC:  # pragma: no cover
        pytest.skip("the mutex layout is glibc's")
    lock = safeshm.SafeLock.create(name=name)
    try:
        kind = peek(name, 128 + MUTEX_KIND, "=i")
        poke(name, 128 + MUTEX_KIND, "=i", 999)
        with pytest.raises(safeshm.SegmentCorruptedError, match="EINVAL"):
            lock.acquire(timeout=1)
        poke(name, 128 + MUTEX_KIND, "=i", kind)
        assert lock.acquire(timeout=1)
        lock.release()
    finally:
        lock.close()
        lock.unlink()


def _dead_tid() -> int:
    p = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    p.start()
    p.join(JOIN_TIMEOUT)
    assert p.pid is not None and not os.path.exists(f"/proc/{p.pid}")
    return p.pid


def _hold_open(name: str, ready: Any, done: Any) -> None:
    h = safeshm.SafeLock.attach(name)
    ready.set()
    done.wait(JOIN_TIMEOUT)
    h.close()


def test_a_mutex_held_by_a_vanished_thread_that_nobody_can_release(name: str) -> None:
    if not _compat.GLIBC:  # pragma: no cover
        pytest.skip("the mutex layout is glibc's")
    lock = safeshm.SafeLock.create(name=name)
    try:
        lock.close()
        # Held by a thread that is gone, never marked dead (no robust-list entry): every
        # acquire would wait forever. Nobody else has the segment open: stuck for good.
        poke(name, 128, "=i", _dead_tid())
        with pytest.raises(safeshm.SegmentCorruptedError, match="never marked dead"):
            safeshm.SafeLock.attach(name)
        # While another process has it open, that process may be the holder, in another
        # pid namespace where its thread id means nothing here: not declared stuck.
        ctx = multiprocessing.get_context("fork")
        ready, done = ctx.Event(), ctx.Event()
        poke(name, 128, "=i", 0)
        p = ctx.Process(target=_hold_open, args=(name, ready, done))
        p.start()
        try:
            assert ready.wait(JOIN_TIMEOUT)
            poke(name, 128, "=i", _dead_tid())
            other = safeshm.SafeLock.attach(name)
            assert other.acquire(timeout=0.05) is False
            other.close()
        finally:
            done.set()
            p.join(JOIN_TIMEOUT)
        # A holder marked dead by the kernel is the normal, recoverable case.
        poke(name, 128, "=i", 0x40000000)
        again = safeshm.SafeLock.attach(name)
        with pytest.warns(safeshm.HolderDiedWarning):
            assert again.acquire(timeout=JOIN_TIMEOUT)
        again.release()
        again.close()
    finally:
        os.unlink(path_of(name))


def test_a_mutex_naming_a_live_thread_that_does_not_map_it(name: str) -> None:
    """Damage can name a thread that exists but cannot be the holder: it does not map the
    segment (here a `sleep` of ours; in the field, say, thread 1). Nobody else has the
    segment open: stuck for good, a typed error at attach instead of a lock that looks
    held forever."""
    if not _compat.GLIBC:  # pragma: no cover
        pytest.skip("the mutex layout is glibc's")
    lock = safeshm.SafeLock.create(name=name)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.close()
        poke(name, 128, "=i", bystander.pid)
        with pytest.raises(safeshm.SegmentCorruptedError, match="never marked dead"):
            safeshm.SafeLock.attach(name)
    finally:
        bystander.kill()
        bystander.wait(JOIN_TIMEOUT)
        os.unlink(path_of(name))


def test_a_holder_marked_dead_while_checked_is_not_stuck(cleanup: Any) -> None:
    """check_mutex reads the futex word, then looks for the holder: a holder that exits in
    between is marked dead by the kernel before its thread id disappears, so the second
    look must see the mark and not call the mutex stuck (a race seen in CI: a thread of
    CPython's RLockTests ended holding the lock while the cleanup attached)."""
    from safeshm import _lock

    lock = cleanup(safeshm.SafeLock.create())
    gone: list[int] = []
    t = threading.Thread(target=lambda: gone.append(threading.get_native_id()))
    t.start()
    t.join(timeout=10)
    tid = gone[0]
    deadline = time.monotonic() + JOIN_TIMEOUT
    while os.path.exists(f"/proc/{tid}"):  # the OS thread ends just after join() returns
        assert time.monotonic() < deadline
        time.sleep(0.01)
    words = lock._mutex._words
    ints = words.cast("B").cast("i")
    ints[0] = tid  # held by a vanished thread, never marked dead: stuck
    try:
        assert _lock._held_forever(words, tid)
        ints[0] = tid | _lock._FUTEX_OWNER_DIED  # what the kernel leaves at its exit
        assert not _lock._held_forever(words, tid)
    finally:
        ints[0] = 0


# The synchronization primitives' words (_sync's layout): the sleepers hint, then state words.
SYNC_SLEEPERS, SYNC_STATE = 264, 320
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)


def _put_word(handle: Any, offset: int, value: int) -> None:
    struct.pack_into("=q", handle._seg.mm, offset, value)


@pytest.mark.parametrize(
    ("cls", "offset"),
    [
        ("SafeEvent", SYNC_SLEEPERS),
        ("SafeEvent", SYNC_STATE + 8),  # the count of sets
        ("SafeCondition", SYNC_SLEEPERS),
        ("SafeCondition", SYNC_STATE),  # the last ticket
        ("SafeRWLock", SYNC_STATE),  # the derived count of read holds
        ("SafeRWLock", SYNC_STATE + 24),  # the derived count of waiting writers
    ],
)
def test_a_counter_at_the_int64_limit_is_not_a_builtin_error(
    name: str, cleanup: Any, cls: str, offset: int
) -> None:
    """A shared counter that only damage can take to the int64 limit: the operation that
    raises it works (a hint, a wrapping count, a derived total recomputed) -- it used to be
    ``ValueError: memoryview: invalid value for format 'q'`` from inside."""
    h = cleanup(getattr(safeshm, cls).create(name=name))
    _put_word(h, offset, INT64_MAX)
    if cls == "SafeEvent":
        assert not h.wait(0.01)
        h.set()
        assert h.wait(0.01)
    elif cls == "SafeCondition":
        with h:
            assert not h.wait(0.01)
        with h:
            h.notify_all()
    else:
        with h.read(timeout=1):
            assert h.statistics().readers == 1
        with h.write(timeout=1):
            pass


@pytest.mark.parametrize("word", ["generation", "reset count"])
def test_a_barrier_counter_at_the_int64_limit_is_a_typed_error(
    name: str, cleanup: Any, word: str
) -> None:
    b = cleanup(safeshm.SafeBarrier.create(2, name=name))
    _put_word(b, SYNC_STATE + (16 if word == "generation" else 24), INT64_MAX)
    with pytest.raises(safeshm.SegmentCorruptedError, match=word):
        b.wait(0.01) if word == "generation" else b.reset()


@pytest.mark.parametrize("value", [-1, INT64_MIN])
def test_a_damaged_semaphore_value_does_not_keep_a_waiter_from_a_free_permit(
    name: str, cleanup: Any, value: int
) -> None:
    """The value is a cache of the permits (the initial value, minus those held): a waiter
    recomputes it at each slice of its wait -- it used to wait forever."""
    s = cleanup(safeshm.SafeSemaphore.create(2, name=name))
    _put_word(s, SYNC_STATE + 8, value)
    assert s.acquire(timeout=5)
    assert s.value == 1


def test_a_damaged_semaphore_base_is_a_typed_error_for_a_waiter(name: str, cleanup: Any) -> None:
    s = cleanup(safeshm.SafeSemaphore.create(0, name=name))
    _put_word(s, SYNC_STATE, -5)
    with pytest.raises(safeshm.SegmentCorruptedError, match="permit count is -5"):
        s.acquire(timeout=1)


@pytest.mark.parametrize("cls", ["SafeSemaphore", "SafeBoundedSemaphore"])
def test_a_negative_initial_value_is_refused_at_attach(name: str, cls: str) -> None:
    s = getattr(safeshm, cls).create(2, name=name)
    try:
        _put_word(s, SYNC_STATE + 16, -1)
        with pytest.raises(safeshm.SegmentCorruptedError, match="initial value is -1"):
            getattr(safeshm, cls).attach(name)
    finally:
        s.unlink()
        s.close()


@pytest.mark.parametrize(
    "word", ["puts", "gets", "held", "credit", "lease ids", "the consumer's count"]
)
def test_queue_counters_wrap_at_the_int64_limit_in_both_implementations(
    name: str, cleanup: Any, word: str
) -> None:
    """The compiled core's counters wrap (unsigned additions); the ctypes path's raised
    ``ValueError`` from a memoryview store -- after the commit, losing the item it took."""
    q = cleanup(safeshm.SafeQueue.create(1024, name=name, processes=4, leases=2))
    q.put("claim")
    assert q.get(timeout=1) == "claim"  # this process's consumer record is the first
    q.task_done()
    offset = {
        "puts": 144,
        "gets": 152,
        "held": 168,
        "credit": 176,
        "lease ids": 184,
        "the consumer's count": QUEUE_RING + 1024 + 24,
    }[word]
    _put_word(q, offset, INT64_MAX)
    q.put_many(["a", "b", "c"])
    q.put("d")
    assert q.get(timeout=1) == "a"
    assert q.get_many(1, timeout=1) == ["b"]
    item, lease = q.get_leased(timeout=1)
    assert item == "c"
    lease.ack()
    assert q.get(timeout=1) == "d"
    # The task count is damaged: task_done() may find it used up (queue.Queue's error),
    # but never fails inside (the credit word is raised by one with no item held).
    for _ in range(5):
        try:
            q.task_done()
        except ValueError as e:
            assert "called too many times" in str(e)  # noqa: PT017 - per call, not per test
    q.put("e")
    assert q.get(timeout=1) == "e"
