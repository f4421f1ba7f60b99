"""SafeLock's compiled core (safeshm._native.Lock) next to the ctypes path.

Mixed processes (this one and a subprocess of the other implementation) on one lock,
SIGKILL of a holder of either kind, in-process differential tests (the class's Python
methods are the ctypes implementation, the handle's bound ones the native), reference
leaks, close() while a thread is blocked, fork(), Ctrl-C, and argument errors.
"""

from __future__ import annotations

import gc
import os
import random
import resource
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import safeshm
from safeshm import _lock

from ._helpers import JOIN_TIMEOUT, PROMPT
from ._impls import IMPLEMENTATION, env_for, needs_native, other, skip_rss_under_asan

native_only = pytest.mark.skipif(
    IMPLEMENTATION != "native", reason="this process uses the ctypes implementation"
)
SRC = str(Path(safeshm.__file__).resolve().parent.parent)


@pytest.fixture
def lock(cleanup: Any) -> safeshm.SafeLock:
    return cleanup(safeshm.SafeLock.create())  # type: ignore[no-any-return]


def _spawn(code: str, implementation: str, *args: str) -> subprocess.Popen[str]:
    """``python -c code args...`` using ``implementation``, with pipes."""
    env = env_for(implementation)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, err = proc.communicate(timeout=JOIN_TIMEOUT)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 0, (proc.returncode, out[-2000:], err[-3000:])
    return out


def _ctypes_release(lock: safeshm.SafeLock) -> None:
    lock._mutex.release()


# -- mixed processes ---------------------------------------------------------------------------
MIXED_WORKER = """
import sys, safeshm
assert safeshm.implementation() == sys.argv[1], safeshm.implementation()
lock = safeshm.SafeLock.attach(sys.argv[2])
counter = safeshm.SafeCounter.attach(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[4])):
    if i % 3 == 0:
        with lock:
            v = counter.value
            counter.set(v + 1)
    else:
        assert lock.acquire(timeout=30)
        v = counter.value
        counter.set(v + 1)
        lock.release()
lock.close(); counter.close()
print("done", flush=True)
"""


@needs_native
def test_mixed_processes_exclude_each_other(lock: safeshm.SafeLock, cleanup: Any) -> None:
    """Unlocked read-modify-writes that race without the lock are exact with it, with
    both implementations taking it at once: this process (threads of either kind too) and
    subprocesses of both kinds."""
    counter = cleanup(safeshm.SafeCounter.create())
    rounds = 3000
    procs = [
        _spawn(MIXED_WORKER, impl, impl, lock.name, counter.name, str(rounds))
        for impl in (IMPLEMENTATION, other())
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"

        def native_rmw() -> None:
            for _ in range(rounds):
                with lock:
                    counter.set(counter.value + 1)

        def ctypes_rmw() -> None:  # the class's methods: the ctypes code on this handle
            for _ in range(rounds):
                assert safeshm.SafeLock.acquire(lock, timeout=30)
                counter.set(counter.value + 1)
                _ctypes_release(lock)

        threads = [threading.Thread(target=native_rmw), threading.Thread(target=ctypes_rmw)]
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=JOIN_TIMEOUT)
        for p in procs:
            assert "done" in _finish(p)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert counter.value == 4 * rounds
    assert not lock.locked()


HOLD_WORKER = """
import sys, time, safeshm
assert safeshm.implementation() == sys.argv[1]
lock = safeshm.SafeLock.attach(sys.argv[2])
if sys.argv[3] == "hold":
    lock.acquire()
    print("holding", flush=True)
    time.sleep(600)
else:  # churn: take and release as fast as possible, until killed
    print("churning", flush=True)
    while True:
        with lock:
            pass
        lock.acquire(); lock.release()
"""

RECOVER_WORKER = """
import sys, warnings, safeshm
assert safeshm.implementation() == sys.argv[1]
lock = safeshm.SafeLock.attach(sys.argv[2])
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    if sys.argv[3] == "with":
        with lock:
            pass
    else:
        assert lock.acquire(timeout=10)
        lock.release()
print("recovered", [type(w.message).__name__ for w in seen], lock.statistics().recoveries,
      flush=True)
assert lock.acquire(timeout=10)
lock.release()
lock.close()
"""


@needs_native
@pytest.mark.parametrize("holder", ["native", "ctypes"])
@pytest.mark.parametrize("how", ["with", "acquire"])
def test_holder_of_either_kind_killed_the_other_kind_recovers(
    lock: safeshm.SafeLock, holder: str, how: str
) -> None:
    recoverer = "ctypes" if holder == "native" else "native"
    proc = _spawn(HOLD_WORKER, holder, holder, lock.name, "hold")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        assert lock.acquire(timeout=0.1) is False  # a live holder is never robbed
        proc.kill()
        proc.wait(timeout=JOIN_TIMEOUT)
    finally:
        proc.kill()
        proc.communicate()
    if recoverer == IMPLEMENTATION:

        def take() -> None:
            if how == "with":
                with lock:
                    pass
            else:
                assert lock.acquire(timeout=10)
                lock.release()

        with pytest.warns(safeshm.HolderDiedWarning, match="previous holder died") as seen:
            take()
        assert seen[0].filename == __file__  # the caller's line (stacklevel)
        assert lock.statistics().recoveries == 1
    else:
        out = _finish(_spawn(RECOVER_WORKER, recoverer, recoverer, lock.name, how))
        assert "recovered ['HolderDiedWarning'] 1" in out
    assert lock.acquire(timeout=1)
    lock.release()


@needs_native
@pytest.mark.parametrize("holder", ["native", "ctypes"])
def test_holder_killed_at_random_moments(lock: safeshm.SafeLock, holder: str) -> None:
    """SIGKILL lands anywhere in a churning process's acquire/release: the lock is always
    free or recoverable at once, never stuck, and stays usable by both kinds."""
    rng = random.Random(1234)
    for _ in range(6):
        proc = _spawn(HOLD_WORKER, holder, holder, lock.name, "churn")
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "churning"
            time.sleep(rng.uniform(0.01, 0.15))
            proc.kill()
            proc.wait(timeout=JOIN_TIMEOUT)
        finally:
            proc.kill()
            proc.communicate()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", safeshm.HolderDiedWarning)  # killed holding, or not
            assert lock.acquire(timeout=PROMPT)
            lock.release()
            assert safeshm.SafeLock.acquire(lock, timeout=PROMPT)  # the ctypes path too
            _ctypes_release(lock)
    assert not lock.locked()


# -- differential: native vs ctypes on one handle -----------------------------------------------
_ARGS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([-1.0, -0.5, 0.0, 0.01, float("inf"), float("-inf"), float("nan"), 10**400]),
    st.sampled_from([-(10**400), 1e300, "1", b"x", [], object()]),
)


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return ("returned", call())
    except Exception as e:  # noqa: BLE001
        return (type(e).__name__, str(e))


@native_only
@given(
    args=st.lists(_ARGS, max_size=3),
    kwargs=st.dictionaries(st.sampled_from(["blocking", "timeout", "block"]), _ARGS, max_size=2),
)
def test_acquire_arguments_match_ctypes(args: list[Any], kwargs: dict[str, Any]) -> None:
    lock = safeshm.SafeLock.create()
    try:
        native = _outcome(lambda: lock.acquire(*args, **kwargs))
        if native[0] == "returned" and native[1]:
            lock.release()
        assert not lock.locked()
        ctypes_ = _outcome(lambda: safeshm.SafeLock.acquire(lock, *args, **kwargs))
        if ctypes_[0] == "returned" and ctypes_[1]:
            _ctypes_release(lock)
        assert native == ctypes_
    finally:
        lock.close()
        lock.unlink()


@native_only
@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((False, 1), {}),
        ((), {"timeout": "x"}),
        ((), {"timeout": -2}),
        ((1, 2, 3), {}),
        ((), {"blocking": False, "timeout": 0}),
        ((True,), {"blocking": True}),
        ((), {"time": 1}),
        ((), {"timeout": 10**400}),
        ((), {"timeout": True}),
    ],
)
def test_argument_errors_match_ctypes(
    lock: safeshm.SafeLock, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises((TypeError, ValueError, OverflowError)) as native:
        lock.acquire(*args, **kwargs)
    with pytest.raises((TypeError, ValueError, OverflowError)) as ctypes_:
        safeshm.SafeLock.acquire(lock, *args, **kwargs)
    assert (type(native.value), str(native.value)) == (type(ctypes_.value), str(ctypes_.value))
    assert not lock.locked()
    with pytest.raises(TypeError) as n:
        lock.acquire_nowait(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError) as c:
        safeshm.SafeLock.acquire_nowait(lock, 1)  # type: ignore[call-arg]
    assert str(n.value) == str(c.value)


@native_only
@given(st.lists(st.tuples(st.sampled_from("AWRNE"), st.booleans()), max_size=30))
def test_operations_match_a_model_with_either_implementation(  # noqa: PLR0912 - one branch per op
    ops: list[tuple[str, bool]],
) -> None:
    """A random sequence of operations, each by native or ctypes code, on one handle:
    results and errors are those of one non-reentrant lock."""
    lock = safeshm.SafeLock.create()
    try:
        held = False
        for op, use_native in ops:
            if op == "A":  # acquire(timeout=0)
                call = (
                    lock.acquire if use_native else lambda **k: safeshm.SafeLock.acquire(lock, **k)
                )
                if held:
                    with pytest.raises(safeshm.LockReentryError, match="already held by this"):
                        call(timeout=0)
                else:
                    assert call(timeout=0) is True
                    held = True
            elif op == "N":  # acquire_nowait
                call = (
                    lock.acquire_nowait
                    if use_native
                    else lambda: safeshm.SafeLock.acquire_nowait(lock)
                )
                if held:
                    with pytest.raises(safeshm.LockReentryError):
                        call()
                else:
                    assert call() is True
                    held = True
            elif op == "R":  # release
                release = lock.release if use_native else lambda: _ctypes_release(lock)
                if held:
                    assert release() is None
                    held = False
                else:
                    with pytest.raises(safeshm.LockNotHeldError, match="not held by this thread"):
                        release()
            elif op == "W":  # a with block
                enter = (
                    lock.__enter__ if use_native else lambda: safeshm.SafeLock._enter_ctypes(lock)
                )
                if held:
                    with pytest.raises(safeshm.LockReentryError):
                        enter()
                else:
                    assert enter() is lock
                    assert lock.locked()
                    assert lock.__exit__(None, None, None) is None
            elif held:
                assert lock.__exit__(KeyError, KeyError(), None) is None
                held = False
            else:
                with pytest.raises(safeshm.LockNotHeldError):
                    lock.__exit__(None, None, None)
            assert lock.locked() == held
            assert lock._mutex.held_here() == held
        if held:
            lock.release()
    finally:
        lock.close()
        lock.unlink()


# -- reference leaks -------------------------------------------------------------------------
def _rss_kib() -> int:
    skip_rss_under_asan()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def _churn(lock: safeshm.SafeLock, n: int) -> None:
    acquire, release = lock.acquire, lock.release
    for _ in range(n // 4):
        with lock:
            pass
        acquire()
        release()
        acquire(timeout=0.5)
        release()
        acquire(False)
        release()


@native_only
def test_no_reference_leaks_over_a_million_calls(lock: safeshm.SafeLock) -> None:
    _churn(lock, 100_000)  # warm up: caches, specialisation
    refs = (sys.getrefcount(lock), sys.getrefcount(lock._core), sys.getrefcount(True))
    rss = _rss_kib()
    _churn(lock, 1_000_000)
    # One object kept per call would be >= 16 MB; one reference, a changed count.
    assert _rss_kib() - rss < 4096
    assert (sys.getrefcount(lock), sys.getrefcount(lock._core)) == refs[:2]
    # Error paths too: refused re-entries, releases of an unheld lock, argument errors.
    with lock:
        for _ in range(50_000):
            with pytest.raises(safeshm.LockReentryError):
                lock.acquire(timeout=0)
    for _ in range(50_000):
        with pytest.raises(safeshm.LockNotHeldError):
            lock.release()
        with pytest.raises(ValueError, match="can't specify a timeout"):
            lock.acquire(False, 1)
    gc.collect()
    rss2 = _rss_kib()
    for _ in range(100_000):
        with pytest.raises(safeshm.LockNotHeldError):
            lock.release()
    assert _rss_kib() - rss2 < 2048
    assert (sys.getrefcount(lock), sys.getrefcount(lock._core)) == refs[:2]


@native_only
def test_with_returns_the_handle_without_keeping_it(cleanup: Any) -> None:
    """enter() holds a weak reference: a dropped handle goes at once, no cyclic GC."""
    lock = safeshm.SafeLock.create()
    name = lock.name
    with lock as held:
        assert held is lock
    del held
    gc.disable()
    try:
        ref = weakref.ref(lock)
        lock.close()
        del lock
        assert ref() is None
    finally:
        gc.enable()
        safeshm.SafeLock.attach(name).unlink()


# -- close, fork, signals ------------------------------------------------------------------------
@native_only
@pytest.mark.parametrize("how", ["acquire", "with", "acquire(timeout)"])
def test_close_from_another_thread_while_one_is_blocked(lock: safeshm.SafeLock, how: str) -> None:
    other_handle = safeshm.SafeLock.attach(lock.name)
    errors: list[BaseException] = []
    started = threading.Event()

    def blocked() -> None:
        started.set()
        try:
            if how == "with":
                with lock:
                    pass
            elif how == "acquire":
                lock.acquire()
            else:
                lock.acquire(timeout=JOIN_TIMEOUT)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    holding, release = threading.Event(), threading.Event()
    stolen: list[bool] = []

    def hold() -> None:  # not the closing thread: close() releases what that one holds
        with other_handle:
            holding.set()
            release.wait(JOIN_TIMEOUT)
            stolen.append(not other_handle._mutex.held_here())

    holder = threading.Thread(target=hold)
    try:
        holder.start()
        assert holding.wait(JOIN_TIMEOUT)
        t = threading.Thread(target=blocked)
        t.start()
        assert started.wait(JOIN_TIMEOUT)
        time.sleep(0.3)  # asleep in the kernel now
        closed_at = time.monotonic()
        lock.close()
        t.join(timeout=JOIN_TIMEOUT)
        assert not t.is_alive()
        assert time.monotonic() - closed_at < PROMPT
        assert len(errors) == 1 and isinstance(errors[0], safeshm.SegmentClosedError), errors
        assert "is closed on this handle" in str(errors[0])
        release.set()
        holder.join(timeout=JOIN_TIMEOUT)
        assert stolen == [False]  # still the holder's, not robbed
        assert not other_handle.locked()
    finally:
        release.set()
        holder.join(timeout=JOIN_TIMEOUT)
        other_handle.close()
    # Every entry point of the closed handle refuses cleanly.
    with pytest.raises(safeshm.SegmentClosedError):
        lock.acquire()
    with pytest.raises(safeshm.SegmentClosedError):
        lock.acquire_nowait()
    with pytest.raises(safeshm.SegmentClosedError), lock:
        pass
    with pytest.raises(safeshm.SegmentClosedError):
        lock.release()  # not held: closed
    with pytest.raises(TypeError, match="timeout"):
        lock.acquire(timeout="x")  # type: ignore[arg-type]  # as ctypes: arguments first


def _fork_child(check: Any) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if check() else 2
        finally:
            os._exit(code)
    return pid


@pytest.mark.parametrize("holder", ["another thread", "the forking thread"])
def test_fork_while_held(lock: safeshm.SafeLock, holder: str) -> None:
    """The child sees the lock held by a live thread of the parent, which will release
    it: it waits (no deadlock, no theft) and gets it once the parent releases."""
    r, w = os.pipe()
    checked_r, checked_w = os.pipe()  # the child's word that it saw the lock held
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(JOIN_TIMEOUT)

    t = threading.Thread(target=hold)
    if holder == "another thread":
        t.start()
        assert holding.wait(JOIN_TIMEOUT)
    else:
        lock.acquire()

    def child() -> bool:
        assert lock.locked()
        assert lock.acquire(timeout=0.2) is False  # a live holder (in the parent)
        assert lock.acquire_nowait() is False
        os.write(checked_w, b"k")
        os.read(r, 1)  # the parent released it
        assert lock.acquire(timeout=JOIN_TIMEOUT) is True
        with pytest.raises(safeshm.LockReentryError):
            lock.acquire()
        lock.release()
        with lock:
            pass
        return True

    pid = _fork_child(child)
    os.close(checked_w)  # the child's exit ends the wait below, had it failed
    try:
        readable, _, _ = select.select([checked_r], [], [], JOIN_TIMEOUT)
        assert readable, "the child did not check the lock in time"
        os.read(checked_r, 1)
    finally:
        os.close(checked_r)
    if holder == "another thread":
        release.set()
        t.join(timeout=JOIN_TIMEOUT)
    else:
        lock.release()
    os.write(w, b"x")
    os.close(w)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lock.acquire(timeout=PROMPT)
    lock.release()


def test_fork_while_a_thread_is_blocked_in_acquire(lock: safeshm.SafeLock) -> None:
    other_handle = safeshm.SafeLock.attach(lock.name)
    try:
        other_handle.acquire()
        got: list[bool] = []

        def waiter() -> None:
            got.append(lock.acquire(timeout=JOIN_TIMEOUT))
            lock.release()

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.2)

        def child() -> bool:
            # The blocked thread does not exist here; the lock is still the parent's.
            assert lock.acquire(timeout=0.1) is False
            return True

        pid = _fork_child(child)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        other_handle.release()
        t.join(timeout=JOIN_TIMEOUT)
        assert got == [True]
        assert not lock.locked()
    finally:
        other_handle.close()


SIGINT_WORKER = """
import os, signal, sys, threading, time, safeshm
assert safeshm.implementation() == "native"
lock = safeshm.SafeLock.attach(sys.argv[1])
holder = safeshm.SafeLock.attach(sys.argv[1])
holder.acquire()  # the main thread holds it through another handle... in another thread:
release = threading.Event()
def hold():
    with lock:
        held.set()
        release.wait(60)
held = threading.Event()
holder.release()
t = threading.Thread(target=hold); t.start(); held.wait(60)
for how in ("acquire", "with", "acquire(timeout)"):
    sent = []
    def interrupt():
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)
    threading.Timer(0.3, interrupt).start()
    try:
        if how == "acquire":
            lock.acquire()
        elif how == "with":
            with lock:
                pass
        else:
            lock.acquire(timeout=60)
        print("not interrupted", how); sys.exit(1)
    except KeyboardInterrupt:
        late = time.monotonic() - sent[0]
    assert late < 1.0, (how, late)
    assert not lock._mutex.held_here(), how  # nothing held by the interrupted thread
    assert lock.locked()  # still the other thread's
    print("interrupted", how, round(late, 3), flush=True)
release.set(); t.join(60)
assert lock.acquire(timeout=5); lock.release()
lock.close(); holder.close()
"""


@needs_native
def test_ctrl_c_interrupts_a_blocked_native_acquire(lock: safeshm.SafeLock) -> None:
    out = _finish(_spawn(SIGINT_WORKER, "native", lock.name))
    assert out.count("interrupted") == 3 and "not interrupted" not in out, out
    assert not lock.locked()


@native_only
def test_warning_as_error_releases_first_with_the_native_enter(lock: safeshm.SafeLock) -> None:
    proc = _spawn(HOLD_WORKER, other(), other(), lock.name, "hold")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        proc.kill()
        proc.wait(timeout=JOIN_TIMEOUT)
    finally:
        proc.kill()
        proc.communicate()
    entered = False
    with pytest.raises(safeshm.HolderDiedWarning), lock:  # warnings are errors here
        entered = True
    assert not entered
    assert not lock.locked()
    assert lock.acquire(timeout=1)
    lock.release()


@native_only
def test_native_core_is_bound(lock: safeshm.SafeLock) -> None:
    assert isinstance(lock._core, safeshm._native.Lock)  # type: ignore[attr-defined]
    assert lock.acquire.__func__ is _lock._native_acquire  # type: ignore[attr-defined]
    assert type(lock).__enter__(lock) is lock
    lock.release()
    held = signal.getsignal(signal.SIGINT)  # untouched by the core
    assert held is signal.getsignal(signal.SIGINT)


def test_with_a_temporary_handle(lock: safeshm.SafeLock) -> None:
    """``with SafeLock.attach(name):`` drops the handle's last reference before __enter__
    runs: the lock is still taken and released, and ``as`` gets the handle."""
    with safeshm.SafeLock.attach(lock.name) as held:
        assert held.name == lock.name
        assert lock.locked()
        assert held._mutex.held_here()
    assert not lock.locked()
    del held
    with safeshm.SafeLock.attach(lock.name):
        assert lock.locked()
    assert not lock.locked()


@native_only
def test_reentry_and_not_held_messages_match_ctypes(lock: safeshm.SafeLock) -> None:
    with lock:
        with pytest.raises(safeshm.LockReentryError) as native:
            lock.acquire()
        with pytest.raises(safeshm.LockReentryError) as ctypes_:
            safeshm.SafeLock.acquire(lock)
        assert str(native.value) == str(ctypes_.value)
        with pytest.raises(safeshm.LockReentryError) as native, lock:
            pass
        assert str(native.value) == str(ctypes_.value)
        assert lock._mutex.held_here()  # the refused re-entries left the outer hold
    with pytest.raises(safeshm.LockNotHeldError) as native:
        lock.release()
    with pytest.raises(safeshm.LockNotHeldError) as ctypes_:
        _lock._c_release(lock._mutex, lock._seg)()
    assert str(native.value) == str(ctypes_.value)


@needs_native
def test_a_clevel_that_leads_back_to_itself_raises_recursion_error() -> None:
    """A CLevel whose name reads itself (or a cycle of them) is a RecursionError, as a
    property would give, not a C stack overflow (it was a segfault). In a subprocess: a
    crash must not take the test run with it."""
    code = (
        "from safeshm import _native as N\n"
        "class K:\n"
        "    x = N.CLevel('x')\n"
        "    y = N.CLevel('z')\n"
        "    z = N.CLevel('y')\n"
        "for attr in ('x', 'y'):\n"
        "    try:\n"
        "        getattr(K(), attr)\n"
        "    except RecursionError:\n"
        "        print('RecursionError', attr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env_for("native"), capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split("\n")[:2] == ["RecursionError x", "RecursionError y"]
