"""RedisQueue against what users write today with redis-py, in one run.

Usage::

    PYTHONPATH=src python benchmarks/bench_redis_queue.py [--quick] [--json FILE]

It starts its own redis-server on a free loopback port (``appendonly yes``,
``appendfsync everysec``: the usual production setting) and measures, in this one run,
interleaved over several rounds, with 64-byte items (``raw=True``, so both sides move the
same bytes):

* batches of 100: ``RedisQueue.put_many`` / ``get_many`` (one Lua script each) against an
  ``RPUSH`` per item and a ``BRPOP`` per item with a plain ``redis.Redis`` client (what a
  producer and a blocking consumer write today). Also shown, for reference: one ``RPUSH``
  of 100 values and one ``LPOP key 100`` -- the raw ceiling, with no capacity, no
  blocking, no atomic all-or-nothing against a limit. Goal: >= 5x items/s;
* single items: ``put`` + ``get`` against ``RPUSH`` + ``BRPOP`` (per call, median/p99);
* wake-up latency: a consumer process blocked in ``get`` (``BRPOP`` for raw redis-py) and
  a ``put`` (``RPUSH``) from this process; the time from the start of the put to the
  consumer's return (both clocks are ``CLOCK_MONOTONIC``). Goal: <= 2 ms.

When pottery is installed (``pip install pottery``; without it its rows are skipped), its
containers are measured too, each with its own client, moving 64-character strings (its
containers hold JSON; 66 bytes on the wire):

* ``RedisDeque`` (a Redis list): ``extend`` of 100 (``WATCH``, ``LLEN``, ``MULTI``/one
  ``RPUSH``/``EXEC``: its optional ``maxlen`` is enforced so) against ``put_many``, and 100
  ``popleft`` (each ``WATCH``, ``LLEN``, ``MULTI``/``LPOP``/``EXEC``; it has no batch pop)
  against ``get_many``; single ``append`` / ``popleft`` against ``put`` / ``get``. It has no
  blocking pop, so it has no wake-up row and it is no bounded queue (``maxlen`` drops the
  oldest items rather than refusing new ones).
* ``RedisSimpleQueue`` (a Redis stream): ``put`` (one ``XADD``) and ``get`` (``WATCH``,
  ``XREAD``, ``MULTI``/``XDEL``/``EXEC``), and its blocking ``get(timeout=30)`` for the
  wake-up latency. It polls: ``XREAD BLOCK 30`` (the timeout taken as milliseconds), then a
  ``random.uniform(0, 0.2)`` s sleep; a put that wakes the ``XREAD`` also changes the
  watched key, so that ``EXEC`` fails and it sleeps too (fewer rounds of it).

Every run checks that what was taken is what was put, so a broken queue cannot report a
fast time. Ratios above 1 mean safeshm is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "src"))

import redis  # noqa: E402
from tests._redis_server import redis_server_binary, started  # noqa: E402

import safeshm  # noqa: E402
from safeshm.redis._queue import RedisQueue  # noqa: E402

BATCH = 100
ITEM = b"x" * 64
PITEM = "x" * 64  # pottery's containers hold JSON values
_PER_ITEM = (
    "raw RPUSH x100",
    "raw BRPOP x100",
    "put_many(100)",
    "get_many(100)",
    "pottery extend(100)",
    "pottery popleft x100",
)
_POTTERY = (
    "pottery extend(100)",
    "pottery popleft x100",
    "pottery deque.append",
    "pottery deque.popleft",
    "pottery SimpleQueue.put",
    "pottery SimpleQueue.get",
    "wake: pottery SimpleQueue.get",
)


def _import_pottery() -> Any:
    """pottery, or ``None``: it is optional (the ``bench`` extra), and untyped here."""
    try:
        return importlib.import_module("pottery")
    except ImportError:
        return None


pottery: Any = _import_pottery()


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _fmt(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e9:.0f} ns"


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e9


class _Wrong(Exception):
    """What was taken is not what was put."""


def _check(got: Any, expected: Any) -> None:
    if got != expected:
        raise _Wrong(f"expected {expected!r:.80}, got {got!r:.80}")


# -- the workloads ------------------------------------------------------------------------------
def _batches(r: Any, q: RedisQueue[bytes], key: str, samples: dict[str, list[float]]) -> None:
    items = [ITEM] * BATCH

    def raw_push() -> None:
        for item in items:
            r.rpush(key, item)

    def raw_pop() -> None:
        for _ in range(BATCH):
            _check(r.brpop([key], timeout=5), (key.encode(), ITEM))

    samples["raw RPUSH x100"].append(_timed(raw_push))
    samples["raw BRPOP x100"].append(_timed(raw_pop))
    samples["put_many(100)"].append(_timed(lambda: q.put_many(items)))
    got: list[Any] = []
    samples["get_many(100)"].append(_timed(lambda: got.extend(q.get_many(BATCH, timeout=5))))
    _check(got, items)
    samples["raw RPUSH 100 values (ref)"].append(_timed(lambda: r.rpush(key, *items)))
    got = []
    samples["raw LPOP 100 (ref)"].append(_timed(lambda: got.extend(r.lpop(key, BATCH))))
    _check(got, items)


def _singles(r: Any, q: RedisQueue[bytes], key: str, n: int, out: dict[str, list[float]]) -> None:
    for _ in range(n):
        out["raw RPUSH"].append(_timed(lambda: r.rpush(key, ITEM)))
        t0 = time.perf_counter_ns()
        _check(r.brpop([key], timeout=5), (key.encode(), ITEM))
        out["raw BRPOP"].append((time.perf_counter_ns() - t0) / 1e9)
        out["RedisQueue.put"].append(_timed(lambda: q.put(ITEM)))
        t0 = time.perf_counter_ns()
        _check(q.get(timeout=5), ITEM)
        out["RedisQueue.get"].append((time.perf_counter_ns() - t0) / 1e9)


def _pottery_batches(deque: Any, samples: dict[str, list[float]]) -> None:
    items = [PITEM] * BATCH
    samples["pottery extend(100)"].append(_timed(lambda: deque.extend(items)))
    got: list[Any] = []

    def pop() -> None:
        for _ in range(BATCH):
            got.append(deque.popleft())

    samples["pottery popleft x100"].append(_timed(pop))
    _check(got, items)


def _pottery_singles(deque: Any, sq: Any, n: int, out: dict[str, list[float]]) -> None:
    for _ in range(n):
        out["pottery deque.append"].append(_timed(lambda: deque.append(PITEM)))
        t0 = time.perf_counter_ns()
        _check(deque.popleft(), PITEM)
        out["pottery deque.popleft"].append((time.perf_counter_ns() - t0) / 1e9)
        out["pottery SimpleQueue.put"].append(_timed(lambda: sq.put(PITEM)))
        t0 = time.perf_counter_ns()
        _check(sq.get(timeout=5), PITEM)
        out["pottery SimpleQueue.get"].append((time.perf_counter_ns() - t0) / 1e9)


def _pottery_consumer(url: str, key: str, ready: Any, woke: Any, rounds: int) -> None:
    sq = pottery.RedisSimpleQueue(redis=redis.Redis.from_url(url), key=key)
    sq.qsize()  # connected before the first round
    for k in range(rounds):
        ready.set()
        # Not get(): without a timeout it raises QueueEmptyError when the put that would
        # wake it makes its EXEC fail (pottery 3.0.1). With one, it polls: XREAD BLOCK of
        # int(timeout) *milliseconds*, a random 0-0.2 s sleep after each miss.
        _check(sq.get(timeout=30), str(k))
        woke[k] = time.monotonic()


def _pottery_round(
    pot: tuple[Any, Any] | None, url: str, batches: int, singles: int, wakes: int, *,
    samples: dict[str, list[float]],
) -> None:  # fmt: skip
    """pottery's share of a round: ``pot`` is its (RedisDeque, RedisSimpleQueue), or none."""
    if pot is None:
        return
    deque, sq = pot
    for _ in range(batches):
        _pottery_batches(deque, samples)
    _pottery_singles(deque, sq, singles, samples)
    wake = pottery.RedisSimpleQueue(redis=sq.redis, key="bench:pottery-wake")
    samples["wake: pottery SimpleQueue.get"] += _wake_latency(
        lambda b: wake.put(b.decode()), _pottery_consumer, (url, wake.key), wakes
    )


def _raw_consumer(url: str, key: str, ready: Any, woke: Any, rounds: int) -> None:
    r = redis.Redis.from_url(url)
    r.ping()
    for k in range(rounds):
        ready.set()
        _check(r.brpop([key], timeout=30), (key.encode(), b"%d" % k))
        woke[k] = time.monotonic()


def _queue_consumer(q: RedisQueue[bytes], ready: Any, woke: Any, rounds: int) -> None:
    q.qsize()  # connected before the first round
    for k in range(rounds):
        ready.set()
        _check(q.get(timeout=30), b"%d" % k)
        woke[k] = time.monotonic()


def _wake_latency(
    put: Callable[[bytes], Any], target: Callable[..., None], args: tuple[Any, ...], rounds: int
) -> list[float]:
    """Seconds from the start of a put to the blocked consumer's return, per round."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    woke = ctx.RawArray("d", rounds)
    proc = ctx.Process(target=target, args=(*args, ready, woke, rounds), daemon=True)
    proc.start()
    started_at = []
    try:
        for k in range(rounds):
            # No spinning here (it would take a CPU from the consumer or the server): the
            # consumer records its wake-up, then says it is ready for the next round.
            if not ready.wait(30):
                raise _Wrong("the consumer did not come back")
            ready.clear()
            time.sleep(0.005)  # the consumer is blocked in the server by now
            started_at.append(time.monotonic())
            put(b"%d" % k)
        proc.join(30)
        if proc.exitcode != 0:
            raise _Wrong(f"the consumer exited with {proc.exitcode}")
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    return [woke[k] - started_at[k] for k in range(rounds)]


def _measure(rounds: int, batches: int, singles: int, wakes: int) -> dict[str, list[float]]:
    names = (
        *(k for k in _PER_ITEM if k not in _POTTERY),
        "raw RPUSH 100 values (ref)",
        "raw LPOP 100 (ref)",
        "raw RPUSH",
        "raw BRPOP",
        "RedisQueue.put",
        "RedisQueue.get",
        "wake: raw BRPOP",
        "wake: RedisQueue.get",
        *(_POTTERY if pottery is not None else ()),
    )
    samples: dict[str, list[float]] = {k: [] for k in names}
    with started(extra=("--appendfsync", "everysec")) as server:
        r = redis.Redis.from_url(server.url)
        q = RedisQueue.open(f"{server.url}#bench-queue", 1 << 24, raw=True)
        key = "bench:raw"
        pot: tuple[Any, Any] | None = None
        if pottery is not None:
            pot = (
                pottery.RedisDeque(redis=redis.Redis.from_url(server.url), key="bench:pottery-dq"),
                pottery.RedisSimpleQueue(
                    redis=redis.Redis.from_url(server.url), key="bench:pottery-sq"
                ),
            )
        try:
            for _ in range(3):  # warm up: connections, scripts
                _batches(r, q, key, {k: [] for k in names})
            _singles(r, q, key, 20, {k: [] for k in names})
            _pottery_round(pot, server.url, 3, 20, 0, samples={k: [] for k in names})
            for _ in range(rounds):
                for _ in range(batches):
                    _batches(r, q, key, samples)
                _singles(r, q, key, singles, samples)
                samples["wake: raw BRPOP"] += _wake_latency(
                    lambda b: r.rpush("bench:wake", b), _raw_consumer,
                    (server.url, "bench:wake"), wakes,
                )  # fmt: skip
                samples["wake: RedisQueue.get"] += _wake_latency(
                    q.put, _queue_consumer, (q,), wakes
                )
                # Its polled wake-ups take ~0.1 s each: a quarter as many.
                _pottery_round(
                    pot, server.url, batches, singles, max(5, wakes // 4), samples=samples
                )
            _check((r.llen(key), q.qsize(), r.llen("bench:wake")), (0, 0, 0))
            if pot is not None:
                _check((len(pot[0]), pot[1].qsize(), r.xlen("bench:pottery-wake")), (0, 0, 0))
        finally:
            if pot is not None:
                r.delete("bench:pottery-dq", "bench:pottery-sq", "bench:pottery-wake")
                for container in pot:
                    container.redis.close()
            q.unlink()
            q.close()
            r.close()
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--check-goals", action="store_true", help="exit with 3 if a goal is missed")
    args = ap.parse_args(argv)
    if redis_server_binary() is None:
        print("redis-server is not installed (Debian: apt-get install redis-server)")
        return 2
    rounds = 2 if args.quick else 5
    batches = 5 if args.quick else 40
    singles = 100 if args.quick else 1000
    wakes = 40 if args.quick else 200

    version = subprocess.run(
        [redis_server_binary() or "redis-server", "--version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{version}; redis-py {redis.__version__}; safeshm {safeshm.implementation()}")
    print("server: loopback, appendonly yes, appendfsync everysec; items: 64 bytes, raw")
    print(
        f"rounds: {rounds} (interleaved); per round: {batches} batches of {BATCH}, "
        f"{singles} single put/get pairs, {wakes} wake-ups per consumer"
    )
    if pottery is None:
        print("pottery is not installed: its rows are skipped (pip install pottery)")
    print()
    try:
        samples = _measure(rounds, batches, singles, wakes)
    except _Wrong as exc:
        print(f"WRONG RESULT: {exc}")
        return 1
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{'operation':<31}{'median':>12}{'p99':>12}{'items/s':>14}")
    for k, v in samples.items():
        per = BATCH if k in _PER_ITEM or "(ref)" in k else 1
        print(f"{k:<31}{_fmt(med[k]):>12}{_fmt(_p(v, 0.99)):>12}{per / med[k]:>14,.0f}")
    ratios = {
        "put_many(100) vs RPUSH per item": med["raw RPUSH x100"] / med["put_many(100)"],
        "get_many(100) vs BRPOP per item": med["raw BRPOP x100"] / med["get_many(100)"],
        "put_many+get_many vs RPUSH+BRPOP per item": (
            (med["raw RPUSH x100"] + med["raw BRPOP x100"])
            / (med["put_many(100)"] + med["get_many(100)"])
        ),
        "put_many(100) vs one RPUSH of 100 (ref)": med["raw RPUSH 100 values (ref)"]
        / med["put_many(100)"],
        "put vs RPUSH": med["raw RPUSH"] / med["RedisQueue.put"],
        "get vs BRPOP": med["raw BRPOP"] / med["RedisQueue.get"],
        "wake p50 vs BRPOP": med["wake: raw BRPOP"] / med["wake: RedisQueue.get"],
    }
    if pottery is not None:
        ratios.update({
            "put_many(100) vs pottery extend(100)": med["pottery extend(100)"]
            / med["put_many(100)"],
            "get_many(100) vs pottery popleft x100": med["pottery popleft x100"]
            / med["get_many(100)"],
            "put vs pottery deque.append": med["pottery deque.append"] / med["RedisQueue.put"],
            "get vs pottery deque.popleft": med["pottery deque.popleft"] / med["RedisQueue.get"],
            "put vs pottery SimpleQueue.put": med["pottery SimpleQueue.put"]
            / med["RedisQueue.put"],
            "get vs pottery SimpleQueue.get": med["pottery SimpleQueue.get"]
            / med["RedisQueue.get"],
            "wake p50 vs pottery SimpleQueue.get": med["wake: pottery SimpleQueue.get"]
            / med["wake: RedisQueue.get"],
        })  # fmt: skip
    print("\nratios (above 1: safeshm is faster)")
    for k, ratio in ratios.items():
        print(f"  {k:<44}{ratio:>10.2f}x")
    wake = samples["wake: RedisQueue.get"]
    goals = {
        "put_many(100) >= 5x an RPUSH per item": ratios["put_many(100) vs RPUSH per item"] >= 5,
        "get_many(100) >= 5x a BRPOP per item": ratios["get_many(100) vs BRPOP per item"] >= 5,
        "blocked get wakes <= 2 ms after a put (p50)": statistics.median(wake) <= 2e-3,
        "blocked get wakes <= 2 ms after a put (p99)": _p(wake, 0.99) <= 2e-3,
    }
    print("\ngoals")
    for k, met in goals.items():
        print(f"  {k:<52}{'met' if met else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"median_s": med, "p99_s": {k: _p(v, 0.99) for k, v in samples.items()},
                 "ratios": ratios, "goals": goals},
                f, indent=2,
            )  # fmt: skip
    return 3 if args.check_goals and not all(goals.values()) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
