"""SafeSemaphore / SafeBoundedSemaphore: semantics against ``threading``, robustness
(a dead holder's permits come back), bad input, timeouts, lifecycle."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import random
import signal
import threading
import time
import warnings
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from safeshm import HolderDiedWarning, SegmentClosedError
from safeshm._counter import SafeCounter
from safeshm._errors import IncompatibleSegmentError
from safeshm._semaphore import SafeBoundedSemaphore, SafeSemaphore
from safeshm._sync import WAIT_SLICE

from ._helpers import JOIN_TIMEOUT, PROMPT, Remote, kill_and_reap, run_all

CLASSES = [SafeSemaphore, SafeBoundedSemaphore]
ctx = multiprocessing.get_context("fork")


@pytest.fixture(params=CLASSES, ids=["plain", "bounded"])
def cls(request: pytest.FixtureRequest) -> Any:
    return request.param


# -- workers (module level: fork children run them) -----------------------------------------
def _hold(name: str, bounded: bool, n: int, ready: Any) -> None:
    sem = (SafeBoundedSemaphore if bounded else SafeSemaphore).attach(name)
    for _ in range(n):
        sem.acquire()
    ready.set()
    time.sleep(JOIN_TIMEOUT)


def _block(name: str, ready: Any) -> None:
    sem = SafeSemaphore.attach(name)
    ready.set()
    sem.acquire(timeout=JOIN_TIMEOUT)


def _hold_mutex(name: str, ready: Any) -> None:
    sem = SafeSemaphore.attach(name)
    with sem._section():
        ready.set()
        time.sleep(JOIN_TIMEOUT)


def _exit_holding(sem: Any) -> None:
    sem.acquire()  # and exits without releasing


def _churn(name: str, ready: Any) -> None:
    sem = SafeSemaphore.attach(name)
    ready.set()
    while True:
        sem.acquire()
        sem.release()


def _stress(name: str, counter_name: str, peak_name: str, rounds: int, start: Any) -> None:
    sem = SafeSemaphore.attach(name)
    inflight = SafeCounter.attach(counter_name)
    peak = SafeCounter.attach(peak_name)
    start.wait(JOIN_TIMEOUT)
    for i in range(rounds):
        if not sem.acquire(timeout=JOIN_TIMEOUT):
            raise AssertionError("acquire timed out")
        now = inflight.add(1)
        while True:  # peak = max(peak, now)
            p = peak.value
            if now <= p or peak.compare_and_set(p, now):
                break
        if i % 7 == 0:
            time.sleep(0)
        inflight.add(-1)
        sem.release()


# -- basics and bad input --------------------------------------------------------------------
def test_basics_and_statistics(cls: Any, cleanup: Any) -> None:
    sem = cleanup(cls.create(3))
    assert sem.value == 3 and sem.initial_value == 3
    assert sem.acquire() and sem.acquire(timeout=0.1) and sem.acquire(False)
    assert not sem.acquire(False)
    st_ = sem.statistics()
    assert (st_.value, st_.initial_value, st_.bounded) == (0, 3, cls is SafeBoundedSemaphore)
    assert st_.holders == {os.getpid(): 3}
    assert st_.creator_pid == os.getpid() and st_.waiters == 0
    sem.release(3)
    assert sem.value == 3 and sem.statistics().holders == {}
    with sem as s:
        assert s is sem and sem.value == 2
    assert sem.value == 3
    assert ("3/3" in repr(sem)) == (cls is SafeBoundedSemaphore)


@pytest.mark.parametrize(
    ("value", "exc"),
    [
        (-1, ValueError),
        (1.5, TypeError),
        ("2", TypeError),
        (None, TypeError),
        (2**63, OverflowError),
    ],
)
def test_create_bad_value(cls: Any, name: str, value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        cls.create(value, name=name)
    with pytest.raises(FileNotFoundError):
        cls.attach(name)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc"),
    [
        ((False,), {"timeout": 1.0}, ValueError),
        ((), {"timeout": "1"}, TypeError),
        ((), {"timeout": math.nan}, ValueError),
        ((), {"timeout": True}, TypeError),
    ],
)
def test_acquire_bad_input(cls: Any, cleanup: Any, args: Any, kwargs: Any, exc: Any) -> None:
    sem = cleanup(cls.create(1))
    with pytest.raises(exc):
        sem.acquire(*args, **kwargs)
    assert sem.value == 1 and sem.statistics().holders == {}


def test_acquire_messages_match_threading(cls: Any, cleanup: Any) -> None:
    sem = cleanup(cls.create(1))
    for theirs in (threading.Semaphore(1), sem):
        with pytest.raises(ValueError, match="can't specify timeout for non-blocking acquire"):
            theirs.acquire(False, timeout=1)
        with pytest.raises(ValueError, match="n must be one or more"):
            theirs.release(0)
    with pytest.raises(ValueError, match="semaphore initial value must be >= 0"):
        cls.create(-1)


@pytest.mark.parametrize(
    ("n", "exc"),
    [(0, ValueError), (-3, ValueError), ("1", TypeError), (1.0, TypeError), (2**63, OverflowError)],
)
def test_release_bad_input(cls: Any, cleanup: Any, n: Any, exc: Any) -> None:
    sem = cleanup(cls.create(1))
    sem.acquire()
    with pytest.raises(exc):
        sem.release(n)
    assert sem.value == 0 and sem.statistics().holders == {os.getpid(): 1}


def test_bounded_release_too_many_changes_nothing(cleanup: Any) -> None:
    sem = cleanup(SafeBoundedSemaphore.create(3))
    sem.acquire()
    sem.acquire()
    with pytest.raises(ValueError, match="Semaphore released too many times"):
        sem.release(3)
    assert sem.value == 1 and sem.statistics().holders == {os.getpid(): 2}
    sem.release(2)
    assert sem.value == 3


def test_release_overflow(cleanup: Any) -> None:
    sem = cleanup(SafeSemaphore.create(2**63 - 2))
    with pytest.raises(OverflowError):
        sem.release(2)
    assert sem.value == 2**63 - 2


def test_timeouts(cls: Any, cleanup: Any) -> None:
    sem = cleanup(cls.create(0))
    for t in (0, -1, 0.0):
        t0 = time.monotonic()
        assert not sem.acquire(timeout=t)
        assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    assert not sem.acquire(timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 0.3 + PROMPT


# -- lifecycle -------------------------------------------------------------------------------
def test_pickle_by_reference(cls: Any, cleanup: Any) -> None:
    sem = cleanup(cls.create(2))
    other = cleanup(pickle.loads(pickle.dumps(sem)))
    assert type(other) is cls and other.name == sem.name
    other.acquire()
    assert sem.value == 1


def test_attach_across_classes(cleanup: Any) -> None:
    plain = cleanup(SafeSemaphore.create(2))
    bounded = cleanup(SafeBoundedSemaphore.create(2))
    h = cleanup(SafeSemaphore.attach(bounded.name))
    assert type(h) is SafeBoundedSemaphore  # the bound belongs to the semaphore
    with pytest.raises(ValueError, match="too many"):
        h.release()
    with pytest.raises(IncompatibleSegmentError, match="expected a SafeBoundedSemaphore"):
        SafeBoundedSemaphore.attach(plain.name)


def test_open(cls: Any, name: str, cleanup: Any) -> None:
    a = cleanup(cls.open(name, 3, processes=4))
    b = cleanup(cls.open(name))
    c = cleanup(cls.open(name, 3))
    a.acquire()
    assert b.value == c.value == 2
    with pytest.raises(IncompatibleSegmentError, match="initial value 3, expected 2"):
        cls.open(name, 2)
    with pytest.raises(IncompatibleSegmentError, match="4 process records, expected 8"):
        cls.open(name, processes=8)
    other = SafeSemaphore if cls is SafeBoundedSemaphore else SafeBoundedSemaphore
    with pytest.raises(IncompatibleSegmentError):
        other.open(name)
    with pytest.raises(ValueError, match="must be >= 0"):
        cls.open(name, -1)
    with pytest.raises(TypeError, match="processes must be an int"):
        cls.open(name, processes="4")
    a.release()


def test_with_acquires_not_lifecycle(cleanup: Any) -> None:
    sem = cleanup(SafeSemaphore.create(1))
    with sem:
        assert not sem.acquire(False)
    assert not sem.closed and sem.value == 1


def test_close_from_another_thread_wakes_waiter(cls: Any, name: str) -> None:
    sem = cls.create(0, name=name)
    try:
        threading.Timer(0.3, sem.close).start()
        t0 = time.monotonic()
        with pytest.raises(SegmentClosedError):
            sem.acquire(timeout=JOIN_TIMEOUT)
        assert time.monotonic() - t0 < PROMPT
        with pytest.raises(SegmentClosedError):
            sem.release()
    finally:
        sem.close()
        sem.unlink()


# -- robustness: a dead process's permits come back ----------------------------------------
def test_killed_holder_permits_come_back(cls: Any, cleanup: Any) -> None:
    sem = cleanup(cls.create(3))
    ready = ctx.Event()
    p = ctx.Process(
        target=_hold, args=(sem.name, cls is SafeBoundedSemaphore, 2, ready), daemon=True
    )
    p.start()
    try:
        assert ready.wait(JOIN_TIMEOUT)
        assert sem.value == 1 and sem.statistics().holders == {p.pid: 2}
    finally:
        kill_and_reap(p)
    assert sem.acquire(False)
    with pytest.warns(HolderDiedWarning, match=f"process {p.pid} died holding 2 permits") as ws:
        assert sem.acquire(False)  # finds none: reaps
    assert len(ws) == 1
    assert ws[0].filename == __file__  # the user's call, not a line inside safeshm
    assert sem.value == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reaped once: no second warning
        assert sem.acquire(False)
        assert not sem.acquire(timeout=2 * WAIT_SLICE)
    sem.release(3)
    assert sem.value == 3 and sem.statistics().holders == {}


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_exit_without_release_returns_permit(cls: Any, cleanup: Any, method: str) -> None:
    sem = cleanup(cls.create(1))
    p = multiprocessing.get_context(method).Process(target=_exit_holding, args=(sem,))
    p.start()  # the handle travels pickled by reference (spawn) or inherited (fork)
    p.join(JOIN_TIMEOUT)
    assert p.exitcode == 0
    assert sem.value == 0  # reaping is lazy: the next acquire that finds none does it
    with pytest.warns(HolderDiedWarning, match="died holding 1 permit;"):
        assert sem.acquire(timeout=PROMPT)
    sem.release()


def test_blocked_waiter_notices_dead_holder_within_a_slice(cleanup: Any) -> None:
    sem = cleanup(SafeSemaphore.create(1))
    ready = ctx.Event()
    p = ctx.Process(target=_hold, args=(sem.name, False, 1, ready), daemon=True)
    p.start()
    assert ready.wait(JOIN_TIMEOUT)
    died = []

    def kill() -> None:
        # The time first: the waiter may see the death (a zombie is dead) and return
        # before this thread's join() does.
        died.append(time.monotonic())
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        p.join(JOIN_TIMEOUT)

    threading.Timer(0.2, kill).start()
    try:
        with pytest.warns(HolderDiedWarning):
            assert sem.acquire(timeout=JOIN_TIMEOUT)
        waited = time.monotonic() - died[0]
        assert waited < WAIT_SLICE + PROMPT / 5, waited
    finally:
        if p.exitcode is None:
            kill_and_reap(p)
    sem.release()
    assert sem.value == 1


def test_killed_waiter_loses_nothing(cleanup: Any) -> None:
    sem = cleanup(SafeSemaphore.create(0))
    ready = ctx.Event()
    p = ctx.Process(target=_block, args=(sem.name, ready), daemon=True)
    p.start()
    assert ready.wait(JOIN_TIMEOUT)
    deadline = time.monotonic() + PROMPT
    while sem.statistics().waiters == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_and_reap(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it held nothing: no warning
        sem.release(2)
        assert sem.acquire(False) and sem.acquire(False) and not sem.acquire(False)
    sem.release(2)
    assert sem.value == 2


def test_bounded_dead_handoff_never_exceeds_bound(cleanup: Any) -> None:
    sem = cleanup(SafeBoundedSemaphore.create(2))
    ready = ctx.Event()
    p = ctx.Process(target=_hold, args=(sem.name, True, 1, ready), daemon=True)
    p.start()
    assert ready.wait(JOIN_TIMEOUT)
    sem.release()  # hands the child's permit back on its behalf (a free release)
    kill_and_reap(p)
    sem.acquire()
    sem.acquire()
    with pytest.warns(HolderDiedWarning):
        assert not sem.acquire(False)  # reaps: the child's permit is not added again
    sem.release(2)
    assert sem.value == 2
    with pytest.raises(ValueError, match="released too many times"):
        sem.release()


def test_killed_inside_the_internal_mutex(cleanup: Any) -> None:
    sem = cleanup(SafeSemaphore.create(1))
    ready = ctx.Event()
    p = ctx.Process(target=_hold_mutex, args=(sem.name, ready), daemon=True)
    p.start()
    assert ready.wait(JOIN_TIMEOUT)
    os.kill(p.pid, signal.SIGSTOP)  # type: ignore[arg-type]
    try:
        t0 = time.monotonic()
        assert not sem.acquire(timeout=0.3)  # a stopped mutex holder: the timeout holds
        assert time.monotonic() - t0 < 0.3 + PROMPT / 5
        t0 = time.monotonic()
        assert not sem.acquire(False)
        assert time.monotonic() - t0 < WAIT_SLICE + PROMPT / 5
    finally:
        kill_and_reap(p)
    assert sem.acquire(timeout=PROMPT)  # the mutex is recovered
    sem.release()
    assert sem.value == 1


@pytest.mark.slow
def test_sigkill_in_tight_loop_conserves_permits(cleanup: Any) -> None:
    sem = cleanup(SafeSemaphore.create(2))
    rng = random.Random(1234)
    died_holding = 0
    for _ in range(15):
        ready = ctx.Event()
        p = ctx.Process(target=_churn, args=(sem.name, ready), daemon=True)
        p.start()
        assert ready.wait(JOIN_TIMEOUT)
        time.sleep(rng.uniform(0.0, 0.05))
        kill_and_reap(p)
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            got = 0
            while sem.acquire(False):
                got += 1
        assert got == 2, got
        assert len(ws) <= 1 and all(w.category is HolderDiedWarning for w in ws)
        died_holding += len(ws)
        sem.release(2)
        assert sem.value == 2 and sem.statistics().holders == {}
    # Informational (the schedule decides): how often the child died holding a permit,
    # and how often inside the internal mutex (the next locker recovered it).
    print(f"died holding a permit {died_holding}/15, in the mutex {sem._mutex.recoveries}/15")


@pytest.mark.slow
def test_stress_never_more_than_value(unique: Any, cleanup: Any) -> None:
    value, nproc, rounds = 2, 4, 300
    sem = cleanup(SafeSemaphore.create(value, name=unique()))
    inflight = cleanup(SafeCounter.create(0, name=unique()))
    peak = cleanup(SafeCounter.create(0, name=unique()))
    start = ctx.Event()
    args = [(sem.name, inflight.name, peak.name, rounds, start)] * nproc
    threading.Timer(0.2, start.set).start()
    run_all("fork", _stress, args)
    assert 1 <= peak.value <= value
    assert inflight.value == 0
    assert sem.value == value and sem.statistics().holders == {}


# -- the state machine: threading's model, one handle in another process -------------------
def _serve_sem(conn: multiprocessing.connection.Connection) -> None:
    sem: Any = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        op, args = msg
        try:
            if op == "attach":
                sem = SafeSemaphore.attach(args[0])
                result: Any = None
            else:
                result = getattr(sem, op)(*args)
            conn.send(("ok", result))
        except BaseException as e:  # noqa: BLE001 - ship every failure to the test
            conn.send(("err", e))
    if sem is not None:
        sem.close()


class SemaphoreMachine(RuleBasedStateMachine):
    bounded = False

    def __init__(self) -> None:
        super().__init__()
        self.sem: Any = None
        self.remote: Remote | None = None
        self.model: Any = None
        self.held = {"local": 0, "remote": 0}

    def _start_remote(self) -> None:
        self.remote = Remote("fork", _serve_sem)
        self.remote._request("attach", (self.sem.name,))

    @precondition(lambda self: self.sem is None)
    @rule(value=st.integers(0, 4))
    def create(self, value: int) -> None:
        cls = SafeBoundedSemaphore if self.bounded else SafeSemaphore
        self.sem = cls.create(value)
        self.model = (threading.BoundedSemaphore if self.bounded else threading.Semaphore)(value)
        self._start_remote()

    def _call(self, who: str, op: str, *args: Any) -> Any:
        if who == "remote":
            assert self.remote is not None
            return self.remote._request(op, args)
        return getattr(self.sem, op)(*args)

    @precondition(lambda self: self.sem is not None)
    @rule(who=st.sampled_from(["local", "remote"]))
    def try_acquire(self, who: str) -> None:
        want = self.model.acquire(False)
        assert self._call(who, "acquire", False) == want
        if want:
            self.held[who] += 1

    @precondition(lambda self: self.sem is not None)
    @rule(who=st.sampled_from(["local", "remote"]), n=st.integers(1, 3))
    def release(self, who: str, n: int) -> None:
        try:
            self.model.release(n)
        except ValueError:
            with pytest.raises(ValueError, match="released too many times"):
                self._call(who, "release", n)
            return
        self._call(who, "release", n)
        self.held[who] -= min(n, self.held[who])  # its own first; the rest are free

    @precondition(lambda self: self.sem is not None)
    @rule()
    def remote_dies(self) -> None:
        assert self.remote is not None
        kill_and_reap(self.remote.proc)
        self.remote._conn.close()
        lost, self.held["remote"] = self.held["remote"], 0
        value = self.model._value + lost
        if self.bounded:  # available + held capped at the bound (or at what is held)
            mine = self.held["local"]
            value = min(value + mine, max(self.model._initial_value, mine)) - mine
        # Reap now, as the next acquire that finds no permit would (reaping is lazy, and
        # a bounded semaphore's cap depends on what is held when it happens), then drain.
        expect = pytest.warns(HolderDiedWarning) if lost else contextlib.nullcontext()
        with expect, self.sem._section():
            assert self.sem._reap() <= 1
        got = 0
        while self.sem.acquire(False):
            got += 1
        assert got == value
        if got:
            self.sem.release(got)
        self.model._value = value
        self._start_remote()

    @invariant()
    def values_agree(self) -> None:
        if self.sem is not None:
            assert self.sem.value == self.model._value
            assert self._call("remote", "__getattribute__", "value") == self.model._value
            holders = self.sem.statistics().holders
            assert holders.get(os.getpid(), 0) == self.held["local"]
            assert self.remote is not None
            assert holders.get(self.remote.proc.pid, 0) == self.held["remote"]

    def teardown(self) -> None:
        if self.remote is not None:
            self.remote.stop()
        if self.sem is not None:
            self.sem.close()
            self.sem.unlink()


class BoundedSemaphoreMachine(SemaphoreMachine):
    bounded = True


@pytest.mark.parametrize("machine", [SemaphoreMachine, BoundedSemaphoreMachine])
def test_state_machine(machine: Any) -> None:
    machine.TestCase.settings = settings(max_examples=10, stateful_step_count=15, deadline=None)
    machine.TestCase().runTest()


# -- asynchronous exceptions --------------------------------------------------------------------
class _Alarm(Exception):
    pass


@pytest.mark.parametrize("bounded", [False, True])
def test_an_acquire_interrupted_by_a_signal_handler_holds_no_permit(bounded: bool) -> None:
    """An exception from a signal handler that ends acquire() leaves no permit taken (it
    could land after the commit, at the internal section's exit: the permit was held
    while the caller got the exception -- leaked until the process exits)."""
    sem = (SafeBoundedSemaphore if bounded else SafeSemaphore).create(2)
    armed = [False]

    def handler(signum: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False  # first order: one exception per call (the library's rule)
            raise _Alarm

    old = signal.signal(signal.SIGALRM, handler)
    held = landed = 0
    problems: list[tuple[int, int, int]] = []
    deadline = time.monotonic() + 3
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        while landed < 300 and not problems and time.monotonic() < deadline:
            try:
                armed[0] = True
                got = sem.acquire(timeout=1)
                held += got  # no call between the return and this store: no alarm
                armed[0] = False
                if got:
                    sem.release()  # unarmed: always done
                    held -= 1
            except _Alarm:
                armed[0] = False
                landed += 1
                record = sem.statistics().holders.get(os.getpid(), 0)
                if record != held:
                    problems.append((landed, held, record))
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
        sem.close()
        sem.unlink()
    assert problems == []
    assert landed >= 50


@pytest.mark.parametrize("cls", CLASSES)
def test_a_with_block_whose_release_is_interrupted_still_returns_the_permit(cls: Any) -> None:
    """An exception from a signal handler inside ``__exit__``'s release, before its commit:
    the block is left, so the permit must go back all the same (it was leaked until the
    process exited), and the exception still propagates."""
    sem = cls.create(1)
    try:
        real = sem._record
        interrupts: list[int] = []

        def interrupted_once() -> int:
            if not interrupts:
                interrupts.append(1)
                raise _Alarm
            return real()  # type: ignore[no-any-return]

        def hit_inside() -> None:
            sem._record = interrupted_once
            sem._mine = (0, -1)  # no cached record: the release looks it up, and is hit

        with pytest.raises(_Alarm), sem:
            hit_inside()
        assert interrupts == [1]
        assert sem.value == 1
        assert sem.statistics().holders == {}
    finally:
        sem.close()
        sem.unlink()


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("n", [1, 2])
def test_a_release_interrupted_before_its_commit_still_completes(cls: Any, n: int) -> None:
    """``acquire(); try: ... finally: release()``: an exception from a signal handler inside
    the release, before its commit, left the permits with the process (the caller's
    ``finally`` had run) until it exited -- a review saw it in a fifth of the releases
    under a signal storm. The release completes; the exception propagates."""
    sem = cls.create(2)
    try:
        real = sem._record
        interrupts: list[int] = []

        def interrupted_once() -> int:
            if not interrupts:
                interrupts.append(1)
                raise _Alarm
            return real()  # type: ignore[no-any-return]

        for _ in range(n):
            assert sem.acquire(timeout=1)
        sem._record = interrupted_once
        sem._mine = (0, -1)  # no cached record: the release looks it up, and is hit
        with pytest.raises(_Alarm):
            sem.release(n)
        assert interrupts == [1]
        assert sem.value == 2
        assert sem.statistics().holders == {}
    finally:
        sem.close()
        sem.unlink()
