"""ShardedCounter: per-thread slots, exact sums, dead owners' slots kept and reused."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import warnings
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import safeshm

from ._helpers import (
    JOIN_TIMEOUT,
    PROMPT,
    START_METHODS,
    Remote,
    adds_then_report_worker,
    attach_add_exit_worker,
    exchange_drain_worker,
    kill_and_reap,
    processes,
    run_all,
    threaded_adds_worker,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.fixture
def counter(cleanup: Any) -> safeshm.ShardedCounter:
    return cleanup(safeshm.ShardedCounter.create())  # type: ignore[no-any-return]


def test_operations(counter: safeshm.ShardedCounter) -> None:
    assert counter.value == 0
    assert counter.add() is None
    counter.add(41)
    counter.add(-2)
    assert counter.value == 40
    counter.set(5)
    assert counter.value == 5
    counter.add(1)
    assert counter.exchange(0) == 6
    assert counter.value == 0
    assert not hasattr(counter, "compare_and_set")


def test_created_through_safecounter(cleanup: Any, name: str) -> None:
    c = cleanup(safeshm.SafeCounter.create(7, name=name, sharded=True, slots=8))
    assert type(c) is safeshm.ShardedCounter
    assert c.value == 7
    assert c.statistics().slots == 8
    d = safeshm.SafeCounter.open(name, sharded=True)
    try:
        assert type(d) is safeshm.ShardedCounter
        d.add(1)
        assert c.value == 8
    finally:
        d.close()


def test_slots_argument_only_for_sharded() -> None:
    with pytest.raises(TypeError, match="sharded"):
        safeshm.SafeCounter.create(slots=4)  # type: ignore[call-overload]


@pytest.mark.parametrize("bad", [0, -1, 2**16 + 1])
def test_bad_slot_counts(bad: int) -> None:
    with pytest.raises(ValueError, match="slots"):
        safeshm.ShardedCounter.create(slots=bad)


def test_bad_inputs_change_nothing(counter: safeshm.ShardedCounter) -> None:
    counter.add(3)
    for bad in (1.5, "1", None, [1]):
        with pytest.raises(TypeError, match="must be an int"):
            counter.add(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            counter.set(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            counter.exchange(bad)  # type: ignore[arg-type]
    for bad in (2**64, -(2**64)):
        with pytest.raises(OverflowError):
            counter.add(bad)
    for bad in (2**63, INT64_MIN - 1):
        with pytest.raises(OverflowError):
            counter.set(bad)
        with pytest.raises(OverflowError):
            counter.exchange(bad)
    assert counter.value == 3


def test_slot_overflow_spills_into_the_shared_word(counter: safeshm.ShardedCounter) -> None:
    counter.add(INT64_MAX)
    counter.add(10)  # this thread's slot is full: lands in the shared word
    assert counter.value == INT64_MAX + 10
    counter.add(-INT64_MAX)
    assert counter.value == 10


def test_overflow_of_slot_and_shared_word(cleanup: Any) -> None:
    c = cleanup(safeshm.ShardedCounter.create(INT64_MAX))
    c.add(INT64_MAX)
    with pytest.raises(OverflowError, match="nothing was changed"):
        c.add(1)
    assert c.value == 2 * INT64_MAX


def test_each_thread_gets_its_own_slot(counter: safeshm.ShardedCounter) -> None:
    n, adds = 8, 5000
    added = threading.Barrier(n + 1)
    finish = threading.Event()

    def work() -> None:
        for _ in range(adds):
            counter.add(1)
        added.wait(timeout=JOIN_TIMEOUT)
        finish.wait(timeout=JOIN_TIMEOUT)

    ts = [threading.Thread(target=work) for _ in range(n)]
    for t in ts:
        t.start()
    added.wait(timeout=JOIN_TIMEOUT)
    # All n threads are alive and have added: each owns its own slot.
    stats = counter.statistics()
    assert stats.slots_in_use == n
    assert stats.slots_ever_used == n
    assert counter.value == n * adds
    finish.set()
    for t in ts:
        t.join(timeout=JOIN_TIMEOUT)
    # The threads ended: their slots were released; their values stay in the sum.
    stats = counter.statistics()
    assert stats.slots_in_use == 0
    assert counter.value == n * adds
    counter.add(1)
    assert counter.statistics().slots_in_use == 1
    assert counter.value == n * adds + 1


def test_close_frees_the_closing_threads_slot_now_and_others_at_thread_exit(
    counter: safeshm.ShardedCounter,
) -> None:
    """Another thread may be in the middle of an add when the handle is closed, so its
    slot must stay owned until that thread ends -- never handed to another process while
    a write into it may still land."""
    h = safeshm.ShardedCounter.attach(counter.name)
    added, finish = threading.Event(), threading.Event()

    def other() -> None:
        h.add(5)
        added.set()
        finish.wait(timeout=JOIN_TIMEOUT)

    t = threading.Thread(target=other)
    t.start()
    assert added.wait(JOIN_TIMEOUT)
    h.add(1)
    assert counter.statistics().slots_in_use == 2
    h.close()
    assert counter.statistics().slots_in_use == 1  # ours freed, the other thread's kept
    finish.set()
    t.join(timeout=JOIN_TIMEOUT)
    assert counter.statistics().slots_in_use == 0
    assert counter.value == 6


def test_dropped_handle_frees_its_slots(counter: safeshm.ShardedCounter) -> None:
    import gc

    h = safeshm.ShardedCounter.attach(counter.name)
    h.add(3)
    assert counter.statistics().slots_in_use == 1
    del h
    gc.collect()
    assert counter.statistics().slots_in_use == 0
    assert counter.value == 3


def test_finished_threads_slots_are_reused(cleanup: Any) -> None:
    c = cleanup(safeshm.ShardedCounter.create(slots=2))  # no warning: slots are freed
    for _ in range(20):  # 20 short-lived threads, 2 slots
        t = threading.Thread(target=lambda: [c.add(1) for _ in range(100)])
        t.start()
        t.join(timeout=JOIN_TIMEOUT)
    assert c.value == 2000
    assert c.statistics().slots_ever_used <= 2


def test_more_threads_than_slots_falls_back_exactly(cleanup: Any) -> None:
    c = cleanup(safeshm.ShardedCounter.create(slots=2))
    n, adds = 6, 2000
    all_in = threading.Barrier(n + 1)
    go = threading.Event()

    def work() -> None:
        c.add(1)  # claims a slot, or finds none left
        all_in.wait(timeout=JOIN_TIMEOUT)
        go.wait(timeout=JOIN_TIMEOUT)
        for _ in range(adds - 1):
            c.add(1)

    # Recorded here, around all the threads: catch_warnings swaps process-wide state and
    # must not be entered by several threads at once.
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        ts = [threading.Thread(target=work) for _ in range(n)]
        for t in ts:
            t.start()
        all_in.wait(timeout=JOIN_TIMEOUT)
        assert c.statistics().slots_in_use == 2  # four threads are on the fallback path
        go.set()
        for t in ts:
            t.join(timeout=JOIN_TIMEOUT)
    assert len(warned) == 1  # said once per handle, not once per thread or per add
    assert issubclass(warned[0].category, safeshm.SafeShmWarning)
    assert "all 2 slots" in str(warned[0].message)
    assert c.value == n * adds


@pytest.mark.parametrize("method", START_METHODS)
def test_processes_and_threads_exact(method: str, counter: safeshm.ShardedCounter) -> None:
    procs, threads, adds = 3, 3, 4000
    barrier = multiprocessing.get_context(method).Barrier(procs)
    run_all(method, threaded_adds_worker, [(counter, barrier, threads, adds, 2)] * procs)
    assert counter.value == procs * threads * adds * 2


def test_dead_processes_slots_keep_their_value_and_are_reused(cleanup: Any) -> None:
    """More short-lived processes than slots, each exiting without close(): nothing is
    lost, and the dead owners' slots are handed on."""
    c = cleanup(safeshm.ShardedCounter.create(slots=3))
    for _ in range(8):
        run_all("fork", attach_add_exit_worker, [(c.name, 250)] * 2)
    assert c.value == 8 * 2 * 250
    stats = c.statistics()
    assert stats.slots_ever_used <= 3
    assert stats.slots_in_use == 0


@pytest.mark.parametrize("method", START_METHODS)
def test_sigkill_mid_add(method: str, counter: safeshm.ShardedCounter) -> None:
    ctx = multiprocessing.get_context(method)
    for i in range(4):
        progress = ctx.RawValue("q", 0)
        ready = ctx.Event()
        before = counter.value
        with processes(method, adds_then_report_worker, [(counter, progress, ready)]) as (p,):
            assert ready.wait(JOIN_TIMEOUT)
            time.sleep(0.05 + 0.05 * i)
            kill_and_reap(p)
        done = progress.value
        assert done > 0
        assert counter.value - before in (done, done + 1)
    counter.add(1)  # the survivors carry on


def test_forked_child_does_not_share_the_parents_slot(counter: safeshm.ShardedCounter) -> None:
    """fork() copies the parent's thread-locals, slot index included; the child must take
    a slot of its own, or the two processes' adds into one slot would be lost."""
    counter.add(1)  # the parent's main thread owns a slot now
    n = 200_000
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(go_w)
            os.read(go_r, 1)  # start together with the parent
            for _ in range(n):
                counter.add(1)
        finally:
            os._exit(0)
    os.close(go_r)
    os.write(go_w, b"x")
    os.close(go_w)
    for _ in range(n):
        counter.add(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert counter.value == 2 * n + 1


def test_fork_keeps_the_parents_other_threads_slots(counter: safeshm.ShardedCounter) -> None:
    """A forked child drops the copies of the parent's other threads' leases (their thread
    states are cleared in the child, before any at-fork hook has run): that must not free
    the parent's slots, which those threads still write into."""
    counter.add(1)
    added, finish = threading.Event(), threading.Event()

    def other() -> None:
        counter.add(1)
        added.set()
        finish.wait(timeout=JOIN_TIMEOUT)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert added.wait(JOIN_TIMEOUT)
        assert counter.statistics().slots_in_use == 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
            pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert counter.statistics().slots_in_use == 2
    finally:
        finish.set()
        t.join(timeout=JOIN_TIMEOUT)


def test_exchange_accounts_every_add_exactly_once(counter: safeshm.ShardedCounter) -> None:
    """exchange(0) racing with adds in other processes: drained + left == added."""
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    drained = ctx.RawValue("q", 0)
    procs, threads, adds = 2, 2, 5000
    barrier = ctx.Barrier(procs)
    with processes("fork", exchange_drain_worker, [(counter, stop, drained)]) as (drainer,):
        run_all("fork", threaded_adds_worker, [(counter, barrier, threads, adds, 1)] * procs)
        stop.set()
        drainer.join(timeout=JOIN_TIMEOUT)
        assert drainer.exitcode == 0
    assert drained.value + counter.value == procs * threads * adds
    assert drained.value > 0


def test_killed_while_holding_the_lock(counter: safeshm.ShardedCounter) -> None:
    ctx = multiprocessing.get_context("fork")
    holding = ctx.Event()
    counter.add(5)

    def hold() -> None:
        counter._mutex.acquire()
        holding.set()
        time.sleep(JOIN_TIMEOUT)

    with processes("fork", hold, [()]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        kill_and_reap(p)
    t0 = time.monotonic()
    assert counter.exchange(1) == 5
    assert time.monotonic() - t0 < PROMPT
    assert counter.value == 1


# -- a model-based state machine ---------------------------------------------------------------
class ShardedMachine(RuleBasedStateMachine):
    """Handles in this process (on several threads) and in a server process, against an int."""

    remote: Remote | None = None

    def __init__(self) -> None:
        super().__init__()
        self.model = 0
        self.c: safeshm.ShardedCounter | None = None

    @initialize(initial=st.integers(-(10**12), 10**12), slots=st.integers(1, 4))
    def create(self, initial: int, slots: int) -> None:
        self.c = safeshm.ShardedCounter.create(initial, slots=slots)
        self.model = initial
        assert self.remote is not None
        self.remote.attach("ShardedCounter", self.c.name)

    @rule(delta=st.integers(-(10**6), 10**6), where=st.sampled_from(["here", "thread", "remote"]))
    def add(self, delta: int, where: str) -> None:
        assert self.c is not None
        if where == "here":
            self.c.add(delta)
        elif where == "thread":
            t = threading.Thread(target=self.c.add, args=(delta,))
            t.start()
            t.join(timeout=JOIN_TIMEOUT)
        else:
            assert self.remote is not None
            self.remote.call(self.c.name, "add", delta)
        self.model += delta

    @rule(v=st.integers(-(10**12), 10**12), remote=st.booleans())
    def exchange(self, v: int, remote: bool) -> None:
        assert self.c is not None and self.remote is not None
        old = self.remote.call(self.c.name, "exchange", v) if remote else self.c.exchange(v)
        assert old == self.model
        self.model = v

    @rule(v=st.integers(-(10**12), 10**12))
    def set(self, v: int) -> None:
        assert self.c is not None
        self.c.set(v)
        self.model = v

    @invariant()
    def agree(self) -> None:
        if self.c is None:
            return
        assert self.c.value == self.model
        assert self.remote is not None
        assert self.remote.call(self.c.name, "value") == self.model

    def teardown(self) -> None:
        if self.c is not None:
            assert self.remote is not None
            self.remote.detach(self.c.name)
            self.c.close()
            self.c.unlink()


@pytest.mark.filterwarnings("ignore::safeshm.SafeShmWarning")  # 1-slot counters run out
def test_state_machine(remote: Remote) -> None:
    ShardedMachine.remote = remote
    try:
        ShardedMachine.TestCase.settings = settings(stateful_step_count=25)
        ShardedMachine.TestCase().runTest()
    finally:
        ShardedMachine.remote = None


@pytest.mark.filterwarnings("ignore::safeshm.SafeShmWarning")  # fewer slots than threads
@settings(max_examples=10)
@given(
    deltas=st.lists(st.integers(-1000, 1000), min_size=1, max_size=50),
    threads=st.integers(1, 6),
    slots=st.integers(1, 8),
)
def test_threads_hypothesis(deltas: list[int], threads: int, slots: int) -> None:
    c = safeshm.ShardedCounter.create(slots=slots)
    try:
        ts = [threading.Thread(target=lambda: [c.add(d) for d in deltas]) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=JOIN_TIMEOUT)
        assert c.value == sum(deltas) * threads
    finally:
        c.close()
        c.unlink()


def test_open_checks_slots_when_given(name: str, cleanup: Any) -> None:
    """One rule for every open(): a parameter given explicitly must match the segment."""
    c = cleanup(safeshm.ShardedCounter.open(name, 3, slots=8))
    with pytest.raises(safeshm.IncompatibleSegmentError, match="8 slots; expected 4"):
        safeshm.ShardedCounter.open(name, slots=4)
    for same in (safeshm.ShardedCounter.open(name), safeshm.ShardedCounter.open(name, slots=8)):
        assert same.statistics().slots == 8
        same.close()
    assert c.value == 3
