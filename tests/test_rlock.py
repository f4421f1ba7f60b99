"""SafeRLock: re-entrancy, robustness (SIGKILL at depth 3, a stopped owner), fork,
mutual exclusion across processes, a state machine against ``threading.RLock``, bad
input, pickling, and close() from another thread."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import safeshm
from safeshm import HolderDiedWarning, LockNotHeldError, SegmentClosedError
from safeshm._array import SafeArray
from safeshm._rlock import RLockStatistics, SafeRLock

from ._helpers import JOIN_TIMEOUT, PROMPT, START_METHODS, Remote, kill_and_reap, processes


@pytest.fixture
def rlock() -> Iterator[SafeRLock]:
    r = SafeRLock.create()
    yield r
    r.close()
    r.unlink()


# -- workers (module level: spawn imports them) --------------------------------------------
def _hold_at_depth_worker(name: str, depth: int, holding: Any, release: Any) -> None:
    r = SafeRLock.attach(name)
    for _ in range(depth):
        r.acquire()
    holding.set()
    release.wait(JOIN_TIMEOUT)
    for _ in range(depth):
        r.release()
    r.close()


def _stop_while_holding_worker(name: str, holding: Any) -> None:
    r = SafeRLock.attach(name)
    r.acquire()
    holding.set()
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(JOIN_TIMEOUT)  # pragma: no cover - killed while stopped


def _increment_worker(lock: SafeRLock, arr: SafeArray[int], barrier: Any, rounds: int) -> None:
    barrier.wait(JOIN_TIMEOUT)
    for _ in range(rounds):
        with lock:
            v = arr[0]
            with lock:  # re-entered: still exclusive
                time.sleep(0) if v % 7 == 0 else None
                arr[0] = v + 1
    lock.close()
    arr.close()


def _rlock_serve(conn: Any) -> None:
    from . import _helpers

    safeshm.SafeRLock = SafeRLock  # type: ignore[attr-defined] # only in this server child
    _helpers._serve(conn)


# -- basics ---------------------------------------------------------------------------------
def test_reentrant_counts_and_statistics(rlock: SafeRLock) -> None:
    assert rlock.statistics().depth == 0
    assert rlock.acquire() and rlock.acquire(False) and rlock.acquire(timeout=1)
    s = rlock.statistics()
    assert isinstance(s, RLockStatistics)
    assert (s.locked, s.owner_pid, s.owner_tid, s.depth) == (
        True,
        os.getpid(),
        threading.get_native_id(),
        3,
    )
    assert rlock._recursion_count() == 3 and rlock.locked()
    for left in (2, 1, 0):
        rlock.release()
        assert rlock._recursion_count() == left
    assert not rlock.locked()
    with pytest.raises(LockNotHeldError):
        rlock.release()
    with pytest.raises(RuntimeError, match="not held"):
        rlock.release()
    with rlock, rlock:
        assert rlock._recursion_count() == 2
    assert rlock.statistics().depth == 0


def test_other_thread_waits_and_cannot_release(rlock: SafeRLock) -> None:
    rlock.acquire()
    rlock.acquire()
    out: list[Any] = []

    def other() -> None:
        out.append(rlock.acquire(False))
        out.append(rlock.acquire(timeout=0.05))
        try:
            rlock.release()
        except RuntimeError as e:
            out.append(type(e))
        out.append(rlock._is_owned())

    t = threading.Thread(target=other)
    t.start()
    t.join(JOIN_TIMEOUT)
    assert out == [False, False, LockNotHeldError, False]
    assert rlock._recursion_count() == 2
    rlock.release()
    rlock.release()


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((False, 1), {}, ValueError),
        ((), {"timeout": -2}, ValueError),
        ((), {"timeout": float("nan")}, ValueError),
        ((), {"timeout": "1"}, TypeError),
        ((), {"timeout": True}, TypeError),
    ],
)
def test_bad_input_changes_nothing(
    rlock: SafeRLock, args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    for held in (0, 2):
        for _ in range(held):
            rlock.acquire()
        with pytest.raises(error):
            rlock.acquire(*args, **kwargs)
        assert rlock._recursion_count() == held
        for _ in range(held):
            rlock.release()
    assert not rlock.locked()


def test_timeouts_and_none_means_forever(rlock: SafeRLock) -> None:
    assert rlock.acquire(timeout=None) and rlock.acquire(True, -1)
    rlock.release()
    rlock.release()


def test_pickles_by_reference_and_attach(rlock: SafeRLock) -> None:
    again = pickle.loads(pickle.dumps(rlock))
    try:
        assert again.name == rlock.name
        with rlock:
            # Another handle in the same thread is the same owner: re-entrant.
            assert again.acquire(False)
            assert rlock._recursion_count() == 2
            again.release()
    finally:
        again.close()


def test_attach_refuses_another_kind() -> None:
    lock = safeshm.SafeLock.create()
    try:
        with pytest.raises(safeshm.IncompatibleSegmentError):
            SafeRLock.attach(lock.name)
        with pytest.raises(safeshm.IncompatibleSegmentError):
            safeshm.SafeLock.attach(SafeRLock.create(name=lock.name + "r").name).close()
    finally:
        lock.close()
        lock.unlink()
        SafeRLock.attach(lock.name + "r").unlink()


def test_close_while_owned_releases_every_level() -> None:
    r = SafeRLock.create()
    other = SafeRLock.attach(r.name)
    try:
        r.acquire()
        r.acquire()
        r.close()
        assert not other.locked()
        with pytest.raises(SegmentClosedError):
            r.acquire()
    finally:
        other.close()
        other.unlink()


def test_close_from_another_thread_ends_a_blocked_acquire(rlock: SafeRLock) -> None:
    other = SafeRLock.attach(rlock.name)
    rlock.acquire()
    out: list[Any] = []

    def waiter() -> None:
        t0 = time.monotonic()
        try:
            other.acquire(timeout=JOIN_TIMEOUT)
        except BaseException as e:  # noqa: BLE001
            out.append(e)
        out.append(time.monotonic() - t0)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.2)
    t_close = time.monotonic()
    closer = threading.Thread(target=other.close)  # a thread that owns nothing
    closer.start()
    closer.join(JOIN_TIMEOUT)
    t.join(JOIN_TIMEOUT)
    assert isinstance(out[0], SegmentClosedError)
    assert time.monotonic() - t_close < PROMPT
    rlock.release()


# -- processes --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", START_METHODS)
def test_owner_killed_at_depth_3_next_acquirer_recovers(method: str, rlock: SafeRLock) -> None:
    ctx = multiprocessing.get_context(method)
    holding, release = ctx.Event(), ctx.Event()
    with processes(method, _hold_at_depth_worker, [(rlock.name, 3, holding, release)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        assert rlock.statistics().depth == 3
        assert rlock.statistics().owner_pid == p.pid
        assert rlock.acquire(timeout=0.1) is False  # a live owner is never robbed
        kill_and_reap(p)
        t0 = time.monotonic()
        with pytest.warns(HolderDiedWarning, match="died holding it"):
            assert rlock.acquire(timeout=JOIN_TIMEOUT) is True
        assert time.monotonic() - t0 < PROMPT
        assert rlock._recursion_count() == 1  # depth 1: the dead owner's levels are gone
        assert rlock.statistics().recoveries == 1
        rlock.release()
        assert not rlock.locked()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert rlock.acquire(timeout=1.0)
        rlock.release()


def test_owner_killed_while_we_wait(rlock: SafeRLock) -> None:
    ctx = multiprocessing.get_context("fork")
    holding, release = ctx.Event(), ctx.Event()
    with processes("fork", _hold_at_depth_worker, [(rlock.name, 3, holding, release)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        result: list[Any] = []

        def waiter() -> None:
            result.append(rlock.acquire(timeout=JOIN_TIMEOUT))
            result.append(time.monotonic())
            rlock.release()

        def kill_while_it_waits() -> float:
            t = threading.Thread(target=waiter)
            t.start()
            time.sleep(0.3)
            killed = time.monotonic()
            kill_and_reap(p)
            t.join(timeout=JOIN_TIMEOUT)
            return killed

        with pytest.warns(HolderDiedWarning):
            killed = kill_while_it_waits()
        assert result[0] is True
        assert result[1] - killed < PROMPT


def test_stopped_owner_does_not_stretch_a_timeout(rlock: SafeRLock) -> None:
    ctx = multiprocessing.get_context("fork")
    holding = ctx.Event()
    with processes("fork", _stop_while_holding_worker, [(rlock.name, holding)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        t0 = time.monotonic()
        assert rlock.acquire(timeout=0.3) is False
        assert time.monotonic() - t0 < 0.3 + PROMPT / 5
        kill_and_reap(p)
        with pytest.warns(HolderDiedWarning):
            assert rlock.acquire(timeout=JOIN_TIMEOUT)
        rlock.release()


def test_forked_child_does_not_own_the_parents_hold(rlock: SafeRLock) -> None:
    rlock.acquire()
    rlock.acquire()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()

    def child() -> None:
        res: list[Any] = [rlock._is_owned(), rlock._recursion_count(), rlock.acquire(False)]
        try:
            rlock.release()
        except RuntimeError:
            res.append("refused")
        out.put(res)

    p = ctx.Process(target=child)
    p.start()
    try:
        assert out.get(timeout=JOIN_TIMEOUT) == [False, 0, False, "refused"]
    finally:
        p.join(JOIN_TIMEOUT)
    assert rlock._recursion_count() == 2
    rlock.release()
    rlock.release()


@pytest.mark.parametrize("impl", ["fork"])
def test_mutual_exclusion_across_processes(impl: str, rlock: SafeRLock) -> None:
    """A plain, non-atomic read-modify-write of a shared element, under the lock taken
    re-entrantly, in 4 processes: the total is exact."""
    n, rounds = 4, 400
    ctx = multiprocessing.get_context(impl)
    barrier = ctx.Barrier(n)
    with SafeArray.create("q", 1) as arr:
        with processes(
            impl, _increment_worker, [(rlock, arr, barrier, rounds) for _ in range(n)]
        ) as procs:
            for p in procs:
                p.join(JOIN_TIMEOUT)
            assert [p.exitcode for p in procs] == [0] * n
        assert arr[0] == n * rounds


# -- a state machine against threading.RLock ----------------------------------------------------
class _Thread:
    """A helper thread that runs calls on request (a second owner in this process)."""

    def __init__(self) -> None:
        self.calls: queue.Queue[Any] = queue.Queue()
        self.results: queue.Queue[Any] = queue.Queue()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            f = self.calls.get()
            if f is None:
                return
            try:
                self.results.put(("ok", f()))
            except BaseException as e:  # noqa: BLE001
                self.results.put(("err", e))

    def call(self, f: Any) -> Any:
        self.calls.put(f)
        status, value = self.results.get(timeout=JOIN_TIMEOUT)
        if status == "err":
            raise value
        return value

    def stop(self) -> None:
        self.calls.put(None)
        self.t.join(JOIN_TIMEOUT)


class RLockMachine(RuleBasedStateMachine):
    """Three would-be owners -- this thread, another thread, another process -- against a
    model of threading.RLock's rules (owner, count)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = SafeRLock.create()
        self.thread = _Thread()
        self.remote = Remote("fork", serve=_rlock_serve)
        self.remote.attach("SafeRLock", self.lock.name)
        self.owner: str | None = None
        self.count = 0

    def _do(self, who: str, method: str, *args: Any) -> Any:
        if who == "main":
            return getattr(self.lock, method)(*args)
        if who == "thread":
            return self.thread.call(lambda: getattr(self.lock, method)(*args))
        return self.remote.call(self.lock.name, method, *args)

    @rule(who=st.sampled_from(["main", "thread", "proc"]))
    def acquire_nowait(self, who: str) -> None:
        got = self._do(who, "acquire", False)
        expected = self.owner in (None, who)
        assert got is expected
        if got:
            self.owner = who
            self.count += 1

    @rule(who=st.sampled_from(["main", "thread", "proc"]))
    def release(self, who: str) -> None:
        if self.owner != who:
            with pytest.raises(RuntimeError):
                self._do(who, "release")
            return
        self._do(who, "release")
        self.count -= 1
        if not self.count:
            self.owner = None

    @precondition(lambda self: self.owner is not None)
    @rule()
    def other_times_out(self) -> None:
        other = "thread" if self.owner == "main" else "main"
        assert self._do(other, "acquire", True, 0.01) is False

    @invariant()
    def counts_agree(self) -> None:
        for who in ("main", "thread", "proc"):
            mine = self.count if self.owner == who else 0
            assert self._do(who, "_recursion_count") == mine
            assert self._do(who, "_is_owned") is (mine > 0)
        s = self.lock.statistics()
        assert s.locked is (self.owner is not None)
        assert s.depth == self.count

    def teardown(self) -> None:
        while self.count:
            self._do(self.owner or "main", "release")
            self.count -= 1
        self.thread.stop()
        self.remote.detach(self.lock.name)
        self.remote.stop()
        self.lock.close()
        self.lock.unlink()


RLockMachine.TestCase.settings = RLockMachine.TestCase.settings  # the profile's settings
TestRLockMachine = RLockMachine.TestCase
