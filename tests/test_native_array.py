"""SafeArray's compiled core (safeshm._native.Array): what only C can get wrong.

Mixed processes (this one and a subprocess of the other implementation) on one array,
SIGKILL of either kind holding a stripe, differential tests of the two implementations on
one handle, reference leaks, use after close (also while blocked in another thread), fork
while a thread is inside a native add, Ctrl-C interrupting a blocked add, and the errors.
"""

from __future__ import annotations

import array
import contextlib
import gc
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safeshm
from safeshm import _array

from ._helpers import JOIN_TIMEOUT, PROMPT
from ._impls import IMPLEMENTATION, env_for, needs_native, other, skip_rss_under_asan

TYPECODES = "bBhHiIlLqQfd"
native_here = pytest.mark.skipif(
    IMPLEMENTATION != "native", reason="this process uses the ctypes implementation"
)


@pytest.fixture
def make(cleanup: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> safeshm.SafeArray[Any]:
        return cleanup(safeshm.SafeArray.create(*args, **kwargs))  # type: ignore[no-any-return]

    return factory


# -- a subprocess of a given implementation -------------------------------------------------
_PRELUDE = """
import os, sys, time, safeshm
assert safeshm.implementation() == sys.argv[1], safeshm.implementation()
arr = safeshm.SafeArray.attach(sys.argv[2])
def ready():
    sys.stdout.write("ready\\n"); sys.stdout.flush()
"""


def spawn(kind: str, name: str, body: str, *args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + body, kind, name, *map(str, args)],
        env=env_for(kind),
        stdout=subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "ready\n", (line, proc.poll())


def finish(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.wait(timeout=JOIN_TIMEOUT) == 0
    finally:
        if proc.poll() is None:  # pragma: no cover - a failure above
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def sigkill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=JOIN_TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()


# -- mixed processes ------------------------------------------------------------------------
_ADDS = """
ready()
while arr[0] == 0:  # the go flag
    time.sleep(0.001)
rounds = int(sys.argv[3])
n = len(arr)
for r in range(rounds):
    for i in range(1, n):
        arr.add(i, i)
    arr.compare_and_set(1 + r % (n - 1), -1, 0)  # never matches: under the lock, no change
"""


@needs_native
@pytest.mark.parametrize("tc", "qbHd")
def test_mixed_processes_add_exact_totals(tc: str, make: Any) -> None:
    """This process (both of its paths, in two threads) and a subprocess of the other
    implementation add into one array at the same time: every element's total is exact."""
    n, rounds = 9, 2000
    if tc in "bH":
        rounds = 3  # small types: stay in range (i * 3 * rounds <= 127)
    a = make(tc, n)
    proc = spawn(other(), a.name, _ADDS, rounds)
    try:
        wait_ready(proc)
        ctypes_add = type(a).add

        def python_path() -> None:
            for _ in range(rounds):
                for i in range(1, n):
                    ctypes_add(a, i, i)

        t = threading.Thread(target=python_path)
        a[0] = 1
        t.start()
        for _ in range(rounds):
            for i in range(1, n):
                a.add(i, i)
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive()
        finish(proc)
    finally:
        if proc.poll() is None:
            sigkill(proc)
    assert a.to_list()[1:] == [3 * rounds * i for i in range(1, n)]


_HOLD_STRIPE = """
m = arr._stripes[int(sys.argv[3])]
m.acquire()
ready()
time.sleep(60)
"""


@needs_native
@pytest.mark.parametrize("holder", ["native", "ctypes"])
def test_sigkill_of_a_stripe_holder_of_either_kind(holder: str, make: Any) -> None:
    """A process of either kind dies holding a stripe: this process recovers it at once
    (counted, nothing partial: an element write is all or nothing) and carries on."""
    a = make("q", 8, stripes=4)
    a.add(1, 5)
    proc = spawn(holder, a.name, _HOLD_STRIPE, 1)
    wait_ready(proc)
    assert a.add(2, 1) == 1  # another stripe: does not wait
    sigkill(proc)
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stripe's recovery alone is no warning
        assert a.add(1, 1) == 6
        assert a.add(5, 1) == 1  # the same stripe
    assert time.monotonic() - t0 < PROMPT
    assert a.statistics().recoveries == 1
    assert not a.partial_update_suspected


_HAMMER = """
i = int(sys.argv[3])
ready()
while True:
    arr.add(i, 1)
"""


@needs_native
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["native", "ctypes"])
def test_sigkill_mid_add_of_either_kind(kind: str, make: Any) -> None:
    """Kill an adding process of either kind at arbitrary moments (some inside the critical
    section): the stripe is recovered, every element write all or nothing, and adds here
    are exact."""
    a = make("q", 4, stripes=1)
    for _ in range(6):
        proc = spawn(kind, a.name, _HAMMER, 0)
        wait_ready(proc)
        time.sleep(0.05)
        sigkill(proc)
        before = a[1]
        t0 = time.monotonic()
        assert a.add(1, 1) == before + 1
        v = a[0]
        assert a.add(0, 1) == v + 1
        assert time.monotonic() - t0 < PROMPT


_DIE_IN_LOCKED = """
with arr.locked() as view:
    view[0] = 99
    ready()
    time.sleep(60)
"""


@needs_native
@pytest.mark.parametrize("dier", ["native", "ctypes"])
def test_bulk_writer_death_is_told_once(dier: str, make: Any) -> None:
    """A process of either kind dies inside locked(): the next element write here (of the
    stripe it died holding) warns once that the array may be partial; later ones do not."""
    a = make("q", 4, stripes=2)
    proc = spawn(dier, a.name, _DIE_IN_LOCKED)
    wait_ready(proc)
    sigkill(proc)
    with pytest.warns(safeshm.HolderDiedWarning, match="partial update"):
        a.add(0, 1)
    assert a.partial_update_suspected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a[1] = 3  # stripe 1: recovered too, not told again
        a.add(2, 1)
    assert a.statistics().recoveries == 2


# -- differential: the two implementations on one handle ------------------------------------
def _np_values() -> list[Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    return [np.int64(3), np.int8(-2), np.uint64(2**64 - 1), np.float32(1.5), np.float64(-2.5)]


_ODD = [
    None,
    "1",
    b"1",
    1.5,
    -0.0,
    math.nan,
    math.inf,
    True,
    False,
    Fraction(1, 2),
    2**64,
    -(2**63) - 1,
    *_np_values(),
]

values = st.one_of(
    st.integers(-(2**65), 2**65),
    st.sampled_from(
        [0, 1, -1, 127, 128, 255, 256, -129, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(_ODD),
)
indices = st.one_of(
    st.integers(-7, 7),
    st.sampled_from(
        [
            2**63,
            -(2**63) - 1,
            2**100,
            True,
            1.0,
            "0",
            None,
            slice(1, 3),
            slice(None),
            *_np_values()[:2],
        ]
    ),
)


def outcome(f: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    try:
        result = f(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - comparing behaviours, whatever they are
        return ("err", type(e), str(e))
    return ("ok", type(result), repr(result))


def _ops(a: Any, native: bool) -> dict[str, Any]:
    cls: Any = _array.SafeArray
    if native:
        return {
            "get": lambda i: a[i],
            "set": lambda i, v: a.__setitem__(i, v),
            "add": a.add,
            "cas": a.compare_and_set,
        }
    return {
        "get": lambda i: cls._py_getitem(a, i),
        "set": lambda i, v: cls._py_setitem(a, i, v),
        "add": lambda *args, **kw: cls.add(a, *args, **kw),
        "cas": lambda *args, **kw: cls.compare_and_set(a, *args, **kw),
    }


calls = st.one_of(
    st.tuples(st.just("get"), st.tuples(indices), st.just({})),
    st.tuples(st.just("set"), st.tuples(indices, values), st.just({})),
    st.tuples(st.just("add"), st.tuples(indices, values), st.just({})),
    st.tuples(st.just("cas"), st.tuples(indices, values, values), st.just({})),
    # argument counts and keywords
    st.tuples(
        st.sampled_from(["add", "cas"]),
        st.lists(st.integers(0, 3), max_size=4).map(tuple),
        st.just({}),
    ),
    st.tuples(
        st.sampled_from(["add", "cas"]),
        st.just(()),
        st.dictionaries(
            st.sampled_from(["index", "delta", "expected", "new", "bogus"]), st.integers(0, 3)
        ),
    ),
)


@native_here
@pytest.mark.parametrize("tc", TYPECODES)
@settings(max_examples=60)
@given(
    initial=st.lists(st.integers(-3, 3), min_size=5, max_size=5), ops=st.lists(calls, max_size=12)
)
def test_differential_native_vs_ctypes(tc: str, initial: list[int], ops: list[Any]) -> None:
    """Every call -- valid or not, any argument types -- gives the same result or the same
    error (type and message) and leaves the same contents, natively or through ctypes."""
    a = safeshm.SafeArray.create(tc, [abs(x) for x in initial])
    try:
        start = a.to_list()
        for op, args, kwargs in ops:
            a[:] = start
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy's overflow warnings, the same on both
                got = outcome(_ops(a, True)[op], *args, **kwargs)
                after = repr(a.to_list())
                a[:] = start
                want = outcome(_ops(a, False)[op], *args, **kwargs)
            assert (got, after) == (want, repr(a.to_list())), (op, args, kwargs)
            start = a.to_list()
    finally:
        a.close()
        a.unlink()


@native_here
@pytest.mark.parametrize("tc", TYPECODES)
def test_errors_identical_at_every_boundary(tc: str, make: Any) -> None:
    """Overflow, type and index errors: the ctypes path's, word for word, at each edge."""
    a = make(tc, 3)
    info = array.array(tc)
    bits = info.itemsize * 8
    if tc in "fd":
        edges: list[Any] = [1e308, -1e308, 3.5e38, math.nan, 2**1100, "x", None, Fraction(1, 3)]
    elif tc.isupper():
        edges = [0, -1, 2**bits - 1, 2**bits, 2**80, 1.0, "x", None]
    else:
        edges = [
            -(2 ** (bits - 1)),
            -(2 ** (bits - 1)) - 1,
            2 ** (bits - 1) - 1,
            2 ** (bits - 1),
            1.0,
            "x",
        ]
    native = _ops(a, True)
    ctypes_ = _ops(a, False)
    for v in edges:
        for index in (0, -1, 2, 3, -4, 2**64, 1.0, "0"):
            for op, args in (
                ("set", (index, v)),
                ("add", (index, v)),
                ("cas", (index, 0, v)),
                ("get", (index,)),
            ):
                a[:] = [0, 1, 2]
                got = outcome(native[op], *args)
                g_after = repr(a.to_list())
                a[:] = [0, 1, 2]
                want = outcome(ctypes_[op], *args)
                assert (got, g_after) == (want, repr(a.to_list())), (op, args)
    # an add that overflows only because of the element's current value
    if tc not in "fd":
        top = 2 ** (bits - 1) - 1 if tc.islower() else 2**bits - 1
        for add in (native["add"], ctypes_["add"]):
            a[0] = top
            with pytest.raises(OverflowError) as e:
                add(0, 1)
            assert a[0] == top
            assert str(e.value) == outcome(array.array, tc, [top + 1])[2]


# -- reference leaks ----------------------------------------------------------------------
def _rss_kib() -> int:
    skip_rss_under_asan()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


@native_here
@pytest.mark.slow
def test_no_reference_leaks_over_a_million_calls(make: Any) -> None:
    """10^6 native calls (fast paths, fallbacks, errors): RSS stays flat and the argument
    objects' reference counts are unchanged."""
    a = make("q", 64)
    f = make("d", 64)
    delta = 10**6 + 7  # not a cached small int: a leaked reference would keep each result
    fdelta = 0.5
    index = 1000  # out of range: the error path

    def burst(n: int) -> None:
        add, cas, fadd = a.add, a.compare_and_set, f.add
        for k in range(n):
            i = k & 63
            add(i, delta)
            a[i] = delta
            a[i]
            cas(i, delta, delta)
            fadd(i, fdelta)
            f[i] = fdelta
            f[i]
            if k % 64 == 0:  # the slow paths: a fallback and an error
                add(i, True)
                with contextlib.suppress(IndexError):
                    a[index] = 1
                with contextlib.suppress(OverflowError):
                    add(i, 2**70)

    burst(20_000)
    gc.collect()
    refs = (sys.getrefcount(delta), sys.getrefcount(fdelta), sys.getrefcount(index))
    before = _rss_kib()
    burst(1_000_000 // 7)
    gc.collect()
    grown = _rss_kib() - before
    assert (sys.getrefcount(delta), sys.getrefcount(fdelta), sys.getrefcount(index)) == refs
    assert grown < 2048, f"RSS grew by {grown} KiB over 10^6 calls"


# -- use after close ----------------------------------------------------------------------
@needs_native
def test_use_after_close(make: Any) -> None:
    a = make("q", 4)
    saved = (a.add, a.compare_and_set, getattr(a, "_c_getitem", None))
    a.close()
    for f in (
        lambda: a[0],
        lambda: a.__setitem__(0, 1),
        lambda: a.add(0, 1),
        lambda: a.compare_and_set(0, 0, 1),
        lambda: a[0:2],
        lambda: saved[0](0, 1),
        lambda: saved[1](0, 0, 1),
        lambda: saved[0](0, 1.5),
    ):
        with pytest.raises(safeshm.SegmentClosedError, match="closed on this handle"):
            f()
    if saved[2] is not None:
        with pytest.raises(safeshm.SegmentClosedError):
            saved[2](0)


@native_here  # a blocked ctypes add waits for the stripe, closed or not
def test_close_while_another_thread_is_blocked_in_add(make: Any) -> None:
    """A thread blocked in a native add (its stripe held) gets SegmentClosedError soon
    after another thread closes the handle; nothing faults, nothing stays held."""
    a = make("q", 4, stripes=1)
    stripe = a._stripes[0]
    stripe.acquire()
    errors: list[BaseException] = []
    add = a.add

    def blocked() -> None:
        try:
            add(0, 1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()
    b = safeshm.SafeArray.attach(a.name)
    a.close()
    t.join(PROMPT)
    assert not t.is_alive()
    stripe.release()
    assert len(errors) == 1 and isinstance(errors[0], safeshm.SegmentClosedError)
    assert b.add(0, 1) == 1  # nothing was added, nothing is held
    b.close()


@needs_native
def test_a_saved_bound_method_outlives_its_handle(make: Any) -> None:
    a = make("q", 4)
    b = safeshm.SafeArray.attach(a.name)
    add = b.add
    del b
    gc.collect()
    assert add(1, 2) == 2
    assert add(1, True) == 3  # the Python fallback, on the shadow handle
    assert a[1] == 3


# -- fork and signals -----------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("blocked", [True, False])
def test_fork_while_another_thread_is_inside_a_native_add(blocked: bool, make: Any) -> None:
    """fork() while another thread is blocked in (or running) native adds: the child uses
    the array at once, and every add of both processes counts."""
    a = make("q", 4, stripes=2)
    stripe = a._stripes[0]
    stop = threading.Event()
    done = [0]

    def adder() -> None:
        while True:
            a.add(0, 1)
            done[0] += 1
            if blocked or stop.is_set():
                return

    if blocked:
        stripe.acquire()
    t = threading.Thread(target=adder)
    t.start()
    time.sleep(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            a.add(1, 1)
            a.add(0, 1)  # blocks until the parent's holder releases stripe 0
            code = 0
        finally:
            os._exit(code)
    if blocked:
        time.sleep(0.1)
        stripe.release()
    stop.set()
    t.join(JOIN_TIMEOUT)
    assert not t.is_alive()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert a[0] == done[0] + 1
    assert a[1] == 1


@needs_native
def test_ctrl_c_interrupts_a_blocked_native_add(make: Any) -> None:
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals go to the main thread")
    a = make("q", 4, stripes=1)
    proc = spawn("ctypes", a.name, _HOLD_STRIPE, 0)
    try:
        wait_ready(proc)
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            a.add(1, 1)
        assert time.monotonic() - t0 < 0.3 + 1.0
        timer.join()
        assert not a._stripes[0].held_here()
    finally:
        sigkill(proc)
    assert a.add(1, 1) == 1
    assert a.statistics().recoveries == 1


@native_here
def test_getitem_and_setitem_are_c_level(make: Any) -> None:
    """a[i] and a[i] = v reach the core without a Python frame; the class's methods still
    work unbound, as contextlib-style callers use them."""
    a = make("d", 3)
    assert type(a).__dict__["__getitem__"].fget is not None
    type(a).__setitem__(a, 1, 2.5)
    assert type(a).__getitem__(a, 1) == 2.5
    assert a[-2] == 2.5


@native_here
def test_a_bare_core_refuses_calls() -> None:
    """A core made without __init__ (no mapping) raises; it never touches memory."""
    native: Any = safeshm._compat.native
    core = native.Array.__new__(native.Array)
    for call in (
        lambda: core.get(0),
        lambda: core.set(0, 1),
        lambda: core.add(0, 1),
        lambda: core.compare_and_set(0, 0, 1),
    ):
        with pytest.raises(ValueError, match="not initialised"):
            call()
    core.close()


@native_here
def test_a_failed_core_init_leaves_nothing_for_the_next(make: Any) -> None:
    """A core whose __init__ failed part-way (here: a float typecode, then a range outside
    the mapping) and is initialised again as a 'b' array works as a 'b' array: the first
    attempt's element kind does not linger (it read 5 back as 0.0)."""
    a = make("b", 4)
    nstripes = len(a._stripes)
    cls: Any = safeshm.SafeArray
    shadow = object.__new__(type(a))
    shadow.__dict__.update(a.__dict__)

    def args(typecode: str, length: int) -> tuple[Any, ...]:
        return (
            a._seg.mm, "SafeArray 'x'", "closed", typecode, _array._CTL_OFFSET,
            _array._STRIPES_OFFSET, nstripes, a._data_offset, length, shadow,
            cls._py_getitem, cls._py_setitem, cls.add, cls.compare_and_set,
        )  # fmt: skip

    core = safeshm._native.Array.__new__(safeshm._native.Array)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="outside the mapping"):
        core.__init__(*args("d", 1 << 40))
    core.__init__(*args("b", 4))
    core.set(0, 5)
    assert core.get(0) == 5
    assert a[0] == 5
    del core
