"""Benchmarks: safeshm against the ``multiprocessing`` idioms, in one process run.

**Counters.** Four ways to count from many processes are measured side by side:

1. ``multiprocessing.Value('q', 0)`` used the way users write it:
   ``with v.get_lock(): v.value += 1``;
2. ``multiprocessing.Lock()`` guarding a ``multiprocessing.RawValue('q', 0)``;
3. :meth:`safeshm.SafeCounter.add` (exact, lock-free compare-and-swap);
4. :meth:`safeshm.ShardedCounter.add` (one cache-line slot per thread).

**Arrays.** Element adds at random indices of a 1000-element int64 array:

1. ``multiprocessing.Array('q', 1000)`` used the way users write it:
   ``with arr.get_lock(): arr[i] += 1``;
2. numpy on a :class:`multiprocessing.shared_memory.SharedMemory` guarded by a
   ``multiprocessing.Lock()``: ``with lock: a[i] += 1``;
3. :meth:`safeshm.SafeArray.add` (one lock stripe per group of elements);

and, in this one process, summing a large float64 array with numpy: on a private array,
through :meth:`safeshm.SafeArray.locked`, and on a ``SharedMemory`` under an
``mp.Lock``. numpy is optional: without it the parts that need it are skipped, with a note.

**Queues.** P producer and P consumer processes on one queue, four workloads: small
``(producer, seq)`` tuples put and got one at a time; the same items in batches of 100
(``put_many``/``get_many`` where the queue has them, and for reference lists of 100 items
put as single items); 64 KiB ``bytes`` items; and the round-trip latency of a ping-pong
over two queues with both processes pinned to one CPU.
The contenders are ``multiprocessing.Queue``, ``multiprocessing.SimpleQueue``,
``faster_fifo.Queue`` (when importable: it is optional, and skipped with a note) and
:class:`safeshm.SafeQueue` (pickling, or ``raw=True`` for the bytes items). Consumers count
every item and sum its sequence number and producer number (for bytes items: read from its
last 16 bytes), and the totals must match what the producers put.

Each element measurement starts P fresh "spawn" worker processes on a fresh structure,
releases them together through a barrier, lets each perform the same calibrated number of
operations, and times from the first worker's start to the last worker's end. The final
count (for arrays: the sum of all elements) is checked against ``P * n`` after every run,
so a benchmark that loses updates fails loudly instead of reporting a fast wrong answer.

While it measures, a progress display on stderr says what is being measured and how far
along it is (``--quiet``: none); stdout gets the tables, or with ``--json`` the results as
one JSON document, whose ``"ratios"`` (see :class:`Ratio`) ``--plot FILE.png`` charts with
matplotlib (the optional ``plot`` extra). ``--from-json FILE`` measures nothing: it prints
or charts results saved earlier.

Run it as ``python -m safeshm bench`` or ``python benchmarks/bench_counter.py`` /
``python benchmarks/bench_array.py`` / ``python benchmarks/bench_queue.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import importlib
import importlib.metadata
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any, Final, TextIO

from . import __version__, _bench_store, _cli
from ._array import SafeArray
from ._counter import SafeCounter, ShardedCounter
from ._queue import SafeQueue

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext, SpawnProcess
    from multiprocessing.sharedctypes import Synchronized, SynchronizedArray
    from multiprocessing.synchronize import Barrier, Lock

    from matplotlib.axes import Axes

    from ._segment import SharedStructure

START_METHOD: Final = "spawn"
"""Fresh interpreters: nothing inherited through fork flatters or handicaps a contender,
and every object a worker uses must reach it the documented way (as a Process argument)."""

IDIOM: Final = "mp.Value idiom"
RAW_LOCK: Final = "mp.Lock + RawValue"
SAFE: Final = "SafeCounter"
SHARDED: Final = "ShardedCounter"
IMPLEMENTATIONS: Final = (IDIOM, RAW_LOCK, SAFE, SHARDED)

_DESCRIPTIONS: Final = {
    IDIOM: "with v.get_lock(): v.value += 1   (v = multiprocessing.Value('q', 0))",
    RAW_LOCK: "with lock: rv.value += 1   (multiprocessing.Lock + RawValue('q', 0))",
    SAFE: "add(1)   (safeshm.SafeCounter: exact, lock-free compare-and-swap)",
    SHARDED: "add(1)   (safeshm.ShardedCounter: one slot per thread)",
}

STRUCTURES: Final = _cli.BENCH_STRUCTURES
"""What ``--structures`` may select: the counter, array and queue benchmarks."""

ARRAY_IDIOM: Final = "mp.Array idiom"
ARRAY_NUMPY: Final = "numpy + mp.Lock"
ARRAY_SAFE: Final = "SafeArray"
ARRAY_IMPLEMENTATIONS: Final = (ARRAY_IDIOM, ARRAY_NUMPY, ARRAY_SAFE)
ARRAY_LENGTH: Final = 1000
"""Elements (int64) in the array the element-add workers update."""

BULK_PRIVATE: Final = "numpy private"
BULK_SAFE: Final = "SafeArray.locked()"
BULK_SHM: Final = "SharedMemory + mp.Lock"
BULK_IMPLEMENTATIONS: Final = (BULK_PRIVATE, BULK_SAFE, BULK_SHM)
DEFAULT_BULK_ELEMENTS: Final = _cli.DEFAULT_BULK_ELEMENTS
"""float64 elements summed by the bulk part (80 MB: far larger than any CPU cache, so
every contender streams the array from memory)."""

_ARRAY_DESCRIPTIONS: Final = {
    ARRAY_IDIOM: "with arr.get_lock(): arr[i] += 1   (arr = multiprocessing.Array('q', 1000))",
    ARRAY_NUMPY: "with lock: a[i] += 1   (a: numpy int64 view of a SharedMemory; "
                 "multiprocessing.Lock)",
    ARRAY_SAFE: "add(i, 1)   (safeshm.SafeArray('q', 1000): element i locks stripe i % 64)",
}
_BULK_DESCRIPTIONS: Final = {
    BULK_PRIVATE: "np.sum(x)   (x: a private numpy float64 array)",
    BULK_SAFE: "with a.locked() as view: np.asarray(view).sum()   "
               "(safeshm.SafeArray('d', N))",
    BULK_SHM: "with lock: np.ndarray((N,), np.float64, buffer=shm.buf).sum()   "
              "(SharedMemory + multiprocessing.Lock)",
}

Q_MP: Final = "mp.Queue"
Q_MP_LISTS: Final = "mp.Queue, lists"
Q_SAFE_LISTS: Final = "SafeQueue, lists"
Q_SIMPLE: Final = "mp.SimpleQueue"
Q_FF: Final = "faster_fifo.Queue"
Q_SAFE: Final = "SafeQueue"

SMALL: Final = "small"
BATCHES: Final = "batches"
BYTES: Final = "bytes"
LATENCY: Final = "latency"
QUEUE_WORKLOADS: Final = (SMALL, BATCHES, BYTES)
"""The throughput workloads (the latency ping-pong is measured apart)."""

QUEUE_CONTENDERS: Final = {
    SMALL: (Q_MP, Q_SIMPLE, Q_FF, Q_SAFE),
    BATCHES: (Q_MP, Q_MP_LISTS, Q_FF, Q_SAFE, Q_SAFE_LISTS),
    BYTES: (Q_MP, Q_SIMPLE, Q_FF, Q_SAFE),
    LATENCY: (Q_SIMPLE, Q_MP, Q_FF, Q_SAFE),
}

QUEUE_CAPACITY: Final = 4 * 1024 * 1024
"""Bytes in every SafeQueue's ring and every faster_fifo.Queue's buffer (4 MiB)."""
QUEUE_BATCH: Final = 100
"""Items per put_many / get_many (and per list, in the "lists" rows)."""
QUEUE_ITEM_BYTES: Final = 64 * 1024
"""The size of every item of the bytes workload."""

# How a worker puts and gets, per workload and contender: one item at a time, batches
# through put_many/get_many, lists of QUEUE_BATCH items as single items, or bytes items.
_SINGLE: Final = "single"
_MANY: Final = "many"
_LISTS: Final = "lists"
_RAW: Final = "bytes"


def _queue_mode(workload: str, implementation: str) -> str:
    if workload == BYTES:
        return _RAW
    if workload == BATCHES and implementation in (Q_FF, Q_SAFE):
        return _MANY
    return _LISTS if implementation in (Q_MP_LISTS, Q_SAFE_LISTS) else _SINGLE


def _queue_kind(implementation: str) -> str:
    """Which queue an implementation uses (the "lists" rows use the plain queues)."""
    return {Q_MP_LISTS: Q_MP, Q_SAFE_LISTS: Q_SAFE}.get(implementation, implementation)


def _ring_items(payload: int) -> int:
    """How many items of ``payload`` bytes a SafeQueue ring of QUEUE_CAPACITY holds (each
    record is an 8-byte header plus the payload, padded to 8 bytes)."""
    return QUEUE_CAPACITY // ((payload + 15) & ~7)


# multiprocessing.Queue counts items, not bytes: it is given, per mode, the number of
# items a SafeQueue ring of QUEUE_CAPACITY holds, for a representative item (a pickled
# (1, 1_000_000) takes 21 bytes, so 131072 small items; 4519 lists; 63 bytes items).
_MP_MAXSIZE: Final = {
    _SINGLE: _ring_items(len(pickle.dumps((1, 1_000_000), pickle.HIGHEST_PROTOCOL))),
    _LISTS: _ring_items(len(pickle.dumps([(1, 1_000_000 + i) for i in range(QUEUE_BATCH)],
                                         pickle.HIGHEST_PROTOCOL))),
    _RAW: _ring_items(QUEUE_ITEM_BYTES),
}

_MIB: Final = QUEUE_CAPACITY // (1024 * 1024)
_CALLS: Final = {
    _SINGLE: "put((i, seq)) / get()",
    _MANY: "put_many([(i, seq), ...]) / get_many(100)",
    _LISTS: "put([(i, seq), ...]) / get(): lists of 100 items, one pickle each",
    _RAW: "put(64 KiB bytes) / get()",
}


def _queue_description(workload: str, implementation: str) -> str:
    """The calls and the queue, as printed in the tables."""
    mode = _queue_mode(workload, implementation)
    calls = ("put((0, seq)) / get()   (both ways)" if workload == LATENCY else _CALLS[mode])
    kind = _queue_kind(implementation)
    if kind == Q_FF:
        calls = calls.replace("get_many(100)", "get_many(max_messages_to_get=100)")
        queue = f"faster_fifo.Queue(max_size_bytes={QUEUE_CAPACITY}), timeout=limit"
    elif kind == Q_SAFE:
        queue = (f"safeshm.SafeQueue.create({QUEUE_CAPACITY}"
                 f"{', raw=True' if workload == BYTES else ''}): {_MIB} MiB ring")
    elif kind == Q_SIMPLE:
        queue = "multiprocessing.SimpleQueue(): a pipe"
    else:
        queue = f"multiprocessing.Queue(maxsize={_MP_MAXSIZE[mode]})"
    return f"{calls}   ({queue})"


# Queue workloads: items per producer in the warm-up run and the first calibration run.
# 64 KiB items are ~1000x larger than the others, so they start 10x smaller.
_QUEUE_WARMUP_OPS: Final = {SMALL: 5_000, BATCHES: 5_000, BYTES: 500, LATENCY: 1_000}
_QUEUE_START_OPS: Final = {SMALL: 20_000, BATCHES: 20_000, BYTES: 2_000, LATENCY: 2_000}
# The pinger keeps every round-trip time (a float in a list, then 8 bytes in shared memory).
_MAX_ROUND_TRIPS: Final = 2_000_000

# Every worker draws its indices from its own generator, seeded by its worker number only,
# so worker k of every implementation updates exactly the same elements in the same order.
_INDEX_SEED: Final = 0x5AFE5111

# Spawned children import the package before reaching the barrier; on a loaded machine
# that can take seconds, so the barrier waits generously -- but never forever.
_BARRIER_TIMEOUT_S: Final = 60.0
_KILL_GRACE_S: Final = 5.0

_WARMUP_OPS: Final = 5_000
_CALIBRATION_START_OPS: Final = 20_000
# A calibration run shorter than this fraction of the target is too noisy to scale from.
_CALIBRATION_MIN_FRACTION: Final = 0.1
_MAX_OPS_PER_WORKER: Final = 2**40
# An array worker's index list costs 8 bytes per operation: 200 MB at this cap.
_MAX_ARRAY_OPS_PER_WORKER: Final = 25_000_000


class BenchError(RuntimeError):
    """A measurement could not be made: a worker failed, hung, or the count was wrong."""


# --- workers (module level: spawn children import them by name) ---------------------------
#
# Every worker has the same shape: wait at the barrier, read the clock, run
# ``for _ in range(n): <one increment>``, read the clock, record both readings. Only the
# loop body differs between implementations, so the per-iteration overhead around it is
# identical. time.perf_counter is CLOCK_MONOTONIC on Linux: one clock for every process,
# so readings taken in different workers can be compared directly.


def _record(times: ctypes.Array[ctypes.c_double], index: int, start: float,
            end: float) -> None:
    times[2 * index] = start
    times[2 * index + 1] = end


def _worker_value_idiom(v: Synchronized[int], n: int, *, barrier: Barrier,
                        times: ctypes.Array[ctypes.c_double], index: int) -> None:
    """The idiom exactly as written in user code, ``get_lock()`` call included."""
    barrier.wait(_BARRIER_TIMEOUT_S)
    start = time.perf_counter()
    for _ in range(n):
        with v.get_lock():
            v.value += 1
    end = time.perf_counter()
    _record(times, index, start, end)


def _worker_raw_lock(rv: ctypes.c_int64, lock: Lock, n: int, *, barrier: Barrier,
                     times: ctypes.Array[ctypes.c_double], index: int) -> None:
    """A plain lock around an unsynchronized shared value."""
    barrier.wait(_BARRIER_TIMEOUT_S)
    start = time.perf_counter()
    for _ in range(n):
        with lock:
            rv.value += 1
    end = time.perf_counter()
    _record(times, index, start, end)


def _worker_safeshm(counter: SafeCounter | ShardedCounter, n: int, *, barrier: Barrier,
                    times: ctypes.Array[ctypes.c_double], index: int) -> None:
    """``add(1)`` through a hoisted bound method, as a hot loop in user code would do."""
    try:
        add = counter.add
        # Pay one-time costs outside the timed region -- ShardedCounter claims its slot
        # on the first add -- without changing the count, so every contender is timed
        # in its steady state.
        add(0)
        barrier.wait(_BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        for _ in range(n):
            add(1)
        end = time.perf_counter()
        _record(times, index, start, end)
    finally:
        counter.close()


def _indices(worker: int, n: int, length: int) -> list[int]:
    """Worker ``worker``'s ``n`` random indices into an array of ``length`` elements.

    Identical for every implementation (see :data:`_INDEX_SEED`), and made before the
    barrier so that generating them is never timed. ``choices`` over a list of the
    ``length`` index objects fills the list with references to those few objects: 8 bytes
    per entry instead of a fresh int object each.
    """
    return random.Random(_INDEX_SEED + worker).choices(list(range(length)), k=n)


def _worker_array_idiom(arr: SynchronizedArray[int], length: int, n: int, *,
                        barrier: Barrier, times: ctypes.Array[ctypes.c_double],
                        index: int) -> None:
    """The ``multiprocessing.Array`` idiom exactly as written in user code."""
    indices = _indices(index, n, length)
    barrier.wait(_BARRIER_TIMEOUT_S)
    start = time.perf_counter()
    for i in indices:
        with arr.get_lock():
            arr[i] += 1
    end = time.perf_counter()
    _record(times, index, start, end)


def _attach_shared_memory(name: str) -> SharedMemory:
    """Attach, in a spawned worker, to the ``SharedMemory`` the parent created.

    The parent created the segment, so the parent's resource tracker already has it
    registered and the parent unlinks it (which unregisters it) after the workers exit.
    On 3.13+ ``track=False`` keeps the worker out of the tracker altogether. Before 3.13
    attaching always registers it again, but a spawned worker shares its parent's tracker
    (multiprocessing hands the tracker's pipe to every child), whose registry is a set: the
    second registration is a no-op, nothing is unlinked when the worker exits, and nothing
    is reported. ``resource_tracker.unregister`` here -- the usual advice for *unrelated*
    processes, each with a tracker of its own -- would be wrong: it would remove the
    parent's own registration from the shared tracker, which then prints a ``KeyError``
    traceback when the parent's ``unlink()`` unregisters the segment (seen on 3.11, 3.12
    and 3.13), and would leave the segment behind if the parent died.
    """
    # A conditional expression, not an if statement: mypy checks each Python version in
    # CI, and would call the other version's branch unreachable.
    untracked: dict[str, Any] = {"track": False} if sys.version_info >= (3, 13) else {}
    return SharedMemory(name, **untracked)


def _worker_array_numpy(shm_name: str, lock: Lock, length: int, n: int, *,
                        barrier: Barrier, times: ctypes.Array[ctypes.c_double],
                        index: int) -> None:
    """numpy over a ``SharedMemory``, with a plain lock around each read-modify-write."""
    import numpy as np  # noqa: PLC0415 - optional dependency, needed only by this worker

    shm = _attach_shared_memory(shm_name)
    try:
        a = np.ndarray((length,), np.int64, buffer=shm.buf)
        try:
            indices = _indices(index, n, length)
            barrier.wait(_BARRIER_TIMEOUT_S)
            start = time.perf_counter()
            for i in indices:
                with lock:
                    a[i] += 1
            end = time.perf_counter()
            _record(times, index, start, end)
        finally:
            # shm.close() raises BufferError while a numpy array still exports shm.buf,
            # even when an exception is on its way out (its traceback keeps this frame).
            del a
    finally:
        shm.close()


def _worker_array_safe(arr: SafeArray[int], length: int, n: int, *, barrier: Barrier,
                       times: ctypes.Array[ctypes.c_double], index: int) -> None:
    """``add(i, 1)`` through a hoisted bound method, as a hot loop in user code would do."""
    try:
        add = arr.add
        indices = _indices(index, n, length)
        barrier.wait(_BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        for i in indices:
            add(i, 1)
        end = time.perf_counter()
        _record(times, index, start, end)
    finally:
        arr.close()


# --- one measurement ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    """One measurement: ``processes`` workers, ``ops_per_worker`` operations each."""

    implementation: str
    processes: int
    ops_per_worker: int
    elapsed_s: float

    @property
    def ops_per_s(self) -> float:
        """Total operations per second, all workers together."""
        return self.processes * self.ops_per_worker / self.elapsed_s


def _join_all(procs: Sequence[SpawnProcess], barrier: Barrier, deadline: float) -> None:
    """Wait for every worker until ``deadline``; on any failure stop the rest and raise."""
    pending = list(procs)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{len(pending)} worker(s) still running at the deadline")
        ready = set(multiprocessing.connection.wait([p.sentinel for p in pending],
                                                    remaining))
        for p in [p for p in pending if p.sentinel in ready]:
            pending.remove(p)
            p.join()
            if p.exitcode != 0:
                # Release workers still waiting at the barrier instead of letting them
                # sit out its timeout.
                barrier.abort()
                raise BenchError(f"worker {p.name} exited with code {p.exitcode}")


def _stop_all(procs: Sequence[SpawnProcess]) -> None:
    """Kill any worker still alive and reap every one (used on success and failure)."""
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(_KILL_GRACE_S)
        if p.exitcode is not None:
            p.close()


def _drop(structure: SharedStructure) -> None:
    """Close and unlink a safeshm structure this benchmark created, whatever happens."""
    try:
        structure.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            structure.unlink()


def _drop_shared_memory(shm: SharedMemory) -> None:
    """Close and unlink a ``SharedMemory`` this benchmark created, whatever happens."""
    try:
        shm.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()


@dataclasses.dataclass(frozen=True)
class _Contender:
    """What one measurement of one implementation needs, made fresh for each run."""

    target: Callable[..., None]
    args: tuple[Any, ...]
    read_count: Callable[[], int]
    """The count after the run: the counter's value, or the sum of all elements."""
    what: str
    """How ``read_count``'s result is named in an error message."""
    release: Callable[[], None]
    """Frees every shared resource the contender created (called in a ``finally``)."""


def _nothing() -> None:
    """Nothing to release: ``multiprocessing`` objects are freed with their last handle."""


def _prepare(ctx: SpawnContext, implementation: str, n: int) -> _Contender:
    """A fresh structure for ``implementation``, with its worker's target and arguments."""
    if implementation == IDIOM:
        v = ctx.Value("q", 0)
        return _Contender(_worker_value_idiom, (v, n), lambda: v.value, "final count",
                          _nothing)
    if implementation == RAW_LOCK:
        rv = ctx.RawValue("q", 0)
        return _Contender(_worker_raw_lock, (rv, ctx.Lock(), n), lambda: rv.value,
                          "final count", _nothing)
    if implementation in (SAFE, SHARDED):
        counter = SafeCounter.create() if implementation == SAFE else ShardedCounter.create()
        return _Contender(_worker_safeshm, (counter, n), lambda: counter.value,
                          "final count", lambda: _drop(counter))
    if implementation == ARRAY_IDIOM:
        arr = ctx.Array("q", ARRAY_LENGTH)
        return _Contender(_worker_array_idiom, (arr, ARRAY_LENGTH, n),
                          lambda: sum(arr.get_obj()), "sum of all elements", _nothing)
    if implementation == ARRAY_NUMPY:
        lock = ctx.Lock()
        # Created zero-filled (a fresh file in /dev/shm), by the parent, which also
        # unlinks it: see _attach_shared_memory for the workers' side.
        shm = SharedMemory(create=True, size=8 * ARRAY_LENGTH)

        def read_sum() -> int:
            buf = shm.buf
            if buf is None:  # pragma: no cover - only after close(), which comes later
                raise BenchError(f"SharedMemory {shm.name!r} was closed too early")
            # Read without numpy, through views released before shm.close() needs it.
            with buf[: 8 * ARRAY_LENGTH] as raw, raw.cast("q") as elements:
                return sum(elements)

        return _Contender(_worker_array_numpy, (shm.name, lock, ARRAY_LENGTH, n), read_sum,
                          "sum of all elements", lambda: _drop_shared_memory(shm))
    if implementation == ARRAY_SAFE:
        safe = SafeArray.create("q", ARRAY_LENGTH)
        return _Contender(_worker_array_safe, (safe, ARRAY_LENGTH, n),
                          lambda: sum(safe.to_list()), "sum of all elements",
                          lambda: _drop(safe))
    raise ValueError(f"unknown implementation {implementation!r}")


def measure(ctx: SpawnContext, implementation: str, processes: int, n: int,
            time_limit_s: float) -> Run:
    """Run one measurement on a fresh structure and check its final count.

    Args:
        ctx: the spawn context every object and process comes from.
        implementation: one of :data:`IMPLEMENTATIONS` or :data:`ARRAY_IMPLEMENTATIONS`.
        processes: how many worker processes update concurrently.
        n: operations (increments, element adds) per worker.
        time_limit_s: how long the workers may take once released, on top of the
            barrier's start-up allowance; stragglers are killed after it.

    Returns:
        The timing, from the earliest worker start to the latest worker end.

    Raises:
        BenchError: a worker failed or hung, or the final count (for arrays: the sum of
            all elements) is not ``processes * n``.
    """
    barrier = ctx.Barrier(processes)
    times: ctypes.Array[ctypes.c_double] = ctx.RawArray(ctypes.c_double, 2 * processes)
    contender = _prepare(ctx, implementation, n)
    procs: list[SpawnProcess] = []
    try:
        for i in range(processes):
            procs.append(ctx.Process(
                target=contender.target, args=contender.args,
                kwargs={"barrier": barrier, "times": times, "index": i},
                name=f"bench-{implementation}-{i}", daemon=True))
            procs[-1].start()
        _join_all(procs, barrier,
                  time.monotonic() + _BARRIER_TIMEOUT_S + time_limit_s)
        count = contender.read_count()
        if count != processes * n:
            raise BenchError(
                f"{implementation} with {processes} process(es): {contender.what} {count}, "
                f"expected {processes * n} -- updates were lost or duplicated")
    finally:
        try:
            _stop_all(procs)
        finally:
            # Every segment this run created goes away, whatever happened above.
            contender.release()
    starts = times[0::2]
    ends = times[1::2]
    return Run(implementation, processes, n, max(max(ends) - min(starts), 1e-9))


def calibrate(ctx: SpawnContext, implementation: str, processes: int, seconds: float,
              time_limit_s: float) -> int:
    """Find how many operations per worker make one measurement last about ``seconds``.

    Grows a short run until it is long enough to scale from reliably, then scales. Array
    workers hold their whole index list in memory, so their count is capped at
    :data:`_MAX_ARRAY_OPS_PER_WORKER` (a measurement may then be shorter than asked).
    """
    cap = (_MAX_ARRAY_OPS_PER_WORKER if implementation in ARRAY_IMPLEMENTATIONS
           else _MAX_OPS_PER_WORKER)

    def elapsed(n: int) -> float:
        return measure(ctx, implementation, processes, n, time_limit_s).elapsed_s

    return _calibrated(elapsed, seconds, _CALIBRATION_START_OPS, cap)


def _calibrated(elapsed: Callable[[int], float], seconds: float, start: int, cap: int) -> int:
    """The ``n`` for which ``elapsed(n)`` (one measurement's seconds) is about ``seconds``.

    Grows ``n`` from ``start`` until a run is long enough to scale from reliably, then
    scales linearly; never beyond ``cap``.
    """
    n = start
    while True:
        took = elapsed(n)
        if took >= seconds * _CALIBRATION_MIN_FRACTION or n >= cap:
            break
        # Aim straight for the threshold (with margin), but never jump more than 100x on
        # the strength of one very short, very noisy timing.
        factor = 2 * seconds * _CALIBRATION_MIN_FRACTION / took
        n = min(cap, int(n * min(100.0, max(2.0, factor))))
    return max(1, min(cap, round(n * seconds / took)))


# --- the queue benchmark: workers -----------------------------------------------------------
#
# A producer puts its n items and then one end marker (None; b"" for bytes items); a
# consumer takes items until it has taken one end marker. With P producers and P consumers
# there are P markers, each consumer stops at its first, and a producer's marker comes after
# all its items: so by the time every consumer has stopped, every item has been taken.
# Producers and consumers read the clock after the barrier; the measurement ends when the
# last consumer has its last item (multiprocessing.Queue's put returns before a feeder
# thread has written the item: only what the consumers received counts).


def _queue_calls(kind: str, q: Any, timeout: float) -> tuple[Callable[[Any], None],
                                                           Callable[[], Any]]:
    """``put`` and ``get``, hoisted as a hot loop in user code would hoist them.

    faster_fifo's calls give up after 10 s by default (raising ``queue.Full`` or
    ``queue.Empty``): they get the run's whole time limit instead, so a briefly overloaded
    machine cannot fail a run that the others would finish. The others block without a
    timeout, as they are usually called; a run that hangs is ended by the parent's deadline.
    """
    if kind == Q_FF:
        return (functools.partial(q.put, block=True, timeout=timeout),
                functools.partial(q.get, True, timeout))
    return q.put, q.get


def _batch_calls(kind: str, q: Any, timeout: float) -> tuple[Callable[[list[Any]], None],
                                                           Callable[[], list[Any]]]:
    """``put_many`` and ``get_many`` of up to :data:`QUEUE_BATCH` items."""
    if kind == Q_FF:
        return (functools.partial(q.put_many, block=True, timeout=timeout),
                functools.partial(q.get_many, True, timeout, QUEUE_BATCH))
    return q.put_many, functools.partial(q.get_many, QUEUE_BATCH)


def _ready_to_get(kind: str, q: Any) -> None:
    """One-time set-up in a process that will get from ``q``, before the barrier.

    A faster_fifo.Queue that arrives in a child has a 0-byte receive buffer: its first get
    finds the buffer too small, releases the lock, grows it and retries without blocking --
    which raises ``queue.Empty`` if another consumer took the item meanwhile (a real race
    with 2 consumers). Sizing the buffer once, up front, to the whole queue avoids both the
    race and a first-call cost in the timed region; a long-running consumer would reach a
    buffer this size on its own.
    """
    if kind == Q_FF:
        q.reallocate_msg_buffer(QUEUE_CAPACITY)


def _release_in_worker(q: Any) -> None:
    """Close a worker's SafeQueue handle (the parent unlinks the queue); the others need
    nothing: multiprocessing queues flush and close when the worker exits."""
    if isinstance(q, SafeQueue):
        q.close()


def _put_items(put: Callable[[Any], None], index: int, n: int) -> None:
    for seq in range(n):
        put((index, seq))
    put(None)


def _put_batches(put_many: Callable[[list[Any]], None], put: Callable[[Any], None],
                 index: int, n: int) -> None:
    # Each batch is built in the loop, as each item is in _put_items: every item is made
    # once in every contender.
    for lo in range(0, n, QUEUE_BATCH):
        put_many([(index, seq) for seq in range(lo, min(lo + QUEUE_BATCH, n))])
    put(None)


def _put_lists(put: Callable[[Any], None], index: int, n: int) -> None:
    for lo in range(0, n, QUEUE_BATCH):
        put([(index, seq) for seq in range(lo, min(lo + QUEUE_BATCH, n))])
    put(None)


def _put_bytes(put: Callable[[Any], None], body: bytes, n: int) -> None:
    # One new 64 KiB bytes object per item (a copy of ``body``), in every contender: an
    # item reused, or a buffer changed in place, would not be what multiprocessing.Queue's
    # feeder thread pickles later.
    for seq in range(n):
        put(body + seq.to_bytes(8, "little"))
    put(b"")


_Tally = tuple[int, int, int, int, int]
"""What a consumer took: items, sum of their sequence numbers, sum of their producer
numbers, payload bytes (bytes items only), end markers."""


def _get_items(get: Callable[[], Any]) -> _Tally:
    count = seq_sum = src_sum = 0
    while True:
        item = get()
        if item is None:
            return count, seq_sum, src_sum, 0, 1
        src, seq = item
        count += 1
        seq_sum += seq
        src_sum += src


def _get_batches(get_many: Callable[[], list[Any]]) -> _Tally:
    # A batch may hold several end markers, and items after one: every item in a batch
    # is counted, and the caller puts back the markers beyond its own.
    count = seq_sum = src_sum = markers = 0
    while not markers:
        for item in get_many():
            if item is None:
                markers += 1
            else:
                src, seq = item
                count += 1
                seq_sum += seq
                src_sum += src
    return count, seq_sum, src_sum, 0, markers


def _get_lists(get: Callable[[], Any]) -> _Tally:
    count = seq_sum = src_sum = 0
    while True:
        batch = get()
        if batch is None:
            return count, seq_sum, src_sum, 0, 1
        for src, seq in batch:
            count += 1
            seq_sum += seq
            src_sum += src


def _get_bytes(get: Callable[[], Any]) -> _Tally:
    count = seq_sum = src_sum = nbytes = 0
    while True:
        item = get()
        if not item:
            return count, seq_sum, src_sum, nbytes, 1
        count += 1
        nbytes += len(item)
        src_sum += int.from_bytes(item[-16:-8], "little")
        seq_sum += int.from_bytes(item[-8:], "little")


def _queue_producer(kind: str, mode: str, q: Any, n: int, *, timeout: float,
                    barrier: Barrier, times: ctypes.Array[ctypes.c_double],
                    index: int) -> None:
    """Put ``n`` items numbered ``0 .. n-1`` (and the end marker), timed from the barrier."""
    try:
        put, _ = _queue_calls(kind, q, timeout)
        loop: Callable[[], None]
        if mode == _MANY:
            loop = functools.partial(_put_batches, _batch_calls(kind, q, timeout)[0], put,
                                     index, n)
        elif mode == _LISTS:
            loop = functools.partial(_put_lists, put, index, n)
        elif mode == _RAW:
            # The last 16 bytes of an item: producer number, then sequence number.
            body = b"\xa5" * (QUEUE_ITEM_BYTES - 16) + index.to_bytes(8, "little")
            loop = functools.partial(_put_bytes, put, body, n)
        else:
            loop = functools.partial(_put_items, put, index, n)
        barrier.wait(_BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        loop()
        end = time.perf_counter()
        _record(times, index, start, end)
    finally:
        _release_in_worker(q)


def _queue_consumer(kind: str, mode: str, q: Any, *, timeout: float,
                    tallies: ctypes.Array[ctypes.c_longlong], slot: int, barrier: Barrier,
                    times: ctypes.Array[ctypes.c_double], index: int) -> None:
    """Take items until an end marker; record the time of the last one and the tally."""
    try:
        _ready_to_get(kind, q)
        put, get = _queue_calls(kind, q, timeout)
        loop: Callable[[], _Tally]
        if mode == _MANY:
            loop = functools.partial(_get_batches, _batch_calls(kind, q, timeout)[1])
        elif mode == _LISTS:
            loop = functools.partial(_get_lists, get)
        elif mode == _RAW:
            loop = functools.partial(_get_bytes, get)
        else:
            loop = functools.partial(_get_items, get)
        barrier.wait(_BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        tally = loop()
        end = time.perf_counter()
        # End markers taken beyond this consumer's own belong to consumers still running.
        for _ in range(tally[4] - 1):
            put(None)
        _record(times, index, start, end)
        tallies[4 * slot : 4 * slot + 4] = list(tally[:4])
    finally:
        _release_in_worker(q)


def _pin(cpu: int) -> None:
    """Run this process (and the threads it starts later) on ``cpu`` only."""
    os.sched_setaffinity(0, {cpu})


def _queue_pinger(kind: str, requests: Any, replies: Any, n: int, *, timeout: float, cpu: int,
                  samples: ctypes.Array[ctypes.c_double],
                  tallies: ctypes.Array[ctypes.c_longlong], barrier: Barrier,
                  times: ctypes.Array[ctypes.c_double], index: int) -> None:
    """Send ``(0, seq)`` and wait for it to come back, ``n`` times; time each round trip."""
    try:
        _pin(cpu)
        _ready_to_get(kind, replies)
        put = _queue_calls(kind, requests, timeout)[0]
        get = _queue_calls(kind, replies, timeout)[1]
        rtts = [0.0] * n  # preallocated: the loop only stores
        clock = time.perf_counter
        right = 0
        barrier.wait(_BARRIER_TIMEOUT_S)
        start = clock()
        for seq in range(n):
            t0 = clock()
            put((0, seq))
            reply = get()
            rtts[seq] = clock() - t0
            right += reply[1] == seq  # after the round trip's clock: not timed
        end = clock()
        _record(times, index, start, end)
        for i, rtt in enumerate(rtts):  # not a slice assignment: typeshed wants c_doubles
            samples[i] = rtt
        tallies[0] = right
    finally:
        _release_in_worker(requests)
        _release_in_worker(replies)


def _queue_ponger(kind: str, requests: Any, replies: Any, n: int, *, timeout: float, cpu: int,
                  barrier: Barrier, times: ctypes.Array[ctypes.c_double],
                  index: int) -> None:
    """Send every request straight back, ``n`` times."""
    try:
        _pin(cpu)
        _ready_to_get(kind, requests)
        get = _queue_calls(kind, requests, timeout)[1]
        put = _queue_calls(kind, replies, timeout)[0]
        barrier.wait(_BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        for _ in range(n):
            put(get())
        end = time.perf_counter()
        _record(times, index, start, end)
    finally:
        _release_in_worker(requests)
        _release_in_worker(replies)


# --- the queue benchmark: one measurement ---------------------------------------------------
def _faster_fifo() -> tuple[Any, str]:
    """``(the faster_fifo module, "")`` if it imports, else ``(None, why not)``.

    ``importlib`` keeps the optional, untyped module out of mypy's sight: an ``import``
    statement would need a different ``type: ignore`` code where it is installed (no type
    information) and where it is not (not found).
    """
    try:
        module = importlib.import_module("faster_fifo")
        # Registers how a faster_fifo.Queue is pickled for a spawned child (its shared
        # buffers travel; its private receive buffer does not).
        importlib.import_module("faster_fifo_reduction")
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return module, ""


def _new_queue(ctx: SpawnContext, implementation: str, workload: str,
               stack: contextlib.ExitStack) -> Any:
    """A fresh queue for one measurement, freed when ``stack`` closes."""
    mode = _queue_mode(workload, implementation)
    kind = _queue_kind(implementation)
    if kind == Q_SAFE:
        q: Any = (SafeQueue.create(QUEUE_CAPACITY, raw=True) if mode == _RAW
                  else SafeQueue.create(QUEUE_CAPACITY))
        stack.callback(_drop, q)
    elif kind == Q_FF:
        module, why = _faster_fifo()
        if module is None:  # pragma: no cover - the plan leaves it out instead
            raise BenchError(f"faster_fifo is not importable: {why}")
        # Its buffers are multiprocessing.RawArrays: freed with the last reference.
        q = module.Queue(max_size_bytes=QUEUE_CAPACITY)
    elif kind == Q_SIMPLE:
        q = ctx.SimpleQueue()
        stack.callback(q.close)
    else:
        q = ctx.Queue(_MP_MAXSIZE[mode])
        # The parent never puts, so it has no feeder thread to join: closing is enough.
        stack.callback(q.close)
    return q


def _start(ctx: SpawnContext, procs: list[SpawnProcess], target: Callable[..., None],
           args: tuple[Any, ...], name: str, **kwargs: Any) -> None:
    procs.append(ctx.Process(target=target, args=args, kwargs=kwargs, name=name,
                             daemon=True))
    procs[-1].start()


def measure_queue(ctx: SpawnContext, workload: str, implementation: str, processes: int,
                  n: int, *, time_limit_s: float) -> Run:
    """Run one throughput measurement on a fresh queue and check every item arrived.

    Args:
        ctx: the spawn context every object and process comes from.
        workload: one of :data:`QUEUE_WORKLOADS`.
        implementation: one of ``QUEUE_CONTENDERS[workload]``.
        processes: producers, and as many consumers.
        n: items per producer.
        time_limit_s: how long the workers may take once released; stragglers are killed
            after it.

    Returns:
        The timing, from the earliest start (any producer or consumer) to the latest
        consumer's end; ``ops_per_s`` is items per second.

    Raises:
        BenchError: a worker failed or hung, or the consumers did not take exactly the
            ``processes * n`` items put (checked by count, by the sums of sequence and
            producer numbers, and for bytes items by the total size).
    """
    mode = _queue_mode(workload, implementation)
    kind = _queue_kind(implementation)
    barrier = ctx.Barrier(2 * processes)
    times: ctypes.Array[ctypes.c_double] = ctx.RawArray(ctypes.c_double, 4 * processes)
    tallies: ctypes.Array[ctypes.c_longlong] = ctx.RawArray(ctypes.c_longlong, 4 * processes)
    timeout = _BARRIER_TIMEOUT_S + time_limit_s
    procs: list[SpawnProcess] = []
    with contextlib.ExitStack() as stack:
        q = _new_queue(ctx, implementation, workload, stack)
        # Registered after the queue: runs first, so no worker still uses the queue when
        # it is freed -- whatever happened.
        stack.callback(_stop_all, procs)
        for i in range(processes):
            _start(ctx, procs, _queue_producer, (kind, mode, q, n),
                   f"bench-{workload}-{implementation}-put-{i}",
                   timeout=timeout, barrier=barrier, times=times, index=i)
        for j in range(processes):
            _start(ctx, procs, _queue_consumer, (kind, mode, q),
                   f"bench-{workload}-{implementation}-get-{j}", timeout=timeout,
                   tallies=tallies, slot=j, barrier=barrier, times=times, index=processes + j)
        _join_all(procs, barrier, time.monotonic() + _BARRIER_TIMEOUT_S + time_limit_s)
    got = tuple(sum(tallies[k::4]) for k in range(4))
    want = (processes * n, processes * n * (n - 1) // 2, n * processes * (processes - 1) // 2,
            processes * n * QUEUE_ITEM_BYTES if mode == _RAW else 0)
    if got != want:
        raise BenchError(
            f"{implementation}, {workload} items, {processes} producer(s) and consumer(s): "
            f"consumers took (items, sum of seq, sum of producer, bytes) = {got}, expected "
            f"{want} -- items were lost, duplicated or damaged")
    start = min(times[0::2])
    end = max(times[2 * processes + 1 :: 2])
    return Run(implementation, processes, n, max(end - start, 1e-9))


@dataclasses.dataclass(frozen=True)
class RoundTrips:
    """One latency measurement: ``n`` round trips, each in seconds."""

    implementation: str
    elapsed_s: float
    """The pinger's whole loop."""
    seconds: list[float]

    @property
    def median(self) -> float:
        """The median round trip, in seconds."""
        return statistics.median(self.seconds)

    @property
    def p99(self) -> float:
        """The 99th percentile round trip (nearest rank), in seconds."""
        ordered = sorted(self.seconds)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _pinned_cpu() -> int:
    """CPU 0 if this process may run there, else the lowest one it may use."""
    usable = os.sched_getaffinity(0)
    return 0 if 0 in usable else min(usable)


def measure_latency(ctx: SpawnContext, implementation: str, n: int, *,
                    time_limit_s: float) -> RoundTrips:
    """Time ``n`` ping-pong round trips over two fresh queues, both processes on one CPU.

    Raises:
        BenchError: a worker failed or hung, or a reply was not the request it answers.
    """
    cpu = _pinned_cpu()
    barrier = ctx.Barrier(2)
    times: ctypes.Array[ctypes.c_double] = ctx.RawArray(ctypes.c_double, 4)
    samples: ctypes.Array[ctypes.c_double] = ctx.RawArray(ctypes.c_double, n)
    tallies: ctypes.Array[ctypes.c_longlong] = ctx.RawArray(ctypes.c_longlong, 1)
    timeout = _BARRIER_TIMEOUT_S + time_limit_s
    procs: list[SpawnProcess] = []
    with contextlib.ExitStack() as stack:
        requests = _new_queue(ctx, implementation, LATENCY, stack)
        replies = _new_queue(ctx, implementation, LATENCY, stack)
        stack.callback(_stop_all, procs)
        args = (implementation, requests, replies, n)
        _start(ctx, procs, _queue_pinger, args, f"bench-latency-{implementation}-ping",
               timeout=timeout, cpu=cpu, samples=samples, tallies=tallies, barrier=barrier,
               times=times, index=0)
        _start(ctx, procs, _queue_ponger, args, f"bench-latency-{implementation}-pong",
               timeout=timeout, cpu=cpu, barrier=barrier, times=times, index=1)
        _join_all(procs, barrier, time.monotonic() + _BARRIER_TIMEOUT_S + time_limit_s)
    if tallies[0] != n:
        raise BenchError(f"{implementation} ping-pong: {tallies[0]} of {n} replies were "
                         "the request they answer")
    return RoundTrips(implementation, max(times[1] - times[0], 1e-9), samples[:n])


# --- the bulk sum: one process, no workers ---------------------------------------------------
def _bulk_expected_sum(elements: int) -> float:
    """The exact sum of the bulk array, which holds ``i % 1000`` at index ``i``.

    Every partial sum of such integers is an integer far below 2**53, exactly
    representable, so numpy's summation order cannot change the float result.
    """
    q, r = divmod(elements, 1000)
    return float(q * (999 * 1000 // 2) + r * (r - 1) // 2)


@contextlib.contextmanager
def _bulk_contenders(elements: int) -> Iterator[dict[str, Callable[[], float]]]:
    """Make the three arrays to sum, each holding the same values; free them on exit.

    Yields:
        For each of :data:`BULK_IMPLEMENTATIONS`, a function that sums its array once,
        exactly as a user would (lock taken and view made inside the function).
    """
    import numpy as np  # noqa: PLC0415 - optional dependency, needed only by this part

    private = np.arange(elements, dtype=np.float64)
    np.remainder(private, 1000.0, out=private)
    lock = multiprocessing.get_context(START_METHOD).Lock()
    safe = SafeArray.create("d", elements)
    try:
        safe[:] = private  # a float64 numpy array is taken as the source without a copy
        shm = SharedMemory(create=True, size=8 * elements)
        try:
            staged = np.ndarray((elements,), np.float64, buffer=shm.buf)
            staged[:] = private
            del staged  # shm.close() raises BufferError while a numpy array exports shm.buf

            def private_sum() -> float:
                return float(np.sum(private))

            def safe_sum() -> float:
                with safe.locked() as view:
                    a = np.asarray(view)
                    try:
                        return float(a.sum())
                    finally:
                        # locked() raises LockedViewLeakedError if an array made from the
                        # view outlives the block, and an exception's traceback would keep
                        # this frame -- and `a` -- alive.
                        del a

            def shm_sum() -> float:
                with lock:
                    a = np.ndarray((elements,), np.float64, buffer=shm.buf)
                    try:
                        return float(a.sum())
                    finally:
                        del a  # as above: shm.close() needs every export gone

            yield {BULK_PRIVATE: private_sum, BULK_SAFE: safe_sum, BULK_SHM: shm_sum}
        finally:
            _drop_shared_memory(shm)
    finally:
        _drop(safe)


def _time_sums(implementation: str, sum_once: Callable[[], float], k: int,
               expected: float) -> float:
    """Seconds per sum over ``k`` back-to-back sums, each checked against ``expected``.

    Raises:
        BenchError: a sum came out wrong.
    """
    start = time.perf_counter()
    for _ in range(k):
        total = sum_once()
        # A float comparison: nanoseconds, next to milliseconds of summing.
        if total != expected:
            raise BenchError(f"{implementation}: sum {total!r}, expected {expected!r}")
    return max(time.perf_counter() - start, 1e-9) / k


def _calibrate_sums(implementation: str, sum_once: Callable[[], float], seconds: float,
                    expected: float) -> int:
    """How many back-to-back sums make one bulk measurement last about ``seconds``."""
    k = 1
    while True:
        elapsed = k * _time_sums(implementation, sum_once, k, expected)
        if elapsed >= seconds * _CALIBRATION_MIN_FRACTION:
            break
        factor = 2 * seconds * _CALIBRATION_MIN_FRACTION / elapsed
        k = int(k * min(100.0, max(2.0, factor)))
    return max(1, round(k * seconds / elapsed))


# --- environment --------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Processor", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Everything needed to interpret the numbers: interpreter, OS, CPU, libc, safeshm."""
    probe = SafeCounter.create()
    try:
        implementation = probe.implementation
    finally:
        probe.close()
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
    libc, libc_version = platform.libc_ver()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - Linux always has it
        usable = None
    return {
        "python": sys.version.replace("\n", " "),
        "python_implementation": platform.python_implementation(),
        "gil_enabled": getattr(sys, "_is_gil_enabled", lambda: True)(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "libc": f"{libc} {libc_version}".strip() or "unknown",
        "safeshm": __version__,
        "safecounter_implementation": implementation,
        "start_method": START_METHOD,
    }


# --- the whole benchmark ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cell:
    """All repeats of one implementation at one process count."""

    implementation: str
    processes: int
    ops_per_worker: int
    samples: tuple[float, ...]
    """Total operations per second of each repeat, in the order measured."""

    @property
    def median(self) -> float:
        """Median operations per second over the repeats."""
        return statistics.median(self.samples)


@dataclasses.dataclass(frozen=True)
class BulkCell:
    """All repeats of one bulk-sum implementation."""

    implementation: str
    elements: int
    sums_per_sample: int
    samples: tuple[float, ...]
    """Seconds per sum in each repeat (the mean over its back-to-back sums)."""

    @property
    def median(self) -> float:
        """Median seconds per sum over the repeats."""
        return statistics.median(self.samples)


@dataclasses.dataclass(frozen=True)
class Bar:
    """One performance requirement, evaluated from measured medians."""

    description: str
    required: float
    measured: float | None
    """The measured ratio; ``None`` when what it needs was not run (a process count not
    asked for, or a contender skipped because numpy is not importable)."""
    at_most: bool = False
    """The ratio must be at most ``required`` (a time ratio) instead of at least (a rate
    ratio)."""

    @property
    def status(self) -> str:
        """``PASS``, ``FAIL``, or ``SKIP`` (not evaluated)."""
        if self.measured is None:
            return "SKIP"
        met = self.measured <= self.required if self.at_most else self.measured >= self.required
        return "PASS" if met else "FAIL"


# The bars against an alternative, shared by the bar checks and the chart's goal marks.
# Keyed by (part, safeshm's implementation, the alternative, process count), where a part
# is "counter", "array", "bulk" or a queue workload (the latency ping-pong: 1 process).
_REQUIRED_SPEEDUP: Final[dict[tuple[str, str, str, int], float]] = {
    ("counter", SAFE, IDIOM, 1): 1.2,
    ("counter", SAFE, IDIOM, 2): 3.0,
    ("counter", SHARDED, IDIOM, 1): 4.0,
    ("array", ARRAY_SAFE, ARRAY_IDIOM, 1): 1.2,
    ("array", ARRAY_SAFE, ARRAY_IDIOM, 2): 3.0,
    (SMALL, Q_SAFE, Q_MP, 1): 2.0,
    (SMALL, Q_SAFE, Q_MP, 2): 2.0,
    (BATCHES, Q_SAFE, Q_MP, 1): 5.0,
    (BATCHES, Q_SAFE, Q_MP, 2): 5.0,
    (BYTES, Q_SAFE, Q_MP, 1): 4.0,
    (BYTES, Q_SAFE, Q_MP, 2): 4.0,
    (BYTES, Q_SAFE, Q_FF, 1): 1.0,
    (BYTES, Q_SAFE, Q_FF, 2): 1.0,
}
"""Rate ratios (safeshm's rate / the alternative's) the project requires, at least."""
_REQUIRED_TIME: Final[dict[tuple[str, str, str, int], float]] = {
    ("bulk", BULK_SAFE, BULK_PRIVATE, 1): 1.5,
    (LATENCY, Q_SAFE, Q_SIMPLE, 1): 1.0,
}
"""Time ratios (safeshm's time / the alternative's) the project requires, at most."""


def _ratio(cells: dict[tuple[str, int], Cell], a: tuple[str, int],
           b: tuple[str, int]) -> float | None:
    if a not in cells or b not in cells:
        return None
    return cells[a].median / cells[b].median


def bars(cells: dict[tuple[str, int], Cell]) -> list[Bar]:
    """The counter bars this project must meet, computed from the medians in ``cells``."""
    return [
        Bar("SafeCounter add, 1 process, vs the mp.Value idiom (1 process)",
            _REQUIRED_SPEEDUP["counter", SAFE, IDIOM, 1],
            _ratio(cells, (SAFE, 1), (IDIOM, 1))),
        Bar("SafeCounter add, 2 processes, vs the mp.Value idiom (2 processes)",
            _REQUIRED_SPEEDUP["counter", SAFE, IDIOM, 2],
            _ratio(cells, (SAFE, 2), (IDIOM, 2))),
        Bar("ShardedCounter add, 1 process, vs the mp.Value idiom (1 process)",
            _REQUIRED_SPEEDUP["counter", SHARDED, IDIOM, 1],
            _ratio(cells, (SHARDED, 1), (IDIOM, 1))),
        Bar("ShardedCounter add, 2 processes, vs its own 1-process rate", 1.7,
            _ratio(cells, (SHARDED, 2), (SHARDED, 1))),
    ]


def _bulk_ratio(bulk: dict[str, BulkCell], a: str, b: str) -> float | None:
    """Time ratio ``a / b`` of median seconds per sum (above 1: ``a`` is slower)."""
    if a not in bulk or b not in bulk:
        return None
    return bulk[a].median / bulk[b].median


def array_bars(cells: dict[tuple[str, int], Cell], bulk: dict[str, BulkCell]) -> list[Bar]:
    """The array bars this project must meet, computed from the measured medians."""
    return [
        Bar("SafeArray element add, 1 process, vs the mp.Array idiom (1 process)",
            _REQUIRED_SPEEDUP["array", ARRAY_SAFE, ARRAY_IDIOM, 1],
            _ratio(cells, (ARRAY_SAFE, 1), (ARRAY_IDIOM, 1))),
        Bar("SafeArray element add at random indices, 2 processes, vs the mp.Array idiom "
            "(2 processes)", _REQUIRED_SPEEDUP["array", ARRAY_SAFE, ARRAY_IDIOM, 2],
            _ratio(cells, (ARRAY_SAFE, 2), (ARRAY_IDIOM, 2))),
        Bar("bulk sum via SafeArray.locked() + numpy, time vs numpy on a private array",
            _REQUIRED_TIME["bulk", BULK_SAFE, BULK_PRIVATE, 1],
            _bulk_ratio(bulk, BULK_SAFE, BULK_PRIVATE), at_most=True),
    ]


@dataclasses.dataclass(frozen=True)
class LatencyCell:
    """All repeats of one implementation's pinned ping-pong."""

    implementation: str
    round_trips: int
    """Round trips per repeat."""
    medians: tuple[float, ...]
    """Each repeat's median round trip, in seconds, in the order measured."""
    p99s: tuple[float, ...]
    """Each repeat's 99th-percentile round trip, in seconds."""

    @property
    def median(self) -> float:
        """The median over the repeats of each repeat's median round trip."""
        return statistics.median(self.medians)

    @property
    def p99(self) -> float:
        """The median over the repeats of each repeat's 99th percentile."""
        return statistics.median(self.p99s)


def _latency_ratio(latency: dict[str, LatencyCell], a: str, b: str) -> float | None:
    """Time ratio ``a / b`` of median round trips (above 1: ``a`` is slower)."""
    if a not in latency or b not in latency:
        return None
    return latency[a].median / latency[b].median


def queue_bars(cells: dict[str, dict[tuple[str, int], Cell]],
               latency: dict[str, LatencyCell]) -> list[Bar]:
    """The queue bars this project must meet, computed from the measured medians.

    ``cells`` maps each throughput workload to its cells; a P in a cell's key means P
    producers and P consumers.
    """
    small, batches, raw = (cells.get(w, {}) for w in QUEUE_WORKLOADS)
    out = [
        Bar(f"SafeQueue small items, {p}P/{p}C, vs mp.Queue ({p}P/{p}C)",
            _REQUIRED_SPEEDUP[SMALL, Q_SAFE, Q_MP, p], _ratio(small, (Q_SAFE, p), (Q_MP, p)))
        for p in (1, 2)
    ]
    out += [
        Bar(f"SafeQueue put_many/get_many in batches of {QUEUE_BATCH}, {p}P/{p}C, vs mp.Queue "
            f"single put/get ({p}P/{p}C)", _REQUIRED_SPEEDUP[BATCHES, Q_SAFE, Q_MP, p],
            _ratio(batches, (Q_SAFE, p), (Q_MP, p)))
        for p in (1, 2)
    ]
    for p in (1, 2):
        out += [
            Bar(f"SafeQueue raw 64 KiB bytes items, {p}P/{p}C, vs mp.Queue ({p}P/{p}C)",
                _REQUIRED_SPEEDUP[BYTES, Q_SAFE, Q_MP, p], _ratio(raw, (Q_SAFE, p), (Q_MP, p))),
            Bar(f"SafeQueue raw 64 KiB bytes items, {p}P/{p}C, vs faster_fifo ({p}P/{p}C)",
                _REQUIRED_SPEEDUP[BYTES, Q_SAFE, Q_FF, p], _ratio(raw, (Q_SAFE, p), (Q_FF, p))),
        ]
    out.append(Bar("SafeQueue round trip pinned to one CPU, median, time vs mp.SimpleQueue",
                   _REQUIRED_TIME[LATENCY, Q_SAFE, Q_SIMPLE, 1],
                   _latency_ratio(latency, Q_SAFE, Q_SIMPLE), at_most=True))
    return out


def _rows(cells: dict[tuple[str, int], Cell], baseline: str = IDIOM,
          scaled: Sequence[str] = (SAFE, SHARDED),
          descriptions: dict[str, str] = _DESCRIPTIONS) -> list[dict[str, Any]]:
    """Table rows: ``vs_idiom_same_processes`` compares with ``baseline``, and
    ``vs_own_1_process`` is given for the implementations in ``scaled``."""
    rows = []
    for (impl, p), cell in cells.items():
        scaling = (_ratio(cells, (impl, p), (impl, 1))
                   if impl in scaled else None)
        rows.append({
            "implementation": impl,
            "code": descriptions[impl],
            "processes": p,
            "ops_per_worker": cell.ops_per_worker,
            "median_ops_per_s": cell.median,
            "min_ops_per_s": min(cell.samples),
            "max_ops_per_s": max(cell.samples),
            "samples_ops_per_s": list(cell.samples),
            "vs_idiom_same_processes": _ratio(cells, (impl, p), (baseline, p)),
            "vs_own_1_process": scaling,
        })
    return rows


def _bulk_rows(bulk: dict[str, BulkCell]) -> list[dict[str, Any]]:
    rows = []
    for impl, cell in bulk.items():
        rows.append({
            "implementation": impl,
            "code": _BULK_DESCRIPTIONS[impl],
            "elements": cell.elements,
            "sums_per_sample": cell.sums_per_sample,
            "median_s_per_sum": cell.median,
            "min_s_per_sum": min(cell.samples),
            "max_s_per_sum": max(cell.samples),
            "samples_s_per_sum": list(cell.samples),
            "median_gb_per_s": 8 * cell.elements / cell.median / 1e9,
            "time_vs_private": _bulk_ratio(bulk, impl, BULK_PRIVATE),
        })
    return rows


def _queue_rows(workload: str, cells: dict[tuple[str, int], Cell]) -> list[dict[str, Any]]:
    rows = []
    for (impl, p), cell in cells.items():
        row = {
            "implementation": impl,
            "code": _queue_description(workload, impl),
            "producers": p,
            "consumers": p,
            "items_per_producer": cell.ops_per_worker,
            "median_items_per_s": cell.median,
            "min_items_per_s": min(cell.samples),
            "max_items_per_s": max(cell.samples),
            "samples_items_per_s": list(cell.samples),
            "vs_mp_queue": _ratio(cells, (impl, p), (Q_MP, p)),
            "vs_faster_fifo": _ratio(cells, (impl, p), (Q_FF, p)),
        }
        if workload == BYTES:
            row["median_mb_per_s"] = cell.median * QUEUE_ITEM_BYTES / 1e6
        rows.append(row)
    return rows


def _latency_rows(latency: dict[str, LatencyCell]) -> list[dict[str, Any]]:
    return [{
        "implementation": impl,
        "code": _queue_description(LATENCY, impl),
        "round_trips": cell.round_trips,
        "median_us": cell.median * 1e6,
        "min_median_us": min(cell.medians) * 1e6,
        "max_median_us": max(cell.medians) * 1e6,
        "p99_us": cell.p99 * 1e6,
        "min_p99_us": min(cell.p99s) * 1e6,
        "max_p99_us": max(cell.p99s) * 1e6,
        "samples_median_us": [m * 1e6 for m in cell.medians],
        "samples_p99_us": [m * 1e6 for m in cell.p99s],
        "time_vs_simple_queue": _latency_ratio(latency, impl, Q_SIMPLE),
    } for impl, cell in latency.items()]


def _bar_json(b: Bar, *, comparison: bool) -> dict[str, Any]:
    out = {"description": b.description, "required": b.required, "measured": b.measured,
           "status": b.status}
    if comparison:
        out["comparison"] = "<=" if b.at_most else ">="
    return out


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _print_environment(env: dict[str, Any], config: dict[str, Any]) -> None:
    print("Environment")
    width = max(map(len, env))
    for key, value in env.items():
        print(f"  {key:<{width}}  {value}")
    extra = (f" bulk_elements={config['bulk_elements']}"
             if "bulk_elements" in config else "")
    if "queue_capacity" in config:
        extra += f" queue_capacity={config['queue_capacity']}"
    print(f"  {'config':<{width}}  processes={config['processes']} "
          f"seconds={config['seconds']} repeats={config['repeats']} "
          f"structures={','.join(config['structures'])}{extra}")


def _print_rate_table(rows: list[dict[str, Any]], baseline: str) -> None:
    """The rates, their ratio to ``baseline`` (named in the header, as the queue tables
    name theirs) at the same process count, and to the same implementation's 1-process
    rate."""
    vs = f"vs {baseline}"
    header = (f"{'implementation':<20} {'procs':>5} {'median Mops/s':>13} "
              f"{'range (min-max)':>17} {vs:>{max(9, len(vs))}} {'vs own 1P':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        rng = f"{r['min_ops_per_s'] / 1e6:.3f}-{r['max_ops_per_s'] / 1e6:.3f}"
        print(f"{r['implementation']:<20} {r['processes']:>5} "
              f"{r['median_ops_per_s'] / 1e6:>13.3f} {rng:>17} "
              f"{_fmt_ratio(r['vs_idiom_same_processes']):>{max(9, len(vs))}} "
              f"{_fmt_ratio(r['vs_own_1_process']):>9}")


def _print_bars(checks: list[dict[str, Any]]) -> None:
    print("Bars (ratios of medians measured above)")
    for b in checks:
        # Three decimals: a ratio just under the bar must not print as if it met it.
        got = "not measured" if b["measured"] is None else f"{b['measured']:.3f}x"
        sign = b.get("comparison", ">=")
        print(f"  [{b['status']}] {b['description']}: {got} "
              f"(required {sign} {b['required']:g}x)")


def _print_counter(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    print("SafeCounter and ShardedCounter: P processes incrementing one shared int64 counter")
    print()
    print("Implementations")
    for impl in IMPLEMENTATIONS:
        print(f"  {impl:<20}  {_DESCRIPTIONS[impl]}")
    print()
    _print_rate_table(rows, "mp.Value")
    print()
    _print_bars(checks)


def _print_bulk(n: int, rows: list[dict[str, Any]]) -> None:
    print(f"SafeArray: summing {n:,} float64 elements ({8 * n / 1e6:.0f} MB) in one process")
    print()
    print("Implementations")
    for impl in BULK_IMPLEMENTATIONS:
        print(f"  {impl:<22}  {_BULK_DESCRIPTIONS[impl]}")
    print()
    header = (f"{'implementation':<22} {'median ms/sum':>13} {'range (min-max)':>17} "
              f"{'GB/s':>6} {'time vs private':>15}")
    print(header)
    print("-" * len(header))
    for r in rows:
        rng = f"{r['min_s_per_sum'] * 1e3:.2f}-{r['max_s_per_sum'] * 1e3:.2f}"
        print(f"{r['implementation']:<22} {r['median_s_per_sum'] * 1e3:>13.2f} "
              f"{rng:>17} {r['median_gb_per_s']:>6.1f} "
              f"{_fmt_ratio(r['time_vs_private']):>15}")


def _print_array(report: dict[str, Any]) -> None:
    print(f"SafeArray: element adds at random indices of a {report['length']}-element "
          "int64 array")
    print(f"  numpy: {report['numpy'] or 'not importable'}")
    for text in report["notes"]:
        print(f"  note: {text}")
    print()
    print("Implementations")
    for impl in report["element_implementations"]:
        print(f"  {impl:<20}  {_ARRAY_DESCRIPTIONS[impl]}")
    print()
    _print_rate_table(report["element_add"], "mp.Array")
    print()
    if report["bulk_sum"]:
        _print_bulk(report["bulk_elements"], report["bulk_sum"])
        print()
    _print_bars(report["bars"])


_QUEUE_TITLES: Final = {
    SMALL: "Small items: (producer, seq) tuples, one put and one get each",
    BATCHES: f"Batches of {QUEUE_BATCH}: the same items through put_many/get_many; "
             "mp.Queue has no batch calls, so one put/get per item (and, for reference, "
             f"lists of {QUEUE_BATCH} items put as single items, into mp.Queue and "
             "SafeQueue)",
    BYTES: f"{QUEUE_ITEM_BYTES // 1024} KiB bytes items (SafeQueue raw=True; the others "
           "pickle them)",
}


def _print_queue_table(workload: str, rows: list[dict[str, Any]]) -> None:
    mb = workload == BYTES
    mb_column = f" {'MB/s':>7}" if mb else ""
    header = (f"{'implementation':<18} {'P+C':>4} {'median k items/s':>16} "
              f"{'range (min-max)':>17}{mb_column} {'vs mp.Queue':>11} {'vs faster_fifo':>14}")
    print(header)
    print("-" * len(header))
    for r in rows:
        rng = f"{r['min_items_per_s'] / 1e3:.1f}-{r['max_items_per_s'] / 1e3:.1f}"
        rate = f" {r['median_mb_per_s']:>7.0f}" if mb else ""
        print(f"{r['implementation']:<18} {r['producers']:>2}+{r['consumers']:<1} "
              f"{r['median_items_per_s'] / 1e3:>16.1f} {rng:>17}{rate} "
              f"{_fmt_ratio(r['vs_mp_queue']):>11} {_fmt_ratio(r['vs_faster_fifo']):>14}")


def _print_latency_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'implementation':<18} {'median RTT us':>13} {'range (min-max)':>16} "
              f"{'p99 RTT us':>10} {'range (min-max)':>16} {'time vs SimpleQueue':>19}")
    print(header)
    print("-" * len(header))
    for r in rows:
        med = f"{r['min_median_us']:.1f}-{r['max_median_us']:.1f}"
        p99 = f"{r['min_p99_us']:.1f}-{r['max_p99_us']:.1f}"
        print(f"{r['implementation']:<18} {r['median_us']:>13.1f} {med:>16} "
              f"{r['p99_us']:>10.1f} {p99:>16} {_fmt_ratio(r['time_vs_simple_queue']):>19}")


def _print_queue(report: dict[str, Any]) -> None:
    print("SafeQueue: P producer and P consumer processes on one queue; every item counted "
          "and checked")
    print(f"  faster_fifo: {report['faster_fifo'] or 'not importable'}")
    print(f"  capacity: SafeQueue ring and faster_fifo buffer {report['capacity_bytes']} "
          f"bytes; mp.Queue maxsize = what that ring holds "
          f"({report['mp_queue_maxsize']['items']} small items, "
          f"{report['mp_queue_maxsize']['lists']} lists, "
          f"{report['mp_queue_maxsize']['bytes']} bytes items); mp.SimpleQueue: a pipe")
    for text in report["notes"]:
        print(f"  note: {text}")
    for workload in QUEUE_WORKLOADS:
        print()
        print(_QUEUE_TITLES[workload])
        for impl in report["implementations"][workload]:
            print(f"  {impl:<18}  {_queue_description(workload, impl)}")
        print()
        _print_queue_table(workload, report[workload])
    print()
    print("Round-trip latency: a ping-pong of one small item over two queues (request, "
          f"reply), both processes pinned to CPU {report['latency_cpu']}")
    for impl in report["implementations"][LATENCY]:
        print(f"  {impl:<18}  {_queue_description(LATENCY, impl)}")
    print()
    _print_latency_table(report[LATENCY])
    print()
    _print_bars(report["bars"])


def _print_report(out: dict[str, Any]) -> None:
    """The tables, from the same data ``--json`` prints."""
    _print_environment(out["environment"], out["config"])
    if "results" in out:
        print()
        _print_counter(out["results"], out["bars"])
    if "array" in out:
        print()
        _print_array(out["array"])
    if "queue" in out:
        print()
        _print_queue(out["queue"])
    if "store" in out:
        print()
        print(_bench_store.report(_bench_store.cells_from_json(out["store"]["cells"])))


def _numpy_version() -> tuple[str | None, str]:
    """``(numpy's version, "")`` if numpy imports, else ``(None, why not)``."""
    try:
        import numpy  # noqa: PLC0415 - optional: only some array contenders need it
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return numpy.__version__, ""


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The parsed command line, plus what follows from it."""

    processes: list[int]
    seconds: float
    repeats: int
    structures: list[str]
    bulk_elements: int
    time_limit_s: float
    """How long released workers may run before they are called hung."""


# --- the progress display -------------------------------------------------------------------
class _Progress:
    """What is being measured and how far along, on stderr -- never on stdout, which
    ``--json`` keeps for the JSON document.

    Each :meth:`step` is one measurement (a warm-up, a calibration or a repeat of one
    implementation at one process count): ``[ 7/96] 0:42 queue small items: SafeQueue,
    2P/2C, repeat 1/3 ...``. On a terminal it is one line rewritten in place; anywhere
    else (a pipe, a CI log) one plain line per step. With ``stream=None`` it prints nothing.
    """

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total = total
        self.done = 0
        self._stream = stream
        self._tty = stream is not None and stream.isatty()
        self._start = time.monotonic()
        self._partial = False
        """A line is on the terminal without its newline."""

    def _clock(self) -> str:
        minutes, seconds = divmod(int(time.monotonic() - self._start), 60)
        return f"{minutes}:{seconds:02d}"

    def _columns(self) -> int:
        if self._stream is None:  # pragma: no cover - callers check first
            return 80
        try:
            # 0 from a pseudo-terminal nobody sized (`script`, some CI runners).
            return os.get_terminal_size(self._stream.fileno()).columns or 80
        except (OSError, ValueError, io.UnsupportedOperation):
            return 80

    def _show(self, line: str, *, final: bool) -> None:
        if self._stream is None:
            return
        if self._tty:
            # Cut to the terminal's width: a wrapped line cannot be rewritten with "\r".
            text = "\r" + line[: max(self._columns() - 1, 20)] + "\x1b[K"
            self._partial = not final
            self._stream.write(text + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def step(self, text: str) -> None:
        """Announce the measurement about to start."""
        self.done += 1
        width = len(str(self.total))
        self._show(f"[{self.done:>{width}}/{self.total}] {self._clock()} {text} ...",
                   final=False)

    def finish(self) -> None:
        """The last line: everything measured, and how long it took."""
        self._show(f"[{self.done}/{self.total}] {self._clock()} measured", final=True)

    def interrupt(self) -> None:
        """End a rewritten line, so a message that follows gets a line of its own (the
        last step shown says what was being measured when it went wrong)."""
        if self._partial and self._stream is not None:
            self._stream.write("\n")
            self._stream.flush()
            self._partial = False


def _procs(p: int, workload: str | None) -> str:
    """A process count as the progress display and the chart write it."""
    return f"{p}P" if workload is None else f"{p}P/{p}C"


def _total_steps(settings: _Settings, array_plan: _ArrayPlan, queue_plan: _QueuePlan) -> int:
    """How many times :func:`_measure_all` calls ``progress.step``: each measured cell has
    a warm-up, a calibration and ``repeats`` samples."""
    per_process_count = 0
    if "counter" in settings.structures:
        per_process_count += len(IMPLEMENTATIONS)
    if "array" in settings.structures:
        per_process_count += len(array_plan.element_implementations)
    if "queue" in settings.structures:
        per_process_count += sum(len(queue_plan.contenders[w]) for w in QUEUE_WORKLOADS)
    cells = per_process_count * len(settings.processes)
    if array_plan.bulk:
        cells += len(BULK_IMPLEMENTATIONS)
    if "queue" in settings.structures:
        cells += len(queue_plan.contenders[LATENCY])
    store = _bench_store.steps(settings.repeats) if "store" in settings.structures else 0
    return cells * (2 + settings.repeats) + store


# --- measuring ------------------------------------------------------------------------------
def _measure_cells(ctx: SpawnContext, implementations: tuple[str, ...], settings: _Settings,
                   progress: _Progress, *, part: str,
                   workload: str | None = None) -> dict[tuple[str, int], Cell]:
    """Warm up, calibrate and measure every implementation at every process count.

    With ``workload`` (one of :data:`QUEUE_WORKLOADS`) the implementations are queues and
    a process count P means P producers and P consumers; without, counters or arrays.
    ``part`` names them in the progress display.
    """
    processes, repeats, time_limit_s = (settings.processes, settings.repeats,
                                        settings.time_limit_s)

    def measure_one(impl: str, p: int, n: int) -> Run:
        if workload is None:
            return measure(ctx, impl, p, n, time_limit_s)
        return measure_queue(ctx, workload, impl, p, n, time_limit_s=time_limit_s)

    def calibrate_one(impl: str, p: int) -> int:
        if workload is None:
            return calibrate(ctx, impl, p, settings.seconds, time_limit_s)
        return _calibrated(lambda n: measure_one(impl, p, n).elapsed_s, settings.seconds,
                           _QUEUE_START_OPS[workload], _MAX_OPS_PER_WORKER)

    def step(impl: str, p: int, what: str) -> None:
        progress.step(f"{part}: {impl}, {_procs(p, workload)}, {what}")

    cells_order = [(impl, p) for p in processes for impl in implementations]
    # Warm-up: one short run of each, discarded -- first-time costs (page cache,
    # bytecode caches, the resource tracker's start) land here, not in a sample.
    for impl, p in cells_order:
        step(impl, p, "warm-up")
        measure_one(impl, p, _WARMUP_OPS if workload is None else _QUEUE_WARMUP_OPS[workload])
    ops = {}
    for impl, p in cells_order:
        step(impl, p, "calibrating")
        ops[impl, p] = calibrate_one(impl, p)
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in cells_order}
    for r in range(repeats):
        # Round-robin, with the starting implementation rotated each repeat, so a
        # noisy stretch on a shared machine is spread over every contender instead
        # of landing on whichever one always runs at the same position.
        shift = r % len(implementations)
        order = implementations[shift:] + implementations[:shift]
        for p in processes:
            for impl in order:
                step(impl, p, f"repeat {r + 1}/{repeats}")
                samples[impl, p].append(measure_one(impl, p, ops[impl, p]).ops_per_s)
    return {key: Cell(key[0], key[1], ops[key], tuple(samples[key])) for key in cells_order}


def _measure_bulk(settings: _Settings, progress: _Progress) -> dict[str, BulkCell]:
    """Warm up, calibrate and time every bulk-sum implementation, in this process."""
    elements, seconds, repeats = settings.bulk_elements, settings.seconds, settings.repeats
    expected = _bulk_expected_sum(elements)

    def step(impl: str, what: str) -> None:
        progress.step(f"array bulk sum: {impl}, {what}")

    with _bulk_contenders(elements) as contenders:
        for impl in BULK_IMPLEMENTATIONS:
            step(impl, "warm-up")
            _time_sums(impl, contenders[impl], 1, expected)
        counts = {}
        for impl in BULK_IMPLEMENTATIONS:
            step(impl, "calibrating")
            counts[impl] = _calibrate_sums(impl, contenders[impl], seconds, expected)
        samples: dict[str, list[float]] = {impl: [] for impl in BULK_IMPLEMENTATIONS}
        for r in range(repeats):
            # Rotated round-robin, as for the element measurements.
            shift = r % len(BULK_IMPLEMENTATIONS)
            for impl in BULK_IMPLEMENTATIONS[shift:] + BULK_IMPLEMENTATIONS[:shift]:
                step(impl, f"repeat {r + 1}/{repeats}")
                samples[impl].append(
                    _time_sums(impl, contenders[impl], counts[impl], expected))
    return {impl: BulkCell(impl, elements, counts[impl], tuple(samples[impl]))
            for impl in BULK_IMPLEMENTATIONS}


def _measure_latency(ctx: SpawnContext, implementations: tuple[str, ...],
                     settings: _Settings, progress: _Progress) -> dict[str, LatencyCell]:
    """Warm up, calibrate and measure the pinned ping-pong of every implementation."""
    time_limit_s, repeats = settings.time_limit_s, settings.repeats

    def one(impl: str, n: int) -> RoundTrips:
        return measure_latency(ctx, impl, n, time_limit_s=time_limit_s)

    def elapsed(impl: str) -> Callable[[int], float]:
        return lambda n: one(impl, n).elapsed_s

    def step(impl: str, what: str) -> None:
        progress.step(f"queue round trip: {impl}, pinned ping-pong, {what}")

    for impl in implementations:
        step(impl, "warm-up")
        one(impl, _QUEUE_WARMUP_OPS[LATENCY])
    counts = {}
    for impl in implementations:
        step(impl, "calibrating")
        counts[impl] = _calibrated(elapsed(impl), settings.seconds, _QUEUE_START_OPS[LATENCY],
                                   _MAX_ROUND_TRIPS)
    medians: dict[str, list[float]] = {impl: [] for impl in implementations}
    p99s: dict[str, list[float]] = {impl: [] for impl in implementations}
    for r in range(repeats):
        # Rotated round-robin, as for the throughput measurements.
        shift = r % len(implementations)
        for impl in implementations[shift:] + implementations[:shift]:
            step(impl, f"repeat {r + 1}/{repeats}")
            trips = one(impl, counts[impl])
            medians[impl].append(trips.median)
            p99s[impl].append(trips.p99)
    return {impl: LatencyCell(impl, counts[impl], tuple(medians[impl]), tuple(p99s[impl]))
            for impl in implementations}


@dataclasses.dataclass(frozen=True)
class _ArrayPlan:
    """Which array contenders can run here: numpy is optional."""

    numpy_version: str | None
    element_implementations: tuple[str, ...]
    bulk: bool
    notes: list[str]


def _array_plan() -> _ArrayPlan:
    numpy_version, why = _numpy_version()
    if numpy_version is not None:
        return _ArrayPlan(numpy_version, ARRAY_IMPLEMENTATIONS, bulk=True, notes=[])
    return _ArrayPlan(None, (ARRAY_IDIOM, ARRAY_SAFE), bulk=False, notes=[
        f"numpy is not importable ({why}): skipped the '{ARRAY_NUMPY}' element add and "
        "the whole bulk-sum part; the bars that need them print [SKIP]"])


@dataclasses.dataclass(frozen=True)
class _QueuePlan:
    """Which queue contenders can run here: faster_fifo is optional."""

    faster_fifo_version: str | None
    contenders: dict[str, tuple[str, ...]]
    """Per workload (and :data:`LATENCY`), the implementations to measure."""
    notes: list[str]


def _queue_plan() -> _QueuePlan:
    module, why = _faster_fifo()
    if module is not None:
        try:
            version = importlib.metadata.version("faster-fifo")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare copy
            version = "unknown version"
        return _QueuePlan(version, dict(QUEUE_CONTENDERS), notes=[])
    return _QueuePlan(
        None, {w: tuple(i for i in impls if i != Q_FF) for w, impls in QUEUE_CONTENDERS.items()},
        notes=[f"faster_fifo is not importable ({why}): skipped its rows; the bars that "
               "compare with it print [SKIP] (pip install faster-fifo, or safeshm[bench])"])


def _queue_results(plan: _QueuePlan, cells: dict[str, dict[tuple[str, int], Cell]],
                   latency: dict[str, LatencyCell]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "faster_fifo": plan.faster_fifo_version,
        "notes": plan.notes,
        "capacity_bytes": QUEUE_CAPACITY,
        "batch_items": QUEUE_BATCH,
        "bytes_item_size": QUEUE_ITEM_BYTES,
        "mp_queue_maxsize": {"items": _MP_MAXSIZE[_SINGLE], "lists": _MP_MAXSIZE[_LISTS],
                             "bytes": _MP_MAXSIZE[_RAW]},
        "latency_cpu": _pinned_cpu(),
        "implementations": {w: list(impls) for w, impls in plan.contenders.items()},
    }
    for workload in QUEUE_WORKLOADS:
        out[workload] = _queue_rows(workload, cells.get(workload, {}))
    out[LATENCY] = _latency_rows(latency)
    out["bars"] = [_bar_json(b, comparison=True) for b in queue_bars(cells, latency)]
    return out


@dataclasses.dataclass
class _Measured:
    """Everything measured, part by part (a part not asked for stays empty)."""

    cells: dict[tuple[str, int], Cell] = dataclasses.field(default_factory=dict)
    array_cells: dict[tuple[str, int], Cell] = dataclasses.field(default_factory=dict)
    bulk: dict[str, BulkCell] = dataclasses.field(default_factory=dict)
    queue_cells: dict[str, dict[tuple[str, int], Cell]] = dataclasses.field(
        default_factory=dict)
    """Per queue workload, its cells."""
    latency: dict[str, LatencyCell] = dataclasses.field(default_factory=dict)
    store: list[_bench_store.StoreCell] = dataclasses.field(default_factory=list)


_QUEUE_PARTS: Final = {SMALL: "queue small items", BATCHES: "queue batches",
                       BYTES: "queue 64 KiB bytes"}


def _measure_all(ctx: SpawnContext, settings: _Settings, array_plan: _ArrayPlan,
                 queue_plan: _QueuePlan, progress: _Progress) -> _Measured:
    """Measure every part ``settings.structures`` asks for, in the order they print."""
    m = _Measured()
    if "counter" in settings.structures:
        m.cells = _measure_cells(ctx, IMPLEMENTATIONS, settings, progress, part="counter")
    if "array" in settings.structures:
        m.array_cells = _measure_cells(ctx, array_plan.element_implementations, settings,
                                       progress, part="array element add")
    if array_plan.bulk:
        m.bulk = _measure_bulk(settings, progress)
    if "queue" in settings.structures:
        for workload in QUEUE_WORKLOADS:
            m.queue_cells[workload] = _measure_cells(
                ctx, queue_plan.contenders[workload], settings, progress,
                part=_QUEUE_PARTS[workload], workload=workload)
        m.latency = _measure_latency(ctx, queue_plan.contenders[LATENCY], settings, progress)
    if "store" in settings.structures:
        try:
            m.store = _bench_store.measure(settings.repeats, progress=progress.step)
        except RuntimeError as e:
            raise BenchError(str(e)) from e
    return m


# --- the ratios the chart draws ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Ratio:
    """One bar of the ``--plot`` chart: how many times faster safeshm is than an alternative.

    ``safeshm bench --json`` lists every ratio measured under the top-level key
    ``"ratios"``, each as a JSON object with exactly these fields, in drawing order::

        {"structure": "SafeQueue", "label": "small items, 2P/2C",
         "versus": "mp.Queue", "ratio": 2.47, "goal": 2.0}

    :func:`plot_ratios` draws whatever that list holds and knows nothing else about the
    benchmarks: a benchmark added for another structure appends its own ratios (say
    ``Ratio("SafeFileStore", "set, 2P", "diskcache", 3.1, None)``) and gets its own panel,
    with no change to the plotting code.

    Attributes:
        structure: the panel the ratio is drawn in, titled with this text; panels come in
            the order of their first ratio.
        label: the row within the panel -- what safeshm did, at which process count; rows
            come in the order of their first ratio, and hold one bar per ``versus``.
        versus: the alternative compared with; each alternative has its own colour,
            explained in the panel's legend.
        ratio: safeshm's speed divided by the alternative's, from the medians (for times,
            such as a latency, the alternative's time divided by safeshm's): above 1,
            safeshm is faster.
        goal: the ratio this project requires (one of the benchmark's bars, as a speed
            ratio), or ``None`` where it requires none; drawn as a mark across the bar.
    """

    structure: str
    label: str
    versus: str
    ratio: float
    goal: float | None = None


def _goal(key: tuple[str, str, str, int]) -> float | None:
    """The bar for ``key`` (see :data:`_REQUIRED_SPEEDUP`), as a speed ratio."""
    if key in _REQUIRED_SPEEDUP:
        return _REQUIRED_SPEEDUP[key]
    if key in _REQUIRED_TIME:
        return 1.0 / _REQUIRED_TIME[key]
    return None


def _plural(p: int) -> str:
    return f"{p} process" if p == 1 else f"{p} processes"


COUNTER_PANEL: Final = "SafeCounter & ShardedCounter"
ARRAY_PANEL: Final = "SafeArray"
QUEUE_PANEL: Final = "SafeQueue"

_QUEUE_LABELS: Final = {SMALL: "small items", BATCHES: f"batches of {QUEUE_BATCH}",
                        BYTES: f"{QUEUE_ITEM_BYTES // 1024} KiB bytes items"}


def ratios(m: _Measured, processes: Sequence[int], bulk_elements: int) -> list[Ratio]:
    """Every safeshm-vs-alternative ratio in ``m``, in the order the chart draws them."""
    out: list[Ratio] = []

    def add(structure: str, label: str, versus: str, ratio: float | None,
            key: tuple[str, str, str, int]) -> None:
        if ratio is not None:  # a contender not measured (not importable, not asked for)
            out.append(Ratio(structure, label, versus, ratio, _goal(key)))

    for impl in (SAFE, SHARDED):
        for p in processes:
            for alt in (IDIOM, RAW_LOCK):
                add(COUNTER_PANEL, f"{impl}.add, {_plural(p)}", alt,
                    _ratio(m.cells, (impl, p), (alt, p)), ("counter", impl, alt, p))
    for p in processes:
        for alt in (ARRAY_IDIOM, ARRAY_NUMPY):
            add(ARRAY_PANEL, f"add(i, 1), {_plural(p)}", alt,
                _ratio(m.array_cells, (ARRAY_SAFE, p), (alt, p)),
                ("array", ARRAY_SAFE, alt, p))
    for alt in (BULK_PRIVATE, BULK_SHM):
        time_ratio = _bulk_ratio(m.bulk, BULK_SAFE, alt)
        add(ARRAY_PANEL, f"locked() + numpy sum of {8 * bulk_elements / 1e6:.0f} MB", alt,
            None if time_ratio is None else 1 / time_ratio, ("bulk", BULK_SAFE, alt, 1))
    for workload in QUEUE_WORKLOADS:
        cells = m.queue_cells.get(workload, {})
        for p in processes:
            for alt in (Q_MP, Q_SIMPLE, Q_FF):
                add(QUEUE_PANEL, f"{_QUEUE_LABELS[workload]}, {_procs(p, workload)}", alt,
                    _ratio(cells, (Q_SAFE, p), (alt, p)), (workload, Q_SAFE, alt, p))
    for alt in (Q_MP, Q_SIMPLE, Q_FF):
        time_ratio = _latency_ratio(m.latency, Q_SAFE, alt)
        add(QUEUE_PANEL, "round trip, both on 1 CPU", alt,
            None if time_ratio is None else 1 / time_ratio, (LATENCY, Q_SAFE, alt, 1))
    return out


def _results(env: dict[str, Any], settings: _Settings, array_plan: _ArrayPlan,
             queue_plan: _QueuePlan, m: _Measured) -> dict[str, Any]:
    """Everything measured, as printed by ``--json`` (and rendered as tables without)."""
    config: dict[str, Any] = {"processes": settings.processes, "seconds": settings.seconds,
                              "repeats": settings.repeats, "structures": settings.structures}
    out: dict[str, Any] = {"environment": env, "config": config}
    if "counter" in settings.structures:
        out["results"] = _rows(m.cells)
        out["bars"] = [_bar_json(b, comparison=False) for b in bars(m.cells)]
    if "array" in settings.structures:
        config["bulk_elements"] = settings.bulk_elements
        out["array"] = {
            "numpy": array_plan.numpy_version,
            "notes": array_plan.notes,
            "length": ARRAY_LENGTH,
            "element_implementations": list(array_plan.element_implementations),
            "element_add": _rows(m.array_cells, ARRAY_IDIOM, ARRAY_IMPLEMENTATIONS,
                                 _ARRAY_DESCRIPTIONS),
            "bulk_elements": settings.bulk_elements,
            "bulk_sum": _bulk_rows(m.bulk),
            "bars": [_bar_json(b, comparison=True)
                     for b in array_bars(m.array_cells, m.bulk)],
        }
    if "queue" in settings.structures:
        config["queue_capacity"] = QUEUE_CAPACITY
        out["queue"] = _queue_results(queue_plan, m.queue_cells, m.latency)
    out["ratios"] = [dataclasses.asdict(r)
                     for r in ratios(m, settings.processes, settings.bulk_elements)]
    if "store" in settings.structures:
        out["store"] = {"value_bytes": _bench_store.VALUE_BYTES, "keys": _bench_store.KEYS,
                        "durable_keys": _bench_store.DURABLE_KEYS,
                        "cells": [dataclasses.asdict(c) for c in m.store],
                        "scaling": _bench_store.scaling(m.store)}
        out["ratios"] += [dataclasses.asdict(r) for r in store_ratios(m.store)]
    return out


STORE_PANEL: Final = "SafeFileStore"


def store_ratios(cells: list[_bench_store.StoreCell]) -> list[Ratio]:
    """SafeFileStore's ratios: its speed over each alternative's, and two writers' total
    over one writer's (the bar: no collapse)."""
    out = [Ratio(STORE_PANEL, label, versus, ratio, goal)
           for label, versus, ratio, goal in _bench_store.ratios(cells)]
    for name, s in _bench_store.scaling(cells).items():
        if name.startswith(_bench_store.SAFESHM):
            durable = "durable" if name.endswith("durable") else "not durable"
            out.append(Ratio(STORE_PANEL, f"2 writers ({durable})", "1 writer", s,
                             _bench_store.REQUIRED_SCALING))
    return out


# --- the chart ------------------------------------------------------------------------------
PLOT_NEEDS_MATPLOTLIB: Final = ("safeshm bench --plot needs matplotlib: "
                                "pip install 'safeshm[plot]'")

_TIMES: Final = "\N{MULTIPLICATION SIGN}"
# Colour-blind-safe (Okabe-Ito, without its yellow, too pale on white); in each panel, one
# per alternative in order of first appearance, so the main alternative is always blue.
_PALETTE: Final = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00",
                   "#999999", "#000000")
_MISSED: Final = "#B2182B"
"""The colour of a ratio's figure when it misses its goal."""

# Geometry, in inches.
_FIG_WIDTH: Final = 12.0
_BAR_PITCH: Final = 0.25
"""Height of one bar's slot (the bar is 80 per cent of it)."""
_ROW_GAP: Final = 0.6
"""Space between two rows of bars, in bar slots."""
_PANEL_GAP: Final = 0.65
_HEADER: Final = 0.8
_FOOTER: Final = 1.15
_LEFT: Final = 3.0
_RIGHT: Final = 2.3
_MARGIN: Final = 0.15
"""Where the title and footnote start, from the figure's left edge."""


def _plot_problem(path: str) -> str | None:
    """Why ``--plot path`` cannot work, checked before anything is measured; ``None`` if
    it can."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 - optional: only --plot needs it
    except ImportError:
        return PLOT_NEEDS_MATPLOTLIB
    if os.path.isdir(path):
        return f"--plot {path!r} is a directory; give a file name such as chart.png"
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        return f"--plot {path!r}: there is no directory {directory!r} to write it in"
    if not os.access(directory, os.W_OK) or (os.path.exists(path)
                                             and not os.access(path, os.W_OK)):
        return f"--plot {path!r}: permission denied"
    formats = Figure().canvas.get_supported_filetypes()
    if _suffix(path) not in formats:
        return (f"--plot {path!r}: the name must end in .png (or another format matplotlib "
                f"writes: {', '.join('.' + f for f in sorted(formats))})")
    return None


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lstrip(".").lower()


def _times(x: float) -> str:
    """A ratio as the chart writes it: 0.83x, 2.47x, 12.3x."""
    return f"{x:.1f}{_TIMES}" if x >= 9.95 else f"{x:.2f}{_TIMES}"


def _goal_text(x: float) -> str:
    """A goal as the chart writes it: 3x, 1.2x, 0.67x."""
    return f"{x:.2f}".rstrip("0").rstrip(".") + _TIMES


def _axis_ticks(lo: float, hi: float) -> list[float]:
    """Round ratios (..., 0.5, 1, 2, 5, 10, ...) from ``lo`` to ``hi``."""
    ticks = [m * 10.0**e for e in range(-3, 4) for m in (1, 2, 5)]
    return [t for t in ticks if lo <= t <= hi]


@dataclasses.dataclass
class _Panel:
    """One structure's ratios, laid out: each bar's slot (0 at the top, one per bar) and
    each row's centre and label."""

    title: str
    bars: list[tuple[float, Ratio]] = dataclasses.field(default_factory=list)
    rows: list[tuple[float, float, str]] = dataclasses.field(default_factory=list)
    """Per row: its first and last slot, and its label."""
    slots: float = 0.0
    """Height in bar slots."""


def _panels(ratios: Sequence[Ratio]) -> list[_Panel]:
    """Group ``ratios`` into panels and rows, in order of first appearance."""
    panels: dict[str, _Panel] = {}
    for structure in dict.fromkeys(r.structure for r in ratios):
        panel = panels[structure] = _Panel(structure)
        members = [r for r in ratios if r.structure == structure]
        y = 0.0
        for label in dict.fromkeys(r.label for r in members):
            row = [r for r in members if r.label == label]
            panel.rows.append((y, y + len(row) - 1, label))
            for r in row:
                panel.bars.append((y, r))
                y += 1
            y += _ROW_GAP
        panel.slots = y - _ROW_GAP
    return list(panels.values())


def _draw_panel(ax: Axes, panel: _Panel, *, log: bool) -> None:
    """One structure's bars, figures, goal marks, rows and legend."""
    from matplotlib.lines import Line2D  # noqa: PLC0415 - optional dependency
    from matplotlib.patches import Patch  # noqa: PLC0415 - optional dependency

    versus = dict.fromkeys(r.versus for _, r in panel.bars)
    colours = {v: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(versus)}
    # On a log axis a bar runs from the 1x line to the ratio, so that its length is how
    # much faster (to the right) or slower (to the left) safeshm is, and 2x faster and 2x
    # slower look alike; on a linear axis, from 0 as usual.
    base = 1.0 if log else 0.0

    for i, (first, last, _) in enumerate(panel.rows):
        if i % 2:  # banded rows: each row's bars stand apart from its neighbours'
            ax.axhspan(first - 0.5 - _ROW_GAP / 2, last + 0.5 + _ROW_GAP / 2,
                       color="#F4F4F4", zorder=0, lw=0)
    for y, r in panel.bars:
        ax.barh(y, r.ratio - base, left=base, height=0.8, color=colours[r.versus],
                zorder=3)
        if r.goal is not None:
            ax.plot([r.goal, r.goal], [y - 0.5, y + 0.5], color="black", lw=2.2,
                    solid_capstyle="butt", zorder=4)
        _label_bar(ax, y, r, base)
    ax.axvline(1.0, color="#333333", lw=1.2, zorder=4)
    ax.set_yticks([(first + last) / 2 for first, last, _ in panel.rows],
                  [label for _, _, label in panel.rows], fontsize=11)
    ax.set_ylim(panel.slots - 0.5 + 0.3, -0.5 - 0.3)
    ax.tick_params(axis="y", length=0, pad=8)
    ax.tick_params(axis="x", labelbottom=False, length=0)
    ax.grid(axis="x", color="#DDDDDD", lw=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.spines["bottom"].set_color("#BBBBBB")
    handles: list[Patch | Line2D] = [Patch(color=colours[v], label=v) for v in versus]
    if any(r.goal is not None for _, r in panel.bars):
        handles.append(Line2D([], [], color="black", lw=2.2, label="goal"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              fontsize=10, title="safeshm vs", title_fontsize=10, alignment="left",
              borderaxespad=0.0)


def _label_bar(ax: Axes, y: float, r: Ratio, base: float) -> None:
    """Write ``r``'s figure at the end of its bar, beyond its goal mark if the mark lies
    that way (never across it); a missed goal is said in red."""
    missed = r.goal is not None and r.ratio < r.goal
    style: dict[str, Any] = {"textcoords": "offset points", "va": "center", "zorder": 5,
                             "fontsize": 9.5, "color": _MISSED if missed else "#222222",
                             "fontweight": "bold" if missed else "normal"}
    if r.ratio >= base:  # the bar grows rightwards
        at = r.ratio if r.goal is None else max(r.ratio, r.goal)
        text = _times(r.ratio) + (f"  (goal {_goal_text(r.goal)})"
                                  if missed and r.goal is not None else "")
        ax.annotate(text, (at, y), xytext=(5, 0), ha="left", **style)
        return
    at = r.ratio if r.goal is None else min(r.ratio, r.goal)
    ax.annotate(_times(r.ratio), (at, y), xytext=(-5, 0), ha="right", **style)
    if missed and r.goal is not None:
        # The goal lies to the right, at or beyond the 1x line: said there.
        style.update(fontsize=8.5, fontweight="normal")
        ax.annotate(f"goal {_goal_text(r.goal)}", (max(r.goal, base), y), xytext=(5, 0),
                    ha="left", **style)


def plot_ratios(ratios: Sequence[Ratio], path: str, *, title: str, subtitle: str,
                footnote: str) -> None:
    """Draw ``ratios`` as a bar chart into ``path`` (its format from its extension).

    One panel per :attr:`Ratio.structure`; in each, one row per :attr:`Ratio.label`
    holding one horizontal bar per alternative, from the 1x line (as fast as the
    alternative) to the ratio, labelled with its value; a black mark across the bar where
    the project has a goal for it (a ratio that misses its goal is labelled in red). The x
    axis, shared by the panels, is logarithmic when the ratios span more than 10x.

    Uses matplotlib's Agg renderer directly (no pyplot, no display, no global state), and
    writes the file atomically: a failure leaves no half-written chart.

    Raises:
        ValueError: ``ratios`` is empty.
        OSError: the file could not be written.
    """
    # Optional dependency: imported here, after _plot_problem has said it is there.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: PLC0415

    if not ratios:
        raise ValueError("nothing to plot: no ratio was measured")
    panels = _panels(ratios)
    values = [r.ratio for r in ratios] + [r.goal for r in ratios if r.goal is not None]
    lo, hi = min([*values, 1.0]), max([*values, 1.0])
    log = hi / lo > 10
    xlim = (lo / 1.6, hi * 2.2) if log else (0.0, hi * 1.25)

    plot_width = _FIG_WIDTH - _LEFT - _RIGHT
    height = (_HEADER + _FOOTER + _PANEL_GAP * len(panels)
              + _BAR_PITCH * sum(p.slots for p in panels))
    fig = Figure(figsize=(_FIG_WIDTH, height), dpi=150, facecolor="white")
    FigureCanvasAgg(fig)
    fig.text(_MARGIN / _FIG_WIDTH, 1 - 0.3 / height, title, fontsize=17, fontweight="bold",
             va="baseline", ha="left", color="#111111")
    fig.text(_MARGIN / _FIG_WIDTH, 1 - 0.58 / height, subtitle, fontsize=10.5,
             va="baseline", ha="left", color="#555555")
    top = height - _HEADER
    axes: list[Axes] = []
    for panel in panels:
        top -= _PANEL_GAP
        h = panel.slots * _BAR_PITCH
        top -= h
        ax = fig.add_axes((_LEFT / _FIG_WIDTH, top / height, plot_width / _FIG_WIDTH,
                           h / height))
        if axes:
            ax.sharex(axes[0])
        axes.append(ax)
        ax.set_title(panel.title, loc="left", fontsize=13.5, fontweight="bold", pad=8,
                     x=(_MARGIN - _LEFT) / plot_width, color="#111111")
        _draw_panel(ax, panel, log=log)

    first, last = axes[0], axes[-1]
    first.set_xscale("log" if log else "linear")
    first.set_xlim(*xlim)
    if log:
        first.xaxis.set_major_locator(FixedLocator(_axis_ticks(*xlim)))
        first.xaxis.set_minor_locator(NullLocator())
    first.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}{_TIMES}"))
    last.tick_params(axis="x", labelbottom=True, labelsize=10.5, length=3, color="#BBBBBB")
    last.set_xlabel(f"safeshm's speed \N{DIVISION SIGN} the alternative's   (higher is "
                    f"better; 1{_TIMES} = as fast)", fontsize=11, labelpad=8)
    fig.text(_MARGIN / _FIG_WIDTH, 0.1 / height, footnote, fontsize=9, color="#555555",
             va="bottom", ha="left", wrap=True)
    _save(fig, path)


def _save(fig: Any, path: str) -> None:
    """``fig.savefig(path)`` through a temporary file renamed over ``path`` at the end."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            # "tight": the saved image grows or shrinks to what was drawn (long labels
            # and legends included), with an even margin around it.
            fig.savefig(f, format=_suffix(name), facecolor="white", bbox_inches="tight",
                        pad_inches=0.25)
        # mkstemp makes the file 0600; a chart is no secret (as for any file the user
        # writes, the umask decides).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _chart_texts(results: dict[str, Any]) -> tuple[str, str, str]:
    """The chart's title, subtitle (the machine) and footnote (the method), from what
    ``--json`` prints."""
    env, config = results.get("environment", {}), results.get("config", {})
    cpus, usable = env.get("cpu_count"), env.get("cpus_usable")
    python = (f"{env.get('python_implementation', 'Python')} "
              f"{str(env.get('python', '?')).split(' ', 1)[0]}")
    if env.get("gil_enabled") is False:
        python += " (free-threaded)"
    system = str(env.get("platform", "")).split("-", 1)[0]
    machine = " \N{MIDDLE DOT} ".join(str(part) for part in (
        env.get("cpu_model", "unknown CPU"),
        f"{cpus} CPUs" if usable in (None, cpus) else f"{cpus} CPUs ({usable} usable)",
        python, f"{system} {env.get('kernel', '')} {env.get('machine', '')}".strip(),
        f"safeshm {env.get('safeshm', '?')}"))
    title = "safeshm vs what you use today: how many times faster"
    repeats, seconds = config.get("repeats", "?"), config.get("seconds", "?")
    notes = [f"Median of {repeats} measurements of about {seconds} s each"
             if repeats != 1 else f"One measurement of about {seconds} s each",
             "every contender measured in the same run; N processes: N worker processes "
             "(started with 'spawn') on one structure."]
    if "queue" in config.get("structures", []):
        notes.append("SafeQueue: N producers and N consumers; in batches, mp.Queue (which has "
                     "no batch calls) puts and gets one item at a time; round trip: a "
                     "ping-pong with both processes pinned to one CPU.")
    notes.append("Black marks: the goals that `safeshm bench` checks.")
    return title, machine, ", ".join(notes[:2]) + " " + " ".join(notes[2:])


def plot(results: dict[str, Any], path: str) -> None:
    """Chart ``results["ratios"]`` (see :class:`Ratio`) into ``path``, titled with the
    machine from ``results["environment"]``.

    Raises:
        ValueError: ``results`` has no ratios, or they are not :class:`Ratio` objects.
        OSError: the file could not be written.
    """
    title, subtitle, footnote = _chart_texts(results)
    plot_ratios(_load_ratios(results), path, title=title, subtitle=subtitle,
                footnote=footnote)


def _load_ratios(results: dict[str, Any]) -> list[Ratio]:
    """``results["ratios"]`` as :class:`Ratio` objects, checked field by field."""
    raw = results.get("ratios")
    if not isinstance(raw, list):
        raise ValueError("no 'ratios' list (was it written by `safeshm bench --json`?)")
    fields = [f.name for f in dataclasses.fields(Ratio)]
    out = []
    for item in raw:
        ok = (isinstance(item, dict) and sorted(item) == sorted(fields)
              and all(isinstance(item[k], str) for k in ("structure", "label", "versus"))
              and all(_positive_number(item[k]) for k in ("ratio", "goal")
                      if k == "ratio" or item[k] is not None))
        if not ok:
            raise ValueError(f"not a ratio: {item!r}")
        out.append(Ratio(**item))
    return out


def _positive_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# --- the command ----------------------------------------------------------------------------
_MEASURING_OPTIONS: Final = {"processes": "--processes", "seconds": "--seconds",
                             "repeats": "--repeats", "structures": "--structures",
                             "bulk_elements": "--bulk-elements"}


def _error(message: str) -> int:
    """Report a problem with the arguments or the input, as every subcommand does."""
    print(message if message.startswith("safeshm") else f"safeshm: {message}",
          file=sys.stderr, flush=True)
    return 2


def _read_results(path: str) -> dict[str, Any]:
    """The results a ``safeshm bench --json`` run saved in ``path``.

    Raises:
        ValueError: the file cannot be read, or is not such results (said in one line).
    """
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read --from-json {path!r}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--from-json {path!r} is not JSON: {e}") from None
    if not isinstance(results, dict) or not isinstance(results.get("environment"), dict):
        raise ValueError(f"--from-json {path!r} is not the output of `safeshm bench --json`")
    return results


def _bulk_problem(elements: int) -> str | None:
    """Why the bulk part cannot make its two shared arrays of ``elements`` float64s in
    /dev/shm, checked before anything is measured (a tmpfs that fills up while numpy
    writes into a ``SharedMemory`` kills the process with SIGBUS instead of raising)."""
    need = 2 * 8 * elements
    try:
        # Where SharedMemory puts its segment (a tmpfs, not a temporary directory).
        st = os.statvfs("/dev/shm")  # noqa: S108
    except OSError:  # pragma: no cover - no /dev/shm: the segments will say so
        return None
    free = st.f_bavail * st.f_frsize
    if need <= free:
        return None
    return (f"--bulk-elements {elements} needs {need / 1e6:,.0f} MB free in /dev/shm for the "
            f"array benchmark's bulk part; {free / 1e6:,.0f} MB are free")


def run(args: argparse.Namespace) -> int:
    """``safeshm bench``: measure (or read saved results), print them, and chart them.

    Args:
        args: the command line as parsed by ``safeshm bench`` (see ``safeshm bench
            --help``): the measuring options (``None`` when not given), ``json``,
            ``plot``, ``from_json`` and ``quiet``.

    Returns:
        0 when every measurement completed with an exact count (whether or not the bars
        pass: they are a report, not a test) and the chart, if asked for, was written; 1
        when a measurement failed or the chart could not be written; 2 for a problem with
        the arguments, which is found before anything is measured; 130 when interrupted.
    """
    problem = _argument_problem(args)
    if problem is not None:
        return _error(problem)
    if args.from_json is not None:
        try:
            out = _read_results(args.from_json)
            if args.plot is not None:
                _load_ratios(out)  # a bad file is said so before anything is printed
        except ValueError as e:
            return _error(str(e))
    else:
        measured = _measure(args)
        if isinstance(measured, int):
            return measured
        out = measured
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        try:
            _print_report(out)
        except (KeyError, TypeError, ValueError) as e:
            # Only saved results can lack what the tables need.
            return _error(f"--from-json {args.from_json!r} lacks what the tables need "
                          f"({type(e).__name__}: {e}); --json prints it as it is")
    sys.stdout.flush()
    return 0 if args.plot is None else _write_chart(out, args.plot, quiet=args.quiet)


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, beyond what argparse checks; ``None`` if nothing."""
    if args.from_json is not None:
        given = [flag for attr, flag in _MEASURING_OPTIONS.items()
                 if getattr(args, attr) is not None]
        if given:
            return (f"--from-json measures nothing: it cannot be combined with "
                    f"{', '.join(given)}")
    return None if args.plot is None else _plot_problem(args.plot)


def _measure(args: argparse.Namespace) -> dict[str, Any] | int:
    """Measure what ``args`` asks for: the results as ``--json`` prints them, or the exit
    status (its message printed) if that could not be done."""
    structures = args.structures or list(STRUCTURES)
    seconds = args.seconds or _cli.DEFAULT_BENCH_SECONDS
    settings = _Settings(
        processes=sorted(set(args.processes or _cli.DEFAULT_BENCH_PROCESSES)),
        seconds=seconds, repeats=args.repeats or _cli.DEFAULT_BENCH_REPEATS,
        structures=[s for s in STRUCTURES if s in structures],
        bulk_elements=args.bulk_elements or DEFAULT_BULK_ELEMENTS,
        # Once released, a worker gets many times its expected share before it is called
        # hung: the machine may be shared and briefly much slower than during calibration.
        time_limit_s=max(30.0, 20 * seconds))
    array_plan = (_array_plan() if "array" in settings.structures
                  else _ArrayPlan(None, (), bulk=False, notes=[]))
    queue_plan = (_queue_plan() if "queue" in settings.structures
                  else _QueuePlan(None, {}, notes=[]))
    problem = _bulk_problem(settings.bulk_elements) if array_plan.bulk else None
    if problem is not None:
        return _error(problem)
    if args.json:
        # The tables show notes; stdout must stay pure JSON here.
        for text in array_plan.notes + queue_plan.notes:
            print(f"note: {text}", file=sys.stderr, flush=True)
    progress = _Progress(_total_steps(settings, array_plan, queue_plan),
                         None if args.quiet else sys.stderr)
    try:
        env = environment()
        measured = _measure_all(multiprocessing.get_context(START_METHOD), settings,
                                array_plan, queue_plan, progress)
    except BenchError as e:
        progress.interrupt()
        print(f"\n*** BENCHMARK FAILED: {e} ***\n", file=sys.stderr, flush=True)
        return 1
    except MemoryError:
        progress.interrupt()
        _error("out of memory (a smaller --bulk-elements needs less)")
        return 1
    except KeyboardInterrupt:
        progress.interrupt()
        print("interrupted", file=sys.stderr)
        return 130
    progress.finish()
    return _results(env, settings, array_plan, queue_plan, measured)


def _write_chart(results: dict[str, Any], path: str, *, quiet: bool) -> int:
    """``--plot``: the chart of ``results`` into ``path``; the exit status."""
    try:
        plot(results, path)
    except ValueError as e:
        return _error(str(e))
    except OSError as e:
        print(f"safeshm: cannot write the chart to {path!r}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    if not quiet:
        print(f"chart written to {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``safeshm bench`` with ``argv`` (``sys.argv[1:]`` when ``None``) as its arguments,
    as the scripts in ``benchmarks/`` run it: the same options, messages and exit status.
    """
    return _cli.main(["bench", *(sys.argv[1:] if argv is None else argv)])
