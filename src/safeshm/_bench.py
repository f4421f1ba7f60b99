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
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any, Final

from . import __version__
from ._array import SafeArray
from ._counter import SafeCounter, ShardedCounter
from ._queue import SafeQueue

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext, SpawnProcess
    from multiprocessing.sharedctypes import Synchronized, SynchronizedArray
    from multiprocessing.synchronize import Barrier, Lock

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

STRUCTURES: Final = ("counter", "array", "queue")
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
DEFAULT_BULK_ELEMENTS: Final = 10_000_000
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


def _ratio(cells: dict[tuple[str, int], Cell], a: tuple[str, int],
           b: tuple[str, int]) -> float | None:
    if a not in cells or b not in cells:
        return None
    return cells[a].median / cells[b].median


def bars(cells: dict[tuple[str, int], Cell]) -> list[Bar]:
    """The counter bars this project must meet, computed from the medians in ``cells``."""
    return [
        Bar("SafeCounter add, 1 process, vs the mp.Value idiom (1 process)", 1.2,
            _ratio(cells, (SAFE, 1), (IDIOM, 1))),
        Bar("SafeCounter add, 2 processes, vs the mp.Value idiom (2 processes)", 3.0,
            _ratio(cells, (SAFE, 2), (IDIOM, 2))),
        Bar("ShardedCounter add, 1 process, vs the mp.Value idiom (1 process)", 4.0,
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
        Bar("SafeArray element add, 1 process, vs the mp.Array idiom (1 process)", 1.2,
            _ratio(cells, (ARRAY_SAFE, 1), (ARRAY_IDIOM, 1))),
        Bar("SafeArray element add at random indices, 2 processes, vs the mp.Array idiom "
            "(2 processes)", 3.0, _ratio(cells, (ARRAY_SAFE, 2), (ARRAY_IDIOM, 2))),
        Bar("bulk sum via SafeArray.locked() + numpy, time vs numpy on a private array",
            1.5, _bulk_ratio(bulk, BULK_SAFE, BULK_PRIVATE), at_most=True),
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
        Bar(f"SafeQueue small items, {p}P/{p}C, vs mp.Queue ({p}P/{p}C)", 2.0,
            _ratio(small, (Q_SAFE, p), (Q_MP, p)))
        for p in (1, 2)
    ]
    out += [
        Bar(f"SafeQueue put_many/get_many in batches of {QUEUE_BATCH}, {p}P/{p}C, vs mp.Queue "
            f"single put/get ({p}P/{p}C)", 5.0, _ratio(batches, (Q_SAFE, p), (Q_MP, p)))
        for p in (1, 2)
    ]
    for p in (1, 2):
        out += [
            Bar(f"SafeQueue raw 64 KiB bytes items, {p}P/{p}C, vs mp.Queue ({p}P/{p}C)", 4.0,
                _ratio(raw, (Q_SAFE, p), (Q_MP, p))),
            Bar(f"SafeQueue raw 64 KiB bytes items, {p}P/{p}C, vs faster_fifo ({p}P/{p}C)",
                1.0, _ratio(raw, (Q_SAFE, p), (Q_FF, p))),
        ]
    out.append(Bar("SafeQueue round trip pinned to one CPU, median, time vs mp.SimpleQueue",
                   1.0, _latency_ratio(latency, Q_SAFE, Q_SIMPLE), at_most=True))
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


def _print_rate_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'implementation':<20} {'procs':>5} {'median Mops/s':>13} "
              f"{'range (min-max)':>17} {'vs idiom':>9} {'vs own 1P':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        rng = f"{r['min_ops_per_s'] / 1e6:.3f}-{r['max_ops_per_s'] / 1e6:.3f}"
        print(f"{r['implementation']:<20} {r['processes']:>5} "
              f"{r['median_ops_per_s'] / 1e6:>13.3f} {rng:>17} "
              f"{_fmt_ratio(r['vs_idiom_same_processes']):>9} "
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
    print("Implementations")
    for impl in IMPLEMENTATIONS:
        print(f"  {impl:<20}  {_DESCRIPTIONS[impl]}")
    print()
    _print_rate_table(rows)
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
    _print_rate_table(report["element_add"])
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


def _numpy_version() -> tuple[str | None, str]:
    """``(numpy's version, "")`` if numpy imports, else ``(None, why not)``."""
    try:
        import numpy  # noqa: PLC0415 - optional: only some array contenders need it
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return numpy.__version__, ""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="safeshm bench",
        description="Compare counter increments, array updates and queues: "
                    "multiprocessing idioms (and numpy, faster_fifo) vs safeshm.")
    p.add_argument("--processes", type=_positive_int, nargs="+", default=[1, 2],
                   metavar="N", help="process counts to measure (default: 1 2)")
    p.add_argument("--seconds", type=_positive_float, default=1.0,
                   help="approximate duration of each measurement (default: 1.0)")
    p.add_argument("--repeats", type=_positive_int, default=5,
                   help="measurements per implementation and process count (default: 5)")
    p.add_argument("--structures", nargs="+", choices=STRUCTURES, default=list(STRUCTURES),
                   metavar="{counter,array,queue}",
                   help="what to benchmark (default: counter array queue); for the queue, "
                        "N processes means N producers and N consumers")
    p.add_argument("--bulk-elements", type=_positive_int, default=DEFAULT_BULK_ELEMENTS,
                   metavar="N", help="float64 elements summed by the array benchmark's "
                   f"bulk part (default: {DEFAULT_BULK_ELEMENTS})")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


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


def _measure_cells(ctx: SpawnContext, implementations: tuple[str, ...], settings: _Settings,
                   note: Callable[[str], None], *, label: str = "",
                   workload: str | None = None) -> dict[tuple[str, int], Cell]:
    """Warm up, calibrate and measure every implementation at every process count.

    With ``workload`` (one of :data:`QUEUE_WORKLOADS`) the implementations are queues and
    a process count P means P producers and P consumers; without, counters or arrays.
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

    cells_order = [(impl, p) for p in processes for impl in implementations]
    # Warm-up: one short run of each, discarded -- first-time costs (page cache,
    # bytecode caches, the resource tracker's start) land here, not in a sample.
    note(f"{label}warming up")
    for impl, p in cells_order:
        measure_one(impl, p, _WARMUP_OPS if workload is None else _QUEUE_WARMUP_OPS[workload])
    note(f"{label}calibrating")
    ops = {key: calibrate_one(*key) for key in cells_order}
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in cells_order}
    for r in range(repeats):
        # Round-robin, with the starting implementation rotated each repeat, so a
        # noisy stretch on a shared machine is spread over every contender instead
        # of landing on whichever one always runs at the same position.
        shift = r % len(implementations)
        order = implementations[shift:] + implementations[:shift]
        for p in processes:
            for impl in order:
                note(f"{label}repeat {r + 1}/{repeats}: {impl}, {p} process(es)")
                samples[impl, p].append(measure_one(impl, p, ops[impl, p]).ops_per_s)
    return {key: Cell(key[0], key[1], ops[key], tuple(samples[key])) for key in cells_order}


def _measure_bulk(settings: _Settings, note: Callable[[str], None]) -> dict[str, BulkCell]:
    """Warm up, calibrate and time every bulk-sum implementation, in this process."""
    elements, seconds, repeats = settings.bulk_elements, settings.seconds, settings.repeats
    expected = _bulk_expected_sum(elements)
    with _bulk_contenders(elements) as contenders:
        note("bulk: warming up")
        for impl in BULK_IMPLEMENTATIONS:
            _time_sums(impl, contenders[impl], 1, expected)
        note("bulk: calibrating")
        counts = {impl: _calibrate_sums(impl, contenders[impl], seconds, expected)
                  for impl in BULK_IMPLEMENTATIONS}
        samples: dict[str, list[float]] = {impl: [] for impl in BULK_IMPLEMENTATIONS}
        for r in range(repeats):
            # Rotated round-robin, as for the element measurements.
            shift = r % len(BULK_IMPLEMENTATIONS)
            for impl in BULK_IMPLEMENTATIONS[shift:] + BULK_IMPLEMENTATIONS[:shift]:
                note(f"bulk: repeat {r + 1}/{repeats}: {impl}")
                samples[impl].append(
                    _time_sums(impl, contenders[impl], counts[impl], expected))
    return {impl: BulkCell(impl, elements, counts[impl], tuple(samples[impl]))
            for impl in BULK_IMPLEMENTATIONS}


def _measure_latency(ctx: SpawnContext, implementations: tuple[str, ...],
                     settings: _Settings, note: Callable[[str], None]) -> dict[str, LatencyCell]:
    """Warm up, calibrate and measure the pinned ping-pong of every implementation."""
    time_limit_s, repeats = settings.time_limit_s, settings.repeats

    def one(impl: str, n: int) -> RoundTrips:
        return measure_latency(ctx, impl, n, time_limit_s=time_limit_s)

    note("queue latency: warming up")
    for impl in implementations:
        one(impl, _QUEUE_WARMUP_OPS[LATENCY])
    note("queue latency: calibrating")
    def elapsed(impl: str) -> Callable[[int], float]:
        return lambda n: one(impl, n).elapsed_s

    counts = {impl: _calibrated(elapsed(impl), settings.seconds, _QUEUE_START_OPS[LATENCY],
                                _MAX_ROUND_TRIPS)
              for impl in implementations}
    medians: dict[str, list[float]] = {impl: [] for impl in implementations}
    p99s: dict[str, list[float]] = {impl: [] for impl in implementations}
    for r in range(repeats):
        # Rotated round-robin, as for the throughput measurements.
        shift = r % len(implementations)
        for impl in implementations[shift:] + implementations[:shift]:
            note(f"queue latency: repeat {r + 1}/{repeats}: {impl}")
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


def _measure_all(ctx: SpawnContext, settings: _Settings, array_plan: _ArrayPlan,
                 queue_plan: _QueuePlan, note: Callable[[str], None]) -> _Measured:
    """Measure every part ``settings.structures`` asks for, in the order they print."""
    m = _Measured()
    if "counter" in settings.structures:
        m.cells = _measure_cells(ctx, IMPLEMENTATIONS, settings, note)
    if "array" in settings.structures:
        m.array_cells = _measure_cells(ctx, array_plan.element_implementations, settings,
                                       note, label="array: ")
    if array_plan.bulk:
        m.bulk = _measure_bulk(settings, note)
    if "queue" in settings.structures:
        for workload in QUEUE_WORKLOADS:
            m.queue_cells[workload] = _measure_cells(
                ctx, queue_plan.contenders[workload], settings, note,
                label=f"queue {workload}: ", workload=workload)
        m.latency = _measure_latency(ctx, queue_plan.contenders[LATENCY], settings, note)
    return m


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
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``): ``--processes N
            [N ...]``, ``--seconds S``, ``--repeats R``, ``--structures
            {counter,array,queue} [...]``, ``--bulk-elements N``, ``--json``.

    Returns:
        0 when every measurement completed with an exact count (whether or not the bars
        pass: they are a report, not a test), 1 when any measurement failed.
    """
    args = _parser().parse_args(argv)
    settings = _Settings(
        processes=sorted(set(args.processes)), seconds=args.seconds, repeats=args.repeats,
        structures=[s for s in STRUCTURES if s in args.structures],
        bulk_elements=args.bulk_elements,
        # Once released, a worker gets many times its expected share before it is called
        # hung: the machine may be shared and briefly much slower than during calibration.
        time_limit_s=max(30.0, 20 * args.seconds))
    ctx = multiprocessing.get_context(START_METHOD)
    progress = sys.stderr.isatty()

    def note(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    array_plan = (_array_plan() if "array" in settings.structures
                  else _ArrayPlan(None, (), bulk=False, notes=[]))
    queue_plan = (_queue_plan() if "queue" in settings.structures
                  else _QueuePlan(None, {}, notes=[]))
    if args.json:
        # The tables show notes; stdout must stay pure JSON here.
        for text in array_plan.notes + queue_plan.notes:
            print(f"note: {text}", file=sys.stderr, flush=True)
    try:
        env = environment()
        measured = _measure_all(ctx, settings, array_plan, queue_plan, note)
    except BenchError as e:
        print(f"\n*** BENCHMARK FAILED: {e} ***\n", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    out = _results(env, settings, array_plan, queue_plan, measured)
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        _print_report(out)
    return 0
