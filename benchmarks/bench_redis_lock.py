"""RedisLock vs redis-py's own ``redis.lock.Lock``, side by side, on one loopback server.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_redis_lock.py [--quick]

Two measurements, each for every lock (pottery's ``Redlock`` too when pottery is
installed: ``pip install pottery``; without it its rows are skipped):

* **hand-off latency**: one process holds the lock while another is blocked in
  ``acquire()``; the time from the holder's ``release()`` call to the waiter's
  ``acquire()`` returning (both read ``time.monotonic()``, one clock for every process
  on Linux). RedisLock's waiter is woken by the release's publish; redis-py's ``Lock``
  (its defaults: ``sleep=0.1``) polls every 100 ms. The holder releases at a random
  moment 10-110 ms after the waiter started waiting, so every phase of the polling is
  sampled (its expected latency is then about 50 ms at p50, 100 ms at p99). pottery's
  ``Redlock`` also polls: a failed attempt sleeps ``random.uniform(0, 0.2)`` s.
* **uncontended rate**: ``with lock: pass`` in a loop in one process (two round trips
  each for both redis-py and RedisLock; RedisLock's renewal thread is idle for such short
  holds; pottery's ``Redlock`` runs each acquire and release through a thread pool, as it
  would for several masters, here one).

It starts its own redis-server (tests/_redis_server.py) on a free loopback port, with
``appendfsync everysec`` by default (``--fsync always`` makes every write wait for an
fsync, which then dominates the rate of both).
"""

from __future__ import annotations

import argparse
import importlib
import math
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_ROOT, os.path.join(_ROOT, "src")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import redis  # noqa: E402
from tests._redis_server import redis_server_binary, started  # noqa: E402

from safeshm.redis._lock import RedisLock  # noqa: E402


def _import_pottery() -> Any:
    """pottery, or ``None``: it is optional (the ``bench`` extra), and untyped here."""
    try:
        return importlib.import_module("pottery")
    except ImportError:
        return None


pottery: Any = _import_pottery()

SAFESHM = "RedisLock"
REDIS_PY = "redis-py Lock"
REDIS_PY_LEASE = "redis-py Lock(timeout=30)"
POTTERY = "pottery Redlock"
CODE = {
    SAFESHM: "safeshm.redis.RedisLock.open(url)  (lease 30 s, renewed; waiters wake on release)",
    REDIS_PY: "redis.Redis.from_url(url).lock(name)  (defaults: no lease, polls every 0.1 s)",
    REDIS_PY_LEASE: "redis.Redis.from_url(url).lock(name, timeout=30)  (a 30 s lease)",
}
if pottery is not None:
    # One master (the Redlock algorithm with a single server), the same 30 s lease.
    CODE[POTTERY] = (
        "pottery.Redlock(key=name, masters={redis.Redis.from_url(url)}, "
        "auto_release_time=30)  (polls 0-0.2 s)"
    )


def _open(kind: str, url: str, name: str) -> Any:
    """A lock of ``kind`` named ``name`` (a separate key space per implementation)."""
    if kind == SAFESHM:
        return RedisLock.open(f"{url}#{name}")
    client = redis.Redis.from_url(url)
    if kind == POTTERY:
        return pottery.Redlock(key=name, masters={client}, auto_release_time=30)
    if kind == REDIS_PY:
        return client.lock(name)
    return client.lock(name, timeout=30)


def _close(lock: Any) -> None:
    if isinstance(lock, RedisLock):
        lock.close()
    elif pottery is not None and isinstance(lock, pottery.Redlock):
        for master in lock.masters:
            master.close()
    else:
        lock.redis.close()


# -- hand-off latency -----------------------------------------------------------------------------
def _waiter(kind: str, url: str, name: str, conn: Any) -> None:
    """The other process: on each "go", say "waiting", block in acquire(), and report
    when it returned."""
    lock = _open(kind, url, name)
    try:
        while conn.recv() == "go":
            conn.send("waiting")
            lock.acquire()
            woke = time.monotonic()
            lock.release()
            conn.send(woke)
    finally:
        _close(lock)


def handoff(kind: str, url: str, rounds: int) -> list[float]:
    """``rounds`` hand-offs from this process to a waiter in another: seconds each."""
    name = f"handoff-{list(CODE).index(kind)}-{os.getpid()}"
    lock = _open(kind, url, name)
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_waiter, args=(kind, url, name, there), daemon=True)
    proc.start()
    latencies = []
    try:
        for i in range(rounds + 1):  # the first round warms up
            lock.acquire()
            here.send("go")
            if here.recv() != "waiting":
                raise RuntimeError("the waiter process went wrong")
            # It is blocked in acquire() after a millisecond or so; a release at a random
            # moment of the next 100 ms samples every phase of redis-py's polling.
            time.sleep(random.uniform(0.010, 0.110))
            released = time.monotonic()
            lock.release()
            woke = here.recv()
            if i:
                latencies.append(woke - released)
        here.send("stop")
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
        _close(lock)
    return latencies


# -- uncontended rate ---------------------------------------------------------------------------
def rates(url: str, ops: int, repeats: int) -> dict[str, list[float]]:
    """``with lock: pass`` ``ops`` times per repeat, for every implementation in turn
    within each repeat (so a busy moment of the machine hits them alike): ops/s.
    pottery's Redlock, several times slower, does a fifth as many (its rate is per op)."""
    locks = {kind: _open(kind, url, f"rate-{i}-{os.getpid()}") for i, kind in enumerate(CODE)}
    try:
        out: dict[str, list[float]] = {kind: [] for kind in CODE}
        for lock in locks.values():
            for _ in range(min(ops, 200)):  # warm up: connections, scripts loaded
                with lock:
                    pass
        for _ in range(repeats):
            for kind, lock in locks.items():
                n = max(100, ops // 5) if kind == POTTERY else ops
                t0 = time.perf_counter()
                for _ in range(n):
                    with lock:
                        pass
                out[kind].append(n / (time.perf_counter() - t0))
        return out
    finally:
        for lock in locks.values():
            _close(lock)


# -- report ---------------------------------------------------------------------------------------
def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def environment(fsync: str) -> None:
    try:
        server = subprocess.run(
            [redis_server_binary() or "redis-server", "--version"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        server = "?"
    print("Environment")
    print(f"  python        {platform.python_version()} ({platform.platform()})")
    print(f"  cpus          {os.cpu_count()}")
    print(f"  redis-py      {redis.__version__}")
    print(f"  redis-server  {server}")
    print(f"  server        127.0.0.1 (loopback), appendonly yes, appendfsync {fsync}")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--rounds", type=int, help="hand-offs per implementation")
    parser.add_argument("--ops", type=int, help="acquire+release pairs per rate repeat")
    parser.add_argument("--fsync", choices=["always", "everysec", "no"], default="everysec")
    args = parser.parse_args(argv)
    rounds = args.rounds or (25 if args.quick else 200)
    ops = args.ops or (300 if args.quick else 3000)
    repeats = 3 if args.quick else 5
    environment(args.fsync)
    print("Implementations")
    for kind, code in CODE.items():
        print(f"  {kind:<26} {code}")
    if pottery is None:
        print("  (pottery is not installed: its rows are skipped; pip install pottery)")
    print()

    with started(extra=("--appendfsync", args.fsync)) as server:
        url = server.url
        print(f"Hand-off latency: release() in one process -> the waiting acquire() returns "
              f"in another ({rounds} hand-offs each)")  # fmt: skip
        lat: dict[str, list[float]] = {}
        for kind in (SAFESHM, REDIS_PY, POTTERY):
            if kind not in CODE:
                continue
            # redis-py's and pottery's polling makes each of their rounds slow: fewer of them.
            n = rounds if kind == SAFESHM else max(10, rounds // 3)
            lat[kind] = handoff(kind, url, n)
        print(f"  {'implementation':<26} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'n':>5}")
        for kind, samples in lat.items():
            print(
                f"  {kind:<26} {percentile(samples, 50) * 1e3:>9.2f} "
                f"{percentile(samples, 99) * 1e3:>9.2f} {max(samples) * 1e3:>9.2f} "
                f"{len(samples):>5}"
            )
        p50 = percentile(lat[REDIS_PY], 50) / percentile(lat[SAFESHM], 50)
        p99 = percentile(lat[REDIS_PY], 99) / percentile(lat[SAFESHM], 99)
        print(f"  RedisLock hands over {p50:.1f}x faster at p50, {p99:.1f}x at p99")
        if POTTERY in lat:
            p50 = percentile(lat[POTTERY], 50) / percentile(lat[SAFESHM], 50)
            p99 = percentile(lat[POTTERY], 99) / percentile(lat[SAFESHM], 99)
            print(f"  ... and {p50:.1f}x faster than pottery Redlock at p50, {p99:.1f}x at p99")
        print(f"  (goal: RedisLock p99 <= 5 ms: {percentile(lat[SAFESHM], 99) * 1e3:.2f} ms)")
        print()

        print(f"Uncontended: `with lock: pass` in one process ({ops} x {repeats} repeats)")
        rates_ = rates(url, ops, repeats)
        base = statistics.median(rates_[REDIS_PY])
        print(f"  {'implementation':<26} {'median/s':>10} {'min/s':>10} {'max/s':>10} "
              f"{'vs redis-py Lock':>17}")  # fmt: skip
        for kind, samples in rates_.items():
            med = statistics.median(samples)
            print(
                f"  {kind:<26} {med:>10.0f} {min(samples):>10.0f} {max(samples):>10.0f} "
                f"{med / base:>16.2f}x"
            )
        if POTTERY in rates_:
            ratio = statistics.median(rates_[SAFESHM]) / statistics.median(rates_[POTTERY])
            print(f"  RedisLock does {ratio:.2f}x as many as pottery Redlock")
    return 0


# Guarded: spawn-started waiters re-import this script as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main())
