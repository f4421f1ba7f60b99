"""SafeBarrier: lifecycle, bad input, multi-process generations, dead parties, timeouts."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import threading
import time
import warnings
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from safeshm import HolderDiedWarning, IncompatibleSegmentError, SafeArray, SegmentClosedError
from safeshm._barrier import SafeBarrier
from safeshm._event import SafeEvent
from safeshm._sync import _Timeout

from ._helpers import kill_and_reap, processes, run_all

BrokenBarrierError = threading.BrokenBarrierError
LONG = 30.0  # a timeout no passing test reaches
fork = multiprocessing.get_context("fork")


@pytest.fixture
def barrier2() -> Any:
    with SafeBarrier.create(2) as b:
        yield b


# -- workers ----------------------------------------------------------------------------------
def generations_worker(name: str, arr_name: str, generations: int) -> None:
    b = SafeBarrier.attach(name)
    arr = SafeArray.attach(arr_name)
    parties = b.parties
    for g in range(generations):
        i = b.wait(LONG)
        arr.add(g * parties + i, 1)
    b.close()
    arr.close()


def action_worker(name: str, arr_name: str, generations: int) -> None:
    arr = SafeArray.attach(arr_name)
    b = SafeBarrier.attach(name, action=lambda: arr.add(0, 1))
    for _ in range(generations):
        b.wait(LONG)
        # The action ran before anyone was released: exactly once per generation so far.
    b.close()
    arr.close()


def wait_forever_worker(name: str) -> None:
    b = SafeBarrier.attach(name)
    b.wait()


def action_forever_worker(name: str, go_name: str) -> None:
    b = SafeBarrier.attach(name, action=lambda: time.sleep(3600))
    assert SafeEvent.attach(go_name).wait(LONG)
    b.wait()


def wait_once_worker(name: str) -> None:
    b = SafeBarrier.attach(name)
    b.wait(LONG)
    b.close()


def wait_report_worker(name: str) -> None:
    b = SafeBarrier.attach(name)
    try:
        b.wait(LONG)
    except BrokenBarrierError:
        os._exit(3)
    os._exit(0)


def die_in_section_worker(name: str, where: str, go_name: str) -> None:
    """Arrive, then SIGKILL this process holding the internal mutex: after the arrival is
    stored (``await``) or before the last arrival's pass commits (``pass``)."""

    def die(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "await":
        SafeBarrier._await_outcome = die  # type: ignore[method-assign, assignment]
    else:
        SafeBarrier._pass = die  # type: ignore[method-assign, assignment]
    b = SafeBarrier.attach(name)
    if go_name:
        assert SafeEvent.attach(go_name).wait(LONG)
    b.wait(LONG)


def stop_in_section_worker(name: str, ready_name: str) -> None:
    b = SafeBarrier.attach(name)
    ready = SafeEvent.attach(ready_name)
    with b._section():
        ready.set()
        os.kill(os.getpid(), signal.SIGSTOP)


def _wait_until(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


# -- lifecycle and bad input ----------------------------------------------------------------
def test_lifecycle_with_create_unlinks() -> None:
    with SafeBarrier.create(1) as b:
        name = b.name
        assert b.wait(1.0) == 0
        assert b.parties == 1
    assert b.closed
    with pytest.raises(FileNotFoundError):
        SafeBarrier.attach(name)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"parties": 0}, ValueError),
        ({"parties": -1}, ValueError),
        ({"parties": 1 << 40}, ValueError),
        ({"parties": 2.0}, TypeError),
        ({"parties": True}, TypeError),
        ({"parties": "2"}, TypeError),
        ({"parties": 2, "action": 3}, TypeError),
        ({"parties": 2, "timeout": "1"}, TypeError),
        ({"parties": 2, "timeout": True}, TypeError),
        ({"parties": 2, "timeout": float("nan")}, ValueError),
        ({"parties": 2, "timeout": -1}, ValueError),
        ({"parties": 2, "processes": 0}, ValueError),
        ({"parties": 2, "processes": 1.5}, TypeError),
    ],
)
def test_bad_input_creates_nothing(kwargs: dict[str, Any], error: type[Exception]) -> None:
    name = f"bad-barrier-{os.getpid()}"
    with pytest.raises(error):
        SafeBarrier.create(**kwargs, name=name)
    with pytest.raises(FileNotFoundError):
        SafeBarrier.attach(name)
    with pytest.raises(error):
        SafeBarrier.open(name, **kwargs)
    with pytest.raises(FileNotFoundError):
        SafeBarrier.attach(name)


def test_bad_wait_timeout_changes_nothing(barrier2: SafeBarrier) -> None:
    with pytest.raises(TypeError):
        barrier2.wait("1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nan"):
        barrier2.wait(float("nan"))
    assert barrier2.n_waiting == 0
    assert not barrier2.broken


def test_negative_wait_timeout_times_out_at_once(barrier2: SafeBarrier) -> None:
    t0 = time.monotonic()
    with pytest.raises(BrokenBarrierError):
        barrier2.wait(-1)
    assert time.monotonic() - t0 < 1.0
    assert barrier2.broken


def test_open_creates_or_attaches_and_checks_parties() -> None:
    name = f"open-barrier-{os.getpid()}"
    a = SafeBarrier.open(name, 2)
    try:
        b = SafeBarrier.open(name, 2, timeout=5.0)
        assert b.parties == 2
        with pytest.raises(IncompatibleSegmentError, match="parties=2"):
            SafeBarrier.open(name, 3)
        with pytest.raises(IncompatibleSegmentError):
            SafeBarrier.open(name, 2, processes=7)
        with pytest.raises(IncompatibleSegmentError):
            SafeEvent.attach(name)
        t = threading.Thread(target=b.wait)
        t.start()
        assert a.wait(LONG) in (0, 1)
        t.join(LONG)
        b.close()
    finally:
        a.close()
        a.unlink()


def test_pickling_by_reference_carries_timeout_not_action(barrier2: SafeBarrier) -> None:
    h = SafeBarrier.attach(barrier2.name, action=lambda: None, timeout=0.05)
    c = pickle.loads(pickle.dumps(h))
    try:
        assert c.name == barrier2.name
        assert c._timeout == 0.05
        assert c._action is None
        t0 = time.monotonic()
        with pytest.raises(BrokenBarrierError):
            c.wait()  # its default timeout
        assert time.monotonic() - t0 < 5.0
        assert barrier2.broken
    finally:
        c.close()
        h.close()
    with pytest.raises(SegmentClosedError):
        pickle.dumps(h)


def test_statistics_and_repr(barrier2: SafeBarrier) -> None:
    s = barrier2.statistics()
    assert (s.parties, s.n_waiting, s.broken, s.generations, s.resets) == (2, 0, False, 0, 0)
    assert "parties=2" in repr(barrier2)
    t = threading.Thread(target=lambda: barrier2.wait(LONG))
    t.start()
    _wait_until(lambda: barrier2.n_waiting == 1)
    assert barrier2.statistics().n_waiting == 1
    barrier2.wait(LONG)
    t.join(LONG)
    barrier2.abort()
    s = barrier2.statistics()
    assert (s.broken, s.generations, s.n_waiting) == (True, 1, 0)
    assert "broken=True" in repr(barrier2)
    barrier2.reset()
    assert barrier2.statistics().resets == 1


# -- multi-process generations ----------------------------------------------------------------
@pytest.mark.parametrize("parties", [2, 3])
def test_every_generation_passed_by_exactly_parties(parties: int) -> None:
    generations = 150
    with (
        SafeBarrier.create(parties) as b,
        SafeArray.create("q", generations * parties) as arr,
    ):
        run_all("fork", generations_worker, [(b.name, arr.name, generations)] * parties, 60)
        # Each generation's arrival indices are exactly 0 .. parties-1, once each.
        assert list(arr) == [1] * (generations * parties)
        assert b.statistics().generations == generations
        assert not b.broken


def test_action_runs_once_per_generation_in_one_process() -> None:
    generations = 100
    with SafeBarrier.create(3) as b, SafeArray.create("q", 1) as arr:
        run_all("fork", action_worker, [(b.name, arr.name, generations)] * 3, 60)
        assert arr[0] == generations


# -- dead parties -----------------------------------------------------------------------------
def test_sigkilled_waiter_breaks_the_barrier_at_once() -> None:
    with SafeBarrier.create(3) as b:
        with processes("fork", wait_forever_worker, [(b.name,)]) as (p,):
            _wait_until(lambda: b.n_waiting == 1)
            killed_at: list[float] = []

            def killer() -> None:
                _wait_until(lambda: b.n_waiting == 2)  # the child and this test wait
                time.sleep(0.2)
                killed_at.append(time.monotonic())
                kill_and_reap(p)

            k = threading.Thread(target=killer)
            k.start()
            try:
                with (
                    pytest.warns(HolderDiedWarning, match="generation 0"),
                    pytest.raises(BrokenBarrierError),
                ):
                    b.wait(LONG)
                elapsed = time.monotonic() - killed_at[0]
            finally:
                k.join(LONG)
        assert elapsed < 1.0, elapsed  # a slice (0.1 s) plus scheduling, far below LONG
        assert b.broken
        # reset() makes it usable again, with new parties.
        b.reset()
        assert not b.broken
        with processes("fork", wait_once_worker, [(b.name,), (b.name,)]) as procs:
            assert b.wait(LONG) in (0, 1, 2)
            for q in procs:
                q.join(LONG)
                assert q.exitcode == 0


def test_a_party_killed_before_the_others_arrive_breaks_the_barrier() -> None:
    # Nobody else waited when it died, so no sleeper reaped it: the last arrival must not
    # pass the generation with a dead party (it did, returning an index to every survivor).
    with SafeBarrier.create(3) as b:
        with processes("fork", wait_forever_worker, [(b.name,)]) as (p,):
            _wait_until(lambda: b.n_waiting == 1)
            kill_and_reap(p)
        got: list[object] = []

        def arrive() -> None:
            try:
                got.append(b.wait(LONG))
            except BrokenBarrierError as e:
                got.append(type(e))

        other = threading.Thread(target=arrive)
        other.start()
        _wait_until(lambda: b.n_waiting == 2)
        with pytest.warns(HolderDiedWarning, match="generation 0") as caught:
            arrive()
        other.join(LONG)
        assert got == [BrokenBarrierError, BrokenBarrierError]
        # The warning names the user's call, not a line inside safeshm.
        assert {w.filename for w in caught if w.category is HolderDiedWarning} == {__file__}
        assert b.broken


def test_party_killed_inside_the_action_breaks_the_barrier(barrier2: SafeBarrier) -> None:
    killed_at: list[float] = []
    with (
        SafeEvent.create() as go,
        processes("fork", action_forever_worker, [(barrier2.name, go.name)]) as (p,),
    ):

        def arrive_last_then_kill() -> None:
            _wait_until(lambda: barrier2.n_waiting == 1)  # this test's main thread waits
            go.set()  # the child arrives last
            _wait_until(lambda: barrier2.n_waiting == 2)  # the child runs the action
            time.sleep(0.2)
            killed_at.append(time.monotonic())
            kill_and_reap(p)

        k = threading.Thread(target=arrive_last_then_kill)
        k.start()
        try:
            with pytest.warns(HolderDiedWarning), pytest.raises(BrokenBarrierError):
                barrier2.wait(LONG)
            elapsed = time.monotonic() - killed_at[0]
        finally:
            k.join(LONG)
    assert elapsed < 1.0, elapsed
    assert barrier2.broken


@pytest.mark.parametrize("where", ["await", "pass"])
def test_party_killed_holding_the_internal_mutex(where: str) -> None:
    """The worst moment: a party dies inside the critical section, after storing its
    arrival (or, as the last party, before the pass commits). The mutex is recovered, the
    dead party reaped and the barrier broken; reset() makes it usable again."""
    parties = 3 if where == "await" else 2
    with SafeBarrier.create(parties) as b:
        if where == "pass":
            with (
                SafeEvent.create() as go,
                processes("fork", die_in_section_worker, [(b.name, where, go.name)]) as (p,),
            ):
                threading.Timer(
                    0.0, lambda: (_wait_until(lambda: b.n_waiting == 1), go.set())
                ).start()
                with pytest.warns(HolderDiedWarning), pytest.raises(BrokenBarrierError):
                    b.wait(LONG)  # the child arrives last and dies before its pass commits
                p.join(LONG)
                assert p.exitcode == -signal.SIGKILL
        else:
            with processes("fork", die_in_section_worker, [(b.name, where, "")]) as (p,):
                p.join(LONG)
            assert p.exitcode == -signal.SIGKILL
            with pytest.warns(HolderDiedWarning), pytest.raises(BrokenBarrierError):
                b.wait(LONG)  # recovers the mutex, reaps the party: broken at once
        assert b.broken
        b.reset()
        assert (b.broken, b.n_waiting) == (False, 0)
        ts = [threading.Thread(target=b.wait, args=(LONG,)) for _ in range(parties - 1)]
        for t in ts:
            t.start()
        assert b.wait(LONG) in range(parties)
        for t in ts:
            t.join(LONG)


def test_a_party_that_passed_and_exited_is_not_a_dead_holder(barrier2: SafeBarrier) -> None:
    with processes("fork", wait_once_worker, [(barrier2.name,)]) as (p,):
        barrier2.wait(LONG)
        p.join(LONG)
        assert p.exitcode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BrokenBarrierError):
            barrier2.wait(0.3)  # reaps the exited process's stale record: no warning


# -- actions, timeouts, abort, reset ------------------------------------------------------------
def test_action_raising_breaks_the_barrier() -> None:
    def boom() -> None:
        raise KeyError("action")

    with SafeBarrier.create(2, action=boom) as b:
        other = SafeBarrier.attach(b.name)
        got: list[BaseException] = []

        def first() -> None:
            try:
                other.wait(LONG)
            except BaseException as e:  # noqa: BLE001
                got.append(e)

        t = threading.Thread(target=first)
        t.start()
        _wait_until(lambda: b.n_waiting == 1)
        with pytest.raises(KeyError, match="action"):
            b.wait(LONG)  # last to arrive: runs this handle's action
        t.join(LONG)
        assert len(got) == 1
        assert isinstance(got[0], BrokenBarrierError)
        assert b.broken
        with pytest.raises(BrokenBarrierError):
            other.wait(LONG)
        b.reset()
        other.close()


def test_timeout_breaks_the_barrier(barrier2: SafeBarrier) -> None:
    t0 = time.monotonic()
    with pytest.raises(BrokenBarrierError):
        barrier2.wait(0.2)
    assert 0.2 <= time.monotonic() - t0 < 2.0
    assert barrier2.broken
    with pytest.raises(BrokenBarrierError):
        barrier2.wait(LONG)  # broken: at once


def test_stopped_section_holder_does_not_stretch_a_timeout(barrier2: SafeBarrier) -> None:
    with (
        SafeEvent.create() as ready,
        processes("fork", stop_in_section_worker, [(barrier2.name, ready.name)]) as (p,),
    ):
        try:
            assert ready.wait(LONG)
            t0 = time.monotonic()
            with pytest.raises(BrokenBarrierError):
                barrier2.wait(0.3)
            assert time.monotonic() - t0 < 1.5
        finally:
            kill_and_reap(p)
    # The killed holder's mutex is recovered by the next user.
    barrier2.reset()
    assert not barrier2.broken


def test_reset_wakes_waiters_with_broken_and_generation_logic(barrier2: SafeBarrier) -> None:
    got: list[object] = []

    def waiter() -> None:
        try:
            got.append(barrier2.wait(LONG))
        except BrokenBarrierError as e:
            got.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    _wait_until(lambda: barrier2.n_waiting == 1)
    barrier2.reset()
    t.join(LONG)
    assert len(got) == 1
    assert isinstance(got[0], BrokenBarrierError)
    assert not barrier2.broken
    assert barrier2.n_waiting == 0


def test_close_from_another_thread_interrupts_a_waiter() -> None:
    with SafeBarrier.create(2) as b:
        h = SafeBarrier.attach(b.name)
        got: list[BaseException] = []
        done_at: list[float] = []

        def waiter() -> None:
            try:
                h.wait(LONG)
            except BaseException as e:  # noqa: BLE001
                got.append(e)
            done_at.append(time.monotonic())

        t = threading.Thread(target=waiter)
        t.start()
        _wait_until(lambda: b.n_waiting == 1)
        t0 = time.monotonic()
        h.close()
        t.join(LONG)
        assert isinstance(got[0], SegmentClosedError)
        assert done_at[0] - t0 < 1.0
        assert b.broken  # the party left: the others are told
        with pytest.raises(SegmentClosedError):
            h.wait(LONG)
        with pytest.raises(SegmentClosedError):
            h.reset()


def _stop_outside_section(b: SafeBarrier, pid: int) -> None:
    """SIGSTOP ``pid`` (asleep in ``b.wait``) at a moment it does not hold the mutex."""
    for _ in range(100):
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)
        try:
            with b._section(time.monotonic() + 0.05):
                return
        except _Timeout:
            os.kill(pid, signal.SIGCONT)
    raise AssertionError("could not stop the waiter outside the section")


@pytest.mark.parametrize("order", ["pass-then-reset", "reset-then-pass"])
def test_a_late_waker_tells_a_pass_from_a_reset(barrier2: SafeBarrier, order: str) -> None:
    """A waiter that wakes only after its generation ended and a reset came: it passed iff
    its generation passed before the reset (the reset_gen word)."""
    with processes("fork", wait_report_worker, [(barrier2.name,)]) as (p,):
        _wait_until(lambda: barrier2.n_waiting == 1)
        _stop_outside_section(barrier2, p.pid)
        try:
            if order == "pass-then-reset":
                assert barrier2.wait(LONG) == 1  # passes the child's generation
                barrier2.reset()
            else:
                barrier2.reset()  # the child's generation is reset...
                t = threading.Thread(target=barrier2.wait, args=(LONG,))
                t.start()
                assert barrier2.wait(LONG) in (0, 1)  # ...and the next one passes
                t.join(LONG)
        finally:
            os.kill(p.pid, signal.SIGCONT)
        p.join(LONG)
        assert p.exitcode == (0 if order == "pass-then-reset" else 3)


# -- a state machine against threading.Barrier ------------------------------------------------
def _remote_waiter(name: str, conn: Any) -> None:
    """Serve wait requests on a handle in this process: one thread per request, each
    sending ``(waiter id, index or "broken")`` back when its wait ends."""
    b = SafeBarrier.attach(name)
    send_lock = threading.Lock()
    threads = []

    def one(wid: int) -> None:
        try:
            out: object = b.wait(LONG)
        except BrokenBarrierError:
            out = "broken"
        with send_lock:
            conn.send((wid, out))

    while True:
        msg = conn.recv()
        if msg is None:
            break
        t = threading.Thread(target=one, args=(msg,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(LONG)
    b.close()


class BarrierMachine(RuleBasedStateMachine):
    """wait (in this process or another), abort and reset, one step at a time, against
    ``threading.Barrier``: every wait's outcome (its index or broken), ``n_waiting`` and
    ``broken`` agree once both have settled."""

    def __init__(self) -> None:
        super().__init__()
        self.model: threading.Barrier | None = None
        self.real: SafeBarrier | None = None
        self.outcomes: dict[tuple[str, int], object] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.started: set[int] = set()
        self.wid = 0

    @initialize(parties=st.integers(1, 3))
    def setup(self, parties: int) -> None:
        self.model = threading.Barrier(parties)
        self.real = SafeBarrier.create(parties)
        self.conn, child = fork.Pipe()
        self.proc = fork.Process(target=_remote_waiter, args=(self.real.name, child), daemon=True)
        self.proc.start()
        child.close()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                wid, out = self.conn.recv()
                with self.lock:
                    self.outcomes["real", wid] = out

    def _waiter(self, which: str, b: Any, wid: int) -> None:
        try:
            out: object = b.wait(LONG)
        except BrokenBarrierError:
            out = "broken"
        with self.lock:
            self.outcomes[which, wid] = out

    def _settle(self) -> None:
        assert self.model is not None and self.real is not None
        deadline = time.monotonic() + LONG
        while True:
            with self.lock:
                pend_model = sum(("model", w) not in self.outcomes for w in self.started)
                pend_real = sum(("real", w) not in self.outcomes for w in self.started)
            if pend_model == self.model.n_waiting and pend_real == self.real.n_waiting:
                break
            assert time.monotonic() < deadline, "did not settle"
            time.sleep(0.002)
        with self.lock:
            for w in self.started:
                assert self.outcomes.get(("model", w)) == self.outcomes.get(("real", w)), w
        assert self.model.broken == self.real.broken
        assert self.model.n_waiting == self.real.n_waiting

    @rule(remote=st.booleans())
    def wait(self, remote: bool) -> None:
        self.wid += 1
        wid = self.wid
        self.started.add(wid)
        t = threading.Thread(target=self._waiter, args=("model", self.model, wid))
        t.start()
        self.threads.append(t)
        if remote:
            self.conn.send(wid)
        else:
            t = threading.Thread(target=self._waiter, args=("real", self.real, wid))
            t.start()
            self.threads.append(t)
        self._settle()

    @rule()
    def abort(self) -> None:
        assert self.model is not None and self.real is not None
        self.model.abort()
        self.real.abort()
        self._settle()

    @rule()
    def reset(self) -> None:
        assert self.model is not None and self.real is not None
        self.model.reset()
        self.real.reset()
        self._settle()

    def teardown(self) -> None:
        if self.real is None or self.model is None:
            return
        self.model.abort()
        self.real.abort()
        with contextlib.suppress(OSError):
            self.conn.send(None)
        for t in self.threads:
            t.join(LONG)
        self.proc.join(LONG)
        if self.proc.is_alive():  # pragma: no cover
            kill_and_reap(self.proc)
        self.conn.close()
        self.reader.join(LONG)
        self.real.close()
        self.real.unlink()


TestBarrierMachine = BarrierMachine.TestCase
TestBarrierMachine.settings = settings(stateful_step_count=15)
