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
``repeats`` runs is reported, each on a fresh store. With ``--quick`` every workload has a
tenth of the keys. Every get must find its key, and after the writers every key they set
must be there: a store that loses data fails the run (:class:`~.harness.BenchError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import os
import random
import shelve
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from safeshm._store import SafeFileStore

from .chart import Ratio
from .harness import BenchError

if TYPE_CHECKING:
    from .harness import Context

VALUE_BYTES: Final = 100
KEYS: Final = 10_000
DURABLE_KEYS: Final = 1_000
SHELVE_KEYS: Final = 200  # shelve reopens its database per operation: ~100 ops/s
QUICK_DIVISOR: Final = 10
"""With --quick every workload has this many times fewer keys."""
_JOIN_TIMEOUT: Final = 600.0

SAFESHM: Final = "SafeFileStore"
DISKCACHE: Final = "diskcache"
SHELVE: Final = "shelve + flock"


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
        store.set if kind.startswith("diskcache") else store.__setitem__
    )
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
        return _fill_and_time_gets(kind, store, keys, value)


def _fill_and_time_gets(kind: str, store: Any, keys: list[str], value: bytes) -> float:
    # A function of its own: no loop inside a with (tests/test_async_bytecode.py).
    put, get = _setter(kind, store), _getter(kind, store)
    for key in keys:
        put(key, value)
    order = keys[:]
    random.Random(7).shuffle(order)
    start = time.perf_counter()
    for key in order:
        if get(key) is None:  # pragma: no cover - a benchmark that lost data is void
            raise BenchError(f"store get: {kind} lost {key!r}")
    return time.perf_counter() - start


def _writer(  # noqa: PLR0917
    kind: str,
    path: str,
    prefix: str,
    n: int,
    barrier: Any,
    times: Any,
    slot: int,
) -> None:
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


def _run_writers(kind: str, procs: list[Any]) -> None:
    # A function of its own: no loop inside a try whose finally kills them.
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=_JOIN_TIMEOUT)
        if p.exitcode != 0:
            raise BenchError(f"a {kind} writer failed (exit code {p.exitcode})")


def _time_writers(ctx: Context, kind: str, path: str, writers: int, n: int) -> float:
    """Total sets per second of ``writers`` processes writing ``n`` keys each."""
    with _opened(kind, path):
        pass  # created once, so the writers race on writes, not on creation
    barrier = ctx.Barrier(writers)
    times = ctx.Array("d", 2 * writers, lock=False)
    procs = [
        ctx.Process(target=_writer, args=(kind, path, f"w{w}", n, barrier, times, w), daemon=True)
        for w in range(writers)
    ]
    try:
        _run_writers(kind, procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    with _opened(kind, path) as store:
        stored = len(store)
    if stored != writers * n:
        raise BenchError(
            f"store {writers} writer(s): {kind} holds {stored} keys, expected "
            f"{writers * n} -- writes were lost"
        )
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


def weights(repeats: int, *, quick: bool) -> list[float]:
    """The progress steps :func:`measure` takes, weighed (see ``Progress``): a rough
    average, the workloads' costs differ widely."""
    return [0.25 if quick else 1.0] * steps(repeats)


def measure(
    ctx: Context,
    repeats: int,
    directory: str | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    quick: bool = False,
) -> list[StoreCell]:
    """Measure every workload for every implementation that is importable.

    Raises:
        BenchError: a store lost data, or a writer process failed.
    """
    divisor = QUICK_DIVISOR if quick else 1
    value = os.urandom(VALUE_BYTES)
    keys = _keys(KEYS // divisor)
    durable_keys = keys[: DURABLE_KEYS // divisor]
    have_diskcache = _diskcache() is not None
    plan: list[tuple[str, str, str, Callable[[str], float]]] = []

    def add(workload: str, name: str, kind: str, fn: Callable[[str], float]) -> None:
        if kind.startswith("diskcache") and not have_diskcache:
            return
        plan.append((workload, name, kind, fn))

    def rate(
        timer: Callable[[str, str, list[str], bytes], float], kind: str, some: list[str]
    ) -> Callable[[str], float]:
        return lambda path: len(some) / timer(kind, path, some, value)

    def writers_rate(kind: str, writers: int) -> Callable[[str], float]:
        n = (DURABLE_KEYS if kind.endswith("durable") else KEYS) // divisor
        return lambda path: _time_writers(ctx, kind, path, writers, n)

    shelve_keys = keys[: SHELVE_KEYS // divisor]
    for name, kind in ((SAFESHM, "safeshm"), (DISKCACHE, "diskcache"), (SHELVE, "shelve")):
        add("set", name, kind, rate(_time_sets, kind, keys if kind != "shelve" else shelve_keys))
    for name, kind in ((SAFESHM, "safeshm-durable"), (DISKCACHE, "diskcache-durable")):
        add("durable set", name, kind, rate(_time_sets, kind, durable_keys))
    for name, kind in ((SAFESHM, "safeshm"), (DISKCACHE, "diskcache"), (SHELVE, "shelve")):
        add("get", name, kind, rate(_time_gets, kind, keys if kind != "shelve" else shelve_keys))
    for name, kind in (
        (SAFESHM, "safeshm"),
        (DISKCACHE, "diskcache"),
        (SAFESHM + " durable", "safeshm-durable"),
        (DISKCACHE + " durable", "diskcache-durable"),
    ):
        for writers in (1, 2):
            add(
                f"{writers} writer{'s' if writers > 1 else ''}",
                name,
                kind,
                writers_rate(kind, writers),
            )

    if len(plan) * repeats != steps(repeats):  # pragma: no cover - keep steps() honest
        raise RuntimeError("safeshm._bench.store.steps() is out of date")
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
    return [
        StoreCell(workload, name, statistics.median(r), tuple(r))
        for (workload, name), r in runs.items()
    ]


def cells_from_json(data: list[dict[str, Any]]) -> list[StoreCell]:
    return [
        StoreCell(
            d["workload"],
            d["implementation"],
            float(d["ops_per_second"]),
            tuple(float(r) for r in d["runs"]),
        )
        for d in data
    ]


def speed_ratios(cells: list[StoreCell]) -> list[tuple[str, str, float]]:
    """``(workload, versus, ratio)``: SafeFileStore's speed divided by each alternative's."""
    speed = {(c.workload, c.implementation): c.ops_per_second for c in cells}
    out: list[tuple[str, str, float]] = []
    for workload in ("set", "durable set", "get"):
        ours = speed.get((workload, SAFESHM))
        for other in (DISKCACHE, SHELVE):
            theirs = speed.get((workload, other))
            if ours is not None and theirs is not None:
                out.append((workload, other, ours / theirs))
    return out


def scaling(cells: list[StoreCell]) -> dict[str, float]:
    """2 writers' total rate / 1 writer's rate, per implementation."""
    speed = {(c.workload, c.implementation): c.ops_per_second for c in cells}
    names = dict.fromkeys(c.implementation for c in cells if c.workload == "2 writers")
    return {
        name: speed[("2 writers", name)] / speed[("1 writer", name)]
        for name in names
        if ("1 writer", name) in speed
    }


PANEL: Final = "SafeFileStore"


def ratios(cells: list[StoreCell]) -> list[Ratio]:
    """The chart's ratios: SafeFileStore's speed over each alternative's, and two writers'
    total over one writer's (does a second writer add, or do they collapse?)."""
    out = [Ratio(PANEL, workload, versus, value) for workload, versus, value in speed_ratios(cells)]
    for name, s in scaling(cells).items():
        if name.startswith(SAFESHM):
            durable = "durable" if name.endswith("durable") else "not durable"
            out.append(Ratio(PANEL, f"2 writers ({durable})", "1 writer", s))
    return out


def section(cells: list[StoreCell], *, quick: bool) -> dict[str, Any]:
    """What ``--json`` prints under ``"store"``."""
    divisor = QUICK_DIVISOR if quick else 1
    return {
        "value_bytes": VALUE_BYTES,
        "keys": KEYS // divisor,
        "durable_keys": DURABLE_KEYS // divisor,
        "cells": [dataclasses.asdict(c) for c in cells],
        "scaling": scaling(cells),
    }


def report(cells: list[StoreCell], *, keys: int = KEYS, durable_keys: int = DURABLE_KEYS) -> str:
    """The human-readable table."""
    lines = [
        f"SafeFileStore vs alternatives ({VALUE_BYTES}-byte values; set/get: {keys} "
        f"keys, durable set: {durable_keys}; ops/s, median)"
    ]
    width = max([len("implementation")] + [len(c.implementation) for c in cells])
    lines.append(f"  {'workload':<12} {'implementation':<{width}} {'ops/s':>12}   runs")
    for c in cells:
        runs = " ".join(f"{r:,.0f}" for r in c.runs)
        lines.append(
            f"  {c.workload:<12} {c.implementation:<{width}} {c.ops_per_second:>12,.0f}   {runs}"
        )
    lines.append("  ratios (SafeFileStore ÷ alternative):")
    for workload, versus, ratio in speed_ratios(cells):
        lines.append(f"    {workload:<12} vs {versus:<16} {ratio:6.2f}x")
    for name, s in scaling(cells).items():
        lines.append(f"    2 writers ÷ 1 writer, {name:<22} {s:6.2f}x")
    if _diskcache() is None:
        lines.append("  (diskcache is not installed: pip install diskcache, or the `bench` extra)")
    return "\n".join(lines)
