"""``limits`` storages for rate limiting across workers: shm:// against memory:// and redis://.

Usage::

    PYTHONPATH=src python benchmarks/bench_ratelimit.py [--quick] [--json FILE]

Measures, in one run, the cost of one ``hit()`` through ``limits.strategies`` for the
fixed window and the moving window:

* ``memory://``: ``limits``' MemoryStorage -- per process, hence *wrong* under several
  workers (each worker has its own counts); the floor of what a hit can cost in Python;
* ``shm://``: safeshm's RateLimitTable, exact across processes;
* ``redis://``: a redis-server this script starts on a free loopback port (``appendonly
  no``), what users run today to share limits across workers.

Then ``shm://`` from several processes at once (hits per second in total, each process
on its own key and on one shared key). Ratios above 1 mean shm:// is faster.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "src"))

_OWN_DIR = None
if "SAFESHM_DIR" not in os.environ:
    _OWN_DIR = os.environ["SAFESHM_DIR"] = tempfile.mkdtemp(prefix="safeshm-bench-", dir="/dev/shm")

from limits import RateLimitItemPerHour  # noqa: E402
from limits.storage import MemoryStorage, storage_from_string  # noqa: E402
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter  # noqa: E402

import safeshm.ratelimit  # noqa: E402, F401 - registers shm://
from safeshm.ratelimit import RateLimitTable  # noqa: E402

TABLE = f"bench-rl-{os.getpid()}"
STRATEGIES = {"fixed window": FixedWindowRateLimiter, "moving window": MovingWindowRateLimiter}


def _per_hit(hit: Callable[[], Any], n: int, rounds: int) -> float:
    """Median seconds per hit over ``rounds`` batches of ``n``."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            hit()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def _worker(strategy: str, key: str, n: int, start: Any, out: Any) -> None:
    limiter = STRATEGIES[strategy](storage_from_string(f"shm://{TABLE}"))
    item = RateLimitItemPerHour(1 << 20)  # never refuses: every hit does the full work
    start.wait()
    t0 = time.perf_counter()
    for _ in range(n):
        limiter.hit(item, key)
    out.put(time.perf_counter() - t0)


def _parallel(strategy: str, procs: int, n: int, shared: bool) -> float:
    """Total hits per second of ``procs`` processes hitting at once."""
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    ps = [
        ctx.Process(target=_worker, args=(strategy, "one" if shared else f"k{i}", n, start, out))
        for i in range(procs)
    ]
    for p in ps:
        p.start()
    time.sleep(0.2)
    start.set()
    elapsed: float = max(out.get(timeout=300) for _ in ps)
    for p in ps:
        p.join(60)
    return procs * n / elapsed


def main() -> None:  # noqa: PLR0915 - one linear script
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    n, rounds = (500, 3) if args.quick else (5000, 5)
    item = RateLimitItemPerHour(1 << 20)
    results: dict[str, Any] = {"python": platform.python_version(), "rows": {}}
    table = RateLimitTable.create(name=TABLE, keys=4096, entries=1 << 22)
    storages: dict[str, Any] = {
        "memory://": MemoryStorage(),
        "shm://": storage_from_string(f"shm://{TABLE}"),
    }
    server_cm = None
    try:
        from tests._redis_server import redis_server_binary, started

        if redis_server_binary() is not None:
            # No fsync per write: the usual setting for a rate-limit cache.
            server_cm = started(extra=("--appendonly", "no"))
            server = server_cm.__enter__()
            storages["redis://"] = storage_from_string(server.url)
    except ImportError:
        pass
    try:
        print(f"hit() cost, median of {rounds} x {n} (us per hit)")
        for strategy, cls in STRATEGIES.items():
            row: dict[str, float] = {}
            for label, storage in storages.items():
                limiter = cls(storage)
                key = strategy.replace(" ", "-")
                limiter.hit(item, key)

                def one_hit(lim: Any = limiter, k: str = key) -> object:
                    return lim.hit(item, k)

                row[label] = _per_hit(one_hit, n, rounds) * 1e6
            results["rows"][strategy] = row
            cells = "  ".join(f"{k} {v:7.2f}" for k, v in row.items())
            ratios = f"shm vs memory {row['memory://'] / row['shm://']:.2f}x"
            if "redis://" in row:
                ratios += f", shm vs redis {row['redis://'] / row['shm://']:.1f}x"
            print(f"  {strategy:14} {cells}   ({ratios})")
        procs = min(4, os.cpu_count() or 1)
        print(f"shm:// from {procs} processes at once (hits/s in total)")
        for strategy in STRATEGIES:
            one = _parallel(strategy, 1, n * 2, shared=False)
            own = _parallel(strategy, procs, n * 2, shared=False)
            shared = _parallel(strategy, procs, n * 2, shared=True)
            results["rows"][f"{strategy} parallel"] = {
                "1 proc": one,
                "own keys": own,
                "one key": shared,
            }
            print(
                f"  {strategy:14} 1 process {one:9.0f}   {procs} processes: own keys {own:9.0f}, "
                f"one key {shared:9.0f}"
            )
    finally:
        storages["memory://"].timer.cancel()
        storages["shm://"].close()
        table.close()
        table.unlink()
        if server_cm is not None:
            server_cm.__exit__(None, None, None)
        if _OWN_DIR is not None:
            os.rmdir(_OWN_DIR)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
