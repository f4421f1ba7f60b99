"""SafeCounter's and ShardedCounter's compiled core (safeshm._native.Counter, .Sharded):
what only C can get wrong.

Processes of both implementations on one counter and one sharded counter at the same time
(also SIGKILLed mid-stream), differential tests of the two implementations on one handle
(results, values, errors and their messages), reference leaks over 10^6 calls, use after
close (also while a call is blocked in another thread), fork while another thread is
adding, Ctrl-C interrupting a blocked add, int64 overflow, and argument errors.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safeshm
from safeshm import _compat

from ._helpers import JOIN_TIMEOUT, PROMPT
from ._impls import IMPLEMENTATION, env_for, needs_native, skip_rss_under_asan

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
IMPLS = ("atomic", "locked")
native_here = pytest.mark.skipif(
    IMPLEMENTATION != "native", reason="this process uses the ctypes implementation"
)


def new_counter(impl: str, initial: int = 0) -> safeshm.SafeCounter:
    """A SafeCounter whose segment uses ``impl`` (the flag every process follows)."""
    saved = _compat.compare_exchange
    if impl == "locked":
        _compat.compare_exchange = None
    elif saved is None:  # pragma: no cover
        pytest.skip("libatomic not available")
    try:
        return safeshm.SafeCounter.create(initial)
    finally:
        _compat.compare_exchange = saved


@pytest.fixture
def counters(cleanup: Any) -> Callable[..., safeshm.SafeCounter]:
    def factory(impl: str, initial: int = 0) -> safeshm.SafeCounter:
        return cleanup(new_counter(impl, initial))  # type: ignore[no-any-return]

    return factory


@pytest.fixture
def sharded(cleanup: Any) -> safeshm.ShardedCounter:
    return cleanup(safeshm.ShardedCounter.create())  # type: ignore[no-any-return]


def test_native_methods_are_bound_on_handles(cleanup: Any) -> None:
    c = cleanup(new_counter("atomic"))
    s = cleanup(safeshm.ShardedCounter.create())
    native = IMPLEMENTATION == "native"
    for h, names in ((c, ("add", "set", "exchange", "compare_and_set")), (s, ("add",))):
        for n in names:
            assert (n in vars(h)) is native, n
            assert callable(getattr(h, n))
    assert safeshm.implementation() == IMPLEMENTATION


# -- a subprocess of a given implementation -------------------------------------------------
_PRELUDE = """
import os, sys, threading, time, safeshm
assert safeshm.implementation() == sys.argv[1], safeshm.implementation()
c = safeshm.SafeCounter.attach(sys.argv[2])
s = safeshm.ShardedCounter.attach(sys.argv[3])
def ready():
    sys.stdout.write("ready\\n"); sys.stdout.flush()
"""


def spawn(kind: str, c: Any, s: Any, body: str, *args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + body, kind, c.name, s.name, *map(str, args)],
        env=env_for(kind),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "ready\n", (line, proc.poll())


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def reap(proc: subprocess.Popen[str], *, kill: bool = False) -> int:
    try:
        if kill:
            proc.kill()
        return proc.wait(timeout=JOIN_TIMEOUT)
    finally:
        if proc.poll() is None:  # pragma: no cover - a failure above
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


# -- mixed processes ------------------------------------------------------------------------
_ADDS = """
ready()
sys.stdin.readline()
rounds = int(sys.argv[4])
def work():
    for i in range(rounds):
        c.add(3)
        s.add(3)
        c.add(-1)
        s.add(-1)
ts = [threading.Thread(target=work) for _ in range(2)]
for t in ts: t.start()
for t in ts: t.join()
"""


@needs_native
@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_processes_exact_totals(
    impl: str, counters: Callable[..., safeshm.SafeCounter], sharded: safeshm.ShardedCounter
) -> None:
    """A native and a ctypes subprocess (two threads each) and this process (the native
    and the ctypes path, one thread each) add into one counter and one sharded counter at
    the same time: both totals are exact."""
    rounds = 3000
    c = counters(impl, 7)
    s = sharded
    procs = [spawn(kind, c, s, _ADDS, rounds) for kind in ("native", "ctypes")]
    try:
        for p in procs:
            wait_ready(p)

        def mine(add_c: Callable[[int], Any], add_s: Callable[[int], Any]) -> None:
            for _ in range(rounds):
                add_c(3)
                add_s(3)
                add_c(-1)
                add_s(-1)

        ts = [
            threading.Thread(target=mine, args=(c.add, s.add)),
            threading.Thread(
                target=mine,
                args=(lambda d: type(c).add(c, d), lambda d: type(s).add(s, d)),
            ),
        ]
        for p in procs:
            go(p)
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=JOIN_TIMEOUT)
    finally:
        codes = [reap(p) for p in procs]
    assert codes == [0, 0]
    total = (2 * 2 + 2) * rounds * 2
    assert c.value == 7 + total
    assert s.value == total


_STREAM = """
p = safeshm.SafeCounter.attach(sys.argv[4])
ready()
sys.stdin.readline()
i = 0
while True:
    c.add(1)
    s.add(1)
    i += 1
    p.set(i)
"""


@needs_native
@pytest.mark.parametrize("kind", ["native", "ctypes"])
@pytest.mark.parametrize("impl", IMPLS)
def test_sigkill_mid_stream_loses_nothing(
    kind: str,
    impl: str,
    counters: Callable[..., safeshm.SafeCounter],
    sharded: safeshm.ShardedCounter,
) -> None:
    """A process of either kind SIGKILLed while adding as fast as it can, with this
    process adding too: each add it completed is counted, the one in flight at most once,
    and this process's adds carry on at once (a lock it died holding is recovered)."""
    c, s = counters(impl), sharded
    progress = counters("atomic")
    mine = 0
    for round_ in range(4):
        before_c, before_s = c.value, s.value
        mine_before = mine
        proc = spawn(kind, c, s, _STREAM, progress.name)
        try:
            wait_ready(proc)
            go(proc)
            deadline = time.monotonic() + 0.05 + 0.07 * round_
            give_up = time.monotonic() + JOIN_TIMEOUT
            while time.monotonic() < deadline or progress.value == 0:
                c.add(1)
                s.add(1)
                mine += 1
                assert time.monotonic() < give_up, "the subprocess never added"
        finally:
            reap(proc, kill=True)
        done = progress.value
        progress.set(0)
        assert done > 0
        mine_now = mine - mine_before
        assert c.value - before_c - mine_now in (done, done + 1)
        assert s.value - before_s - mine_now in (done, done + 1)
        t0 = time.monotonic()
        c.add(0)
        s.add(0)
        assert time.monotonic() - t0 < PROMPT


_HOLD = """
c._mutex.acquire()
ready()
time.sleep(60)
"""


@needs_native
@pytest.mark.parametrize("kind", ["native", "ctypes"])
def test_sigkill_holding_the_counters_lock(
    kind: str, counters: Callable[..., safeshm.SafeCounter], sharded: safeshm.ShardedCounter
) -> None:
    """Locked counters: a process of either kind killed holding the counter's lock blocks
    this process's adds only until it dies; the value is what it was, the lock recovered."""
    c = counters("locked", 41)
    proc = spawn(kind, c, sharded, _HOLD)
    done: list[int] = []
    try:
        wait_ready(proc)
        t = threading.Thread(target=lambda: done.append(c.add(1)))
        t.start()
        time.sleep(0.2)
        assert not done  # blocked behind a live holder: never robbed
    finally:
        reap(proc, kill=True)
    t.join(timeout=PROMPT)
    assert done == [42]
    assert c.value == 42
    assert c._mutex.recoveries == 1


# -- differential: native vs ctypes on one handle ------------------------------------------
class _Odd:
    """An int-like operand that only has __index__ (no arithmetic)."""

    def __index__(self) -> int:
        return 5

    def __repr__(self) -> str:
        return "_Odd()"


operands = st.one_of(
    st.integers(INT64_MIN, INT64_MAX),
    st.sampled_from(
        [0, 1, -1, INT64_MAX, INT64_MIN, 2**63, -(2**63) - 1, 2**64, -(2**70), True, False]
    ),
    st.integers(),
    st.sampled_from([1.0, 2.5, "3", None, b"x", Fraction(1, 1), _Odd()]),
)
_OPS = {
    "add": 1,
    "set": 1,
    "exchange": 1,
    "compare_and_set": 2,
}


def outcome(f: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", f())
    except Exception as e:  # noqa: BLE001 - compared, not handled
        return (type(e).__name__, str(e))


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    op = draw(st.sampled_from(sorted(_OPS)))
    shape = draw(st.sampled_from(["positional", "keyword", "few", "many", "badkw", "dupkw"]))
    names = {"add": ["delta"], "set": ["value"], "exchange": ["value"]}.get(op, ["expected", "new"])
    values = [draw(operands) for _ in names]
    if shape == "positional":
        return op, tuple(values), {}
    if shape == "keyword":
        return op, (), dict(zip(names, values, strict=True))
    if shape == "few":
        return op, tuple(values[:-1]), {}
    if shape == "many":
        return op, (*values, 1), {}
    if shape == "badkw":
        return op, tuple(values), {"bogus": 1}
    return op, tuple(values), {names[0]: 1}


@native_here
@pytest.mark.parametrize("impl", IMPLS)
def test_differential_counter(impl: str, cleanup: Any) -> None:
    c = cleanup(new_counter(impl))
    cls = type(c)

    @settings(max_examples=300)
    @given(st.integers(INT64_MIN, INT64_MAX), st.lists(calls(), max_size=12))
    def run(start: int, ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> None:
        c.set(start)
        for op, args, kwargs in ops:
            before = c._value[0]
            native = outcome(lambda: getattr(c, op)(*args, **kwargs))  # noqa: B023
            after_native = c._value[0]
            cls.set(c, before)
            python = outcome(lambda: getattr(cls, op)(c, *args, **kwargs))  # noqa: B023
            after_python = c._value[0]
            assert native == python, (op, args, kwargs)
            assert after_native == after_python, (op, args, kwargs)
            assert c.value == after_python

    run()


@native_here
@pytest.mark.parametrize("impl", IMPLS)
def test_differential_numpy_operands(impl: str, cleanup: Any) -> None:
    np = pytest.importorskip("numpy")
    c = cleanup(new_counter(impl, 10))
    cls = type(c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's own overflow warnings
        for text in ("np.int64(5)", "np.int8(-3)", "np.uint64(2**64-1)", "np.float64(1.0)"):
            v = eval(text, {"np": np})  # noqa: S307 - fixed strings
            for op, args in (
                ("add", (v,)),
                ("set", (v,)),
                ("exchange", (v,)),
                ("compare_and_set", (v, v)),
            ):
                before = c._value[0]
                native = outcome(lambda: getattr(c, op)(*args))  # noqa: B023
                after_native = c._value[0]
                cls.set(c, before)
                python = outcome(lambda: getattr(cls, op)(c, *args))  # noqa: B023
                assert native == python, (text, op)
                assert after_native == c._value[0]


@native_here
def test_differential_sharded() -> None:
    """The native add on one sharded counter, the ctypes add on a twin: the same outcome
    (errors and messages too) and the same value after every call, overflow included."""
    ctypes_add = safeshm.ShardedCounter.add

    def same(result: tuple[str, Any], h: Any) -> tuple[str, Any]:
        kind, v = result
        return (kind, v.replace(repr(h.name), "NAME") if isinstance(v, str) else v)

    @settings(max_examples=300)
    @given(st.lists(st.tuples(operands, st.sampled_from(["pos", "kw", "many", "badkw"]))))
    def run(ops: list[tuple[Any, str]]) -> None:
        # Fresh counters per example, not set(0): after an add of -2**63 into a slot, no
        # base can represent 0 (set() raises OverflowError, by design: slots belong to
        # their threads), and the next example would fail in its set-up.
        with safeshm.ShardedCounter.create() as a, safeshm.ShardedCounter.create() as b:
            check(a, b, ops)

    def check(a: Any, b: Any, ops: list[tuple[Any, str]]) -> None:
        for v, shape in ops:
            args: tuple[Any, ...] = () if shape == "kw" else (v,)
            kwargs = {"delta": v} if shape == "kw" else {}
            if shape == "many":
                args = (v, 1)
            if shape == "badkw":
                kwargs = {"bogus": 1}
            native = same(outcome(lambda: a.add(*args, **kwargs)), a)  # noqa: B023
            python = same(outcome(lambda: ctypes_add(b, *args, **kwargs)), b)  # noqa: B023
            assert native == python, (v, shape)
            assert a.value == b.value, (v, shape)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", safeshm.SafeShmWarning)
        run()


# -- overflow and argument errors ------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_overflow_changes_nothing(impl: str, counters: Callable[..., safeshm.SafeCounter]) -> None:
    c = counters(impl, INT64_MAX)
    n = c.name
    with pytest.raises(OverflowError) as e1:
        c.add()
    assert str(e1.value) == (
        f"SafeCounter {n!r}: delta 1 would leave the int64 range (the counter is at "
        f"{INT64_MAX}); nothing was changed"
    )
    with pytest.raises(OverflowError):
        c.add(1)
    assert c.add(-(2**63)) == -1  # a delta at the edge is fine
    c.set(INT64_MIN)
    with pytest.raises(OverflowError, match="the counter is at -9223372036854775808"):
        c.add(-1)
    assert c.add(INT64_MAX) == -1
    c.set(-5)
    assert c.add(2**63) == INT64_MAX - 4  # a delta outside int64 whose sum fits
    with pytest.raises(OverflowError):
        c.set(2**63)
    with pytest.raises(OverflowError, match="outside the int64 range"):
        c.exchange(-(2**63) - 1)
    with pytest.raises(OverflowError, match="outside the int64 range"):
        c.compare_and_set(INT64_MAX - 4, 2**63)
    assert c.value == INT64_MAX - 4


def test_sharded_overflow_spills_then_refuses(sharded: safeshm.ShardedCounter) -> None:
    s = sharded
    s.add(INT64_MAX)
    s.add(INT64_MAX)  # the slot is full: into the shared word
    assert s.value == 2 * INT64_MAX
    with pytest.raises(OverflowError, match="would overflow both"):
        s.add(1)
    assert s.value == 2 * INT64_MAX
    s.add(-5)  # into the slot
    assert s.value == 2 * INT64_MAX - 5


_BAD_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    (
        "add",
        (1, 2),
        {},
        "SafeCounter.add() takes from 1 to 2 positional arguments but 3 were given",
    ),
    ("add", (), {"x": 1}, "SafeCounter.add() got an unexpected keyword argument 'x'"),
    ("add", (1,), {"delta": 1}, "SafeCounter.add() got multiple values for argument 'delta'"),
    ("add", (1.5,), {}, "delta must be an int, not float"),
    ("add", ("1",), {}, "delta must be an int, not str"),
    ("set", (), {}, "SafeCounter.set() missing 1 required positional argument: 'value'"),
    ("set", (1, 2), {}, "SafeCounter.set() takes 2 positional arguments but 3 were given"),
    ("set", (None,), {}, "value must be an int, not NoneType"),
    ("exchange", (), {"val": 1}, "SafeCounter.exchange() got an unexpected keyword argument 'val'"),
    ("exchange", (2.0,), {}, "value must be an int, not float"),
    (
        "compare_and_set",
        (1,),
        {},
        "SafeCounter.compare_and_set() missing 1 required positional argument: 'new'",
    ),
    (
        "compare_and_set",
        (1, 2, 3),
        {},
        "SafeCounter.compare_and_set() takes 3 positional arguments but 4 were given",
    ),
    ("compare_and_set", ("a", 2), {}, "expected must be an int, not str"),
    ("compare_and_set", (1, b""), {}, "new must be an int, not bytes"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("op", "args", "kwargs", "message"), _BAD_CALLS)
def test_argument_errors(  # noqa: PLR0917 - parametrized
    impl: str,
    op: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    message: str,
    counters: Callable[..., safeshm.SafeCounter],
) -> None:
    """The same TypeError and message from both implementations' methods."""
    c = counters(impl, 5)
    for f in (getattr(c, op), getattr(type(c), op).__get__(c)):
        with pytest.raises(TypeError) as e:
            f(*args, **kwargs)
        assert str(e.value) == message
    assert c.value == 5


def test_sharded_argument_errors(sharded: safeshm.ShardedCounter) -> None:
    s = sharded
    cases: list[tuple[tuple[Any, ...], dict[str, Any], str]] = [
        (
            (1, 2),
            {},
            "ShardedCounter.add() takes from 1 to 2 positional arguments but 3 were given",
        ),
        ((), {"x": 1}, "ShardedCounter.add() got an unexpected keyword argument 'x'"),
        ((1.5,), {}, "delta must be an int, not float"),
        ((None,), {}, "delta must be an int, not NoneType"),
    ]
    for args, kwargs, message in cases:
        for f in (s.add, type(s).add.__get__(s)):
            with pytest.raises(TypeError) as e:
                f(*args, **kwargs)
            assert str(e.value) == message
    assert s.value == 0


# -- use after close ---------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_use_after_close(impl: str, counters: Callable[..., safeshm.SafeCounter]) -> None:
    c = counters(impl)
    saved = [c.add, c.set, c.exchange, c.compare_and_set]
    c.close()
    msg = f"SafeCounter {c.name!r} is closed on this handle"
    calls_: list[Callable[[], Any]] = [
        lambda: c.value,
        lambda: c.add(1),
        lambda: saved[0](1),
        lambda: saved[0](),
        lambda: saved[1](1),
        lambda: saved[2](1),
        lambda: saved[3](0, 1),
    ]
    for f in calls_:
        with pytest.raises(safeshm.SegmentClosedError) as e:
            f()
        assert str(e.value) == msg


def test_sharded_use_after_close(sharded: safeshm.ShardedCounter) -> None:
    s = sharded
    add = s.add
    add(1)
    s.close()
    for f in (lambda: add(1), lambda: add(), lambda: s.add(1), lambda: s.value):
        with pytest.raises(safeshm.SegmentClosedError, match="is closed on this handle"):
            f()


def test_sharded_add_from_a_thread_that_has_no_slot_yet_after_close(
    sharded: safeshm.ShardedCounter,
) -> None:
    add = sharded.add
    sharded.close()
    out: list[BaseException] = []

    def run() -> None:
        try:
            add(1)
        except BaseException as e:  # noqa: BLE001
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=PROMPT)
    assert len(out) == 1 and isinstance(out[0], safeshm.SegmentClosedError)


def test_close_while_add_is_blocked_in_another_thread(
    counters: Callable[..., safeshm.SafeCounter],
) -> None:
    """A locked counter's add blocked on the mutex (held here) in another thread raises
    SegmentClosedError promptly when this thread closes the handle."""
    c = counters("locked", 3)
    mutex = c._mutex
    assert mutex.acquire() == 0
    out: list[Any] = []

    def blocked() -> None:
        try:
            out.append(c.add(1))
        except BaseException as e:  # noqa: BLE001
            out.append(e)

    t = threading.Thread(target=blocked)
    try:
        t.start()
        time.sleep(0.3)
        assert out == []
        c.close()
        if IMPLEMENTATION == "native":  # the ctypes add waits on until the mutex is free
            t.join(timeout=PROMPT)
            assert not t.is_alive()
    finally:
        mutex.release()
        t.join(timeout=PROMPT)
    if IMPLEMENTATION == "native":
        assert len(out) == 1 and isinstance(out[0], safeshm.SegmentClosedError), out
    else:  # the ctypes add holds its own views: it completes once the mutex is free
        assert len(out) == 1
    again = safeshm.SafeCounter.attach(c.name)
    try:
        assert again.value in (3, 4)
        assert again.add(1) in (4, 5)  # the mutex is free
    finally:
        again.close()


def test_hammering_threads_while_closing(
    counters: Callable[..., safeshm.SafeCounter], sharded: safeshm.ShardedCounter
) -> None:
    """Threads adding flat out while another thread closes both handles: each either
    keeps counting or gets SegmentClosedError; nothing crashes."""
    c, s = counters("atomic"), sharded
    errors: list[BaseException] = []
    started = threading.Barrier(5)

    def hammer(h: Any) -> None:
        add = h.add
        started.wait(timeout=JOIN_TIMEOUT)
        try:
            while True:
                add(1)
        except safeshm.SegmentClosedError:
            return
        except BaseException as e:  # noqa: BLE001 - pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=hammer, args=(h,)) for h in (c, s, c, s)]
    for t in ts:
        t.start()
    started.wait(timeout=JOIN_TIMEOUT)
    time.sleep(0.1)
    c.close()
    s.close()
    for t in ts:
        t.join(timeout=PROMPT)
    assert not any(t.is_alive() for t in ts)
    assert errors == []


# -- Ctrl-C ------------------------------------------------------------------------------------
def test_sigint_interrupts_a_blocked_add(counters: Callable[..., safeshm.SafeCounter]) -> None:
    """A locked counter's add blocked on a mutex another thread holds: Ctrl-C raises
    KeyboardInterrupt promptly, the add changed nothing and holds nothing."""
    c = counters("locked", 10)
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        c._mutex.acquire()
        holding.set()
        release.wait(JOIN_TIMEOUT)
        c._mutex.release()

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(JOIN_TIMEOUT)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            c.add(1)
        assert time.monotonic() - t0 < 0.3 + 1.0
    finally:
        timer.cancel()
        release.set()
        t.join(timeout=PROMPT)
    assert c.value == 10
    assert not c._mutex.locked()
    assert c.add(1) == 11


# -- fork --------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_fork_while_another_thread_adds(
    impl: str, counters: Callable[..., safeshm.SafeCounter], sharded: safeshm.ShardedCounter
) -> None:
    """Children forked while another thread adds flat out (for a locked counter: often
    while it holds the counter's mutex, or sleeps on it) add their own share; the child
    never writes into the parent's slots, nothing deadlocks, and every total is exact."""
    c, s = counters(impl), sharded
    c.add(1)
    s.add(1)  # this thread has a slot: a child must not reuse it
    stop = threading.Event()
    count = [0]

    def adder() -> None:
        n = 0
        while not stop.is_set():
            c.add(1)
            s.add(1)
            n += 1
        count[0] = n

    t = threading.Thread(target=adder)
    t.start()
    children, per_child = 12, 200
    try:
        for _ in range(children):
            time.sleep(0.01)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
                pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    for _ in range(per_child):
                        c.add(1)
                        s.add(1)
                    code = 0
                finally:
                    os._exit(code)
            _waitpid(pid)
    finally:
        stop.set()
        t.join(timeout=JOIN_TIMEOUT)
    expected = 1 + count[0] + children * per_child
    assert c.value == expected
    assert s.value == expected


def _waitpid(pid: int) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)  # pragma: no cover
    os.waitpid(pid, 0)  # pragma: no cover
    raise AssertionError(f"forked child {pid} did not finish (deadlock?)")  # pragma: no cover


# -- reference leaks -----------------------------------------------------------------------------
def _rss() -> int:
    skip_rss_under_asan()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _leak_workload(c: safeshm.SafeCounter, s: safeshm.ShardedCounter, n: int) -> None:
    add, set_, exchange, cas, sadd = c.add, c.set, c.exchange, c.compare_and_set, s.add
    big = 1 << 40
    for i in range(n):
        add(big)
        set_(big + i)
        exchange(big)
        cas(big, big + 1)
        c.value  # noqa: B018
        sadd(big)
        add(delta=-1)
    for _ in range(n // 10):  # the error paths
        for f, args in (
            (add, (1.5,)),
            (add, (2**63,)),
            (set_, ("x",)),
            (exchange, (2**64,)),
            (cas, (1,)),
            (sadd, (None,)),
        ):
            with contextlib.suppress(TypeError, OverflowError):
                f(*args)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_no_reference_leaks(impl: str, counters: Callable[..., safeshm.SafeCounter]) -> None:
    """10^6 rounds of every operation (and 10^5 of each error): memory stays flat. A leak
    of one small object per call would grow it by tens of megabytes."""
    c = counters(impl)
    s = safeshm.ShardedCounter.create()
    try:
        _leak_workload(c, s, 100_000)  # warm up: caches, free lists, arenas
        gc.collect()
        before = _rss()
        _leak_workload(c, s, 1_000_000 if impl == "atomic" else 300_000)
        gc.collect()
        grown = _rss() - before
    finally:
        s.close()
        s.unlink()
    assert grown < 4 << 20, f"RSS grew by {grown / 2**20:.1f} MiB"


@needs_native
def test_handles_and_cores_are_freed(cleanup: Any) -> None:
    """Making and dropping handles (native cores included) frees them: no growth."""

    def churn(n: int) -> None:
        for _ in range(n):
            c = safeshm.SafeCounter.create()
            c.add(1)
            c.close()
            c.unlink()
            s = safeshm.ShardedCounter.create()
            s.add(1)
            s.close()
            s.unlink()

    churn(200)
    gc.collect()
    before = _rss()
    churn(2000)
    gc.collect()
    assert _rss() - before < 4 << 20


def test_a_kept_add_keeps_its_handle_and_slot(sharded: safeshm.ShardedCounter) -> None:
    """``add = ShardedCounter.attach(name).add``: as with a bound method of the ctypes path,
    the kept add keeps its handle, so this thread's slot stays owned while it is used."""
    add = safeshm.ShardedCounter.attach(sharded.name).add
    gc.collect()
    for _ in range(100):
        add(1)
    gc.collect()
    assert sharded.statistics().slots_in_use == 1  # still owned by the kept handle
    sharded.add(1)  # another handle: another slot, never the kept one
    assert sharded.statistics().slots_in_use == 2
    del add
    gc.collect()
    assert sharded.statistics().slots_in_use == 1
    assert sharded.value == 101
