"""RedisStore against what users write today with redis-py, side by side in one run.

Usage::

    PYTHONPATH=src python benchmarks/bench_redis_store.py [--quick] [--repeat N] [--json FILE]

Starts its own redis-servers on loopback (tests/_redis_server.py): one with
``appendfsync everysec`` for the per-operation figures (so the disk does not hide the
client's cost), one with ``appendfsync always`` for the durable writes. Each workload
runs with plain redis-py and with ``RedisStore``, back to back, ``--repeat`` times; the
table gives the median and the p99 of one operation (from the run with the best median)
and the ratio of the medians, redis-py / RedisStore (above 1: RedisStore is faster):

* **set** / **get**: ``HSET h k json.dumps(v)`` / ``json.loads(HGET h k)`` against
  ``store[k] = v`` / ``store[k]`` (a small dict value).
* **modify**: an atomic read-modify-write of a JSON value. redis-py: its
  ``transaction()`` helper (``WATCH h``, ``HGET``, ``MULTI``/``HSET``/``EXEC``, retried on
  a conflict); RedisStore: ``store.modify(k, fn)`` (``HGET``, then one compare-and-set
  script).
* **transaction (2 keys)**: move a unit from one key to another, atomically.
* **modify, 4 procs**: four processes modify (a) one shared key, (b) a key of their own
  in the same hash, as fast as they can; total operations per second, checked exact at
  the end. ``WATCH`` watches the whole hash, so in (b) redis-py's processes still
  conflict with each other; RedisStore's compare only the key.
* **durable set**: ``appendfsync always``: both wait for the fsync.

When pottery is installed (``pip install pottery``; without it its columns show ``-``),
its ``RedisDict`` (a Redis hash of JSON keys and values) runs too, interleaved with the
other two, for **set**, **get** and **durable set** (``d[k] = v``: ``HSET``; ``d[k]``:
``HGET``), with its own client; the last column is its median / RedisStore's. It has no
atomic read-modify-write (``d[k] = fn(d[k])`` is an ``HGET`` then an ``HSET``, which loses
updates; its ``WATCH`` helper is private) nor a multi-key transaction, so the modify,
transaction and contention rows have no pottery figure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests._redis_server
sys.path.insert(0, os.path.join(ROOT, "src"))

import redis  # noqa: E402
from tests._redis_server import RedisServer  # noqa: E402

import safeshm  # noqa: E402
from safeshm.redis._store import RedisStore  # noqa: E402

CTX = multiprocessing.get_context("fork")
TIMEOUT = 120.0
VALUE: Any = {"batch": 17, "state": "running", "tags": ["a", "b"]}


def _import_pottery() -> Any:
    """pottery, or ``None``: it is optional (the ``bench`` extra), and untyped here."""
    try:
        return importlib.import_module("pottery")
    except ImportError:
        return None


pottery: Any = _import_pottery()


def _client(server: RedisServer) -> Any:
    return redis.Redis(host="127.0.0.1", port=server.port)


def _latencies(op: Callable[[int], Any], n: int) -> list[float]:
    """Seconds per call of ``op(i)``, ``n`` calls (after a short warm-up)."""
    for i in range(min(50, n)):
        op(i)
    out = []
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        op(i)
        out.append(clock() - t0)
    return out


def _best(runs: list[list[float]]) -> tuple[float, float]:
    """(median, p99) of the run with the best median."""
    best = min(runs, key=statistics.median)
    ordered = sorted(best)
    return statistics.median(best), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# -- the raw redis-py idioms -------------------------------------------------------------------
def _raw_modify(r: Any, h: str, key: str, fn: Callable[[Any], Any]) -> Any:
    def body(pipe: Any) -> None:
        current = json.loads(pipe.hget(h, key))
        pipe.multi()
        pipe.hset(h, key, json.dumps(fn(current)))

    return r.transaction(body, h)


def _raw_move(r: Any, h: str) -> None:
    def body(pipe: Any) -> None:
        a, b = (json.loads(v) for v in pipe.hmget(h, "a", "b"))
        pipe.multi()
        pipe.hset(h, mapping={"a": json.dumps(a - 1), "b": json.dumps(b + 1)})

    r.transaction(body, h)


def _store_move(store: RedisStore[Any]) -> None:
    with store.transaction() as tx:
        tx["a"] = tx["a"] - 1
        tx["b"] = tx["b"] + 1


# -- contention: processes modifying at once ---------------------------------------------------
def _contender(job: tuple[str, int, str, str, int], go: Any, out: Any) -> None:
    kind, port, url, key, n = job
    if kind == "raw":
        r = redis.Redis(host="127.0.0.1", port=port)
        h = url
        go.wait(TIMEOUT)
        t0 = time.perf_counter()
        for _ in range(n):
            _raw_modify(r, h, key, lambda v: v + 1)
    else:
        store = RedisStore.open(url, durable=False)
        go.wait(TIMEOUT)
        t0 = time.perf_counter()
        for _ in range(n):
            store.modify(key, lambda v: v + 1)
    out.put(time.perf_counter() - t0)


def _contention(kind: str, server: RedisServer, shared: bool, n: int) -> float:
    """Operations per second of 4 processes together, checked exact."""
    procs = 4
    keys = ["k"] * procs if shared else [f"k{i}" for i in range(procs)]
    url = f"{server.url}#bench-{kind}-{time.monotonic_ns()}"
    r: Any = None
    store: Any = None
    if kind == "raw":
        where = f"raw:{time.monotonic_ns()}"
        r = _client(server)
        r.hset(where, mapping=dict.fromkeys(keys, "0"))
    else:
        store = RedisStore.open(url, durable=False)
        store.update(dict.fromkeys(keys, 0))
        where = url
    go = CTX.Barrier(procs)
    out = CTX.Queue()
    ps = [
        CTX.Process(target=_contender, args=((kind, server.port, where, k, n), go, out))
        for k in keys
    ]
    for p in ps:
        p.start()
    times = [out.get(timeout=TIMEOUT) for _ in ps]
    for p in ps:
        p.join(timeout=TIMEOUT)
        if p.exitcode != 0:
            raise RuntimeError(f"a {kind} contender failed with exit code {p.exitcode}")
    if kind == "raw":
        total = sum(int(v) for v in r.hvals(where))
        r.delete(where)
        r.close()
    else:
        total = sum(store.to_dict().values())
        store.unlink()
        store.close()
    if total != procs * n:
        raise RuntimeError(f"{kind}: {total} increments counted, not {procs * n}")
    return float(procs * n / max(times))


class Table:
    """Prints the rows as they come and keeps them for ``--json``."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        print(
            f"  {'workload':<28} {'redis-py':>10} {'p99':>8} {'RedisStore':>11} {'p99':>8} "
            f"{'unit':<7} {'ratio':>7} {'pottery':>9} {'p99':>8} {'vs pottery':>10}"
        )

    def latency(
        self,
        name: str,
        raw: list[list[float]],
        ours: list[list[float]],
        pot: list[list[float]] | None = None,
    ) -> None:
        (rm, rp), (om, op) = _best(raw), _best(ours)
        us = 1e6
        row = {"workload": name, "unit": "us", "redis-py": rm * us, "redis-py p99": rp * us,
               "RedisStore": om * us, "RedisStore p99": op * us, "ratio": rm / om}  # fmt: skip
        extra = f"{'-':>9} {'-':>8} {'-':>10}"
        if pot:
            pm, pp = _best(pot)
            row.update({"pottery": pm * us, "pottery p99": pp * us, "vs pottery": pm / om})
            extra = f"{pm * us:>9.1f} {pp * us:>8.1f} {pm / om:>9.2f}x"
        self.rows.append(row)
        print(
            f"  {name:<28} {rm * us:>10.1f} {rp * us:>8.1f} {om * us:>11.1f} {op * us:>8.1f} "
            f"{'us':<7} {rm / om:>6.2f}x {extra}",
            flush=True,
        )

    def rate(self, name: str, raw: float, ours: float) -> None:
        self.rows.append(
            {"workload": name, "unit": "ops/s", "redis-py": raw, "RedisStore": ours,
             "ratio": ours / raw}
        )  # fmt: skip
        print(
            f"  {name:<28} {raw:>10.0f} {'':>8} {ours:>11.0f} {'':>8} {'ops/s':<7} "
            f"{ours / raw:>6.2f}x {'-':>9} {'-':>8} {'-':>10}",
            flush=True,
        )


def _both(
    raw_op: Callable[[int], Any], our_op: Callable[[int], Any], n: int, repeat: int
) -> tuple[list[list[float]], list[list[float]]]:
    """Both contenders, alternating, ``repeat`` runs of ``n`` operations each."""
    raw_runs, our_runs, _ = _all(raw_op, our_op, None, n, repeat)
    return raw_runs, our_runs


def _all(
    raw_op: Callable[[int], Any],
    our_op: Callable[[int], Any],
    pot_op: Callable[[int], Any] | None,
    n: int,
    repeat: int,
) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """The contenders (pottery's when ``pot_op`` is given), alternating, ``repeat`` runs
    of ``n`` operations each."""
    raw_runs, our_runs, pot_runs = [], [], []
    for _ in range(repeat):
        raw_runs.append(_latencies(raw_op, n))
        our_runs.append(_latencies(our_op, n))
        if pot_op is not None:
            pot_runs.append(_latencies(pot_op, n))
    return raw_runs, our_runs, pot_runs


def _pottery_dict(server: RedisServer, key: str) -> Any:
    """A pottery ``RedisDict`` on its own client, or ``None`` without pottery."""
    if pottery is None:
        return None
    return pottery.RedisDict(redis=_client(server), key=key)


def _pottery_ops(d: Any, keys: list[str]) -> tuple[Any, Any]:
    """pottery's (set, get) for ``_all``, or ``(None, None)`` without it."""
    if d is None:
        return None, None

    def pot_set(i: int) -> None:
        d[keys[i]] = VALUE

    def pot_get(i: int) -> Any:
        return d[keys[i]]

    return pot_set, pot_get


def _close_pottery(d: Any) -> None:
    if d is not None:
        d.clear()
        d.redis.close()


def bench_operations(table: Table, server: RedisServer, n: int, repeat: int) -> None:
    """set, get, modify and a two-key transaction, one client, one operation at a time."""
    r = _client(server)
    h = f"raw:{os.getpid()}"
    store = RedisStore.open(f"{server.url}#bench-{os.getpid()}", durable=False)
    keys = [f"key{i % 100}" for i in range(n)]
    pot = _pottery_dict(server, f"pottery:{os.getpid()}")
    pot_set, pot_get = _pottery_ops(pot, keys)

    def raw_set(i: int) -> None:
        r.hset(h, keys[i], json.dumps(VALUE))

    def our_set(i: int) -> None:
        store[keys[i]] = VALUE

    table.latency("set", *_all(raw_set, our_set, pot_set, n, repeat))

    def raw_get(i: int) -> Any:
        return json.loads(r.hget(h, keys[i]))

    def our_get(i: int) -> Any:
        return store[keys[i]]

    table.latency("get", *_all(raw_get, our_get, pot_get, n, repeat))
    if pot is not None:
        with warnings.catch_warnings():  # its InefficientAccessWarning: "an O(n) operation"
            warnings.simplefilter("ignore")
            if pot.to_dict() != store.to_dict():
                raise RuntimeError("set: pottery's RedisDict and RedisStore hold different items")
    _close_pottery(pot)
    r.hset(h, "n", "0")
    store["n"] = 0

    def raw_modify(i: int) -> Any:
        return _raw_modify(r, h, "n", lambda v: v + 1)

    def our_modify(i: int) -> Any:
        return store.modify("n", lambda v: v + 1)

    table.latency("modify", *_both(raw_modify, our_modify, n, repeat))
    if int(r.hget(h, "n")) != store["n"]:
        raise RuntimeError("modify: the two counts differ")
    r.hset(h, mapping={"a": "1000000", "b": "0"})
    store.update(a=1_000_000, b=0)
    table.latency(
        "transaction (2 keys)",
        *_both(lambda i: _raw_move(r, h), lambda i: _store_move(store), n, repeat),
    )
    if store["b"] != int(r.hget(h, "b")):
        raise RuntimeError("transaction: the two results differ")
    r.delete(h)
    r.close()
    store.unlink()
    store.close()


def bench_contention(table: Table, server: RedisServer, n: int, repeat: int) -> None:
    """Four processes modifying one key, then a key each."""
    for shared, label in ((True, "one key"), (False, "4 keys")):
        raw = max(_contention("raw", server, shared, n) for _ in range(repeat))
        ours = max(_contention("ours", server, shared, n) for _ in range(repeat))
        table.rate(f"modify, 4 procs, {label}", raw, ours)


def bench_durable(table: Table, server: RedisServer, n: int, repeat: int) -> None:
    """Sets that return after the server's fsync (appendfsync always)."""
    r = _client(server)
    h = f"raw:{os.getpid()}"
    store = RedisStore.open(f"{server.url}#bench-durable-{os.getpid()}")
    keys = [f"key{i % 100}" for i in range(n)]
    pot = _pottery_dict(server, f"pottery:durable-{os.getpid()}")
    pot_set, _ = _pottery_ops(pot, keys)

    def raw_set(i: int) -> None:
        r.hset(h, keys[i], json.dumps(VALUE))

    def our_set(i: int) -> None:
        store[keys[i]] = VALUE

    table.latency("durable set (fsync always)", *_all(raw_set, our_set, pot_set, n, repeat))
    _close_pottery(pot)
    r.delete(h)
    r.close()
    store.unlink()
    store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations (a smoke run)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (best kept)")
    parser.add_argument("--json", metavar="FILE", help="also save the results as JSON")
    args = parser.parse_args(argv)
    n = 300 if args.quick else 3000
    repeat = 1 if args.quick else args.repeat
    fast = RedisServer(extra=("--appendfsync", "everysec"))
    durable = RedisServer()
    try:
        fast.start()
        durable.start()
        version = _client(fast).info("server")["redis_version"]
        print(
            f"safeshm {safeshm.__version__}, redis-py {redis.__version__}, Redis {version} on "
            f"loopback, Python {platform.python_version()}, {os.cpu_count()} CPUs"
        )
        if pottery is None:
            print("pottery is not installed: its columns are skipped (pip install pottery)")
        table = Table()
        bench_operations(table, fast, n, repeat)
        bench_contention(table, fast, max(50, n // 4), repeat)
        bench_durable(table, durable, max(100, n // 10), repeat)
    finally:
        fast.stop()
        durable.stop()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"python": platform.python_version(), "rows": table.rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
