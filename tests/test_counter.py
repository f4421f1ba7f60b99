"""SafeCounter: exact, linearizable int64 operations from any mix of processes and threads."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import safeshm
from safeshm import _compat

from ._helpers import (
    JOIN_TIMEOUT,
    PROMPT,
    START_METHODS,
    Remote,
    adds_then_report_worker,
    counter_ops_worker,
    kill_and_reap,
    processes,
    run_all,
    threaded_adds_worker,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
int64s = st.integers(INT64_MIN, INT64_MAX)


@pytest.fixture(params=["atomic", "locked"])
def make(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, cleanup: Any
) -> Callable[..., safeshm.SafeCounter]:
    """Create counters with either implementation (children attach and follow the
    segment's recorded implementation)."""
    if request.param == "locked":
        monkeypatch.setattr(_compat, "compare_exchange", None)
    elif _compat.compare_exchange is None:  # pragma: no cover
        pytest.skip("libatomic not available")

    def factory(*args: Any, **kwargs: Any) -> safeshm.SafeCounter:
        c = cleanup(safeshm.SafeCounter.create(*args, **kwargs))
        expected = (
            "lock-free (atomic compare-and-swap)" if request.param == "atomic" else "robust lock"
        )
        assert c.implementation == expected
        return c  # type: ignore[no-any-return]

    return factory


def test_operations(make: Callable[..., safeshm.SafeCounter]) -> None:
    c = make()
    assert c.value == 0
    assert c.add() == 1
    assert c.add(41) == 42
    assert c.add(-50) == -8
    c.set(10)
    assert c.value == 10
    assert c.exchange(3) == 10
    assert c.value == 3
    assert c.compare_and_set(3, 7) is True
    assert c.compare_and_set(3, 9) is False
    assert c.value == 7
    s = c.statistics()
    assert (s.name, s.value) == (c.name, 7)


def test_initial_value(make: Callable[..., safeshm.SafeCounter]) -> None:
    assert make(INT64_MIN).value == INT64_MIN
    assert make(INT64_MAX).value == INT64_MAX
    assert make(name=None, initial=5).value == 5


@pytest.mark.parametrize("bad", [2**63, -(2**63) - 1, 10**30])
def test_initial_out_of_range(bad: int) -> None:
    with pytest.raises(OverflowError):
        safeshm.SafeCounter.create(bad)


@pytest.mark.parametrize("bad", [1.0, "1", None, [1], 1j])
def test_initial_wrong_type(bad: Any) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        safeshm.SafeCounter.create(bad)


def test_overflow_changes_nothing(make: Callable[..., safeshm.SafeCounter]) -> None:
    c = make(INT64_MAX)
    with pytest.raises(OverflowError, match="int64"):
        c.add(1)
    assert c.value == INT64_MAX
    c.set(INT64_MIN)
    with pytest.raises(OverflowError):
        c.add(-1)
    assert c.value == INT64_MIN
    for bad in (2**63, INT64_MIN - 1):
        with pytest.raises(OverflowError):
            c.set(bad)
        with pytest.raises(OverflowError):
            c.exchange(bad)
        with pytest.raises(OverflowError):
            c.compare_and_set(INT64_MIN, bad)
        with pytest.raises(OverflowError):
            c.compare_and_set(bad, 0)
        with pytest.raises(OverflowError):
            c.add(bad * 4)
    assert c.value == INT64_MIN


@pytest.mark.parametrize("bad", [1.5, 1.0, "1", None, b"1", [1], float("nan")])
def test_wrong_types_change_nothing(make: Callable[..., safeshm.SafeCounter], bad: Any) -> None:
    c = make(5)
    for op in (
        c.add,
        c.set,
        c.exchange,
        lambda v: c.compare_and_set(5, v),
        lambda v: c.compare_and_set(v, 6),
    ):
        with pytest.raises(TypeError, match="must be an int"):
            op(bad)
    assert c.value == 5


def test_int_like_operands(make: Callable[..., safeshm.SafeCounter]) -> None:
    np = pytest.importorskip("numpy")
    c = make()
    assert c.add(np.int64(5)) == 5
    c.set(np.int32(7))
    assert c.value == 7
    assert c.compare_and_set(np.int64(7), np.int16(1))
    assert c.value == 1


def test_open_initial_applies_only_on_create(name: str, cleanup: Any) -> None:
    a = cleanup(safeshm.SafeCounter.open(name, 10))
    b = safeshm.SafeCounter.open(name, 99)
    try:
        assert b.value == 10
    finally:
        b.close()
    assert a.value == 10


def test_attaching_atomic_segment_without_atomics(
    monkeypatch: pytest.MonkeyPatch, cleanup: Any
) -> None:
    if _compat.compare_exchange is None:  # pragma: no cover
        pytest.skip("libatomic not available")
    c = cleanup(safeshm.SafeCounter.create())
    monkeypatch.setattr(_compat, "compare_exchange", None)
    with pytest.raises(safeshm.IncompatibleSegmentError, match="libatomic"):
        safeshm.SafeCounter.attach(c.name)


# -- a model-based state machine, with one handle in another process ---------------------------
class CounterMachine(RuleBasedStateMachine):
    """Several handles on one segment (one of them in a server process) against an int."""

    remote: Remote | None = None
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.model = 0
        self.counter: safeshm.SafeCounter | None = None
        self.extra: list[safeshm.SafeCounter] = []

    @initialize(target=handles, initial=int64s)
    def create(self, initial: int) -> Any:
        self.counter = safeshm.SafeCounter.create(initial)
        self.model = initial
        assert self.remote is not None
        self.remote.attach("SafeCounter", self.counter.name)
        return "local"

    @rule(target=handles)
    def attach_another(self) -> Any:
        assert self.counter is not None
        self.extra.append(safeshm.SafeCounter.attach(self.counter.name))
        return len(self.extra) - 1

    @rule(target=handles)
    def use_remote(self) -> Any:
        return "remote"

    def _call(self, which: Any, method: str, *args: Any) -> Any:
        assert self.counter is not None
        if which == "remote":
            assert self.remote is not None
            return self.remote.call(self.counter.name, method, *args)
        h = self.counter if which == "local" else self.extra[which]
        attr = getattr(h, method)
        return attr(*args) if callable(attr) else attr

    @rule(which=handles, delta=st.one_of(st.integers(-5, 5), int64s))
    def add(self, which: Any, delta: int) -> None:
        new = self.model + delta
        if INT64_MIN <= new <= INT64_MAX:
            assert self._call(which, "add", delta) == new
            self.model = new
        else:
            with pytest.raises(OverflowError):
                self._call(which, "add", delta)

    @rule(which=handles, v=int64s)
    def set(self, which: Any, v: int) -> None:
        self._call(which, "set", v)
        self.model = v

    @rule(which=handles, v=int64s)
    def exchange(self, which: Any, v: int) -> None:
        assert self._call(which, "exchange", v) == self.model
        self.model = v

    @rule(which=handles, new=int64s, hit=st.booleans(), other=int64s)
    def compare_and_set(self, which: Any, new: int, hit: bool, other: int) -> None:
        expected = self.model if hit else other
        ok = self._call(which, "compare_and_set", expected, new)
        assert ok == (expected == self.model)
        if ok:
            self.model = new

    @rule(which=handles, bad=st.sampled_from([1.5, "x", None]))
    def bad_input(self, which: Any, bad: Any) -> None:
        with pytest.raises(TypeError):
            self._call(which, "add", bad)

    @invariant()
    def values_agree(self) -> None:
        if self.counter is None:
            return
        assert self.counter.value == self.model
        for h in self.extra:
            assert h.value == self.model
        assert self.remote is not None
        assert self.remote.call(self.counter.name, "value") == self.model

    def teardown(self) -> None:
        for h in self.extra:
            h.close()
        if self.counter is not None:
            assert self.remote is not None
            self.remote.detach(self.counter.name)
            self.counter.close()
            self.counter.unlink()


@pytest.mark.parametrize("impl", ["atomic", "locked"])
def test_state_machine(remote: Remote, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if impl == "locked":
        monkeypatch.setattr(_compat, "compare_exchange", None)
    CounterMachine.remote = remote
    try:
        CounterMachine.TestCase.settings = settings(stateful_step_count=30)
        CounterMachine.TestCase().runTest()
    finally:
        CounterMachine.remote = None


# -- multi-process stress --------------------------------------------------------------------
ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "add", "cas_add", "exchange_add"]), st.integers(-3, 3)
    ),
    min_size=50,
    max_size=400,
)


@pytest.mark.slow
@pytest.mark.parametrize("method", START_METHODS)
@settings(max_examples=6)
@given(per_worker=st.lists(ops_strategy, min_size=2, max_size=4), repeat=st.integers(1, 5))
def test_stress_exact_totals(
    method: str, per_worker: list[list[tuple[str, int]]], repeat: int
) -> None:
    """N processes released together by a barrier apply drawn op mixes: the final value
    is exactly the sum of every worker's net effect."""
    for impl in ("atomic", "locked"):
        saved = _compat.compare_exchange
        if impl == "locked":
            _compat.compare_exchange = None
        try:
            c = safeshm.SafeCounter.create()
        finally:
            _compat.compare_exchange = saved
        try:
            ctx = multiprocessing.get_context(method)
            n = len(per_worker)
            barrier = ctx.Barrier(n)
            nets = ctx.Array("q", n)
            run_all(
                method,
                counter_ops_worker,
                [(c, barrier, ops * repeat, nets, i) for i, ops in enumerate(per_worker)],
            )
            expected = sum(arg for ops in per_worker for _, arg in ops) * repeat
            assert sum(nets[:]) == expected
            assert c.value == expected
        finally:
            c.close()
            c.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("method", START_METHODS)
def test_threads_and_processes_mixed(method: str, make: Callable[..., safeshm.SafeCounter]) -> None:
    c = make()
    procs, threads, adds = 3, 4, 3000
    barrier = multiprocessing.get_context(method).Barrier(procs)
    run_all(method, threaded_adds_worker, [(c, barrier, threads, adds, 1)] * procs)
    # ... and the parent's own threads, concurrently with nothing but each other.
    ts = [threading.Thread(target=lambda: [c.add(-1) for _ in range(adds)]) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=JOIN_TIMEOUT)
    assert c.value == procs * threads * adds - threads * adds


def test_signal_handler_counting_mid_add(cleanup: Any) -> None:
    """A signal handler that counts into the same counter, interrupting add() anywhere,
    must not corrupt the interrupted call (per-call scratch memory). Lock-free only: with
    the lock fallback the handler would find the lock held by its own thread and get a
    LockReentryError, as documented."""
    import signal

    if _compat.compare_exchange is None:  # pragma: no cover
        pytest.skip("libatomic not available")
    c = cleanup(safeshm.SafeCounter.create())
    fired = [0]

    def handler(signum: int, frame: Any) -> None:
        c.add(1000)
        fired[0] += 1

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    try:
        n = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            for _ in range(200):
                c.add(1)
            n += 200
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert fired[0] > 10
    assert c.value == n + 1000 * fired[0]


# -- crashes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", START_METHODS)
def test_sigkill_mid_update_loses_nothing(
    method: str, make: Callable[..., safeshm.SafeCounter]
) -> None:
    """A process killed while adding in a loop: every add it completed is counted, the
    one in flight is counted at most once, and the others carry on at once."""
    c = make()
    ctx = multiprocessing.get_context(method)
    for _ in range(5):
        progress = ctx.RawValue("q", 0)
        ready = ctx.Event()
        before = c.value
        with processes(method, adds_then_report_worker, [(c, progress, ready)]) as (p,):
            assert ready.wait(JOIN_TIMEOUT)
            time.sleep(0.05 + 0.1 * (_ % 3))
            kill_and_reap(p)
        done = progress.value
        assert done > 0
        assert c.value - before in (done, done + 1)
        t0 = time.monotonic()
        c.add(1)
        assert time.monotonic() - t0 < PROMPT


def test_sigkill_while_holding_the_internal_lock(
    monkeypatch: pytest.MonkeyPatch, cleanup: Any
) -> None:
    """Lock-based counters: a process killed holding the counter's lock does not stop the
    others, and the value stays what it was."""
    monkeypatch.setattr(_compat, "compare_exchange", None)
    c = cleanup(safeshm.SafeCounter.create(41))
    ctx = multiprocessing.get_context("fork")
    holding = ctx.Event()

    def hold() -> None:
        c._mutex.acquire()
        holding.set()
        time.sleep(JOIN_TIMEOUT)

    with processes("fork", hold, [()]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        done: list[int] = []
        t = threading.Thread(target=lambda: done.append(c.add(1)))
        t.start()
        time.sleep(0.2)
        assert not done  # blocked behind a live holder: never robbed
        kill_and_reap(p)
        t.join(timeout=PROMPT)
        assert done == [42]
    assert c.value == 42
    assert c._mutex.recoveries == 1
