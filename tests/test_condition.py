"""SafeCondition: waits that restore the lock's depth, notify(n) semantics, producers and
consumers in several processes, a waiter SIGKILLed inside wait(), close() from another
thread, an interrupt inside wait(), the lifecycle of the lock it owns, bad input."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import safeshm
from safeshm import SegmentClosedError
from safeshm._array import SafeArray
from safeshm._condition import ConditionStatistics, SafeCondition
from safeshm._rlock import SafeRLock

from ._helpers import JOIN_TIMEOUT, PROMPT, START_METHODS, kill_and_reap, processes


@pytest.fixture
def cond() -> Iterator[SafeCondition]:
    c = SafeCondition.create()
    yield c
    c.close()
    c.unlink()


def _wait_for_waiters(c: SafeCondition, n: int) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while c.statistics().waiters < n:
        assert time.monotonic() < deadline, "waiters never arrived"
        time.sleep(0.01)


# -- workers ----------------------------------------------------------------------------------
def _producer(c: SafeCondition, state: SafeArray[int], barrier: Any, count: int) -> None:
    barrier.wait(JOIN_TIMEOUT)
    for _ in range(count):
        with c:
            state[0] += 1  # items available
            state[1] += 1  # produced
            c.notify()
    c.close()
    state.close()


def _consumer(c: SafeCondition, state: SafeArray[int], barrier: Any, total: int) -> None:
    barrier.wait(JOIN_TIMEOUT)
    with c:
        while True:
            while state[0] == 0 and state[2] < total:
                if not c.wait(10.0):
                    state[3] += 1  # a wait that timed out: a lost wake-up
            if state[2] >= total:
                break
            state[0] -= 1
            state[2] += 1  # consumed
            if state[2] == total:
                c.notify_all()  # let the other consumers leave
    c.close()
    state.close()


def _wait_forever_worker(name: str, waiting: Any) -> None:
    c = SafeCondition.attach(name)
    with c:
        waiting.set()
        c.wait(JOIN_TIMEOUT)
    c.close()  # pragma: no cover - killed before


# -- basics -----------------------------------------------------------------------------------
def test_wait_restores_the_depth_also_on_timeout(cond: SafeCondition) -> None:
    lock = cond.lock
    assert isinstance(lock, SafeRLock)
    with cond, cond, cond:
        t0 = time.monotonic()
        assert cond.wait(0.05) is False
        assert time.monotonic() - t0 >= 0.05
        assert lock._recursion_count() == 3
    assert not lock.locked()
    assert cond.statistics().waiters == 0


def test_other_threads_can_take_the_lock_while_one_waits(cond: SafeCondition) -> None:
    got: list[bool] = []

    def other() -> None:
        _wait_for_waiters(cond, 1)
        got.append(cond.acquire(timeout=JOIN_TIMEOUT))
        cond.notify()
        cond.release()

    t = threading.Thread(target=other)
    t.start()
    with cond, cond:
        assert cond.wait(JOIN_TIMEOUT) is True
        assert cond.lock._recursion_count() == 2  # type: ignore[union-attr]
    t.join(JOIN_TIMEOUT)
    assert got == [True]


def test_over_a_safelock() -> None:
    lock = safeshm.SafeLock.create()
    c = SafeCondition.create(lock)
    try:
        assert c.lock is lock
        assert c.statistics().lock_type == "SafeLock"
        with c:
            assert c.wait(0.01) is False
            assert lock.locked()
        assert not lock.locked()
        c.close()
        assert not lock.closed  # the user's handle stays open
    finally:
        c.close()
        c.unlink()
        assert os.path.basename(lock.name)  # still there: unlink removed only the condition
        lock.close()
        lock.unlink()


def test_notify_n_wakes_at_most_n_of_the_current_waiters(cond: SafeCondition) -> None:
    results: list[bool] = []

    def waiter() -> None:
        with cond:
            results.append(cond.wait(2.0))

    ts = [threading.Thread(target=waiter) for _ in range(3)]
    for t in ts:
        t.start()
    _wait_for_waiters(cond, 3)
    with cond:
        cond.notify(2)
        assert cond.statistics().notified == 2
        cond.notify(0)
        cond.notify(-1)
    late = threading.Thread(target=waiter)  # arrives after the notify: not woken by it
    late.start()
    for t in (*ts, late):
        t.join(JOIN_TIMEOUT)
    assert sorted(results) == [False, False, True, True]


def test_notify_all_and_deprecated_alias(cond: SafeCondition) -> None:
    results: list[bool] = []

    def waiter() -> None:
        with cond:
            results.append(cond.wait(JOIN_TIMEOUT))

    ts = [threading.Thread(target=waiter) for _ in range(3)]
    for t in ts:
        t.start()
    _wait_for_waiters(cond, 3)
    with cond, pytest.warns(DeprecationWarning, match="notify_all"):
        cond.notifyAll()
    for t in ts:
        t.join(JOIN_TIMEOUT)
    assert results == [True] * 3


def test_wait_for(cond: SafeCondition) -> None:
    box = [0]

    def setter() -> None:
        for _ in range(3):
            time.sleep(0.01)
            with cond:
                box[0] += 1
                cond.notify()

    t = threading.Thread(target=setter)
    t.start()
    with cond:
        assert cond.wait_for(lambda: box[0] == 3, timeout=JOIN_TIMEOUT) is True
        assert cond.wait_for(lambda: box[0] == 4, timeout=0.05) is False
    t.join(JOIN_TIMEOUT)


# -- bad input --------------------------------------------------------------------------------
def test_bad_input(cond: SafeCondition) -> None:
    with pytest.raises(RuntimeError, match="un-acquired"):
        cond.wait(0.01)
    with pytest.raises(RuntimeError, match="un-acquired"):
        cond.notify()
    with pytest.raises(RuntimeError, match="un-acquired"):
        cond.notify_all()
    with cond:
        for bad, error in (("1", TypeError), (float("nan"), ValueError)):
            with pytest.raises(error):
                cond.wait(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            cond.notify("2")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            cond.notify(True)
        assert cond.lock._recursion_count() == 1  # type: ignore[union-attr]
    assert cond.statistics().waiters == 0
    with pytest.raises(TypeError, match="SafeLock or SafeRLock"):
        SafeCondition.create(threading.Lock())  # type: ignore[arg-type]
    closed = SafeRLock.create()
    closed.close()
    try:
        with pytest.raises(SegmentClosedError):
            SafeCondition.create(closed)
    finally:
        closed.unlink()


# -- lifecycle --------------------------------------------------------------------------------
def test_owns_the_lock_it_made_and_attach_finds_it() -> None:
    c = SafeCondition.create()
    lock_name = c.lock.name
    s = c.statistics()
    assert isinstance(s, ConditionStatistics)
    assert (s.lock_name, s.lock_type, s.owns_lock) == (lock_name, "SafeRLock", True)
    other = pickle.loads(pickle.dumps(c))  # by reference: attach(name)
    assert other.lock.name == lock_name and other.lock is not c.lock
    with other:
        assert c.lock.locked()
    other.close()
    assert other.lock.closed  # the handle attach() opened is closed with it
    c.close()
    assert c.lock.closed
    c.unlink()
    with pytest.raises(safeshm.SegmentNotFoundError):
        SafeRLock.attach(lock_name)  # unlinked with the condition that made it
    with pytest.raises(safeshm.SegmentNotFoundError):
        SafeCondition.attach(c.name)


def test_with_a_users_lock_unlink_leaves_the_lock() -> None:
    lock = SafeRLock.create()
    c = SafeCondition.create(lock)
    assert not c.statistics().owns_lock
    c.close()
    c.unlink()
    assert not lock.closed
    lock.close()
    SafeRLock.attach(lock.name).unlink()


# -- robustness -------------------------------------------------------------------------------
def test_close_from_another_thread_while_one_waits(cond: SafeCondition) -> None:
    other = SafeCondition.attach(cond.name)
    out: list[Any] = []

    def waiter() -> None:
        try:
            with other, other:
                other.wait(JOIN_TIMEOUT)
        except SegmentClosedError as e:
            out.append(e)
            out.append(time.monotonic())

    t = threading.Thread(target=waiter)
    t.start()
    _wait_for_waiters(cond, 1)
    closed_at = time.monotonic()
    closer = threading.Thread(target=other.close)
    closer.start()
    closer.join(JOIN_TIMEOUT)
    t.join(JOIN_TIMEOUT)
    assert isinstance(out[0], SegmentClosedError)
    assert out[1] - closed_at < PROMPT
    assert cond.statistics().waiters == 0  # its slot was freed on the way out
    # The waiter's hold was not left behind: the lock is free for everyone else.
    assert cond.acquire(timeout=PROMPT)
    cond.release()


def test_interrupt_inside_wait_restores_the_lock(cond: SafeCondition) -> None:
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with cond, cond:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(KeyboardInterrupt):
                cond.wait(JOIN_TIMEOUT)
            assert cond.lock._recursion_count() == 2  # type: ignore[union-attr]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not cond.lock.locked()
    assert cond.statistics().waiters == 0


def test_waiter_killed_inside_wait_does_not_swallow_a_notify(cond: SafeCondition) -> None:
    ctx = multiprocessing.get_context("fork")
    waiting = ctx.Event()
    with processes("fork", _wait_forever_worker, [(cond.name, waiting)]) as (p,):
        assert waiting.wait(JOIN_TIMEOUT)
        _wait_for_waiters(cond, 1)
        kill_and_reap(p)
    assert cond.statistics().waiters == 0  # a dead process's waiter is not shown
    # The dead waiter is the oldest; a live one arrives after it.
    result: list[bool] = []

    def waiter() -> None:
        with cond:
            result.append(cond.wait(PROMPT))
            result.append(True)

    t = threading.Thread(target=waiter)
    t.start()
    _wait_for_waiters(cond, 1)
    t0 = time.monotonic()
    with cond:
        cond.notify(1)  # must reach the live waiter, not the dead one
    t.join(JOIN_TIMEOUT)
    assert result == [True, True]
    assert time.monotonic() - t0 < PROMPT
    assert cond.statistics().waiters == 0  # the dead one's slot was freed


@pytest.mark.parametrize("method", START_METHODS)
def test_producers_and_consumers_across_processes(method: str, cond: SafeCondition) -> None:
    """2 producers and 2 consumers in 4 processes: every item consumed, none twice, and no
    wait ever ran into its timeout (no lost wake-up)."""
    producers, consumers, count = 2, 2, 150
    total = producers * count
    ctx = multiprocessing.get_context(method)
    barrier = ctx.Barrier(producers + consumers)
    with SafeArray.create("q", 4) as state:
        args = [(cond, state, barrier, count)] * producers + [(cond, state, barrier, total)] * (
            consumers
        )
        with contextlib.ExitStack() as stack:
            procs = stack.enter_context(processes(method, _producer, args[:producers]))
            procs += stack.enter_context(processes(method, _consumer, args[producers:]))
            for p in procs:
                p.join(JOIN_TIMEOUT)
            assert [p.exitcode for p in procs] == [0] * len(procs)
        assert list(state) == [0, total, total, 0]
    assert cond.statistics().waiters == 0


def test_open_creates_then_attaches_to_the_same_lock() -> None:
    name = f"cond-open-{os.getpid()}"
    a = SafeCondition.open(name)
    b = SafeCondition.open(name)
    try:
        assert a.lock.name == b.lock.name and b.statistics().owns_lock
        with a:
            assert b.lock.locked()
            assert b.acquire(False)  # the same thread: re-entrant
            b.release()
    finally:
        b.close()
        a.close()
        a.unlink()
    with pytest.raises(safeshm.SegmentNotFoundError):
        SafeRLock.attach(a.lock.name)


def test_negative_timeout_does_not_wait(cond: SafeCondition) -> None:
    with cond:
        t0 = time.monotonic()
        assert cond.wait(-1) is False
        assert cond.wait(0) is False
        assert time.monotonic() - t0 < PROMPT / 5
    assert cond.statistics().waiters == 0


class _Alarm(Exception):
    pass


def _check_free(cond: SafeCondition) -> str | None:
    lock = cond.lock
    assert isinstance(lock, SafeRLock)
    if lock._recursion_count():
        return f"this thread still holds the lock at depth {lock._recursion_count()}"
    if cond.statistics().waiters or cond.statistics().notified:
        return f"a waiter slot was left behind: {cond.statistics()}"
    out: list[bool] = []

    def probe() -> None:  # another thread: the lock and the internal mutex are free
        out.append(lock.acquire(timeout=2.0))
        if out[-1]:
            lock.release()
        try:
            with cond._section(time.monotonic() + 2.0):
                out.append(True)
        except Exception:  # noqa: BLE001 - _Timeout
            out.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join(JOIN_TIMEOUT)
    return None if out == [True, True] else f"not free for another thread: {out}"


# An interrupt inside _compat's /proc reads (a record's first claim) can leave a file for
# the garbage collector: a ResourceWarning, not a held lock.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_interrupts_anywhere_leave_nothing_held(cond: SafeCondition) -> None:
    """One SIGALRM whose handler raises, at a random instant inside a loop of nested
    ``with``, ``wait`` and ``notify``, hundreds of times: after each, this thread owns
    nothing, no waiter slot is left, and another thread can take the lock and the
    internal mutex. (First order: one exception per operation, as _lock's rule.)"""

    def handler(*_: object) -> None:
        raise _Alarm

    ops = [lambda: _nested(cond), lambda: _wait0(cond), lambda: _notify(cond)]
    old = signal.signal(signal.SIGALRM, handler)
    rng = random.Random(1234)
    interrupts = 0
    deadline = time.monotonic() + 6.0
    try:
        while time.monotonic() < deadline and interrupts < 450:
            for op in ops:
                try:
                    signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, 3e-4))
                    for _ in range(10_000):
                        op()
                except _Alarm:
                    interrupts += 1
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                problem = _check_free(cond)
                assert problem is None, problem
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert interrupts > 50


def _nested(cond: SafeCondition) -> None:
    with cond, cond:
        pass


def _wait0(cond: SafeCondition) -> None:
    with cond, cond:
        cond.wait(0)


def _notify(cond: SafeCondition) -> None:
    with cond:
        cond.notify()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"


def test_a_killed_waiter_its_parent_has_not_reaped_never_swallows_a_notify(
    cond: SafeCondition,
) -> None:
    """A zombie (killed, not yet waited for: a pool's parent blocked elsewhere never waits)
    is dead, as for every primitive: a notify() went to its slot and the live waiter
    slept on (found by a review)."""
    ctx = multiprocessing.get_context("fork")
    waiting = ctx.Event()
    result: list[bool] = []

    def waiter() -> None:
        with cond:
            result.append(cond.wait(JOIN_TIMEOUT))

    with processes("fork", _wait_forever_worker, [(cond.name, waiting)]) as (p,):
        assert waiting.wait(JOIN_TIMEOUT)
        _wait_for_waiters(cond, 1)  # the dead one will be the oldest waiter
        t = threading.Thread(target=waiter)
        t.start()
        _wait_for_waiters(cond, 2)
        os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + JOIN_TIMEOUT
        while not _zombie(p.pid):
            assert time.monotonic() < deadline, "the killed waiter never became a zombie"
            time.sleep(0.01)
        t0 = time.monotonic()
        with cond:
            cond.notify(1)
        t.join(JOIN_TIMEOUT)
        assert result == [True]
        assert time.monotonic() - t0 < PROMPT
