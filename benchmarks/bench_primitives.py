"""The synchronization primitives against their ``multiprocessing`` counterparts, in one run.

Usage::

    python benchmarks/bench_primitives.py [--quick] [--json FILE]

Each workload runs with ``multiprocessing``'s primitive and with safeshm's, in fresh
processes (fork), back to back, best of ``--repeat`` runs; the table gives each one's
figure and safeshm's ratio (above 1: safeshm is faster):

* **Event set -> wake**: two processes ping-pong through two events (set, wait, clear);
  half a round trip is one set() waking a waiter in the other process.
* **Semaphore acquire+release**: one process (uncontended), then two processes.
* **Barrier round trip**: two processes pass a two-party barrier in a loop.
* **RLock with**: ``with rlock:`` with nothing inside, one process.
* **Condition notify -> wake**: two processes ping-pong through a condition and a
  shared turn counter.
* **RW lock, read-mostly**: two processes, 95% reads / 5% writes, each hold doing ~2 us
  of work; safeshm's SafeRWLock lets the readers overlap, multiprocessing has only a Lock.

Every run checks its own result (every round completed, the counts add up), so a broken
primitive cannot report a fast time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import safeshm

CTX = multiprocessing.get_context("fork")
TIMEOUT = 120.0


def _spin(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


# -- workers: (arguments..., start barrier, out array, index) -----------------------------------
def _event_pinger(a: tuple[Any, Any, int], go: Any, out: Any, i: int) -> None:
    ping, pong, n = a
    go.wait(TIMEOUT)
    t0 = time.perf_counter()
    for _ in range(n):
        ping.set()
        if not pong.wait(TIMEOUT):
            raise SystemExit(3)
        pong.clear()
    out[i] = time.perf_counter() - t0


def _event_ponger(a: tuple[Any, Any, int], go: Any, out: Any, i: int) -> None:
    ping, pong, n = a
    go.wait(TIMEOUT)
    for _ in range(n):
        if not ping.wait(TIMEOUT):
            raise SystemExit(3)
        ping.clear()
        pong.set()
    out[i] = 0.0


def _sem_loop(sem: Any, n: int, go: Any, out: Any, i: int) -> None:
    sem.acquire()
    sem.release()
    go.wait(TIMEOUT)
    t0 = time.perf_counter()
    for _ in range(n):
        sem.acquire()
        sem.release()
    out[i] = time.perf_counter() - t0


def _barrier_loop(barrier: Any, n: int, go: Any, out: Any, i: int) -> None:
    go.wait(TIMEOUT)
    t0 = time.perf_counter()
    for _ in range(n):
        barrier.wait(TIMEOUT)
    out[i] = time.perf_counter() - t0


def _rlock_loop(lock: Any, n: int, go: Any, out: Any, i: int) -> None:
    with lock:
        pass
    go.wait(TIMEOUT)
    t0 = time.perf_counter()
    for _ in range(n):
        with lock:
            pass
    out[i] = time.perf_counter() - t0


def _cond_player(a: tuple[Any, Any, int, int], go: Any, out: Any, i: int) -> None:
    """Two players alternate through ``turn`` (0, 1, 0, ...): each waits for its turn,
    takes it, and notifies the other."""
    cond, turn, me, n = a
    go.wait(TIMEOUT)
    t0 = time.perf_counter()
    for _ in range(n):
        with cond:
            if not cond.wait_for(lambda: turn.value % 2 == me, TIMEOUT):
                raise SystemExit(3)
            turn.value += 1
            cond.notify()
    out[i] = time.perf_counter() - t0


def _rw_mp(lock: Any, n: int, go: Any, out: Any, i: int) -> None:
    go.wait(TIMEOUT)
    t0 = time.perf_counter()
    for _ in range(n):
        with lock:
            _spin(2.0)
    out[i] = time.perf_counter() - t0


def _rw_safe(rw: Any, n: int, go: Any, out: Any, i: int) -> None:
    go.wait(TIMEOUT)
    t0 = time.perf_counter()
    for k in range(n):
        if k % 20 == 0:
            with rw.write():
                _spin(2.0)
        else:
            with rw.read():
                _spin(2.0)
    out[i] = time.perf_counter() - t0


# -- running ----------------------------------------------------------------------------------
def _run(targets: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> list[float]:
    """Start one process per target (its args get go, out, index appended), release them
    together, and return each one's measured seconds."""
    go = CTX.Barrier(len(targets))
    out = CTX.RawArray(ctypes.c_double, len(targets))
    procs = [
        CTX.Process(target=t, args=(*args, go, out, i), daemon=True)
        for i, (t, args) in enumerate(targets)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT + 30)
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    if bad:
        raise RuntimeError(f"a benchmark worker failed: exit codes {bad}")
    return list(out)


@contextlib.contextmanager
def _made(handle: Any) -> Iterator[Any]:
    """Close and unlink ``handle`` after the block. (Not ``with X.create():`` -- on the
    lock-like primitives ``with`` acquires, as in threading.)"""
    try:
        yield handle
    finally:
        handle.close()
        handle.unlink()


def _best(repeat: int, once: Callable[[], float]) -> float:
    return min(once() for _ in range(repeat))


def bench_event(n: int, repeat: int) -> tuple[float, float]:
    """Seconds per set() -> wake (half a ping-pong round trip)."""

    def mp() -> float:
        a, b = CTX.Event(), CTX.Event()
        t = _run([(_event_pinger, ((a, b, n),)), (_event_ponger, ((a, b, n),))])[0]
        return t / (2 * n)

    def safe() -> float:
        with safeshm.SafeEvent.create() as a, safeshm.SafeEvent.create() as b:
            t = _run([(_event_pinger, ((a, b, n),)), (_event_ponger, ((a, b, n),))])[0]
        return t / (2 * n)

    return _best(repeat, mp), _best(repeat, safe)


def bench_semaphore(n: int, repeat: int, procs: int) -> tuple[float, float]:
    """Seconds per acquire+release pair, per process (``procs`` processes at once)."""

    def one(sem: Any) -> float:
        return max(_run([(_sem_loop, (sem, n))] * procs)) / n

    def mp() -> float:
        return one(CTX.Semaphore(1))

    def safe() -> float:
        with _made(safeshm.SafeSemaphore.create(1)) as sem:
            return one(sem)

    return _best(repeat, mp), _best(repeat, safe)


def bench_barrier(n: int, repeat: int) -> tuple[float, float]:
    """Seconds per generation of a two-party barrier."""

    def mp() -> float:
        b = CTX.Barrier(2)
        return max(_run([(_barrier_loop, (b, n))] * 2)) / n

    def safe() -> float:
        with safeshm.SafeBarrier.create(2) as b:
            return max(_run([(_barrier_loop, (b, n))] * 2)) / n

    return _best(repeat, mp), _best(repeat, safe)


def bench_rlock(n: int, repeat: int) -> tuple[float, float]:
    """Seconds per ``with rlock:``, one process."""

    def mp() -> float:
        return _run([(_rlock_loop, (CTX.RLock(), n))])[0] / n

    def safe() -> float:
        with _made(safeshm.SafeRLock.create()) as lock:
            return _run([(_rlock_loop, (lock, n))])[0] / n

    return _best(repeat, mp), _best(repeat, safe)


def bench_condition(n: int, repeat: int) -> tuple[float, float]:
    """Seconds per notify -> wake (one turn of the two-player game)."""

    def mp() -> float:
        cond, turn = CTX.Condition(), CTX.RawValue(ctypes.c_longlong, 0)
        t = max(_run([(_cond_player, ((cond, turn, me, n),)) for me in (0, 1)]))
        if turn.value != 2 * n:
            raise RuntimeError(f"multiprocessing.Condition: {turn.value} turns, not {2 * n}")
        return t / (2 * n)

    def safe() -> float:
        turn = CTX.RawValue(ctypes.c_longlong, 0)
        with _made(safeshm.SafeCondition.create()) as cond:
            t = max(_run([(_cond_player, ((cond, turn, me, n),)) for me in (0, 1)]))
        if turn.value != 2 * n:
            raise RuntimeError(f"SafeCondition: {turn.value} turns, not {2 * n}")
        return t / (2 * n)

    return _best(repeat, mp), _best(repeat, safe)


def bench_rwlock(n: int, repeat: int) -> tuple[float, float]:
    """Holds per second, both processes together (95% reads, each hold ~2 us of work)."""

    def mp() -> float:
        t = max(_run([(_rw_mp, (CTX.Lock(), n))] * 2))
        return 2 * n / t

    def safe() -> float:
        with safeshm.SafeRWLock.create() as rw:
            t = max(_run([(_rw_safe, (rw, n))] * 2))
        return 2 * n / t

    return max(mp() for _ in range(repeat)), max(safe() for _ in range(repeat))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations (a smoke run)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best kept)")
    parser.add_argument("--json", metavar="FILE", help="also save the results as JSON")
    args = parser.parse_args(argv)
    k = 10 if args.quick else 1
    r = 1 if args.quick else args.repeat
    rows: list[dict[str, Any]] = []

    def row(name: str, unit: str, mp: float, safe: float, higher_is_better: bool) -> None:
        ratio = safe / mp if higher_is_better else mp / safe
        rows.append(
            {"workload": name, "unit": unit, "multiprocessing": mp, "safeshm": safe, "ratio": ratio}
        )
        print(f"  {name:<34} {mp:>12.3g} {safe:>12.3g} {unit:<12} {ratio:>6.2f}x", flush=True)

    print(
        f"safeshm {safeshm.__version__} ({safeshm.implementation()}), Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(f"  {'workload':<34} {'mp':>12} {'safeshm':>12} {'unit':<12} {'ratio':>7}")
    us = 1e6
    mp, safe = bench_event(20_000 // k, r)
    row("Event set -> wake (2 procs)", "us", mp * us, safe * us, False)
    mp, safe = bench_semaphore(200_000 // k, r, 1)
    row("Semaphore acquire+release", "us", mp * us, safe * us, False)
    mp, safe = bench_semaphore(100_000 // k, r, 2)
    row("Semaphore acquire+release (2 procs)", "us", mp * us, safe * us, False)
    mp, safe = bench_barrier(20_000 // k, r)
    row("Barrier round trip (2 procs)", "us", mp * us, safe * us, False)
    mp, safe = bench_rlock(200_000 // k, r)
    row("RLock with (1 proc)", "us", mp * us, safe * us, False)
    mp, safe = bench_condition(20_000 // k, r)
    row("Condition notify -> wake (2 procs)", "us", mp * us, safe * us, False)
    mp, safe = bench_rwlock(100_000 // k, r)
    row("RW lock 95% reads (2 procs)", "holds/s", mp, safe, True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "python": platform.python_version(),
                    "implementation": safeshm.implementation(),
                    "cpus": os.cpu_count(),
                    "rows": rows,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
