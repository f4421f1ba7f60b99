"""SafeEvent: set/clear/wait across processes and threads, prompt wake-ups, robustness."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import safeshm
from safeshm._event import SafeEvent

from ._helpers import JOIN_TIMEOUT, PROMPT, START_METHODS, kill_and_reap, processes


@pytest.fixture
def event(cleanup: Any) -> SafeEvent:
    return cleanup(SafeEvent.create())  # type: ignore[no-any-return]


def test_initially_clear(event: SafeEvent) -> None:
    assert not event.is_set()
    t0 = time.monotonic()
    assert event.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.05
    assert event.wait(0) is False


def test_set_clear(event: SafeEvent) -> None:
    event.set()
    assert event.is_set()
    assert event.wait() is True
    assert event.wait(0) is True
    event.set()  # idempotent
    assert event.is_set()
    event.clear()
    assert not event.is_set()
    event.clear()
    assert not event.is_set()


def test_attach_open_share_the_flag(event: SafeEvent, cleanup: Any, unique: Any) -> None:
    other = cleanup(SafeEvent.attach(event.name))
    event.set()
    assert other.is_set()
    other.clear()
    assert not event.is_set()
    n = unique()
    a = cleanup(SafeEvent.open(n))
    b = cleanup(SafeEvent.open(n))
    a.set()
    assert b.is_set()


def test_pickles_by_reference(event: SafeEvent, cleanup: Any) -> None:
    copy = cleanup(pickle.loads(pickle.dumps(event)))
    assert copy.name == event.name
    copy.set()
    assert event.is_set()


def test_lifecycle_with_unlinks_what_create_made() -> None:
    with SafeEvent.create() as e:
        name = e.name
        e.set()
    with pytest.raises(safeshm.SegmentNotFoundError):
        SafeEvent.attach(name)


def test_wrong_kind_is_refused(cleanup: Any) -> None:
    c = cleanup(safeshm.SafeCounter.create())
    with pytest.raises(safeshm.IncompatibleSegmentError, match="SafeCounter"):
        SafeEvent.attach(c.name)


@pytest.mark.parametrize("bad", ["1", [], object()])
def test_bad_timeout_types(event: SafeEvent, bad: Any) -> None:
    with pytest.raises(TypeError):
        event.wait(bad)
    assert not event.is_set()
    event.set()
    assert (
        event.wait(bad) is True
    )  # as threading.Event: a set flag returns before the timeout is read


def test_nan_timeout(event: SafeEvent) -> None:
    with pytest.raises(ValueError, match="nan"):
        event.wait(float("nan"))


def test_negative_timeout_does_not_wait_like_threading(event: SafeEvent) -> None:
    assert threading.Event().wait(-1) is False
    t0 = time.monotonic()
    assert event.wait(-1) is False
    assert time.monotonic() - t0 < PROMPT
    event.set()
    assert event.wait(-1) is True


def test_use_after_close(cleanup: Any) -> None:
    e = cleanup(SafeEvent.create())
    e.close()
    e.close()
    for call in (e.set, e.clear, e.is_set, lambda: e.wait(0)):
        with pytest.raises(safeshm.SegmentClosedError):
            call()
    assert "closed=True" in repr(e)


def test_close_wakes_a_waiter_in_another_thread(event: SafeEvent) -> None:
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            event.wait(JOIN_TIMEOUT)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    _until_sleeping(event, 1)
    t0 = time.monotonic()
    event.close()
    t.join(PROMPT)
    assert not t.is_alive()
    assert time.monotonic() - t0 < PROMPT
    assert len(errors) == 1
    assert isinstance(errors[0], safeshm.SegmentClosedError)


def _until_sleeping(event: SafeEvent, n: int) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while event.statistics().waiters < n:
        assert time.monotonic() < deadline, "the waiters never went to sleep"
        time.sleep(0.005)


def test_set_wakes_every_thread_waiter(event: SafeEvent) -> None:
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(event.wait(JOIN_TIMEOUT))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    _until_sleeping(event, 8)
    t0 = time.monotonic()
    event.set()
    for t in threads:
        t.join(PROMPT)
    assert time.monotonic() - t0 < PROMPT
    assert results == [True] * 8
    assert event.statistics().waiters == 0


def _wait_worker(name: str, ready: Any, woke: Any, slot: int) -> None:
    e = SafeEvent.attach(name)
    ready.release()
    t0 = time.monotonic()
    ok = e.wait(JOIN_TIMEOUT)
    woke[slot] = time.monotonic() - t0 if ok else -1.0
    e.close()


@pytest.mark.parametrize("method", START_METHODS)
def test_set_wakes_waiters_in_other_processes(event: SafeEvent, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    n = 4
    ready = ctx.Semaphore(0)
    woke = ctx.Array("d", [0.0] * n)
    with processes(method, _wait_worker, [(event.name, ready, woke, i) for i in range(n)]) as ps:
        for _ in range(n):
            assert ready.acquire(timeout=JOIN_TIMEOUT)
        _until_sleeping(event, n)
        event.set()
        for p in ps:
            p.join(PROMPT + 5)
        assert [p.exitcode for p in ps] == [0] * n
    assert all(w >= 0 for w in woke[:]), woke[:]


def test_a_killed_waiter_does_not_disturb_the_others(event: SafeEvent) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Semaphore(0)
    woke = ctx.Array("d", [0.0] * 2)
    with processes("fork", _wait_worker, [(event.name, ready, woke, i) for i in range(2)]) as ps:
        for _ in range(2):
            assert ready.acquire(timeout=JOIN_TIMEOUT)
        _until_sleeping(event, 2)
        kill_and_reap(ps[0])
        event.set()
        ps[1].join(PROMPT + 5)
        assert ps[1].exitcode == 0
    assert woke[1] >= 0
    event.clear()
    assert event.wait(0.01) is False  # still a working event


def _hold_internal_mutex(name: str, ready: Any) -> None:
    e = SafeEvent.attach(name)
    e._mutex.acquire()
    ready.set()
    time.sleep(JOIN_TIMEOUT)


def test_a_stopped_holder_does_not_stretch_a_timeout(event: SafeEvent) -> None:
    ready = multiprocessing.get_context("fork").Event()
    with processes("fork", _hold_internal_mutex, [(event.name, ready)]) as (p,):
        try:
            assert ready.wait(JOIN_TIMEOUT)
            os.kill(p.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            assert event.wait(0.3) is False
            assert time.monotonic() - t0 < PROMPT
        finally:
            os.kill(p.pid, signal.SIGCONT)
            kill_and_reap(p)
    # Its holder died inside the internal mutex: the next call recovers it.
    event.set()
    assert event.wait(1)


def test_sigint_interrupts_a_wait(event: SafeEvent) -> None:
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            event.wait(JOIN_TIMEOUT)
        assert time.monotonic() - t0 < PROMPT
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not event._mutex.locked()  # nothing held
    event.set()
    assert event.wait(0)


def _toggler(name: str, rounds: int) -> None:
    e = SafeEvent.attach(name)
    for _ in range(rounds):
        e.set()
        e.clear()
    e.close()


def test_toggling_processes_never_strand_a_waiter(event: SafeEvent) -> None:
    """Two processes set and clear as fast as they can while this one waits in a loop:
    every wait returns by its timeout (the internal mutex is never stuck), and the event
    still works afterwards."""
    slowest = 0.0
    with processes("fork", _toggler, [(event.name, 2000)] * 2):
        for _ in range(200):
            t0 = time.monotonic()
            event.wait(0.01)
            slowest = max(slowest, time.monotonic() - t0)
    assert slowest < PROMPT
    event.set()
    assert event.wait(0)


class EventMachine(RuleBasedStateMachine):
    """Two handles (one attached) against threading.Event."""

    def __init__(self) -> None:
        super().__init__()
        self.a = SafeEvent.create()
        self.b = SafeEvent.attach(self.a.name)
        self.model = threading.Event()

    def _h(self, second: bool) -> SafeEvent:
        return self.b if second else self.a

    @rule(second=st.booleans())
    def set(self, second: bool) -> None:
        self._h(second).set()
        self.model.set()

    @rule(second=st.booleans())
    def clear(self, second: bool) -> None:
        self._h(second).clear()
        self.model.clear()

    @rule(second=st.booleans())
    def wait0(self, second: bool) -> None:
        assert self._h(second).wait(0) == self.model.wait(0)

    @invariant()
    def same(self) -> None:
        assert self.a.is_set() == self.b.is_set() == self.model.is_set()

    def teardown(self) -> None:
        self.b.close()
        self.a.close()
        self.a.unlink()


TestEventMachine = EventMachine.TestCase
TestEventMachine.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)


def test_set_wakes_by_futex_not_by_the_slice(event: SafeEvent, monkeypatch: Any) -> None:
    """With the waiters' slice stretched to a minute, only set()'s futex wake-up can
    return the waiter within PROMPT: the wake-up is not the periodic re-check."""
    import ctypes

    from safeshm import _compat, _sync

    monkeypatch.setattr(_sync, "_SLICE_TIMESPEC", ctypes.byref(_compat.Timespec(60, 0)))
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.append(event.wait(JOIN_TIMEOUT)))
    t.start()
    _until_sleeping(event, 1)
    time.sleep(0.05)  # asleep in the kernel, not between the count and the futex call
    t0 = time.monotonic()
    event.set()
    t.join(PROMPT)
    assert results == [True]
    assert time.monotonic() - t0 < PROMPT


def test_isset_is_threadings_deprecated_alias(event: SafeEvent) -> None:
    with pytest.warns(DeprecationWarning, match="is_set"):
        assert event.isSet() is False
    event.set()
    with pytest.warns(DeprecationWarning, match="is_set"):
        assert event.isSet() is True
