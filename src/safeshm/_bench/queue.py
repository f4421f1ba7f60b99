"""The queue benchmark: multiprocessing's queues and faster_fifo vs safeshm.SafeQueue.

P producer and P consumer processes on one queue, four workloads: small
``(producer, seq)`` tuples put and got one at a time; the same items in batches of 100
(``put_many``/``get_many`` where the queue has them, and for reference lists of 100 items
put as single items); 64 KiB ``bytes`` items; and the round-trip latency of a ping-pong
over two queues with both processes pinned to one CPU.
The contenders are ``multiprocessing.Queue``, ``multiprocessing.SimpleQueue``,
``faster_fifo.Queue`` (when importable: it is optional, and skipped with a note) and
:class:`safeshm.SafeQueue` (pickling, or ``raw=True`` for the bytes items). Consumers count
every item and sum its sequence number and producer number (for bytes items: read from its
last 16 bytes), and the totals must match what the producers put.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib
import importlib.metadata
import math
import os
import pickle
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from safeshm._queue import SafeQueue

from .chart import Ratio
from .harness import (
    BARRIER_TIMEOUT_S,
    MAX_OPS_PER_WORKER,
    VARIANTS,
    Agents,
    BenchError,
    Cell,
    Progress,
    Run,
    calibrated,
    drop,
    join_all,
    measure_cells,
    procs_label,
    ratio,
    record,
    step_weights,
    stop_all,
    tagged,
    untagged,
    with_variants,
)
from .report import Column, fmt_ratio, print_side_by_side, spread

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.synchronize import Barrier

    from .harness import Context
    from .options import Settings

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

QUEUE_SAFESHM: Final = (Q_SAFE, Q_SAFE_LISTS)
"""The contenders measured once per implementation (native, ctypes)."""

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
    _LISTS: _ring_items(
        len(pickle.dumps([(1, 1_000_000 + i) for i in range(QUEUE_BATCH)], pickle.HIGHEST_PROTOCOL))
    ),
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
    calls = "put((0, seq)) / get()   (both ways)" if workload == LATENCY else _CALLS[mode]
    kind = _queue_kind(implementation)
    if kind == Q_FF:
        calls = calls.replace("get_many(100)", "get_many(max_messages_to_get=100)")
        queue = f"faster_fifo.Queue(max_size_bytes={QUEUE_CAPACITY}), timeout=limit"
    elif kind == Q_SAFE:
        queue = (
            f"safeshm.SafeQueue.create({QUEUE_CAPACITY}"
            f"{', raw=True' if workload == BYTES else ''}): {_MIB} MiB ring"
        )
    elif kind == Q_SIMPLE:
        queue = "multiprocessing.SimpleQueue(): a pipe"
    else:
        queue = f"multiprocessing.Queue(maxsize={_MP_MAXSIZE[mode]})"
    return f"{calls}   ({queue})"


# Queue workloads: items per producer in the warm-up run (and, with --quick, every run) and
# the first calibration run.
# 64 KiB items are ~1000x larger than the others, so they start 10x smaller.
_QUEUE_WARMUP_OPS: Final = {SMALL: 5_000, BATCHES: 5_000, BYTES: 500, LATENCY: 1_000}
_QUEUE_START_OPS: Final = {SMALL: 20_000, BATCHES: 20_000, BYTES: 2_000, LATENCY: 2_000}
# The pinger keeps every round-trip time (a float in a list, then 8 bytes in shared memory).
_MAX_ROUND_TRIPS: Final = 2_000_000


# --- workers (module level: spawn children import them by name) ---------------------------
#
# A producer puts its n items and then one end marker (None; b"" for bytes items); a
# consumer takes items until it has taken one end marker. With P producers and P consumers
# there are P markers, each consumer stops at its first, and a producer's marker comes after
# all its items: so by the time every consumer has stopped, every item has been taken.
# Producers and consumers read the clock after the barrier; the measurement ends when the
# last consumer has its last item (multiprocessing.Queue's put returns before a feeder
# thread has written the item: only what the consumers received counts).


def _queue_calls(
    kind: str, q: Any, timeout: float
) -> tuple[Callable[[Any], None], Callable[[], Any]]:
    """``put`` and ``get``, hoisted as a hot loop in user code would hoist them.

    faster_fifo's calls give up after 10 s by default (raising ``queue.Full`` or
    ``queue.Empty``): they get the run's whole time limit instead, so a briefly overloaded
    machine cannot fail a run that the others would finish. The others block without a
    timeout, as they are usually called; a run that hangs is ended by the parent's deadline.
    """
    if kind == Q_FF:
        return (
            functools.partial(q.put, block=True, timeout=timeout),
            functools.partial(q.get, True, timeout),
        )
    return q.put, q.get


def _batch_calls(
    kind: str, q: Any, timeout: float
) -> tuple[Callable[[list[Any]], None], Callable[[], list[Any]]]:
    """``put_many`` and ``get_many`` of up to :data:`QUEUE_BATCH` items."""
    if kind == Q_FF:
        return (
            functools.partial(q.put_many, block=True, timeout=timeout),
            functools.partial(q.get_many, True, timeout, QUEUE_BATCH),
        )
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


def _put_batches(
    put_many: Callable[[list[Any]], None], put: Callable[[Any], None], index: int, n: int
) -> None:
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


def _queue_producer(
    kind: str,
    mode: str,
    q: Any,
    n: int,
    *,
    timeout: float,
    barrier: Barrier,
    times: ctypes.Array[ctypes.c_double],
    index: int,
) -> None:
    """Put ``n`` items numbered ``0 .. n-1`` (and the end marker), timed from the barrier."""
    try:
        put, _ = _queue_calls(kind, q, timeout)
        loop: Callable[[], None]
        if mode == _MANY:
            loop = functools.partial(_put_batches, _batch_calls(kind, q, timeout)[0], put, index, n)
        elif mode == _LISTS:
            loop = functools.partial(_put_lists, put, index, n)
        elif mode == _RAW:
            # The last 16 bytes of an item: producer number, then sequence number.
            body = b"\xa5" * (QUEUE_ITEM_BYTES - 16) + index.to_bytes(8, "little")
            loop = functools.partial(_put_bytes, put, body, n)
        else:
            loop = functools.partial(_put_items, put, index, n)
        barrier.wait(BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        loop()
        end = time.perf_counter()
        record(times, index, start, end)
    finally:
        _release_in_worker(q)


def _queue_consumer(
    kind: str,
    mode: str,
    q: Any,
    *,
    timeout: float,
    tallies: ctypes.Array[ctypes.c_longlong],
    slot: int,
    barrier: Barrier,
    times: ctypes.Array[ctypes.c_double],
    index: int,
) -> None:
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
        barrier.wait(BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        tally = loop()
        end = time.perf_counter()
        # End markers taken beyond this consumer's own belong to consumers still running.
        for _ in range(tally[4] - 1):
            put(None)
        record(times, index, start, end)
        tallies[4 * slot : 4 * slot + 4] = list(tally[:4])
    finally:
        _release_in_worker(q)


def _pin(cpu: int) -> None:
    """Run this process (and the threads it starts later) on ``cpu`` only."""
    os.sched_setaffinity(0, {cpu})


def _queue_pinger(
    kind: str,
    requests: Any,
    replies: Any,
    n: int,
    *,
    timeout: float,
    cpu: int,
    samples: ctypes.Array[ctypes.c_double],
    tallies: ctypes.Array[ctypes.c_longlong],
    barrier: Barrier,
    times: ctypes.Array[ctypes.c_double],
    index: int,
) -> None:
    """Send ``(0, seq)`` and wait for it to come back, ``n`` times; time each round trip."""
    try:
        _pin(cpu)
        _ready_to_get(kind, replies)
        put = _queue_calls(kind, requests, timeout)[0]
        get = _queue_calls(kind, replies, timeout)[1]
        rtts = [0.0] * n  # preallocated: the loop only stores
        clock = time.perf_counter
        right = 0
        barrier.wait(BARRIER_TIMEOUT_S)
        start = clock()
        for seq in range(n):
            t0 = clock()
            put((0, seq))
            reply = get()
            rtts[seq] = clock() - t0
            right += reply[1] == seq  # after the round trip's clock: not timed
        end = clock()
        record(times, index, start, end)
        for i, rtt in enumerate(rtts):  # not a slice assignment: typeshed wants c_doubles
            samples[i] = rtt
        tallies[0] = right
    finally:
        _release_in_worker(requests)
        _release_in_worker(replies)


def _queue_ponger(
    kind: str,
    requests: Any,
    replies: Any,
    n: int,
    *,
    timeout: float,
    cpu: int,
    barrier: Barrier,
    times: ctypes.Array[ctypes.c_double],
    index: int,
) -> None:
    """Send every request straight back, ``n`` times."""
    try:
        _pin(cpu)
        _ready_to_get(kind, requests)
        get = _queue_calls(kind, requests, timeout)[1]
        put = _queue_calls(kind, replies, timeout)[0]
        barrier.wait(BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        for _ in range(n):
            put(get())
        end = time.perf_counter()
        record(times, index, start, end)
    finally:
        _release_in_worker(requests)
        _release_in_worker(replies)


# --- one measurement ------------------------------------------------------------------------
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


def _new_queue(
    ctx: Context, implementation: str, workload: str, stack: contextlib.ExitStack
) -> Any:
    """A fresh queue for one measurement, freed when ``stack`` closes."""
    mode = _queue_mode(workload, implementation)
    kind = _queue_kind(implementation)
    if kind == Q_SAFE:
        q: Any = (
            SafeQueue.create(QUEUE_CAPACITY, raw=True)
            if mode == _RAW
            else SafeQueue.create(QUEUE_CAPACITY)
        )
        stack.callback(drop, q)
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


def _start(
    ctx: Context,
    procs: list[BaseProcess],
    target: Callable[..., None],
    args: tuple[Any, ...],
    name: str,
    **kwargs: Any,
) -> None:
    procs.append(ctx.Process(target=target, args=args, kwargs=kwargs, name=name, daemon=True))
    procs[-1].start()


def measure_queue(
    ctx: Context, workload: str, implementation: str, processes: int, n: int, *, time_limit_s: float
) -> Run:
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
    timeout = BARRIER_TIMEOUT_S + time_limit_s
    procs: list[BaseProcess] = []
    with contextlib.ExitStack() as stack:
        q = _new_queue(ctx, implementation, workload, stack)
        # Registered after the queue: runs first, so no worker still uses the queue when
        # it is freed -- whatever happened.
        stack.callback(stop_all, procs)
        for i in range(processes):
            _start(
                ctx,
                procs,
                _queue_producer,
                (kind, mode, q, n),
                f"bench-{workload}-{implementation}-put-{i}",
                timeout=timeout,
                barrier=barrier,
                times=times,
                index=i,
            )
        for j in range(processes):
            _start(
                ctx,
                procs,
                _queue_consumer,
                (kind, mode, q),
                f"bench-{workload}-{implementation}-get-{j}",
                timeout=timeout,
                tallies=tallies,
                slot=j,
                barrier=barrier,
                times=times,
                index=processes + j,
            )
        join_all(procs, barrier, time.monotonic() + BARRIER_TIMEOUT_S + time_limit_s)
    got = tuple(sum(tallies[k::4]) for k in range(4))
    want = (
        processes * n,
        processes * n * (n - 1) // 2,
        n * processes * (processes - 1) // 2,
        processes * n * QUEUE_ITEM_BYTES if mode == _RAW else 0,
    )
    if got != want:
        raise BenchError(
            f"{implementation}, {workload} items, {processes} producer(s) and consumer(s): "
            f"consumers took (items, sum of seq, sum of producer, bytes) = {got}, expected "
            f"{want} -- items were lost, duplicated or damaged"
        )
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


def measure_latency(
    ctx: Context, implementation: str, n: int, *, time_limit_s: float
) -> RoundTrips:
    """Time ``n`` ping-pong round trips over two fresh queues, both processes on one CPU.

    Raises:
        BenchError: a worker failed or hung, or a reply was not the request it answers.
    """
    cpu = _pinned_cpu()
    barrier = ctx.Barrier(2)
    times: ctypes.Array[ctypes.c_double] = ctx.RawArray(ctypes.c_double, 4)
    samples: ctypes.Array[ctypes.c_double] = ctx.RawArray(ctypes.c_double, n)
    tallies: ctypes.Array[ctypes.c_longlong] = ctx.RawArray(ctypes.c_longlong, 1)
    timeout = BARRIER_TIMEOUT_S + time_limit_s
    procs: list[BaseProcess] = []
    with contextlib.ExitStack() as stack:
        requests = _new_queue(ctx, implementation, LATENCY, stack)
        replies = _new_queue(ctx, implementation, LATENCY, stack)
        stack.callback(stop_all, procs)
        args = (implementation, requests, replies, n)
        _start(
            ctx,
            procs,
            _queue_pinger,
            args,
            f"bench-latency-{implementation}-ping",
            timeout=timeout,
            cpu=cpu,
            samples=samples,
            tallies=tallies,
            barrier=barrier,
            times=times,
            index=0,
        )
        _start(
            ctx,
            procs,
            _queue_ponger,
            args,
            f"bench-latency-{implementation}-pong",
            timeout=timeout,
            cpu=cpu,
            barrier=barrier,
            times=times,
            index=1,
        )
        join_all(procs, barrier, time.monotonic() + BARRIER_TIMEOUT_S + time_limit_s)
    if tallies[0] != n:
        raise BenchError(
            f"{implementation} ping-pong: {tallies[0]} of {n} replies were the request they answer"
        )
    return RoundTrips(implementation, max(times[1] - times[0], 1e-9), samples[:n])


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


def latency_ratio(latency: dict[str, LatencyCell], a: str, b: str) -> float | None:
    """Time ratio ``a / b`` of median round trips (above 1: ``a`` is slower)."""
    if a not in latency or b not in latency:
        return None
    return latency[a].median / latency[b].median


def measure_latencies(
    ctx: Context,
    implementations: tuple[str, ...],
    settings: Settings,
    progress: Progress,
    agents: Agents,
) -> dict[str, LatencyCell]:
    """Warm up, calibrate and measure the pinned ping-pong of every implementation (a
    safeshm one, named as ``harness.tagged`` names it, in its measuring process)."""
    time_limit_s, repeats = settings.time_limit_s, settings.repeats

    def one(impl: str, n: int) -> RoundTrips:
        base, variant = untagged(impl)
        return agents.run(ctx, variant, measure_latency, base, n, time_limit_s=time_limit_s)

    def elapsed(impl: str) -> Callable[[int], float]:
        return lambda n: one(impl, n).elapsed_s

    def step(impl: str, what: str) -> None:
        progress.step(f"queue round trip: {impl}, pinned ping-pong, {what}")

    counts = dict.fromkeys(implementations, _QUEUE_WARMUP_OPS[LATENCY])
    if not settings.quick:
        for impl in implementations:
            step(impl, "warm-up")
            one(impl, _QUEUE_WARMUP_OPS[LATENCY])
        for impl in implementations:
            step(impl, "calibrating")
            counts[impl] = calibrated(
                elapsed(impl), settings.seconds, _QUEUE_START_OPS[LATENCY], _MAX_ROUND_TRIPS
            )
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
    return {
        impl: LatencyCell(impl, counts[impl], tuple(medians[impl]), tuple(p99s[impl]))
        for impl in implementations
    }


_PARTS: Final = {SMALL: "queue small items", BATCHES: "queue batches", BYTES: "queue 64 KiB bytes"}


def contenders(plan: Plan, workload: str, variants: tuple[str, ...]) -> tuple[str, ...]:
    """A workload's contenders, SafeQueue's once per implementation in ``variants``."""
    return with_variants(plan.contenders[workload], QUEUE_SAFESHM, variants)


def weights(settings: Settings, plan: Plan, variants: tuple[str, ...]) -> list[float]:
    """The progress steps :func:`measure_all` takes, weighed (see ``Progress``)."""
    out: list[float] = []
    for workload in QUEUE_WORKLOADS:
        out += step_weights(
            settings, len(contenders(plan, workload, variants)) * len(settings.processes)
        )
    return out + step_weights(settings, len(contenders(plan, LATENCY, variants)))


def measure_all(
    ctx: Context, settings: Settings, plan: Plan, progress: Progress, agents: Agents
) -> tuple[dict[str, dict[tuple[str, int], Cell]], dict[str, LatencyCell]]:
    """Every queue contender of every workload at every process count, then the latency."""
    cells = {}
    for workload in QUEUE_WORKLOADS:

        def one(impl: str, p: int, n: int, workload: str = workload) -> Run:
            base, variant = untagged(impl)
            return agents.run(
                ctx,
                variant,
                measure_queue,
                workload,
                base,
                p,
                n,
                time_limit_s=settings.time_limit_s,
            )

        cells[workload] = measure_cells(
            contenders(plan, workload, agents.variants),
            settings,
            progress,
            part=_PARTS[workload],
            measure_one=one,
            warmup_ops=_QUEUE_WARMUP_OPS[workload],
            start_ops=_QUEUE_START_OPS[workload],
            quick_ops=_QUEUE_WARMUP_OPS[workload],
            cap=MAX_OPS_PER_WORKER,
            pairs=True,
        )
    latency = measure_latencies(
        ctx, contenders(plan, LATENCY, agents.variants), settings, progress, agents
    )
    return cells, latency


PANEL: Final = "SafeQueue"

_LABELS: Final = {
    SMALL: "small items",
    BATCHES: f"batches of {QUEUE_BATCH}",
    BYTES: f"{QUEUE_ITEM_BYTES // 1024} KiB bytes items",
}


def ratios(
    cells: dict[str, dict[tuple[str, int], Cell]],
    latency: dict[str, LatencyCell],
    processes: list[int],
) -> list[Ratio]:
    """The chart's ratios: SafeQueue against each alternative, per workload and process
    count, and its round trip's speed against theirs."""
    out = []
    for workload in QUEUE_WORKLOADS:
        of = cells.get(workload, {})
        for p in processes:
            for variant in VARIANTS:
                safe = tagged(Q_SAFE, variant)
                for alt in (Q_MP, Q_SIMPLE, Q_FF):
                    value = ratio(of, (safe, p), (alt, p))
                    if value is not None:
                        label = f"{_LABELS[workload]}, {procs_label(p, pairs=True)}, {variant}"
                        out.append(Ratio(PANEL, label, alt, value))
    for variant in VARIANTS:
        safe = tagged(Q_SAFE, variant)
        for alt in (Q_MP, Q_SIMPLE, Q_FF):
            time_ratio = latency_ratio(latency, safe, alt)
            if time_ratio is not None:
                out.append(
                    Ratio(PANEL, f"round trip, both on 1 CPU, {variant}", alt, 1 / time_ratio)
                )
    return out


def _queue_rows(workload: str, cells: dict[tuple[str, int], Cell]) -> list[dict[str, Any]]:
    rows = []
    for (name, p), cell in cells.items():
        impl, variant = untagged(name)
        row = {
            "implementation": impl,
            "variant": variant,
            "code": _queue_description(workload, impl),
            "producers": p,
            "consumers": p,
            "items_per_producer": cell.ops_per_worker,
            "median_items_per_s": cell.median,
            "min_items_per_s": min(cell.samples),
            "max_items_per_s": max(cell.samples),
            "samples_items_per_s": list(cell.samples),
            "vs_mp_queue": ratio(cells, (name, p), (Q_MP, p)),
            "vs_faster_fifo": ratio(cells, (name, p), (Q_FF, p)),
        }
        if workload == BYTES:
            row["median_mb_per_s"] = cell.median * QUEUE_ITEM_BYTES / 1e6
        rows.append(row)
    return rows


def _latency_rows(latency: dict[str, LatencyCell]) -> list[dict[str, Any]]:
    return [
        {
            "implementation": untagged(impl)[0],
            "variant": untagged(impl)[1],
            "code": _queue_description(LATENCY, untagged(impl)[0]),
            "round_trips": cell.round_trips,
            "median_us": cell.median * 1e6,
            "min_median_us": min(cell.medians) * 1e6,
            "max_median_us": max(cell.medians) * 1e6,
            "p99_us": cell.p99 * 1e6,
            "min_p99_us": min(cell.p99s) * 1e6,
            "max_p99_us": max(cell.p99s) * 1e6,
            "samples_median_us": [m * 1e6 for m in cell.medians],
            "samples_p99_us": [m * 1e6 for m in cell.p99s],
            "time_vs_simple_queue": latency_ratio(latency, impl, Q_SIMPLE),
        }
        for impl, cell in latency.items()
    ]


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
    columns = [
        Column("median k items/s", 8, lambda r: f"{r['median_items_per_s'] / 1e3:.1f}"),
    ]
    if workload == BYTES:
        columns.append(Column("MB/s", 6, lambda r: f"{r['median_mb_per_s']:.0f}"))
    columns += [
        Column("vs mp.Queue", 7, lambda r: fmt_ratio(r["vs_mp_queue"])),
        Column("vs faster_fifo", 7, lambda r: fmt_ratio(r["vs_faster_fifo"])),
    ]
    print_side_by_side(
        rows,
        key=lambda r: f"{r['producers']}+{r['consumers']}",
        key_header=" P+C",
        columns=columns,
        noise=lambda r: spread(r["min_items_per_s"], r["max_items_per_s"], r["median_items_per_s"]),
        name_width=18,
    )


def _print_latency_table(rows: list[dict[str, Any]]) -> None:
    print_side_by_side(
        rows,
        key=lambda r: "",
        key_header="",
        columns=[
            Column("median RTT us", 7, lambda r: f"{r['median_us']:.1f}"),
            Column("p99 RTT us", 7, lambda r: f"{r['p99_us']:.1f}"),
            Column("time vs SimpleQueue", 9, lambda r: fmt_ratio(r["time_vs_simple_queue"])),
        ],
        noise=lambda r: spread(r["min_median_us"], r["max_median_us"], r["median_us"]),
        name_width=18,
    )


def print_section(report: dict[str, Any]) -> None:
    print(
        "SafeQueue: P producer and P consumer processes on one queue; every item counted "
        "and checked"
    )
    print(f"  faster_fifo: {report['faster_fifo'] or 'not importable'}")
    print("  safeshm rows: each implementation (native, ctypes) side by side")
    print(
        f"  capacity: SafeQueue ring and faster_fifo buffer {report['capacity_bytes']} "
        f"bytes; mp.Queue maxsize = what that ring holds "
        f"({report['mp_queue_maxsize']['items']} small items, "
        f"{report['mp_queue_maxsize']['lists']} lists, "
        f"{report['mp_queue_maxsize']['bytes']} bytes items); mp.SimpleQueue: a pipe"
    )
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
    print(
        "Round-trip latency: a ping-pong of one small item over two queues (request, "
        f"reply), both processes pinned to CPU {report['latency_cpu']}"
    )
    for impl in report["implementations"][LATENCY]:
        print(f"  {impl:<18}  {_queue_description(LATENCY, impl)}")
    print()
    _print_latency_table(report[LATENCY])


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which queue contenders can run here: faster_fifo is optional."""

    faster_fifo_version: str | None
    contenders: dict[str, tuple[str, ...]]
    """Per workload (and :data:`LATENCY`), the implementations to measure."""
    notes: list[str]


def plan() -> Plan:
    module, why = _faster_fifo()
    if module is not None:
        try:
            version = importlib.metadata.version("faster-fifo")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare copy
            version = "unknown version"
        return Plan(version, dict(QUEUE_CONTENDERS), notes=[])
    return Plan(
        None,
        {w: tuple(i for i in impls if i != Q_FF) for w, impls in QUEUE_CONTENDERS.items()},
        notes=[
            f"faster_fifo is not importable ({why}): skipped its rows "
            "(pip install faster-fifo, or safeshm[bench])"
        ],
    )


def section(
    plan: Plan, cells: dict[str, dict[tuple[str, int], Cell]], latency: dict[str, LatencyCell]
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "faster_fifo": plan.faster_fifo_version,
        "notes": plan.notes,
        "capacity_bytes": QUEUE_CAPACITY,
        "batch_items": QUEUE_BATCH,
        "bytes_item_size": QUEUE_ITEM_BYTES,
        "mp_queue_maxsize": {
            "items": _MP_MAXSIZE[_SINGLE],
            "lists": _MP_MAXSIZE[_LISTS],
            "bytes": _MP_MAXSIZE[_RAW],
        },
        "latency_cpu": _pinned_cpu(),
        "implementations": {w: list(impls) for w, impls in plan.contenders.items()},
    }
    for workload in QUEUE_WORKLOADS:
        out[workload] = _queue_rows(workload, cells.get(workload, {}))
    out[LATENCY] = _latency_rows(latency)
    return out
