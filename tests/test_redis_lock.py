"""RedisLock: the SafeLock contract on Redis, and what only a lease lock does.

The contract tests run over both backends (``lock`` is a ``SafeLock`` or a
``RedisLock``), so the two cannot drift; what differs -- a dead holder is recovered when
its lease runs out, the previous holder may still be running, fencing tokens, renewal,
network failures -- is tested as a difference, against real redis-server processes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import safeshm
from tests._redis_server import raw_client

from ._helpers import JOIN_TIMEOUT, PROMPT, START_METHODS, kill_and_reap, processes, run_all

redis = pytest.importorskip("redis")

from safeshm.redis._lock import RedisLock  # noqa: E402 - after the importorskip

SHORT = 0.5
"""A lease short enough to wait out in a test."""


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def rcleanup(cleanup: Any) -> Iterator[Callable[[Any], Any]]:
    """``cleanup`` for both backends: a RedisLock's keys are deleted (``unlink()`` needs
    an open handle), then it is closed; a SafeLock goes to ``cleanup``."""
    handles: list[RedisLock] = []

    def register(handle: Any) -> Any:
        if isinstance(handle, RedisLock):
            handles.append(handle)
            return handle
        return cleanup(handle)

    yield register
    for h in reversed(handles):
        with contextlib.suppress(safeshm.HandleClosedError):
            h.unlink()
        h.close()


@pytest.fixture(params=["shm", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_lock(backend: str, request: pytest.FixtureRequest, rcleanup: Any) -> Callable[..., Any]:
    """``make_lock(**redis_options)`` -> a new lock of the backend under test."""

    def make(**options: Any) -> Any:
        if backend == "shm":
            return rcleanup(safeshm.SafeLock.create())
        url = request.getfixturevalue("redis_url")("lock")
        return rcleanup(RedisLock.open(url, **options))

    return make


@pytest.fixture
def lock(make_lock: Callable[..., Any]) -> Any:
    return make_lock()


def reopen(lock: Any) -> Any:
    """Another handle on the same lock."""
    if isinstance(lock, RedisLock):
        return RedisLock.open(lock.url, lease=lock.lease)
    return safeshm.SafeLock.attach(lock.name)


def in_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` in another thread: its result, or the exception it raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=JOIN_TIMEOUT)
    assert not t.is_alive()
    return out[0]


# -- worker processes -------------------------------------------------------------------------
def holder_worker(lock: Any, holding: Any, release: Any, report: Any) -> None:
    """Take the lock, report its fencing token, say so, and wait (for a SIGKILL or SIGSTOP,
    or a release); then report what the lock tells a holder that was away."""
    lock.acquire()
    report.put(lock.fencing_token if isinstance(lock, RedisLock) else 0)
    holding.set()
    release.wait(timeout=JOIN_TIMEOUT)
    seen: dict[str, Any] = {}
    if isinstance(lock, RedisLock):
        seen["lost"] = lock.lost
        try:
            lock.check()
            seen["check"] = "ok"
        except safeshm.LeaseLostError as e:
            seen["check"] = f"LeaseLostError: {e}"
    try:
        lock.release()
        seen["release"] = "ok"
    except safeshm.SafeShmError as e:
        seen["release"] = f"{type(e).__name__}: {e}"
    report.put(seen)
    if isinstance(lock, RedisLock):
        lock.close()


def locked_rmw_worker(lock: Any, counter: Any, barrier: Any, rounds: int) -> None:
    """Read-modify-writes that race without the lock; with the lock, also the fencing
    tokens must only grow."""
    barrier.wait(timeout=JOIN_TIMEOUT)
    last = 0
    for _ in range(rounds):
        with lock:
            v = counter.value
            if isinstance(lock, RedisLock):
                if lock.fencing_token <= last:
                    raise AssertionError(f"fencing token {lock.fencing_token} after {last}")
                last = lock.fencing_token
            counter.set(v + 1)
    if isinstance(lock, RedisLock):
        lock.close()


def waiter_worker(lock: Any, ready: Any, report: Any) -> None:
    """Say so, then block in acquire(); report when it returned."""
    ready.set()
    got = lock.acquire(timeout=JOIN_TIMEOUT)
    report.put((got, time.monotonic()))
    lock.release()
    lock.close()


# == the contract, over both backends =========================================================
def test_satisfies_the_protocol(lock: Any) -> None:
    assert isinstance(lock, safeshm.SharedLock)


def test_acquire_release(lock: Any) -> None:
    assert not lock.locked()
    assert lock.acquire() is True
    assert lock.locked()
    lock.release()
    assert not lock.locked()


def test_with_statement(lock: Any) -> None:
    with lock as held:
        assert held is lock
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(KeyError), lock:
        raise KeyError("x")
    assert not lock.locked()


def test_reentry_is_an_error_not_a_deadlock(lock: Any) -> None:
    with lock:
        with pytest.raises(safeshm.LockReentryError, match="already held by this thread"):
            lock.acquire()
        with pytest.raises(safeshm.LockReentryError):
            lock.acquire(timeout=5)
        with pytest.raises(safeshm.LockReentryError):
            lock.acquire(False)
        with pytest.raises(safeshm.LockReentryError), lock:
            pass
        assert lock.locked()
    assert not lock.locked()


def test_two_handles_in_one_thread_are_a_reentry(lock: Any) -> None:
    other = reopen(lock)
    try:
        with lock:
            with pytest.raises(safeshm.LockReentryError):
                other.acquire(timeout=0)
            with pytest.raises(safeshm.LockReentryError):
                other.acquire(timeout=5)
            assert in_thread(lambda: other.acquire(timeout=0)) is False
        assert other.acquire(timeout=0)
        other.release()
    finally:
        other.close()


def test_release_unheld(lock: Any) -> None:
    with pytest.raises(safeshm.LockNotHeldError):
        lock.release()
    assert not lock.locked()


def test_release_by_another_thread_is_refused(lock: Any) -> None:
    lock.acquire()
    error = in_thread(lock.release)
    assert isinstance(error, safeshm.LockNotHeldError)
    assert lock.locked()
    lock.release()
    assert not lock.locked()


@pytest.mark.parametrize("bad", [-2, -0.5, -1.5, float("-inf"), float("nan")])
def test_bad_timeouts(lock: Any, bad: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a non-negative number"):
        lock.acquire(timeout=bad)
    assert not lock.locked()


@pytest.mark.parametrize("bad", ["1", [], True, False])
def test_timeout_type_errors(lock: Any, bad: Any) -> None:
    with pytest.raises(TypeError, match="timeout"):
        lock.acquire(timeout=bad)
    assert not lock.locked()


@pytest.mark.parametrize("timeout", [0, 1, 0.5, float("inf"), -2])
def test_timeout_with_nonblocking_is_an_error(lock: Any, timeout: float) -> None:
    with pytest.raises(ValueError, match="can't specify a timeout for a non-blocking call"):
        lock.acquire(blocking=False, timeout=timeout)
    with pytest.raises(ValueError, match="can't specify a timeout for a non-blocking call"):
        lock.acquire(False, timeout)
    assert not lock.locked()


def test_threading_lock_semantics(lock: Any) -> None:
    """acquire(blocking=True, timeout=-1) as threading.Lock (BaseLockTests' cases)."""
    assert lock.acquire(False) is True

    def other() -> list[bool]:
        return [
            lock.acquire(False),
            lock.acquire(blocking=False),
            lock.acquire_nowait(),
            lock.acquire(timeout=0),
            lock.acquire(True, 0.01),
            lock.acquire(blocking=False, timeout=-1),
            lock.acquire(blocking=False, timeout=None),
        ]

    assert in_thread(other) == [False] * 7
    lock.release()
    for forever in ({}, {"timeout": -1}, {"timeout": -1.0}, {"timeout": None}, {"blocking": 1}):
        assert lock.acquire(**forever) is True
        lock.release()
    assert lock.acquire(True) is True
    lock.release()
    with pytest.raises(OverflowError):  # as threading.Lock: beyond TIMEOUT_MAX
        lock.acquire(timeout=float("inf"))
    with pytest.raises(OverflowError):
        lock.acquire(timeout=threading.TIMEOUT_MAX * 2)
    assert not lock.locked()


def test_acquired_context(lock: Any) -> None:
    with lock.acquired(timeout=1) as held:
        assert held is lock and lock.locked()
        assert in_thread(lambda: _acquired_times_out(lock)) == "timed out"
    assert not lock.locked()


def _acquired_times_out(lock: Any) -> str:
    try:
        with lock.acquired(timeout=0.05):
            return "acquired"
    except safeshm.LockTimeoutError:
        return "timed out"


def test_timeouts_are_bounded_and_a_release_wakes_the_waiter(lock: Any) -> None:
    ctx = multiprocessing.get_context("fork")
    holding, release, report = ctx.Event(), ctx.Event(), ctx.Queue()
    with processes("fork", holder_worker, [(lock, holding, release, report)]):
        assert holding.wait(JOIN_TIMEOUT)
        assert lock.locked()
        assert lock.acquire(blocking=False) is False
        assert lock.acquire(timeout=0) is False
        t0 = time.monotonic()
        assert lock.acquire(timeout=0.3) is False
        assert 0.29 <= time.monotonic() - t0 < PROMPT
        release.set()
        t0 = time.monotonic()
        assert lock.acquire(timeout=JOIN_TIMEOUT)
        assert time.monotonic() - t0 < PROMPT
        lock.release()
        report.get(timeout=JOIN_TIMEOUT)
        assert report.get(timeout=JOIN_TIMEOUT)["release"] == "ok"


@pytest.mark.parametrize("method", START_METHODS)
def test_mutual_exclusion_across_processes(
    method: str, make_lock: Callable[..., Any], rcleanup: Any
) -> None:
    """Read-modify-writes that race without the lock are exact with it (the handle is
    pickled to spawned workers, inherited by forked ones)."""
    lock = make_lock()
    counter = rcleanup(safeshm.SafeCounter.create())
    n, rounds = 3, 60
    barrier = multiprocessing.get_context(method).Barrier(n)
    run_all(method, locked_rmw_worker, [(lock, counter, barrier, rounds)] * n)
    assert counter.value == n * rounds
    assert not lock.locked()


def test_mutual_exclusion_across_threads(lock: Any) -> None:
    state = {"v": 0}
    n, rounds = 4, 50

    def work() -> None:
        for _ in range(rounds):
            with lock:
                v = state["v"]
                time.sleep(0)  # invite a switch mid-update
                state["v"] = v + 1

    ts = [threading.Thread(target=work) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in ts)
    assert state["v"] == n * rounds


def test_holder_killed_next_acquirer_recovers_and_is_told(make_lock: Callable[..., Any]) -> None:
    """Both recover a SIGKILLed holder's lock and warn; SafeLock at once, RedisLock when
    the lease runs out -- and only RedisLock must say the holder may still be running."""
    lock = make_lock(lease=SHORT)
    ctx = multiprocessing.get_context("fork")
    holding, release, report = ctx.Event(), ctx.Event(), ctx.Queue()
    with processes("fork", holder_worker, [(lock, holding, release, report)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        their_fence = report.get(timeout=JOIN_TIMEOUT)
        assert lock.acquire(timeout=0.1) is False  # a live holder is never robbed
        kill_and_reap(p)
        t0 = time.monotonic()
        with pytest.warns(safeshm.HolderDiedWarning) as caught:
            assert lock.acquire(timeout=PROMPT) is True
        waited = time.monotonic() - t0
        assert caught[0].filename == __file__  # points at the caller's line
        if isinstance(lock, RedisLock):
            assert waited < SHORT + PROMPT
            assert "may still be running" in str(caught[0].message)
            assert lock.fencing_token > their_fence
        else:
            assert waited < PROMPT
        lock.release()
        assert lock.acquire(timeout=1.0)  # no further warning
        lock.release()


def test_warning_as_error_leaves_lock_free(make_lock: Callable[..., Any]) -> None:
    lock = make_lock(lease=SHORT)
    ctx = multiprocessing.get_context("fork")
    holding, release, report = ctx.Event(), ctx.Event(), ctx.Queue()
    with processes("fork", holder_worker, [(lock, holding, release, report)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        kill_and_reap(p)
        with pytest.raises(safeshm.HolderDiedWarning):
            lock.acquire(timeout=PROMPT)
        assert not lock.locked()
        assert lock.acquire(timeout=1)
        lock.release()


def test_thread_ending_while_holding(make_lock: Callable[..., Any]) -> None:
    """A thread that ends holding the lock is a dead holder for both (a RedisLock stops
    renewing its lease)."""
    lock = make_lock(lease=SHORT)
    in_thread(lock.acquire)
    with pytest.warns(safeshm.HolderDiedWarning):
        assert lock.acquire(timeout=PROMPT)
    lock.release()


def test_close_releases_a_lock_this_thread_holds(make_lock: Callable[..., Any]) -> None:
    lock = make_lock()
    other = reopen(lock)
    try:
        lock.acquire()
        lock.close()
        assert not other.locked()
        assert in_thread(lambda: other.acquire(timeout=1)) is True
    finally:
        other.close()


# == RedisLock only ===========================================================================
@pytest.fixture
def rlock(redis_url: Callable[[str], str], rcleanup: Any) -> Callable[..., RedisLock]:
    """``rlock(**options)`` -> a RedisLock on a fresh name; ``rlock(url=..)`` reuses one."""

    def make(url: str | None = None, **options: Any) -> RedisLock:
        return rcleanup(RedisLock.open(url or redis_url("rlock"), **options))  # type: ignore[no-any-return]

    return make


def test_guarantees() -> None:
    g = RedisLock.guarantees
    assert (g.backend, g.scope, g.holder_death, g.outcome_unknown) == (
        "redis",
        "network",
        "lease",
        True,
    )


def test_fencing_tokens_grow_and_belong_to_the_holder(rlock: Callable[..., RedisLock]) -> None:
    a = rlock()
    b = rlock(url=a.url)
    tokens = []
    for handle in (a, b, a, b):
        with handle:
            tokens.append(handle.fencing_token)
            elsewhere = in_thread(lambda h=handle: h.fencing_token)
            assert isinstance(elsewhere, safeshm.LockNotHeldError)
    assert tokens == sorted(tokens) and len(set(tokens)) == 4
    with pytest.raises(safeshm.LockNotHeldError):
        _ = a.fencing_token
    with pytest.raises(safeshm.LockNotHeldError):
        a.check()


def test_renewal_keeps_the_lock_past_many_leases(rlock: Callable[..., RedisLock]) -> None:
    # Renewed every lease / 3: a renewal may be late by up to 0.4 s (the test server
    # fsyncs every write; a loaded machine) before the lease runs out.
    lease = 0.6
    lock = rlock(lease=lease)
    other = rlock(url=lock.url)
    with lock:
        t_end = time.monotonic() + 5 * lease
        while time.monotonic() < t_end:
            assert in_thread(lambda: other.acquire(False)) is False
            assert not lock.lost
            assert 0 < lock.check() <= lease
            time.sleep(lease / 2)
    assert not lock.locked()
    assert in_thread(lambda: other.acquire(False)) is True  # no HolderDiedWarning: an error


def test_without_renewal_the_lease_runs_out_and_the_holder_is_told(
    rlock: Callable[..., RedisLock],
) -> None:
    lock = rlock(lease=0.2, renew=False)
    lock.acquire()
    fence = lock.fencing_token
    time.sleep(0.35)
    assert lock.lost
    with pytest.raises(safeshm.LeaseLostError):
        lock.check()
    assert not lock.locked()  # the server let it go
    with pytest.raises(safeshm.LeaseLostError, match=f"fencing token {fence} is still the latest"):
        lock.release()
    # The late release says the holder is alive: the next holder is not told of a death.
    assert lock.acquire(False)
    lock.release()


def test_manual_extend(rlock: Callable[..., RedisLock]) -> None:
    lock = rlock(lease=0.6, renew=False)  # extended every 0.1 s: room for a pause
    with lock:
        for _ in range(4):
            time.sleep(0.1)
            lock.extend()
        assert not lock.lost
        lock.extend(2.0)
        assert lock.check() > 1.5
    lock.acquire()
    time.sleep(0.8)
    with pytest.raises(safeshm.LeaseLostError):
        lock.extend()
    with pytest.raises(safeshm.LeaseLostError):
        lock.release()
    with pytest.raises(safeshm.LockNotHeldError):
        lock.extend()


def test_paused_holder_loses_the_lease_and_learns_it(rlock: Callable[..., RedisLock]) -> None:
    """SIGSTOP the holder past its lease: the next holder gets a larger fencing token;
    the paused one, resumed, is told it lost the lock (lost, check(), release())."""
    lock = rlock(lease=SHORT)
    ctx = multiprocessing.get_context("fork")
    holding, release, report = ctx.Event(), ctx.Event(), ctx.Queue()
    with processes("fork", holder_worker, [(lock, holding, release, report)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        their_fence = report.get(timeout=JOIN_TIMEOUT)
        os.kill(p.pid, signal.SIGSTOP)
        try:
            with pytest.warns(safeshm.HolderDiedWarning, match="may still be running"):
                assert lock.acquire(timeout=PROMPT)
            assert lock.fencing_token > their_fence
        finally:
            os.kill(p.pid, signal.SIGCONT)
        release.set()
        seen = report.get(timeout=JOIN_TIMEOUT)
        p.join(timeout=JOIN_TIMEOUT)
        assert p.exitcode == 0
    assert seen["lost"] is True
    assert seen["check"].startswith("LeaseLostError")
    assert seen["release"].startswith("LeaseLostError")
    assert "another holder acquired the lock since" in seen["release"]
    # The resumed holder's renewal and release left our hold alone.
    assert not lock.lost
    assert lock.locked()
    lock.release()
    assert not lock.locked()


def test_waiter_wakes_promptly_on_release(rlock: Callable[..., RedisLock]) -> None:
    """Across processes, a blocked acquire() is woken by the release's publish, not by a
    polling tick or the lease (30 s here)."""
    lock = rlock()
    ctx = multiprocessing.get_context("fork")
    latencies = []
    for _ in range(5):
        ready, report = ctx.Event(), ctx.Queue()
        lock.acquire()
        with processes("fork", waiter_worker, [(lock, ready, report)]) as (p,):
            assert ready.wait(JOIN_TIMEOUT)
            time.sleep(0.3)  # it is blocked in acquire() now
            released = time.monotonic()
            lock.release()
            got, woke = report.get(timeout=JOIN_TIMEOUT)
            p.join(timeout=JOIN_TIMEOUT)
        assert got is True
        latencies.append(woke - released)
    median = statistics.median(latencies)
    print(f"\nRedisLock hand-off to another process: median {median * 1e3:.2f} ms, "
          f"max {max(latencies) * 1e3:.2f} ms")  # fmt: skip
    assert median < 1.0  # measured: a few ms; redis-py's Lock: up to 100 ms


def test_no_lost_wakeups_under_contention(rlock: Callable[..., RedisLock], rcleanup: Any) -> None:
    """Processes hammering one lock: every waiter must hear the release it waits for (a
    lost wake-up would sleep until the lease's end, 30 s here)."""
    lock = rlock()
    counter = rcleanup(safeshm.SafeCounter.create())
    n, rounds = 3, 150
    barrier = multiprocessing.get_context("fork").Barrier(n)
    t0 = time.monotonic()
    run_all("fork", locked_rmw_worker, [(lock, counter, barrier, rounds)] * n)
    elapsed = time.monotonic() - t0
    assert counter.value == n * rounds
    assert elapsed < 25.0, f"{elapsed:.1f} s: a waiter slept until a lease ran out"


def test_waiter_wakes_when_a_dead_holders_lease_runs_out(rlock: Callable[..., RedisLock]) -> None:
    lock = rlock(lease=SHORT)
    ctx = multiprocessing.get_context("fork")
    holding, release, report = ctx.Event(), ctx.Event(), ctx.Queue()
    with processes("fork", holder_worker, [(lock, holding, release, report)]) as (p,):
        assert holding.wait(JOIN_TIMEOUT)
        waited: list[Any] = []

        def waiter() -> None:
            t0 = time.monotonic()
            waited.append(lock.acquire(timeout=JOIN_TIMEOUT))
            waited.append(time.monotonic() - t0)
            lock.release()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = threading.Thread(target=waiter)
            t.start()
            time.sleep(0.1)
            kill_and_reap(p)
            t.join(timeout=JOIN_TIMEOUT)
        assert [w.category for w in caught] == [safeshm.HolderDiedWarning]
    assert waited[0] is True
    assert waited[1] < SHORT + PROMPT


def test_unknown_outcome_of_an_acquire_is_resolved(fresh_redis: Any, rcleanup: Any) -> None:
    """The server stops answering after the acquire was sent: redis-py's read times out
    (an unknown outcome); the same token is sent again, and when the server resumes both
    run -- once acquiring, once reporting it. The caller knows it holds the lock, and the
    fencing counter moved once."""
    url = f"{fresh_redis.url}?socket_timeout=1.0#unknown"
    lock = rcleanup(RedisLock.open(url, lease=10))
    fresh_redis.pause()
    resume = threading.Timer(1.5, fresh_redis.resume)
    resume.start()
    try:
        assert lock.acquire(timeout=JOIN_TIMEOUT) is True
    finally:
        resume.join()
    assert lock.fencing_token == 1
    raw = redis.Redis.from_url(fresh_redis.url)
    try:
        assert raw.get("safeshm:{unknown}:fence") == b"1"
    finally:
        raw.close()
    lock.release()
    assert not lock.locked()


# -- server crashes ---------------------------------------------------------------------------
def _is_typed(error: BaseException) -> bool:
    return isinstance(error, safeshm.SafeShmError) and not isinstance(
        error, redis.exceptions.RedisError
    )


def test_lock_survives_a_server_crash_and_restart(fresh_redis: Any, rcleanup: Any) -> None:
    """kill -9 the server while the lock is held: calls raise typed errors; the AOF keeps
    the lease, so after the restart the holder still holds it and renews it."""
    url = f"{fresh_redis.url}#crash"
    lock = rcleanup(RedisLock.open(url, lease=3.0))
    other = rcleanup(RedisLock.open(url, lease=3.0))
    assert lock.acquire()
    fence = lock.fencing_token
    fresh_redis.kill()
    with pytest.raises(safeshm.BackendUnavailableError) as e1:
        lock.locked()
    error = in_thread(lambda: other.acquire(timeout=1))
    assert _is_typed(e1.value) and _is_typed(error)
    assert isinstance(error, safeshm.BackendUnavailableError)
    fresh_redis.start()
    assert lock.locked()
    assert in_thread(lambda: other.acquire(False)) is False
    time.sleep(1.2)  # renewals go through again
    assert not lock.lost
    lock.release()
    assert in_thread(lambda: _acquire_fence(other)) > fence  # the counter survived too


def _acquire_fence(lock: RedisLock) -> int:
    with lock:
        return lock.fencing_token


def test_release_during_a_crash_is_retried_in_the_background(
    fresh_redis: Any, rcleanup: Any
) -> None:
    url = f"{fresh_redis.url}#crash2"
    lease = 20.0
    lock = rcleanup(RedisLock.open(url, lease=lease))
    other = rcleanup(RedisLock.open(url, lease=lease))
    assert lock.acquire()
    fresh_redis.kill()
    with pytest.raises(ConnectionError) as e:  # BackendUnavailable or OutcomeUnknown
        lock.release()
    assert _is_typed(e.value)
    assert "retried in the background" in str(e.value)
    with pytest.raises(safeshm.LockNotHeldError):  # no longer this thread's either way
        lock.release()
    fresh_redis.start()
    # Free long before its lease ends, and with no HolderDiedWarning (an error here).
    t0 = time.monotonic()
    assert other.acquire(timeout=PROMPT)  # the same thread: not a re-entry any more
    assert time.monotonic() - t0 < PROMPT < lease
    other.release()


def test_a_blocked_acquire_gets_a_typed_error_when_the_server_dies(
    fresh_redis: Any, rcleanup: Any
) -> None:
    url = f"{fresh_redis.url}#crash3"
    lock = rcleanup(RedisLock.open(url))
    other = rcleanup(RedisLock.open(url))
    lock.acquire()
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(in_thread(other.acquire)))
    t.start()  # in_thread: the acquire's exception becomes its result
    time.sleep(0.3)  # blocked, subscribed
    fresh_redis.kill()
    t.join(timeout=JOIN_TIMEOUT)
    assert len(result) == 1
    assert isinstance(result[0], safeshm.BackendUnavailableError), result
    assert _is_typed(result[0])
    fresh_redis.start()
    lock.release()


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"lease": "1"}, TypeError),
        ({"lease": True}, TypeError),
        ({"lease": 0}, ValueError),
        ({"lease": -1}, ValueError),
        ({"lease": float("nan")}, ValueError),
        ({"lease": float("inf")}, ValueError),
        ({"renew": 1}, TypeError),
    ],
)
def test_bad_options_are_refused_before_connecting(options: Any, error: type) -> None:
    # Port 1 answers nothing: a connection attempt would be BackendUnavailableError.
    with pytest.raises(error):
        RedisLock.open("redis://127.0.0.1:1/0#x", **options)


def test_foreign_keys_under_the_name_are_refused(
    redis_server: Any, redis_url: Callable[[str], str]
) -> None:
    raw = raw_client(redis_server.url)
    try:
        url = redis_url("foreign")
        name = url.rsplit("#", 1)[1]
        raw.rpush(f"safeshm:{{{name}}}:lease", "x")
        with pytest.raises(safeshm.IncompatibleKeyError, match="list"):
            RedisLock.open(url)
        assert raw.type(f"safeshm:{{{name}}}:lease") == b"list"
        assert not raw.exists(f"safeshm:{{{name}}}")  # nothing claimed
        url2 = redis_url("foreign")
        raw.hset(f"safeshm:{{{url2.rsplit('#', 1)[1]}}}", "kind", "counter")
        with pytest.raises(safeshm.IncompatibleKeyError, match="counter"):
            RedisLock.open(url2)
    finally:
        raw.close()


# -- lifecycle ----------------------------------------------------------------------------------
def test_pickles_as_its_url_and_options(rlock: Callable[..., RedisLock]) -> None:
    lock = rlock(lease=7.0, renew=False)
    copy = pickle.loads(pickle.dumps(lock))
    try:
        assert (copy.url, copy.lease, copy.renew) == (lock.url, 7.0, False)
        assert "lease=7" in repr(copy) and "renew=False" in repr(copy)
    finally:
        copy.close()


def test_a_forked_child_does_not_hold_its_parents_lock(rlock: Callable[..., RedisLock]) -> None:
    lock = rlock()
    ctx = multiprocessing.get_context("fork")
    report = ctx.Queue()
    with lock, processes("fork", _child_view, [(lock, report)]):
        seen = report.get(timeout=JOIN_TIMEOUT)
    assert seen == ("LockNotHeldError", False)


def _child_view(lock: RedisLock, report: Any) -> None:
    try:
        lock.release()
        outcome = "released"
    except safeshm.SafeShmError as e:
        outcome = type(e).__name__
    report.put((outcome, lock.acquire(False)))


def test_use_after_close(rlock: Callable[..., RedisLock]) -> None:
    lock = rlock()
    lock.close()
    lock.close()  # idempotent
    with pytest.raises(safeshm.HandleClosedError):
        lock.acquire()
    with pytest.raises(safeshm.HandleClosedError):
        lock.locked()
    assert "closed" in repr(lock)


def test_closing_the_handle_of_a_blocked_acquire(rlock: Callable[..., RedisLock]) -> None:
    """Another thread closes the handle a thread waits on: the wait ends at once with
    HandleClosedError (redis-py's own failure on the closed socket is not let out)."""
    lock = rlock()
    other = rlock(url=lock.url)
    lock.acquire()
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(in_thread(other.acquire)))
    t.start()
    time.sleep(0.3)  # blocked, subscribed
    t0 = time.monotonic()
    other.close()
    t.join(timeout=JOIN_TIMEOUT)
    assert isinstance(result[0], safeshm.HandleClosedError), result
    assert time.monotonic() - t0 < PROMPT
    lock.release()


@pytest.fixture(autouse=True)
def _no_stray_renewal_threads() -> Iterator[None]:
    yield
    # Every handle of the test was closed: its renewal thread ends with it.
    deadline = time.monotonic() + PROMPT
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t.name.startswith("safeshm-renew-")]:
            return
        time.sleep(0.01)
    raise AssertionError("a renewal thread outlived its handle")


def test_a_lease_without_expiry_is_waited_for_not_an_overflow(
    redis_url: Callable[[str], str],
) -> None:
    """An operator PERSISTed the lease key (PTTL -1): a waiter with no timeout keeps
    waiting (it once asked redis-py to wait forever: a raw OverflowError), and takes the
    lock once the key is gone."""
    url = redis_url("persisted")
    name = url.rsplit("#", 1)[1]
    raw = raw_client(url)
    lock = RedisLock.open(url)
    try:
        raw.set(f"safeshm:{{{name}}}:lease", "someone")
        result: list[object] = []

        def wait() -> None:
            try:
                result.append(lock.acquire())
                lock.release()
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                result.append(exc)

        t = threading.Thread(target=wait, daemon=True)
        t.start()
        t.join(1.5)
        assert result == []  # still waiting, nothing raised
        raw.delete(f"safeshm:{{{name}}}:lease")
        t.join(JOIN_TIMEOUT)
        assert result == [True]
    finally:
        lock.close()
        lock.unlink()
        raw.close()
