"""safeshm.metrics across processes: exact totals, SIGKILLed writers, row reuse under
churn, gauge modes over live and dead processes, crash-safe folds, untorn floats."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import struct
import threading
import time
from typing import Any

import pytest

from safeshm.metrics import Counter, Gauge, Histogram, MetricsRegistry
from safeshm.metrics import _registry as registry_module

from ._metrics_helpers import fork, kill, pipe_wait, reap, value, values, wait_until


@pytest.fixture
def reg(cleanup: Any) -> MetricsRegistry:
    return cleanup(MetricsRegistry.create(series=64, rows=16))  # type: ignore[no-any-return]


def test_processes_and_threads_exact(reg: MetricsRegistry) -> None:
    c = Counter("c", "c", ["k"], registry=reg)
    h = Histogram("h", "h", ["k"], registry=reg, buckets=[1, 2])
    n = 3000

    def work() -> None:
        child = c.labels("same")
        hist = h.labels("same")
        for i in range(n):
            child.inc()
            hist.observe(i % 3)

    def process() -> None:
        ts = [threading.Thread(target=work) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)

    pids = [fork(process) for _ in range(4)]
    work()
    assert [reap(p) for p in pids] == [0] * 4
    total = 13 * n
    assert value(reg, "c", ("same",)) == total
    # i % 3 in 0, 1, 2: buckets <=1 gets two thirds, <=2 one third
    assert values(reg)[("h", ("same",))] == [total * 2 / 3, total / 3, 0.0, total]


def test_sigkill_mid_inc_never_backwards_and_exact(reg: MetricsRegistry) -> None:
    """Writers SIGKILLed at random points and replaced, no cleanup hook: the total never
    goes backwards and equals what the children report having completed (each killed
    child's in-flight inc may or may not have landed)."""
    c = Counter("c", "c", ["k"], registry=reg)
    h = Histogram("h", "h", registry=reg, buckets=[1])
    kills = 40
    done = multiprocessing.RawArray("q", kills)  # shared with the forked children
    rng = random.Random(1)

    def writer(i: int) -> None:
        child = c.labels("x")
        while True:
            child.inc()
            h.observe(0.5)  # a second write: the kill may land between the two
            done[i] += 1

    last = 0.0
    for i in range(kills):
        pid = fork(lambda i=i: writer(i))  # type: ignore[misc]
        time.sleep(rng.uniform(0.001, 0.02))
        kill(pid)
        now = values(reg)
        total = now.get(("c", ("x",)), [0.0])[0]
        assert total >= last
        last = total
    completed = sum(done)
    total = value(reg, "c", ("x",))
    assert completed <= total <= completed + kills
    buckets = values(reg)[("h", ())]
    assert completed <= buckets[0] <= total
    assert reg.statistics().rows_ever_used <= 3


def test_short_lived_processes_reuse_rows(reg: MetricsRegistry) -> None:
    """200 processes come and go: rows are reused, nothing grows, nothing is lost; their
    gauge values are folded into the base exactly once."""
    c = Counter("c", "c", registry=reg)
    s = Gauge("s", "s", registry=reg, multiprocess_mode="sum")
    m = Gauge("m", "m", registry=reg, multiprocess_mode="max")
    live = Gauge("l", "l", registry=reg, multiprocess_mode="livesum")
    before = reg.statistics()

    def child(i: int) -> None:
        c.inc()
        s.set(1)
        m.set(i)
        live.set(1)

    for i in range(200):
        assert reap(fork(lambda i=i: child(i))) == 0  # type: ignore[misc]
    st = reg.statistics()
    assert st.rows_ever_used <= 3
    assert st.series == before.series
    assert (value(reg, "c"), value(reg, "s"), value(reg, "m"), value(reg, "l")) == (
        200,
        200,
        199,
        0,
    )


def _hold(fn: Any) -> tuple[int, int]:
    """Fork a child that runs ``fn``, says so, and waits until its pipe closes."""
    r, w = os.pipe()
    r2, w2 = os.pipe()

    def child() -> None:
        os.close(r)
        fn()
        os.write(w, b"ok")
        with contextlib.suppress(AssertionError):
            pipe_wait(r2)  # until the parent closes its end or kills us (or a timeout)

    pid = fork(child)
    os.close(w)
    os.close(r2)
    assert pipe_wait(r) == b"ok"
    os.close(r)
    return pid, w2


MODES = ("sum", "livesum", "max", "livemax", "min", "livemin", "mostrecent", "livemostrecent")


def test_gauge_modes_over_live_and_dead_processes(cleanup: Any) -> None:
    reg = cleanup(MetricsRegistry.create(series=64, rows=3))
    gauges = {m: Gauge(f"g_{m}", m, registry=reg, multiprocess_mode=m) for m in MODES}

    def setter(v: float) -> Any:
        return lambda: [g.set(v) for g in gauges.values()]

    held: list[tuple[int, int]] = []
    try:
        held.append(_hold(setter(1)))
        held.append(_hold(setter(5)))
        time.sleep(0.002)
        held.append(_hold(setter(3)))
        kill(held[1][0])
        expected = {
            "sum": 9,
            "livesum": 4,
            "max": 5,
            "livemax": 3,
            "min": 1,
            "livemin": 1,
            "mostrecent": 3,
            "livemostrecent": 3,
        }
        assert {m: value(reg, f"g_{m}") for m in MODES} == expected
        # Reusing the dead process's row folds its values into the base, exactly once.
        Counter("c", "c", registry=reg).inc()
        assert reg.statistics().rows_ever_used == 3
        assert {m: value(reg, f"g_{m}") for m in MODES} == expected
    finally:
        for pid, w in held:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                kill(pid)
            os.close(w)
    assert value(reg, "g_livesum") == 0
    assert value(reg, "g_sum") == 9
    assert value(reg, "g_min") == 1


@pytest.mark.parametrize("stop_at", ["journal", "base"])
def test_fold_is_crash_safe(cleanup: Any, stop_at: str) -> None:
    """A process SIGKILLed in the middle of folding a dead row's gauge values (holding
    the mutex) leaves them counted exactly once."""
    reg = cleanup(MetricsRegistry.create(series=16, rows=2))
    g = Gauge("g", "g", registry=reg, multiprocess_mode="sum")
    c = Counter("c", "c", registry=reg)
    assert reap(fork(lambda: g.set(5))) == 0  # its row (row 0) now has a dead owner

    def folder() -> None:
        registry_module._fold_hook = lambda at: at == stop_at and os.kill(os.getpid(), 9)
        c.inc()  # claims the dead row: folds, and dies at stop_at

    assert reap(fork(folder)) == -9
    assert reg._mutex.owner_died()
    assert value(reg, "g") == 5  # the collector repairs the half-done fold
    assert reg._q[registry_module._CTRL + registry_module._C_JACTIVE] == 0
    c.inc()  # folds for real now
    assert value(reg, "g") == 5
    assert value(reg, "c") == 1
    g.set(2)
    assert value(reg, "g") == 7


def test_floats_are_never_torn(reg: MetricsRegistry) -> None:
    a = struct.unpack("d", b"\x55" * 8)[0]
    b = struct.unpack("d", b"\xaa" * 7 + b"\x3a")[0]
    g = Gauge("g", "g", registry=reg, multiprocess_mode="mostrecent")
    c = Counter("c", "c", registry=reg)
    stop = multiprocessing.RawValue("i", 0)

    def writer() -> None:
        while not stop.value:
            g.set(a)
            g.set(b)
            c.inc(a)

    pid = fork(writer)
    try:
        wait_until(lambda: value(reg, "g") != 0)
        seen = set()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            got = value(reg, "g")
            assert got in (a, b)
            seen.add(got)
        assert len(seen) == 2
    finally:
        stop.value = 1
        assert reap(pid) == 0


def _bounded(fn: Any, limit: float = 10.0) -> BaseException | None:
    """Run ``fn`` in a thread; what it raised (``None``: returned). Fails if it blocks."""
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            box.append(None)
        except BaseException as e:  # noqa: BLE001 - returned to the test
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert box, f"{fn!r} still blocked after {limit} s"
    return box[0]


def test_a_stopped_mutex_holder_fails_calls_after_the_lock_timeout(cleanup: Any) -> None:
    """Review r2 F3: a process SIGSTOPped holding the registry mutex must not hang
    scrapes, new label sets, definitions, row claims or ending threads."""
    import signal

    import safeshm

    reg = cleanup(MetricsRegistry.create(series=16, rows=8, lock_timeout=0.3))
    c = Counter("c", "c", ["a"], registry=reg)
    g = Gauge("g", "g", registry=reg)
    c.labels("x").inc()  # this thread has a row and a cached child
    go = threading.Event()

    def end_later() -> None:
        c.labels("x").inc()
        go.wait(30)

    ender = threading.Thread(target=end_later, daemon=True)
    ender.start()
    wait_until(lambda: reg.statistics().rows_in_use == 2)
    r, w = os.pipe()

    def hold() -> None:  # pragma: no cover - the child
        with reg._held():
            os.write(w, b"held")
            os.kill(os.getpid(), signal.SIGSTOP)

    pid = fork(hold)
    try:
        pipe_wait(r)
        wait_until(lambda: os.waitpid(pid, os.WNOHANG | os.WUNTRACED)[0] == pid)
        t0 = time.monotonic()
        for _ in range(1000):
            c.labels("x").inc()  # the hot path never takes the mutex
        assert time.monotonic() - t0 < 1.0
        for op in (
            lambda: c.labels("y"),  # a new label set
            lambda: g.set(1),  # the process's first gauge write claims a row
            reg.snapshot,  # the scrape
            lambda: Counter("d", "d", registry=reg),  # a definition (a worker's boot)
            lambda: c.labels("x").inc(),  # from a new thread: a row claim
        ):
            t = time.monotonic()
            err = _bounded(op)
            assert isinstance(err, safeshm.LockTimeoutError), err
            assert time.monotonic() - t < 3.0
        go.set()  # a thread that ends releases its row without waiting for the holder
        ender.join(5)
        assert not ender.is_alive()
        assert reg.statistics().rows_in_use == 1
    finally:
        os.kill(pid, signal.SIGCONT)
        reap(pid)
        os.close(r)
        os.close(w)
    c.labels("y").inc()
    assert value(reg, "c", ("x",)) == 1002
    assert value(reg, "c", ("y",)) == 1
