"""TickLeader: one job per tick across processes and threads.

The properties: at most one leader per tick (exactly one when someone asks), no two runs
at once (a tick that begins while a run holds the lock is skipped, not run late), a
leader SIGKILLed mid-job loses its tick only and the next leader is told, lead() never
blocks; the same through ``async with`` and the two loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import os
import pickle
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest

import safeshm
from safeshm import (
    HolderDiedWarning,
    IncompatibleSegmentError,
    InvalidNameError,
    SafeArray,
    SafeCounter,
    SafeEvent,
    SafeLock,
    SegmentClosedError,
    SegmentExistsError,
    SegmentNotFoundError,
    TickLeader,
)
from safeshm._tick import TickOverrunWarning

from ._helpers import kill_and_reap, processes

EVERY = 0.05  # seconds per tick in the multi-process tests
WAIT = 10.0  # the longest any single wait may take


def _sleep_until(leader: TickLeader, tick: int) -> None:
    """Sleep until ``tick`` has begun (bounded)."""
    delay = leader.tick_time(tick) - time.time()
    if delay > WAIT:
        raise AssertionError(f"tick {tick} is {delay:.1f} s away")
    if delay > 0:
        time.sleep(delay)
    deadline = time.monotonic() + WAIT
    while leader.current_tick() < tick:
        if time.monotonic() > deadline:
            raise AssertionError(f"tick {tick} never began")
        time.sleep(0.001)


def _in_mid_tick(leader: TickLeader) -> int:
    """Wait for a fresh tick with most of it ahead (so that a test step fits in it)."""
    tick = leader.current_tick() + 1
    _sleep_until(leader, tick)
    return tick


Probe = tuple[SafeArray[int], SafeCounter, SafeCounter]
"""What the jobs record: runs per tick (indexed from the window's first), runs active
right now, and how many runs found another one active."""


def _job(counts: SafeArray[int], active: SafeCounter, overlaps: SafeCounter, index: int) -> None:
    """What a leader does: count its tick; count an overlap if another run is active."""
    if active.add(1) != 1:
        overlaps.add(1)
    counts.add(index, 1)
    active.add(-1)


# -- workers (module level: picklable for every start method) ----------------------------------


def lead_at_boundaries_worker(
    leader: TickLeader,
    probe: Probe,
    threads: int,
    start: Start,
) -> None:
    """Threads that wake at each boundary together and try to lead it three times."""
    first = _await_start(start)
    counts, active, overlaps = probe
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for tick in range(first, first + len(counts)):
                _sleep_until(leader, tick)
                for _ in range(3):
                    with leader.lead(tick) as leading:
                        if leading:
                            _job(counts, active, overlaps, tick - first)
        except BaseException as e:  # noqa: BLE001 - reported by the exit code below
            errors.append(e)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=WAIT * 3)
    if errors or any(t.is_alive() for t in workers):
        raise SystemExit(f"worker failed: {errors!r}")


def async_loops_worker(
    leader: TickLeader,
    probe: Probe,
    start: Start,
) -> None:
    """Two ``aiter_ticks`` loops on one event loop, cancelled after the last tick."""
    first = _await_start(start)
    counts, active, overlaps = probe
    last = first + len(counts) - 1

    async def loop() -> None:
        async with contextlib.aclosing(leader.aiter_ticks()) as ticks:
            async for tick in ticks:
                if first <= tick <= last:
                    if active.add(1) != 1:
                        overlaps.add(1)
                    counts.add(tick - first, 1)
                    await asyncio.sleep(0)  # the job awaits: the other loop runs meanwhile
                    active.add(-1)

    async def main() -> None:
        end = leader.tick_time(last + 1) - time.time() + 0.02
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(loop(), loop()), timeout=min(end, WAIT * 3))

    asyncio.run(main())


def lead_and_hang_worker(leader: TickLeader, tick: int, inside: SafeEvent) -> None:
    """Lead ``tick`` and never finish the job (the test SIGKILLs this process)."""
    with leader.lead(tick) as leading:
        if not leading:
            raise SystemExit("did not lead")
        inside.set()
        time.sleep(WAIT * 3)


def lead_and_wait_worker(leader: TickLeader, inside: SafeEvent, release: SafeEvent) -> None:
    """Lead the current tick and hold it until ``release`` is set (the test SIGSTOPs this
    process meanwhile)."""
    with leader.lead() as leading:
        if not leading:
            raise SystemExit("did not lead")
        inside.set()
        if not release.wait(WAIT * 3):
            raise SystemExit("never released")


def slow_every_third_worker(
    leader: TickLeader,
    probe: Probe,
    stop: SafeEvent,
    start: Start,
) -> None:
    """``iter_ticks`` loop whose job on every third tick lasts 1.5 ticks."""
    first = _await_start(start)
    counts, active, overlaps = probe
    for tick in leader.iter_ticks(stop):
        if first <= tick < first + len(counts):
            if active.add(1) != 1:
                overlaps.add(1)
            counts.add(tick - first, 1)
            if (tick - first) % 3 == 0:
                time.sleep(leader.every * 1.5)
            active.add(-1)


Start = tuple[SafeCounter, SafeCounter]
"""(workers ready, the window's first tick): workers may take a while to start (spawn, a
loaded machine); the window opens once they all wait for it."""


def _await_start(start: Start) -> int:
    ready, first = start
    ready.add(1)
    deadline = time.monotonic() + WAIT * 2
    while first.value == 0:
        if time.monotonic() > deadline:
            raise SystemExit("the window never opened")
        time.sleep(0.005)
    return first.value


def _open_window(start: Start, parties: int, leader: TickLeader) -> int:
    """Wait until every worker is ready, then open the window three ticks from now."""
    ready, first = start
    deadline = time.monotonic() + WAIT * 2
    while ready.value < parties:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.005)
    first.set(leader.current_tick() + 3)
    return first.value


def _run_window(
    method: str, target: Any, args: tuple[Any, ...], parties: int, leader: TickLeader
) -> int:
    """Run ``parties`` processes of ``target(*args, start)``; the window's first tick."""
    start = (SafeCounter.create(), SafeCounter.create())
    try:
        with processes(method, target, [(*args, start)] * parties) as procs:
            first = _open_window(start, parties, leader)
            for p in procs:
                p.join(timeout=WAIT * 3)
            assert [p.exitcode for p in procs] == [0] * parties
        return first
    finally:
        for counter in start:
            counter.close()
            counter.unlink()


# -- exactly one per tick ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_one_leader_per_tick_across_processes_and_threads(
    method: str, name: str, cleanup: Any
) -> None:
    n = 20
    leader = cleanup(TickLeader.create(EVERY, name=name))
    counts = cleanup(SafeArray.create("q", n))
    active = cleanup(SafeCounter.create())
    overlaps = cleanup(SafeCounter.create())
    args = (leader, (counts, active, overlaps), 2)
    first = _run_window(method, lead_at_boundaries_worker, args, 3, leader)
    # This process asks too, after everyone: nothing of the window is led again.
    for tick in range(first, first + n):
        with leader.lead(tick) as leading:
            assert not leading
    led = counts.to_list()
    stats = leader.statistics()
    assert max(led) <= 1, led  # at most once per tick
    assert overlaps.value == 0
    # Every tick was claimed exactly once: it was either led or skipped (its claimer found
    # the previous run still holding the lock: a leader preempted mid-job).
    assert stats.runs == sum(led)
    assert stats.runs + stats.skipped == n, (stats, led)
    assert stats.skipped <= n // 4, stats
    assert stats.last_tick == first + n - 1
    assert not stats.running and stats.leader_deaths == 0


def test_one_leader_per_tick_async(name: str, cleanup: Any) -> None:
    """Several processes, each with two ``aiter_ticks`` loops on one event loop."""
    n = 16
    leader = cleanup(TickLeader.create(EVERY, name=name))
    counts = cleanup(SafeArray.create("q", n))
    active = cleanup(SafeCounter.create())
    overlaps = cleanup(SafeCounter.create())
    args = (leader, (counts, active, overlaps))
    _run_window("spawn", async_loops_worker, args, 3, leader)
    led = counts.to_list()
    assert max(led) <= 1, led
    assert overlaps.value == 0
    assert sum(led) >= n - n // 4, led
    assert not leader.statistics().running  # cancelled loops released the lock


def test_leading_gives_true_once_per_tick(name: str) -> None:
    with TickLeader.create(10.0, name=name) as leader:  # one long tick
        results = []
        for _ in range(5):
            with leader.lead() as leading:
                results.append(leading)
        assert results == [True, False, False, False, False]
        stats = leader.statistics()
        assert (stats.runs, stats.skipped, stats.last_tick) == (1, 0, leader.current_tick())


def test_lead_used_as_a_condition_is_refused(name: str) -> None:
    """A new user's trap: ``if leader.lead():`` was always true (an object), so every
    worker ran the job. It raises TypeError now, and claims nothing."""
    with TickLeader.create(10.0, name=name) as leader:
        with pytest.raises(TypeError, match=r"with leader\.lead"):
            bool(leader.lead())  # what ``if leader.lead():`` calls
        with leader.lead() as leading:
            assert leading  # the tick was not claimed by the refused call


def test_an_earlier_tick_is_never_led_after_a_later_one(name: str) -> None:
    with TickLeader.create(EVERY, name=name) as leader:
        tick = _in_mid_tick(leader)
        with leader.lead() as leading:
            assert leading
        with leader.lead(tick - 1) as leading:  # unclaimed, but a later tick was led
            assert not leading
        _sleep_until(leader, tick + 2)
        with leader.lead(tick + 1) as leading:  # over, and unclaimed: still leadable
            assert leading
        with leader.lead() as leading:
            assert leading


# -- no overlap ----------------------------------------------------------------------------------


def test_a_tick_that_begins_during_a_run_is_skipped(name: str) -> None:
    with TickLeader.create(EVERY * 4, name=name) as leader:
        tick = _in_mid_tick(leader)
        with leader.lead() as leading:
            assert leading
            _sleep_until(leader, tick + 1)
            other = TickLeader.attach(name)  # another handle, another thread
            try:
                got: list[bool] = []

                def ask() -> None:
                    with other.lead() as leading:
                        got.append(leading)

                t = threading.Thread(target=ask)
                t.start()
                t.join(timeout=WAIT)
                assert got == [False]
            finally:
                other.close()
            with leader.lead() as nested:  # this thread, while it runs the job
                assert not nested
            assert leader.statistics().running
        # Lost, not run late: nobody leads tick + 1 any more.
        with leader.lead(tick + 1) as leading:
            assert not leading
        stats = leader.statistics()
        assert (stats.runs, stats.skipped, stats.running) == (1, 1, False)


def test_same_event_loop_overlap_is_skipped(name: str) -> None:
    async def main(leader: TickLeader) -> None:
        tick = _in_mid_tick(leader)
        async with leader.lead() as leading:
            assert leading
            await asyncio.sleep(leader.tick_time(tick + 1) - time.time() + 0.005)
            assert leader.current_tick() == tick + 1
            # Another coroutine of this loop (this thread) while the job awaits.
            async with leader.lead() as other:
                assert not other
        assert leader.statistics().skipped == 1

    with TickLeader.create(EVERY * 2, name=name) as leader:
        asyncio.run(asyncio.wait_for(main(leader), WAIT))


def test_slow_jobs_never_overlap_and_lose_their_next_tick(name: str, cleanup: Any) -> None:
    n = 12
    leader = cleanup(TickLeader.create(EVERY * 2, name=name))
    counts = cleanup(SafeArray.create("q", n))
    active = cleanup(SafeCounter.create())
    overlaps = cleanup(SafeCounter.create())
    stop = cleanup(SafeEvent.create())
    start = (cleanup(SafeCounter.create()), cleanup(SafeCounter.create()))
    args = (leader, (counts, active, overlaps), stop, start)
    with processes("fork", slow_every_third_worker, [args] * 3) as procs:
        first = _open_window(start, 3, leader)
        _sleep_until(leader, first + n)
        stop.set()
        for p in procs:
            p.join(timeout=WAIT)
        assert [p.exitcode for p in procs] == [0, 0, 0]
    led = counts.to_list()
    assert overlaps.value == 0
    assert max(led) <= 1, led
    for i in range(0, n - 1, 3):  # a slow run (1.5 ticks) skips the tick after it
        assert led[i + 1] == 0, (i, led)  # even if no worker asked while the run went on
    assert sum(led) >= n // 2, led


def test_a_tick_that_begins_during_a_run_is_skipped_though_nobody_asked(name: str) -> None:
    """The run claims the tick under way when it ends: nobody leads it late, even with no
    call for it while the run went on; every tick that began during the run counts as
    skipped."""
    with TickLeader.create(0.2, name=name) as leader:
        tick = _in_mid_tick(leader)
        with leader.lead() as leading:
            assert leading
            _sleep_until(leader, tick + 3)  # the run goes on across three boundaries
        stats = leader.statistics()
        assert stats.last_tick is not None and stats.last_tick >= tick + 3
        for t in range(tick + 1, stats.last_tick + 1):
            with leader.lead(t) as leading:
                assert not leading, t
        assert leader.statistics().skipped == stats.last_tick - tick
        later = _in_mid_tick(leader)
        with leader.lead(later) as leading:
            assert leading
        # a run within its tick skips nothing
        assert leader.statistics().skipped == stats.last_tick - tick


# -- a leader killed mid-job ---------------------------------------------------------------------


def test_leader_killed_mid_job(name: str, cleanup: Any) -> None:
    leader = cleanup(TickLeader.create(EVERY * 2, name=name))
    inside = cleanup(SafeEvent.create())
    tick = _in_mid_tick(leader)
    with processes("fork", lead_and_hang_worker, [(leader, tick, inside)]) as (proc,):
        assert inside.wait(WAIT)
        kill_and_reap(proc)
    # The dead run's tick is not run again, by anyone.
    with leader.lead(tick) as leading:
        assert not leading
    _sleep_until(leader, tick + 1)
    lead = leader.lead()
    with pytest.warns(HolderDiedWarning, match="died while running the job"):
        leading = lead.__enter__()
    assert leading  # the next tick is led, by the first to ask
    assert leader.statistics().running
    lead.__exit__(None, None, None)
    stats = leader.statistics()
    assert (stats.runs, stats.leader_deaths, stats.running) == (2, 1, False)
    _sleep_until(leader, tick + 2)
    with leader.lead() as leading:  # recovered for good: no warning any more
        assert leading


def test_leader_killed_warning_as_error_releases_the_lock(name: str, cleanup: Any) -> None:
    leader = cleanup(TickLeader.create(EVERY * 2, name=name))
    inside = cleanup(SafeEvent.create())
    tick = _in_mid_tick(leader)
    with processes("fork", lead_and_hang_worker, [(leader, tick, inside)]) as (proc,):
        assert inside.wait(WAIT)
        kill_and_reap(proc)
    _sleep_until(leader, tick + 1)
    # pytest's filterwarnings = error: the warning is raised from lead()...
    with pytest.raises(HolderDiedWarning), leader.lead():
        pytest.fail("entered the block")  # pragma: no cover
    # ... with the lock released first, and that tick lost.
    assert not leader.statistics().running
    with leader.lead() as leading:
        assert not leading
    _sleep_until(leader, tick + 2)
    with leader.lead() as leading:
        assert leading


# -- a hung or stopped leader (max_run) ----------------------------------------------------------


def _first_tick_after(leader: TickLeader, when: float) -> int:
    """The first tick that begins after the ``time.time()`` instant ``when``."""
    tick = leader.current_tick() + 1
    while leader.tick_time(tick) <= when:
        tick += 1
    return tick


def test_a_stopped_leader_is_reported_once_per_tick(name: str, cleanup: Any) -> None:
    max_run = EVERY * 2
    leader = cleanup(TickLeader.create(EVERY * 2, max_run=max_run, name=name))
    assert leader.max_run == max_run
    inside = cleanup(SafeEvent.create())
    release = cleanup(SafeEvent.create())
    _in_mid_tick(leader)
    with processes("fork", lead_and_wait_worker, [(leader, inside, release)]) as (proc,):
        try:
            assert inside.wait(WAIT)
            os.kill(proc.pid, signal.SIGSTOP)  # a frozen worker, holding the lead
            tick = _first_tick_after(leader, time.time() + max_run)
            _sleep_until(leader, tick)
            with pytest.warns(TickOverrunWarning) as record, leader.lead(tick) as leading:
                assert not leading
            [w] = record
            assert w.filename == __file__  # the caller's line, not safeshm's
            warning = w.message
            assert isinstance(warning, TickOverrunWarning)
            assert (warning.name, warning.tick, warning.holder_pid) == (name, tick, proc.pid)
            assert warning.running_for >= max_run
            assert f"pid {proc.pid}" in str(warning) and "max_run" in str(warning)
            with leader.lead(tick) as leading:  # claimed: once per tick, no warning
                assert not leading
            stats = leader.statistics()
            assert stats.running and stats.holder_pid == proc.pid
            assert stats.running_for is not None and stats.running_for >= max_run
            assert (stats.max_run, stats.skipped) == (max_run, 1)
            _sleep_until(leader, tick + 1)
            again = pytest.warns(TickOverrunWarning, match=f"tick {tick + 1} ")
            with again, leader.lead(tick + 1) as leading:
                assert not leading
        finally:
            release.set()
            os.kill(proc.pid, signal.SIGCONT)
        proc.join(timeout=WAIT)
        assert proc.exitcode == 0
    # The run ended: the schedule goes on, without a warning.
    _in_mid_tick(leader)
    with leader.lead() as leading:
        assert leading
    stats = leader.statistics()
    assert (stats.runs, stats.skipped, stats.running, stats.leader_deaths) == (2, 2, False, 0)
    assert stats.running_for is None and stats.holder_pid is None


def test_max_run(name: str) -> None:
    with TickLeader.create(EVERY * 4, max_run=60, name=name) as leader:
        assert leader.max_run == 60.0
        tick = _in_mid_tick(leader)
        with leader.lead() as leading:
            assert leading
            _sleep_until(leader, tick + 1)
            with leader.lead() as nested:  # an overrun shorter than max_run: no warning
                assert not nested
            stats = leader.statistics()
            assert stats.holder_pid == os.getpid()
            assert stats.running_for is not None and 0 < stats.running_for < 60
        # Every worker gives the same max_run (None: none); attach reads it.
        with pytest.raises(IncompatibleSegmentError, match="max_run"):
            TickLeader.open(name, EVERY * 4)
        with pytest.raises(IncompatibleSegmentError, match="max_run"):
            TickLeader.open(name, EVERY * 4, max_run=30)
        TickLeader.open(name, EVERY * 4, max_run=datetime.timedelta(minutes=1)).close()
        with TickLeader.attach(name) as attached:
            assert attached.max_run == 60.0
    with TickLeader.create(EVERY * 4, max_run=0.001, name=name) as leader:
        tick = _in_mid_tick(leader)
        with leader.lead() as leading:
            assert leading
            _sleep_until(leader, tick + 1)
            with pytest.warns(TickOverrunWarning) as record, leader.lead() as nested:
                assert not nested  # the job runs in this very thread, past max_run
            assert record[0].message.holder_pid == os.getpid()  # type: ignore[union-attr]
    with TickLeader.create(1.0, name=name) as leader:
        assert leader.max_run is None
        assert leader.statistics().max_run is None


@pytest.mark.parametrize(
    ("max_run", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (0.0001, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (1e12, ValueError),
        ("60", TypeError),
        (True, TypeError),
    ],
)
def test_bad_max_run(max_run: Any, error: type[Exception], name: str) -> None:
    with pytest.raises(error):
        TickLeader.create(1.0, max_run=max_run, name=name)
    with pytest.raises(error):
        TickLeader.open(name, 1.0, max_run=max_run)
    with pytest.raises(SegmentNotFoundError):  # nothing was created
        TickLeader.attach(name)


def _lead_once(how: str, leader: TickLeader) -> bool:
    if how == "with":
        with leader.lead() as leading:
            return leading

    async def lead() -> bool:
        async with leader.lead() as leading:
            return leading

    return asyncio.run(lead())


def _loop_until_led(how: str, leader: TickLeader) -> int:
    if how == "iter_ticks":
        stop = threading.Event()
        timer = threading.Timer(WAIT, stop.set)  # a bound, should the test go wrong
        timer.start()
        try:
            for tick in leader.iter_ticks(stop):
                return tick
        finally:
            timer.cancel()
        raise AssertionError("iter_ticks never led")

    async def loop() -> int:
        async with contextlib.aclosing(leader.aiter_ticks()) as ticks:
            async for tick in ticks:
                return tick
        raise AssertionError("unreachable")  # pragma: no cover

    return asyncio.run(asyncio.wait_for(loop(), WAIT))


@pytest.mark.parametrize("how", ["with", "async with", "iter_ticks", "aiter_ticks"])
def test_warnings_point_at_the_callers_line(how: str, name: str, cleanup: Any) -> None:
    """Both of lead()'s warnings name the user's ``with``/``async with``/``for``/
    ``async for`` line, not a line of safeshm (what logging and -W filters show)."""
    leader = cleanup(TickLeader.create(EVERY * 2, max_run=EVERY, name=name))
    inside = cleanup(SafeEvent.create())
    tick = _in_mid_tick(leader)
    with processes("fork", lead_and_hang_worker, [(leader, tick, inside)]) as (proc,):
        assert inside.wait(WAIT)
        overdue = _first_tick_after(leader, time.time() + EVERY)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            if how in ("with", "async with"):
                _sleep_until(leader, overdue)
                assert not _lead_once(how, leader)  # TickOverrunWarning
                kill_and_reap(proc)
                _sleep_until(leader, overdue + 1)
                assert _lead_once(how, leader)  # HolderDiedWarning
            else:
                # The loop asks at every boundary: overruns until the kill, then the next
                # tick recovers the lead.
                def kill_after_an_overrun() -> None:
                    deadline = time.monotonic() + WAIT
                    while not any(isinstance(w.message, TickOverrunWarning) for w in record):
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.005)
                    kill_and_reap(proc)

                killer = threading.Thread(target=kill_after_an_overrun)
                killer.start()
                try:
                    _loop_until_led(how, leader)
                finally:
                    killer.join(timeout=WAIT)
    kinds = {type(w.message) for w in record}
    assert kinds == {TickOverrunWarning, HolderDiedWarning}, record
    assert [w.filename for w in record] == [__file__] * len(record)


# -- the loops -----------------------------------------------------------------------------------


def test_iter_ticks_threads_lead_every_tick_once(name: str) -> None:
    with TickLeader.create(EVERY, name=name) as leader:
        stop = threading.Event()
        led: list[int] = []
        begun: list[int] = []
        start = _in_mid_tick(leader)

        def loop() -> None:
            begun.append(leader.current_tick())
            for tick in leader.iter_ticks(stop):
                led.append(tick)

        threads = [threading.Thread(target=loop) for _ in range(3)]
        for t in threads:
            t.start()
        _sleep_until(leader, start + 8)
        stop.set()
        for t in threads:
            t.join(timeout=WAIT)
        assert not any(t.is_alive() for t in threads)
        assert len(led) == len(set(led)), led
        # The first tick led is the next to begin, never the one running: a thread that
        # started late (a loaded machine) may have seen a later tick than `start`.
        assert start + 1 <= min(led) <= max(begun) + 2, (start, begun, led)
        assert len(led) >= 5, led


def test_iter_ticks_stops_promptly(name: str) -> None:
    with TickLeader.create(3600.0, name=name) as leader:
        stop = threading.Event()
        threading.Timer(0.05, stop.set).start()
        began = time.monotonic()
        assert list(leader.iter_ticks(stop)) == []
        assert time.monotonic() - began < 2.0


def test_iter_ticks_break_releases_the_lock(name: str) -> None:
    with TickLeader.create(EVERY, name=name) as leader:
        for _ in leader.iter_ticks(threading.Event()):
            assert leader.statistics().running
            break
        assert not leader.statistics().running


def test_aiter_ticks(name: str) -> None:
    async def main(leader: TickLeader) -> list[int]:
        got: list[int] = []
        async with contextlib.aclosing(leader.aiter_ticks()) as ticks:
            async for tick in ticks:
                assert leader.statistics().running
                got.append(tick)
                if len(got) == 3:
                    break
        assert not leader.statistics().running
        return got

    with TickLeader.create(EVERY, name=name) as leader:
        start = leader.current_tick()
        got = asyncio.run(asyncio.wait_for(main(leader), WAIT))
        assert got[0] > start and got == sorted(set(got))


# -- the schedule --------------------------------------------------------------------------------


def test_schedule_and_offset(name: str) -> None:
    with TickLeader.create(datetime.timedelta(seconds=60), offset=-15, name=name) as leader:
        assert (leader.every, leader.offset) == (60.0, 45.0)  # offset taken modulo every
        now = time.time()
        tick = leader.current_tick()
        assert leader.tick_time(tick) <= now < leader.tick_time(tick + 1)
        assert (leader.tick_time(tick) - 45) % 60 == 0
        assert tick == math.floor((now - 45) / 60)
        # The same schedule, spelt otherwise, opens it; another one is refused.
        TickLeader.open(name, 60.0, offset=datetime.timedelta(seconds=45)).close()
        with pytest.raises(IncompatibleSegmentError, match=r"every 60\.0 s"):
            TickLeader.open(name, 30.0)
        with pytest.raises(IncompatibleSegmentError):
            TickLeader.open(name, 60.0, offset=10)
        attached = TickLeader.attach(name)
        assert (attached.every, attached.offset) == (60.0, 45.0)
        attached.close()


@pytest.mark.parametrize(
    ("every", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (0.0001, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (1e12, ValueError),
        (datetime.timedelta(0), ValueError),
        ("60", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_bad_every(every: Any, error: type[Exception], name: str) -> None:
    with pytest.raises(error):
        TickLeader.create(every, name=name)
    with pytest.raises(error):
        TickLeader.open(name, every)
    with pytest.raises(SegmentNotFoundError):  # nothing was created
        TickLeader.attach(name)


@pytest.mark.parametrize(
    ("offset", "error"), [(math.nan, ValueError), (-math.inf, ValueError), ("0", TypeError)]
)
def test_bad_offset(offset: Any, error: type[Exception], name: str) -> None:
    with pytest.raises(error):
        TickLeader.open(name, 1.0, offset=offset)


def test_bad_names_and_ticks(name: str) -> None:
    with pytest.raises(InvalidNameError, match="at most 59"):
        TickLeader.open("x" * 60, 1.0)
    with pytest.raises(InvalidNameError):
        TickLeader.open("bad/name", 1.0)
    with pytest.raises(TypeError):
        TickLeader.open(42, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"use TickLeader\.open"):
        TickLeader()
    with TickLeader.create(1.0, name=name) as leader:
        now = leader.current_tick()
        with pytest.raises(ValueError, match="has not begun"):
            leader.lead(now + 5)
        with pytest.raises(TypeError):
            leader.lead(1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            leader.lead(True)
        assert leader.statistics().last_tick is None  # nothing was claimed
        lead = leader.lead()
        with lead:
            pass
        with pytest.raises(RuntimeError, match="only once"), lead:
            pass  # pragma: no cover


# -- lifecycle -----------------------------------------------------------------------------------


def test_lifecycle(name: str) -> None:
    leader = TickLeader.open(name, 1.0)
    segments = {f"{name}.tick", f"{name}.lock"}
    with TickLeader.open(name, 1.0) as other:  # open() only closes
        assert other.name == name
    assert other.closed
    with pytest.raises(SegmentExistsError):
        TickLeader.create(1.0, name=name)
    clone = pickle.loads(pickle.dumps(leader))
    assert repr(clone) == f"safeshm.TickLeader(name={name!r}, every=1.0, offset=0.0)"
    assert type(clone) is safeshm.TickLeader and clone.__module__ == "safeshm"
    clone.close()
    clone.close()  # idempotent
    assert repr(clone) == f"safeshm.TickLeader(name={name!r}, closed=True)"
    with pytest.raises(SegmentClosedError, match=f"TickLeader {name!r} is closed"), clone.lead():
        pass  # pragma: no cover
    with pytest.raises(SegmentClosedError):
        pickle.dumps(clone)
    with pytest.raises(SegmentClosedError), clone:
        pass  # pragma: no cover
    assert segments <= set(_listing())
    leader.unlink()
    with pytest.raises(SegmentNotFoundError):
        leader.unlink()
    leader.close()
    assert not segments & set(_listing())
    with TickLeader.create(1.0) as made:  # create() removes what it made
        made_segments = {f"{made.name}.tick", f"{made.name}.lock"}
        assert made_segments <= set(_listing())
    assert not made_segments & set(_listing())


def test_attach_refuses_other_structures(name: str, cleanup: Any) -> None:
    with pytest.raises(SegmentNotFoundError):
        TickLeader.attach(name)
    cleanup(SafeLock.create(name=f"{name}.lock"))
    with SafeArray.create("q", 8, name=f"{name}.tick"):
        with pytest.raises(IncompatibleSegmentError, match="not a TickLeader"):
            TickLeader.attach(name)
        with pytest.raises(IncompatibleSegmentError):
            TickLeader.open(name, 1.0)
    with SafeArray.create("q", 3, name=f"{name}.tick"), pytest.raises(IncompatibleSegmentError):
        TickLeader.open(name, 1.0)


def test_closed_handle_errors_name_the_leader(name: str) -> None:
    with TickLeader.create(1.0, name=name):
        closed = TickLeader.attach(name)
        closed.close()

        async def first_async_tick() -> int:
            return await anext(closed.aiter_ticks())

        calls: list[Callable[[], object]] = [
            lambda: closed.every,
            lambda: closed.offset,
            lambda: closed.max_run,
            closed.current_tick,
            lambda: closed.tick_time(0),
            closed.statistics,
            lambda: closed.lead().__enter__(),
            lambda: next(closed.iter_ticks()),
            lambda: asyncio.run(first_async_tick()),
        ]
        for call in calls:
            with pytest.raises(SegmentClosedError, match=f"^TickLeader {name!r} is closed"):
                call()


def test_close_inside_the_block_keeps_the_lead(name: str) -> None:
    with TickLeader.create(60.0, name=name) as leader:
        other = TickLeader.attach(name)
        with other.lead() as leading:
            assert leading
            other.close()
            leader.close()  # no handle's close() cuts the running job short
            probe = TickLeader.attach(name)
            assert probe.statistics().running
        assert not probe.statistics().running
        probe.close()


def _listing() -> list[str]:
    from safeshm import _compat

    return [
        f.removeprefix(_compat.FILE_PREFIX)
        for f in os.listdir(_compat.SHM_DIR)
        if f.startswith(_compat.FILE_PREFIX)
    ]
