"""Redis counters against what users write today with redis-py, in one run.

Usage::

    PYTHONPATH=src python benchmarks/bench_redis_counter.py [--quick] [--json FILE]

It starts its own redis-server on a free loopback port (``appendonly yes``,
``appendfsync everysec``: the usual production setting) and measures, in this one
process, back to back and interleaved over several rounds:

* ``r.incr(key)``: an ``INCR`` per add with a plain ``redis.Redis`` client, what users
  write today;
* ``RedisCounter.add()``: one ``INCRBY`` through safeshm's typed wrapper (no automatic
  retry, typed errors). Expected: about 1x the raw call -- both are one round trip;
* ``ShardedCounter.add()``: the local shared-memory counter;
* ``FleetCounter.add()``: the fleet counter, its flusher thread running. Expected:
  about 1x the local ``ShardedCounter`` (it *is* its add), hundreds of times the raw
  ``INCR``;
* ``r.get(key)`` against ``RedisCounter.value`` for reads;
* when pottery is installed (``pip install pottery``; without it its rows are skipped):
  ``pottery.RedisCounter.update({k: 1})`` and ``c[k]``. pottery has no atomic increment:
  ``update`` is an optimistic ``WATCH``, two ``HGET``, ``MULTI``/``HSET``/``EXEC`` that
  raises ``redis.WatchError`` instead of retrying when another writer got in between (and
  ``c[k] += 1`` is a plain ``HGET`` then ``HSET``, which loses updates). So it is a
  reference for one writer only, not a drop-in for ``INCR``. Only the mapping form is
  used: in pottery 3.0.1 ``update([k])`` and ``update(k=1)`` add the old count twice.

Network operations are timed one by one (median and p99 per call); local adds in
batches of 1000 (median per add). Every run checks its count, so a broken counter
cannot report a fast time. Ratios above 1 mean safeshm is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "src"))

# Our segments go to a private directory, as the test suite's do.
_OWN_DIR = None
if "SAFESHM_DIR" not in os.environ:
    _OWN_DIR = os.environ["SAFESHM_DIR"] = tempfile.mkdtemp(prefix="safeshm-bench-", dir="/dev/shm")

import redis  # noqa: E402
from tests._redis_server import redis_server_binary, started  # noqa: E402

import safeshm  # noqa: E402
from safeshm.redis._counter import FleetCounter, RedisCounter  # noqa: E402

_BATCHED = ("ShardedCounter.add", "FleetCounter.add")
POTTERY_ADD = "pottery update({k:1})"
POTTERY_GET = "pottery c[k]"


def _import_pottery() -> Any:
    """pottery, or ``None``: it is optional (the ``bench`` extra), and untyped here."""
    try:
        return importlib.import_module("pottery")
    except ImportError:
        return None


pottery: Any = _import_pottery()


def _per_call(fn: Callable[[], Any], n: int) -> list[float]:
    """Seconds per call, each call timed on its own."""
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1e9)
    return out


def _batched(fn: Callable[[], Any], batches: int, size: int = 1000) -> list[float]:
    """Seconds per call, from batches of ``size`` calls."""
    clock = time.perf_counter_ns
    out = []
    for _ in range(batches):
        t0 = clock()
        for _ in range(size):
            fn()
        out.append((clock() - t0) / 1e9 / size)
    return out


def _pottery_round(pot: Any, n: int, samples: dict[str, list[float]]) -> None:
    """``n`` adds, then ``n`` reads, of pottery's counter (``pot``, or none)."""
    if pot is not None:
        samples[POTTERY_ADD] += _per_call(lambda: pot.update({"n": 1}), n)
        samples[POTTERY_GET] += _per_call(lambda: pot["n"], n)


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _fmt(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e9:.0f} ns"


def _measure(rounds: int, net_n: int, batches: int) -> dict[str, list[float]] | None:
    """Every workload, interleaved over ``rounds``; ``None`` if a count came out wrong."""
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "raw INCR",
            "RedisCounter.add",
            "ShardedCounter.add",
            "FleetCounter.add",
            "raw GET",
            "RedisCounter.value",
            *((POTTERY_ADD, POTTERY_GET) if pottery is not None else ()),
        )
    }
    with started(extra=("--appendfsync", "everysec")) as server:
        r = redis.Redis.from_url(server.url)
        if r.config_get("appendfsync") != {"appendfsync": "everysec"}:
            print(f"unexpected server config: {r.config_get('append*')}")
            return None
        counter = RedisCounter.open(f"{server.url}#bench-ctr")
        fleet = FleetCounter.open(f"{server.url}#bench-fleet", flush_interval=1.0)
        local = safeshm.ShardedCounter.create()
        raw_key = "bench:raw"
        r.delete(raw_key)
        pot: Any = None
        if pottery is not None:
            # Its own client (as a user's would be), one hash field as the counter.
            pot = pottery.RedisCounter(redis=redis.Redis.from_url(server.url), key="bench:pottery")
            pot.clear()
        try:
            for fn in (lambda: r.incr(raw_key), counter.add, local.add, fleet.add):
                _per_call(fn, 50)  # warm up: connections, scripts, slots
            _pottery_round(pot, 50, {POTTERY_ADD: [], POTTERY_GET: []})
            adds = {"raw": 50, "ctr": 50, "local": 50, "fleet": 50, "pottery": 50}
            for _ in range(rounds):
                samples["raw INCR"] += _per_call(lambda: r.incr(raw_key), net_n)
                samples["RedisCounter.add"] += _per_call(counter.add, net_n)
                samples["ShardedCounter.add"] += _batched(local.add, batches)
                samples["FleetCounter.add"] += _batched(fleet.add, batches)
                samples["raw GET"] += _per_call(lambda: r.get(raw_key), net_n)
                samples["RedisCounter.value"] += _per_call(lambda: counter.value, net_n)
                _pottery_round(pot, net_n, samples)
                adds["pottery"] += net_n
                adds["raw"] += net_n
                adds["ctr"] += net_n
                adds["local"] += batches * 1000
                adds["fleet"] += batches * 1000
            fleet.flush()
            checks = {
                "raw": int(r.get(raw_key) or 0),
                "ctr": counter.value,
                "local": local.value,
                "fleet": fleet.value,
                "pottery": adds["pottery"] if pot is None else pot["n"],
            }
            if checks != adds:
                print(f"WRONG COUNTS: expected {adds}, got {checks}")
                return None
        finally:
            counter.close()
            counter.unlink()
            fleet.close()
            fleet.unlink()
            local.close()
            local.unlink()
            if pot is not None:
                pot.clear()
                pot.redis.close()
            r.close()
    if _OWN_DIR is not None:
        with contextlib.suppress(OSError):
            os.rmdir(_OWN_DIR)

    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if redis_server_binary() is None:
        print("redis-server is not installed (Debian: apt-get install redis-server)")
        return 2
    rounds = 3 if args.quick else 7
    net_n = 300 if args.quick else 3000
    batches = 10 if args.quick else 60

    version = subprocess.run(
        [redis_server_binary() or "redis-server", "--version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{version}; redis-py {redis.__version__}; safeshm {safeshm.implementation()}")
    print("server: loopback, appendonly yes, appendfsync everysec")
    print(f"rounds: {rounds} (interleaved); per round: {net_n} network calls, ", end="")
    print(f"{batches} x 1000 local adds")
    if pottery is None:
        print("pottery is not installed: its rows are skipped (pip install pottery)")
    print()

    samples = _measure(rounds, net_n, batches)
    if samples is None:
        return 1
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{'operation':<22}{'median':>12}{'p99':>12}{'ops/s':>14}")
    for k, v in samples.items():
        p99 = "-" if k in _BATCHED else _fmt(_p(v, 0.99))  # a batch has no per-call tail
        print(f"{k:<22}{_fmt(med[k]):>12}{p99:>12}{1 / med[k]:>14,.0f}")
    ratios = {
        "RedisCounter.add vs raw INCR": med["raw INCR"] / med["RedisCounter.add"],
        "RedisCounter.value vs raw GET": med["raw GET"] / med["RedisCounter.value"],
        "FleetCounter.add vs ShardedCounter.add": med["ShardedCounter.add"]
        / med["FleetCounter.add"],
        "FleetCounter.add vs raw INCR": med["raw INCR"] / med["FleetCounter.add"],
    }
    if POTTERY_ADD in med:
        ratios["RedisCounter.add vs pottery update"] = med[POTTERY_ADD] / med["RedisCounter.add"]
        ratios["RedisCounter.value vs pottery c[k]"] = med[POTTERY_GET] / med["RedisCounter.value"]
    print("\nratios (above 1: safeshm is faster)")
    for k, ratio in ratios.items():
        print(f"  {k:<42}{ratio:>10.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_s": med, "ratios": ratios}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
