"""The SafeFileStore benchmark: SafeFileStore against diskcache (and shelve + a lock).

Measured side by side in one run, on the same file system (a temporary directory, or
``--store-dir``), with 100-byte values and 10,000 keys:

* ``set``: 10,000 sets of new keys into an empty store. ``SafeFileStore(durable=False)``
  against ``diskcache.Cache`` with its defaults (SQLite ``synchronous=NORMAL``: neither
  flushes each write to disk), and ``shelve`` + ``fcntl.flock`` (the hand-rolled idiom).
* ``durable set``: ``SafeFileStore(durable=True)`` (``fdatasync`` per write) against
  ``diskcache.Cache(sqlite_synchronous=2)`` (SQLite ``FULL``), both durable per write.
* ``get``: 10,000 gets of present keys in random order.
* ``2 writers``: two processes set 10,000 keys each into one store at once; the total rate
  divided by one process's rate shows whether concurrent writers collapse.

Values are 100 random bytes: ``SafeFileStore(serializer="bytes")``, stored as they are by
diskcache too, so the figures compare storage, not serialisation. The median of
``repeats`` runs is reported, each on a fresh store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import multiprocessing
import os
import random
import shelve
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from ._store import SafeFileStore

VALUE_BYTES: Final = 100
KEYS: Final = 10_000
DURABLE_KEYS: Final = 1_000
SHELVE_KEYS: Final = 200  # shelve reopens its database per operation: ~100 ops/s
_JOIN_TIMEOUT: Final = 600.0

SAFESHM: Final = "SafeFileStore"
DISKCACHE: Final = "diskcache"
SHELVE: Final = "shelve + flock"

# The bars: (workload, alternative) -> the speed ratio SafeFileStore must reach.
REQUIRED: Final[dict[tuple[str, str], float]] = {
    ("set", DISKCACHE): 1.0,
    ("get", DISKCACHE): 1.0,
    ("durable set", DISKCACHE): 1.0,
}
REQUIRED_SCALING: Final = 0.8  # 2 writers' total rate / 1 writer's rate


class _Shelf:
    """``shelve`` made process-safe the way people do it: an exclusive flock around each
    operation, reopening the shelf so that other processes' writes are seen."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)

    def __setitem__(self, key: str, value: bytes) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            with shelve.open(self._path) as db:  # noqa: S301 - the benchmark's own data
                db[key] = value
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def __getitem__(self, key: str) -> bytes:
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        try:
            with shelve.open(self._path, flag="r") as db:  # noqa: S301 - as above
                return bytes(db[key])
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._lock)


def _diskcache() -> Any | None:
    try:
        return importlib.import_module("diskcache")  # optional: untyped, maybe absent
    except ImportError:
        return None


@contextlib.contextmanager
def _opened(kind: str, path: str) -> Iterator[Any]:
    """A store of ``kind`` at ``path``, closed afterwards."""
    if kind == "safeshm":
        store: Any = SafeFileStore(path, durable=False, serializer="bytes")
    elif kind == "safeshm-durable":
        store = SafeFileStore(path, durable=True, serializer="bytes")
    elif kind == "diskcache":
        store = _diskcache().Cache(path)  # type: ignore[union-attr]
    elif kind == "diskcache-durable":
        store = _diskcache().Cache(path, sqlite_synchronous=2)  # type: ignore[union-attr]
    elif kind == "shelve":
        store = _Shelf(path)
    else:  # pragma: no cover
        raise ValueError(kind)
    try:
        yield store
    finally:
        store.close()


def _setter(kind: str, store: Any) -> Callable[[str, bytes], Any]:
    put: Callable[[str, bytes], Any] = (
        store.set if kind.startswith("diskcache") else store.__setitem__)
    return put


def _getter(kind: str, store: Any) -> Callable[[str], Any]:
    get: Callable[[str], Any] = store.get if kind.startswith("diskcache") else store.__getitem__
    return get


def _keys(n: int, prefix: str = "key") -> list[str]:
    return [f"{prefix}:{i:08d}" for i in range(n)]


def _time_sets(kind: str, path: str, keys: list[str], value: bytes) -> float:
    with _opened(kind, path) as store:
        put = _setter(kind, store)
        start = time.perf_counter()
        for key in keys:
            put(key, value)
        return time.perf_counter() - start


def _time_gets(kind: str, path: str, keys: list[str], value: bytes) -> float:
    with _opened(kind, path) as store:
        put, get = _setter(kind, store), _getter(kind, store)
        for key in keys:
            put(key, value)
        order = keys[:]
        random.Random(7).shuffle(order)
        start = time.perf_counter()
        for key in order:
            if get(key) is None:  # pragma: no cover - a benchmark that lost data is void
                raise RuntimeError(f"{kind} lost {key}")
        return time.perf_counter() - start


def _writer(kind: str, path: str, prefix: str, n: int, barrier: Any,  # noqa: PLR0917
            times: Any, slot: int) -> None:
    value = os.urandom(VALUE_BYTES)
    keys = _keys(n, prefix)
    with _opened(kind, path) as store:
        put = _setter(kind, store)
        barrier.wait(timeout=_JOIN_TIMEOUT)
        start = time.perf_counter()
        for key in keys:
            put(key, value)
        times[2 * slot] = start
        times[2 * slot + 1] = time.perf_counter()


def _time_writers(kind: str, path: str, writers: int, n: int) -> float:
    """Total sets per second of ``writers`` processes writing ``n`` keys each."""
    ctx = multiprocessing.get_context("spawn")
    with _opened(kind, path):
        pass  # created once, so the writers race on writes, not on creation
    barrier = ctx.Barrier(writers)
    times = ctx.Array("d", 2 * writers, lock=False)
    procs = [ctx.Process(target=_writer, args=(kind, path, f"w{w}", n, barrier, times, w),
                         daemon=True) for w in range(writers)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=_JOIN_TIMEOUT)
            if p.exitcode != 0:
                raise RuntimeError(f"a {kind} writer failed (exit code {p.exitcode})")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    span = float(max(times[1::2]) - min(times[0::2]))
    return writers * n / span


@dataclasses.dataclass(frozen=True)
class StoreCell:
    workload: str
    implementation: str
    ops_per_second: float
    """Median over the repeats."""
    runs: tuple[float, ...]


def steps(repeats: int) -> int:
    """How many times :func:`measure` calls ``progress``."""
    per_repeat = 9 + (7 if _diskcache() is not None else 0)
    return repeats * per_repeat


def measure(repeats: int, directory: str | None = None,
            progress: Callable[[str], None] | None = None) -> list[StoreCell]:
    """Measure every workload for every implementation that is importable."""
    value = os.urandom(VALUE_BYTES)
    keys = _keys(KEYS)
    durable_keys = keys[:DURABLE_KEYS]
    have_diskcache = _diskcache() is not None
    plan: list[tuple[str, str, str, Callable[[str], float]]] = []

    def add(workload: str, name: str, kind: str, fn: Callable[[str], float]) -> None:
        if kind.startswith("diskcache") and not have_diskcache:
            return
        plan.append((workload, name, kind, fn))

    def rate(timer: Callable[[str, str, list[str], bytes], float], kind: str,
             some: list[str]) -> Callable[[str], float]:
        return lambda path: len(some) / timer(kind, path, some, value)

    def writers_rate(kind: str, writers: int) -> Callable[[str], float]:
        n = DURABLE_KEYS if kind.endswith("durable") else KEYS
        return lambda path: _time_writers(kind, path, writers, n)

    shelve_keys = keys[:SHELVE_KEYS]
    for name, kind in ((SAFESHM, "safeshm"), (DISKCACHE, "diskcache"), (SHELVE, "shelve")):
        add("set", name, kind, rate(_time_sets, kind, keys if kind != "shelve" else shelve_keys))
    for name, kind in ((SAFESHM, "safeshm-durable"), (DISKCACHE, "diskcache-durable")):
        add("durable set", name, kind, rate(_time_sets, kind, durable_keys))
    for name, kind in ((SAFESHM, "safeshm"), (DISKCACHE, "diskcache"), (SHELVE, "shelve")):
        add("get", name, kind, rate(_time_gets, kind, keys if kind != "shelve" else shelve_keys))
    for name, kind in ((SAFESHM, "safeshm"), (DISKCACHE, "diskcache"),
                       (SAFESHM + " durable", "safeshm-durable"),
                       (DISKCACHE + " durable", "diskcache-durable")):
        for writers in (1, 2):
            add(f"{writers} writer{'s' if writers > 1 else ''}", name, kind,
                writers_rate(kind, writers))

    if len(plan) * repeats != steps(repeats):  # pragma: no cover - keep steps() honest
        raise RuntimeError("safeshm._bench_store.steps() is out of date")
    runs: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="safeshm-bench-", dir=directory) as tmp:
        step = 0
        for repeat in range(repeats):
            # Interleaved: each repeat measures everything once, so a noisy spell of the
            # machine hits all contenders alike.
            for workload, name, _kind, fn in plan:
                step += 1
                if progress is not None:
                    progress(f"store {workload}: {name}, repeat {repeat + 1}/{repeats}")
                path = os.path.join(tmp, f"r{repeat}-{step}")
                runs.setdefault((workload, name), []).append(fn(path))
    return [StoreCell(workload, name, statistics.median(r), tuple(r))
            for (workload, name), r in runs.items()]


def cells_from_json(data: list[dict[str, Any]]) -> list[StoreCell]:
    return [StoreCell(d["workload"], d["implementation"], float(d["ops_per_second"]),
                      tuple(float(r) for r in d["runs"])) for d in data]


def ratios(cells: list[StoreCell]) -> list[tuple[str, str, float, float | None]]:
    """``(label, versus, ratio, goal)`` for the chart: SafeFileStore's speed divided by each
    alternative's, and the 2-writer scaling of each implementation."""
    speed = {(c.workload, c.implementation): c.ops_per_second for c in cells}
    out: list[tuple[str, str, float, float | None]] = []
    for workload in ("set", "durable set", "get"):
        ours = speed.get((workload, SAFESHM))
        for other in (DISKCACHE, SHELVE):
            theirs = speed.get((workload, other))
            if ours is not None and theirs is not None:
                label = "durable set" if workload == "durable set" else workload
                out.append((label, other, ours / theirs, REQUIRED.get((workload, other))))
    return out


def scaling(cells: list[StoreCell]) -> dict[str, float]:
    """2 writers' total rate / 1 writer's rate, per implementation."""
    speed = {(c.workload, c.implementation): c.ops_per_second for c in cells}
    names = dict.fromkeys(c.implementation for c in cells if c.workload == "2 writers")
    return {name: speed[("2 writers", name)] / speed[("1 writer", name)]
            for name in names if ("1 writer", name) in speed}


def report(cells: list[StoreCell]) -> str:
    """The human-readable table."""
    lines = [f"SafeFileStore vs alternatives ({VALUE_BYTES}-byte values; set/get: {KEYS} "
             f"keys, durable set: {DURABLE_KEYS}; ops/s, median)"]
    width = max([len("implementation")] + [len(c.implementation) for c in cells])
    lines.append(f"  {'workload':<12} {'implementation':<{width}} {'ops/s':>12}   runs")
    for c in cells:
        runs = " ".join(f"{r:,.0f}" for r in c.runs)
        lines.append(f"  {c.workload:<12} {c.implementation:<{width}} "
                     f"{c.ops_per_second:>12,.0f}   {runs}")
    lines.append("  ratios (SafeFileStore ÷ alternative; bar = required):")
    for label, versus, ratio, goal in ratios(cells):
        verdict = "" if goal is None else ("  PASS" if ratio >= goal else "  MISS")
        bar = "" if goal is None else f" (bar {goal:g}x)"
        lines.append(f"    {label:<12} vs {versus:<16} {ratio:6.2f}x{bar}{verdict}")
    for name, s in scaling(cells).items():
        ours = name.startswith(SAFESHM)
        bar = f" (bar {REQUIRED_SCALING:g}x)" if ours else ""
        verdict = ("  PASS" if s >= REQUIRED_SCALING else "  MISS") if ours else ""
        lines.append(f"    2 writers ÷ 1 writer, {name:<22} {s:6.2f}x{bar}{verdict}")
    if _diskcache() is None:
        lines.append("  (diskcache is not installed: pip install diskcache, or the `bench` "
                     "extra)")
    return "\n".join(lines)
