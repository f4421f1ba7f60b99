"""SafeLock: mutual exclusion across processes and threads, timeouts, robustness."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest

import safeshm

from ._helpers import (
    JOIN_TIMEOUT,
    PROMPT,
    START_METHODS,
    hold_lock_worker,
    kill_and_reap,
    locked_rmw_worker,
    processes,
    run_all,
)


@pytest.fixture
def lock(cleanup: Any) -> safeshm.SafeLock:
    return cleanup(safeshm.SafeLock.create())  # type: ignore[no-any-return]


def test_acquire_release(lock: safeshm.SafeLock) -> None:
    assert not lock.locked()
    assert lock.acquire() is True
    assert lock.locked()
    lock.release()
    assert not lock.locked()


def test_with_statement(lock: safeshm.SafeLock) -> None:
    with lock as held:
        assert held is lock
        assert lock.locked()
    assert not lock.locked()


def test_with_releases_on_exception(lock: safeshm.SafeLock) -> None:
    with pytest.raises(KeyError), lock:
        raise KeyError("x")
    assert not lock.locked()


def test_reentry_is_an_error_not_a_deadlock(lock: safeshm.SafeLock) -> None:
    with lock:
        with pytest.raises(safeshm.LockReentryError, match="already held by this thread"):
            lock.acquire()
        with pytest.raises(safeshm.LockReentryError):
            lock.acquire(timeout=5)
        with pytest.raises(safeshm.LockReentryError), lock:
            pass
        assert lock.locked()
    assert not lock.locked()


def test_release_unheld(lock: safeshm.SafeLock) -> None:
    with pytest.raises(safeshm.LockNotHeldError):
        lock.release()
    assert not lock.locked()


def test_release_by_another_thread_is_refused(lock: safeshm.SafeLock) -> None:
    lock.acquire()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            lock.release()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=JOIN_TIMEOUT)
    assert len(errors) == 1 and isinstance(errors[0], safeshm.LockNotHeldError)
    assert lock.locked()
    lock.release()


def test_two_handles_in_one_process_exclude_each_other(lock: safeshm.SafeLock) -> None:
    other = safeshm.SafeLock.attach(lock.name)
    try:
        # Same thread, other handle, same mutex: still a re-entry.
        with lock, pytest.raises(safeshm.LockReentryError):
            other.acquire(timeout=0)
        assert other.acquire(timeout=0)
        other.release()
    finally:
        other.close()


def test_timeouts_across_processes(lock: safeshm.SafeLock) -> None:
    ctx = multiprocessing.get_context("spawn")
    holding, release = ctx.Event(), ctx.Event()
    with processes("spawn", hold_lock_worker, [(lock.name, holding, release)]):
        assert holding.wait(JOIN_TIMEOUT)
        assert lock.locked()
        assert lock.acquire(blocking=False) is False
        assert lock.acquire(timeout=0) is False
        t0 = time.monotonic()
        assert lock.acquire(timeout=0.3) is False
        waited = time.monotonic() - t0
        assert 0.25 <= waited < PROMPT
        with pytest.raises(safeshm.LockTimeoutError), lock.acquired(timeout=0.05):
            pass
        # A blocked acquire wakes promptly when the holder releases.
        release.set()
        t0 = time.monotonic()
        assert lock.acquire(timeout=JOIN_TIMEOUT)
        assert time.monotonic() - t0 < PROMPT
        lock.release()


def test_blocking_acquire_wakes_promptly(
    lock: safeshm.SafeLock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safeshm import _lock

    # With 30-second sleeps, a waiter that wakes within seconds was woken by the unlock,
    # not by the end of a sleep: a bound that also holds on a loaded machine.
    monkeypatch.setattr(_lock, "_WAIT_SLICE", 30.0)
    lock.acquire()
    got = threading.Event()
    woke_at: list[float] = []

    def waiter() -> None:
        lock.acquire()
        woke_at.append(time.monotonic())
        got.set()
        lock.release()

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.25)  # the waiter is asleep in the kernel now
    assert not got.is_set()
    released = time.monotonic()
    lock.release()
    assert got.wait(JOIN_TIMEOUT)
    t.join(timeout=JOIN_TIMEOUT)
    assert woke_at[0] - released < PROMPT  # woken by the unlock, not by a polling tick


@pytest.mark.parametrize("bad", [-2, -0.5, -1.5, float("-inf"), float("nan")])
def test_bad_timeouts(lock: safeshm.SafeLock, bad: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a non-negative number"):
        lock.acquire(timeout=bad)
    assert not lock.locked()


@pytest.mark.parametrize("bad", ["1", [], True, False])
def test_timeout_type_errors(lock: safeshm.SafeLock, bad: Any) -> None:
    with pytest.raises(TypeError, match="timeout"):
        lock.acquire(timeout=bad)
    assert not lock.locked()


@pytest.mark.parametrize("timeout", [0, 1, 0.5, float("inf"), -2])
def test_timeout_with_nonblocking_is_an_error(lock: safeshm.SafeLock, timeout: float) -> None:
    # threading.Lock's exact error, before anything happens.
    with pytest.raises(ValueError, match="can't specify a timeout for a non-blocking call"):
        lock.acquire(blocking=False, timeout=timeout)
    with pytest.raises(ValueError, match="can't specify a timeout for a non-blocking call"):
        lock.acquire(False, timeout)
    assert not lock.locked()


def test_threading_lock_semantics(lock: safeshm.SafeLock) -> None:
    """acquire(blocking=True, timeout=-1) as threading.Lock (BaseLockTests' cases)."""
    assert lock.acquire(False) is True  # try once, free: acquired
    held: list[bool] = []

    def other() -> None:
        held.append(lock.acquire(False))
        held.append(lock.acquire(blocking=False))
        held.append(lock.acquire_nowait())
        held.append(lock.acquire(timeout=0))
        held.append(lock.acquire(True, 0.01))
        held.append(lock.acquire(blocking=False, timeout=-1))
        held.append(lock.acquire(blocking=False, timeout=None))

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=JOIN_TIMEOUT)
    assert held == [False] * 7
    lock.release()
    for forever in (
        {},
        {"timeout": -1},
        {"timeout": -1.0},
        {"timeout": None},
        {"blocking": True},
        {"blocking": 1},
    ):
        assert lock.acquire(**forever) is True  # type: ignore[arg-type]
        lock.release()
    assert lock.acquire(True) is True  # the first argument is `blocking`, as threading's
    lock.release()
    assert lock.acquire_nowait() is True
    lock.release()
    with pytest.raises(OverflowError):  # as threading.Lock: beyond TIMEOUT_MAX
        lock.acquire(timeout=float("inf"))
    assert not lock.locked()


def test_acquired_context(lock: safeshm.SafeLock) -> None:
    with lock.acquired(timeout=1) as held:
        assert held is lock and lock.locked()
    assert not lock.locked()


def test_acquired_is_entered_once_and_decorates(lock: safeshm.SafeLock) -> None:
    """As contextlib's objects: one with block per object (a second is a RuntimeError,
    never a silent no-op or a stray StopIteration), and usable as a decorator, each call
    holding the lock afresh."""
    cm = lock.acquired(timeout=1)
    with cm:
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="only once"), cm:
        pass
    assert not lock.locked()

    @lock.acquired(timeout=1)
    def inside(x: int) -> tuple[int, bool]:
        return x, lock.locked()

    assert inside(1) == (1, True)
    assert inside(2) == (2, True)
    assert not lock.locked()


@pytest.mark.parametrize("method", START_METHODS)
def test_mutual_exclusion_across_processes(
    method: str, lock: safeshm.SafeLock, cleanup: Any
) -> None:
    """Read-modify-writes that race without the lock are exact with it."""
    counter = cleanup(safeshm.SafeCounter.create())
    n, rounds = 4, 300
    barrier = multiprocessing.get_context(method).Barrier(n)
    run_all(method, locked_rmw_worker, [(lock, counter, barrier, rounds)] * n)
    assert counter.value == n * rounds


def test_mutual_exclusion_across_threads(lock: safeshm.SafeLock) -> None:
    state = {"v": 0}
    n, rounds = 6, 2000

    def work() -> None:
        for _ in range(rounds):
            with lock:
                v = state["v"]
                time.sleep(0) if v % 97 == 0 else None  # invite a switch mid-update
                state["v"] = v + 1

    ts = [threading.Thread(target=work) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in ts)
    assert state["v"] == n * rounds


# -- robustness ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", START_METHODS)
def test_holder_killed_next_acquirer_recovers_and_is_told(
    method: str, lock: safeshm.SafeLock
) -> None:
    ctx = multiprocessing.get_context(method)
    holding, release = ctx.Event(), ctx.Event()
    with processes(method, hold_lock_worker, [(lock.name, holding, release)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        assert lock.acquire(timeout=0.1) is False  # a live holder is never robbed
        kill_and_reap(p)
        t0 = time.monotonic()
        with pytest.warns(safeshm.HolderDiedWarning, match="previous holder died"):
            assert lock.acquire(timeout=1.0) is True
        assert time.monotonic() - t0 < PROMPT
        assert lock.statistics().recoveries == 1
        lock.release()
        # Fully usable afterwards, with no further warning.
        assert lock.acquire(timeout=1.0)
        lock.release()


def test_holder_killed_while_we_wait(lock: safeshm.SafeLock) -> None:
    """A waiter blocked in the kernel is woken by the holder's death, not by a timeout."""
    ctx = multiprocessing.get_context("fork")
    holding, release = ctx.Event(), ctx.Event()
    with processes("fork", hold_lock_worker, [(lock.name, holding, release)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        result: list[Any] = []

        def waiter() -> None:
            result.append(lock.acquire(timeout=JOIN_TIMEOUT))
            result.append(time.monotonic())
            lock.release()

        def kill_while_it_waits() -> float:
            t = threading.Thread(target=waiter)
            t.start()
            time.sleep(0.3)
            killed = time.monotonic()
            kill_and_reap(p)
            t.join(timeout=JOIN_TIMEOUT)
            return killed

        # Warnings are caught here, not in the thread: catch_warnings swaps process-wide
        # state and is only safe in one thread at a time.
        with pytest.warns(safeshm.HolderDiedWarning):
            killed = kill_while_it_waits()
        assert result[0] is True
        assert result[1] - killed < PROMPT


def test_with_statement_after_dead_holder_warns(lock: safeshm.SafeLock) -> None:
    ctx = multiprocessing.get_context("fork")
    holding, release = ctx.Event(), ctx.Event()
    with processes("fork", hold_lock_worker, [(lock.name, holding, release)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        kill_and_reap(p)
        with pytest.warns(safeshm.HolderDiedWarning), lock:
            assert lock.locked()
    assert not lock.locked()


def test_warning_as_error_leaves_lock_free(lock: safeshm.SafeLock) -> None:
    """With warnings turned into errors the recovery is reported by raising, and the
    lock is released first so nothing deadlocks."""
    ctx = multiprocessing.get_context("fork")
    holding, release = ctx.Event(), ctx.Event()
    with processes("fork", hold_lock_worker, [(lock.name, holding, release)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        kill_and_reap(p)
        with pytest.raises(safeshm.HolderDiedWarning):
            lock.acquire(timeout=1)
        assert not lock.locked()
        assert lock.acquire(timeout=1)
        lock.release()


def test_thread_dying_while_holding(lock: safeshm.SafeLock) -> None:
    def take_and_exit() -> None:
        lock.acquire()

    t = threading.Thread(target=take_and_exit)
    t.start()
    t.join(timeout=JOIN_TIMEOUT)
    with pytest.warns(safeshm.HolderDiedWarning):
        assert lock.acquire(timeout=1.0)
    lock.release()


def test_close_releases_a_lock_this_thread_holds(cleanup: Any) -> None:
    lock = cleanup(safeshm.SafeLock.create())
    other = safeshm.SafeLock.attach(lock.name)
    try:
        lock.acquire()
        lock.close()
        assert other.acquire(timeout=1.0)
        other.release()
    finally:
        other.close()


def test_holder_can_release_after_another_thread_closed_the_handle(cleanup: Any) -> None:
    lock = cleanup(safeshm.SafeLock.create())
    other = safeshm.SafeLock.attach(lock.name)
    held, closed = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            with lock:
                held.set()
                closed.wait(timeout=JOIN_TIMEOUT)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(JOIN_TIMEOUT)
        lock.close()
        with pytest.raises(safeshm.SegmentClosedError):
            lock.acquire(timeout=0)
        closed.set()
        t.join(timeout=JOIN_TIMEOUT)
        assert errors == []
        assert other.acquire(timeout=1.0)  # released, not stuck with a live thread
        other.release()
    finally:
        other.close()


def test_statistics(lock: safeshm.SafeLock) -> None:
    import os

    s = lock.statistics()
    assert (s.name, s.locked, s.holder_pid, s.recoveries) == (lock.name, False, None, 0)
    assert s.creator_pid == os.getpid()
    with lock:
        s = lock.statistics()
        assert s.locked and s.holder_pid == os.getpid()


def test_lock_open(name: str) -> None:
    a = safeshm.SafeLock.open(name)
    b = safeshm.SafeLock.open(name)
    seen: list[bool] = []
    try:
        with a:
            t = threading.Thread(target=lambda: seen.append(b.acquire(timeout=0)))
            t.start()
            t.join(timeout=JOIN_TIMEOUT)
            assert b.locked()
        assert seen == [False]
    finally:
        b.close()
        a.close()
        a.unlink()


def test_timedlock_fallback(monkeypatch: pytest.MonkeyPatch, lock: safeshm.SafeLock) -> None:
    """musl and glibc < 2.30 lack pthread_mutex_clocklock: waits use timedlock instead."""
    from safeshm import _compat

    monkeypatch.setattr(_compat, "mutex_clocklock", None)
    ctx = multiprocessing.get_context("fork")
    holding, release = ctx.Event(), ctx.Event()
    with processes("fork", hold_lock_worker, [(lock.name, holding, release)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        t0 = time.monotonic()
        assert lock.acquire(timeout=0.3) is False
        assert 0.25 <= time.monotonic() - t0 < PROMPT
        kill_and_reap(p)
        with pytest.warns(safeshm.HolderDiedWarning):
            assert lock.acquire(timeout=1.0)
        lock.release()


def test_closed_handle_is_not_counted_as_in_use(cleanup: Any) -> None:
    # The unlocker keeps the mapping (and the open file) alive after close(), so a holder
    # can still release; the "in use" flock must go at close() all the same, or
    # `safeshm ls` and `rm --stale` would count a closed handle as a user.
    from safeshm._cli import _in_use
    from safeshm._segment import segment_path

    lock = cleanup(safeshm.SafeLock.create())
    path = segment_path(lock.name)
    assert _in_use(path) is True
    lock.close()
    assert _in_use(path) is False


# -- the mapping outlives every hold (issue 10.2) ---------------------------------------------
def _python(code: str, **kwargs: Any) -> Any:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ)
    src = str(Path(safeshm.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def test_dropping_a_held_lock_does_not_crash_the_holder(unique: Any) -> None:
    """glibc links a held robust mutex into its thread's robust list: unmapping it (the
    handle garbage-collected) made the thread's next robust-mutex operation segfault."""
    name = unique()
    proc = _python(f"""
import gc, safeshm
safeshm.SafeLock.create(name={name!r}).acquire()  # held; the handle is dropped at once
gc.collect()
for _ in range(3):
    other = safeshm.SafeLock.create()
    for _ in range(50):
        with other:
            pass
    other.close(); other.unlink()
q = safeshm.SafeQueue.create(4096)
q.put(1); q.get()
q.close(); q.unlink()
print("survived", flush=True)
""")
    try:
        out, err = proc.communicate(timeout=JOIN_TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
        safeshm.SafeLock.attach(name).unlink()
    assert proc.returncode == 0 and "survived" in out, (proc.returncode, err[-2000:])


@pytest.mark.parametrize("holder", ["thread", "process", "normal exit"])
def test_holder_of_a_dropped_handle_dies_and_is_seen_dead(
    holder: str, lock: safeshm.SafeLock
) -> None:
    """If the mapping is gone when the holder exits, the kernel cannot mark the mutex
    owner-dead, and every other process waits forever without a HolderDiedWarning. Also
    for a process that simply exits holding it: interpreter teardown frees the handle."""
    acquire_and_drop = f"""
import gc, safeshm
def take():
    safeshm.SafeLock.attach({lock.name!r}).acquire()  # the handle is dropped at once
    gc.collect()
"""
    if holder == "normal exit":
        acquire_and_drop = f"""
import safeshm
kept = safeshm.SafeLock.attach({lock.name!r})
def take():
    kept.acquire()  # held until the process exits; the handle lives until teardown
"""
    if holder == "thread":
        code = (
            acquire_and_drop
            + """
import sys, threading
t = threading.Thread(target=take)
t.start(); t.join()
print("thread exited", flush=True)
sys.stdin.read()  # this process stays alive until the test is done
"""
        )
    else:
        code = acquire_and_drop + "take()\nprint('exiting', flush=True)\n"
    proc = _python(code)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() in ("thread exited", "exiting")
        if holder == "process":
            proc.wait(timeout=JOIN_TIMEOUT)
        with pytest.warns(safeshm.HolderDiedWarning):
            assert lock.acquire(timeout=10.0) is True
        lock.release()
    finally:
        proc.kill()
        proc.communicate()


def test_exit_works_through_the_class_as_exit_stack_calls_it(lock: safeshm.SafeLock) -> None:
    """release() and __exit__ are C-level calls reached through properties; the class
    attributes still work as ExitStack (type(cm).__exit__(cm, ...)) and users call them."""
    import contextlib

    with contextlib.ExitStack() as stack:
        stack.enter_context(lock)
        assert lock.locked()
    assert not lock.locked()

    def fail_inside() -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(lock)
            raise KeyError("x")  # __exit__ must not swallow it

    with pytest.raises(KeyError):
        fail_inside()
    assert not lock.locked()
    lock.acquire()
    safeshm.SafeLock.release(lock)
    assert not lock.locked()
    with pytest.raises(safeshm.LockNotHeldError):
        type(lock).__exit__(lock, None, None, None)
    assert "Release the lock" in (safeshm.SafeLock.release.__doc__ or "")


def test_an_internal_mutex_wait_can_be_bounded(cleanup: Any) -> None:
    """``Held(mutex, timeout=...)``, what structures use to bound a wait for a holder that
    is alive but never releases (SIGSTOP): LockTimeoutError, the block not run, the mutex
    not taken; once it is free, the same call takes it."""
    from safeshm._lock import Held

    counter = cleanup(safeshm.ShardedCounter.create())
    mutex = counter._mutex
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with Held(mutex):
            holding.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(30)
        ran = False
        t0 = time.monotonic()
        timed_out = pytest.raises(safeshm.LockTimeoutError, match=r"within 0\.2 s")
        with timed_out, Held(mutex, None, 0.2):
            ran = True
        assert not ran
        assert 0.15 <= time.monotonic() - t0 < 10
    finally:
        release.set()
        t.join(30)
    with Held(mutex, None, 5.0):
        pass
    counter.set(3)  # takes the mutex itself: it was released
    assert counter.value == 3
