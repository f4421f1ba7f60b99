"""SafeQueue[T]: a bounded multi-producer multi-consumer FIFO in a shared-memory ring."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import mmap
import os
import pickle
import queue
import struct
import time
import warnings
import weakref
from collections.abc import Generator, Iterable
from typing import Any, ClassVar, Final, Generic, Literal, TypeVar, overload

from . import _compat
from ._errors import (
    HolderDiedWarning,
    IncompatibleSegmentError,
    ItemDecodeError,
    LeaseExpiredError,
    LeaseTableFullError,
    ProcessTableFullError,
    QueueShutDown,
    SafeShmError,
    SegmentCorruptedError,
)
from ._int64 import INT64_MAX, INT64_MIN
from ._lock import (
    EDEADLK,
    MUTEX_BLOCK,
    RECOVERED,
    TIMED_OUT,
    GeneratorHold,
    Held,
    RobustMutex,
    init_mutex,
)
from ._protocols import SHM_GUARANTEES, Guarantees
from ._segment import CACHE_LINE, HEADER_SIZE, Kind, Segment, SharedStructure
from ._sync import holder_alive, my_start_time, user_stacklevel
from ._timeout import check_timeout

T = TypeVar("T")

# --- layout -----------------------------------------------------------------------------------
#   128  state line, int64 words (changed only under the mutex):
#          head, tail  -- byte counters that only grow; position = counter % capacity
#          puts, gets  -- items ever put / taken; the queue holds puts - gets items
#          shutdown    -- 0, or _SHUTDOWN / _SHUTDOWN_NOW
#          held        -- the sum of the consumer records' counts (derived: recomputed by
#                         _repair and after reaping; kept so that task_done need not sum)
#          credit      -- task_done() calls not matched by an item any process held
#                         (queue.Queue allows put(); task_done() without a get)
#        unfinished tasks = puts - gets + held - credit (as queue.Queue.unfinished_tasks)
#   192  futex line, uint32 words: not-empty sequence and "sleepers" token, then not-full,
#        then join (task_done's "all done" and a reaped consumer; layout 3)
#   256  robust mutex block
#   384  the ring: capacity bytes of records, each an 8-byte header (payload length in
#        the low 32 bits, the length XOR _MARK_KEY in the high 32: layout 2) and the
#        payload, padded to 8 bytes; a payload may wrap around the end of the ring (a
#        header never does).
#   384 + capacity  consumer records (layout 3), ``processes`` of _REC_WORDS int64 words:
#          +0 owner pid (0: free; written last when claiming), +1 its start time, +2 its
#          pid namespace, +3 count: items this process got and has not marked done. A get
#          adds to its process's count in the critical section that takes the item; a
#          dead process's record is reaped (join() while it waits, a claim that finds the
#          table full): its count stops counting as unfinished.
#   then    lease slots (layout 3), ``leases`` of _SLOT_WORDS int64 words (state, lease id,
#          holder pid, start time, pid namespace, deadline in CLOCK_MONOTONIC ns, payload
#          length) and ``lease_size`` payload bytes. Only the Python code uses them (the
#          compiled core never sees a lease): an item put back is an ordinary record in
#          front of head, so every get of either implementation returns it first.
_STATE_OFFSET: Final = HEADER_SIZE
_HEAD, _TAIL, _PUTS, _GETS, _SHUT, _HELD, _CREDIT, _LEASE_SEQ = range(8)
_FUTEX_OFFSET: Final = HEADER_SIZE + CACHE_LINE
_NE_SEQ, _NE_SLEEP, _NF_SEQ, _NF_SLEEP, _JOIN_SEQ, _JOIN_SLEEP = range(6)
# _futex_ptrs[seq >> 1] is a seq's byref
_R_PID, _R_START, _R_NS, _R_COUNT = range(4)
_REC_WORDS: Final = 4
DEFAULT_PROCESSES: Final = 128
MAX_PROCESSES: Final = 1 << 16
_MUTEX_OFFSET: Final = HEADER_SIZE + 2 * CACHE_LINE
_RING_OFFSET: Final = _MUTEX_OFFSET + MUTEX_BLOCK
_RECORD_HEADER: Final = 8
# A record header's high half is its length XOR this key: a length changed by damage no
# longer matches its check half, so it is never used to cut an item out of the ring (a
# constant marker let a damaged length swallow the records after it, returned as one item).
_MARK_KEY: Final = 0x51ED51ED
_COUNT_LIMIT: Final = 1 << 62  # more puts than a queue can see in centuries: damage
_LEN_MASK: Final = 0xFFFFFFFF
_NOWAIT_GRACE: Final = 0.1
"""Longest wait of a non-blocking call for the queue's internal mutex (see _finish_acquire):
long enough for a holder descheduled on a loaded machine, short enough not to block."""
_SEQ_MASK: Final = 0x7FFFFFFF  # futex values travel through ctypes as C ints
_SHUTDOWN: Final = 1
_SHUTDOWN_NOW: Final = 2
_PARAMS: Final = struct.Struct("=QQIIII")  # capacity, maxsize, raw, records, leases, lease size
# Lease slots (after the consumer records): _SLOT_WORDS int64 words, then the payload.
_S_STATE, _S_ID, _S_PID, _S_START, _S_NS, _S_DEADLINE, _S_LEN = range(7)
_SLOT_WORDS: Final = 8
_ACTIVE: Final = 1
MAX_LEASES: Final = 1 << 12
DEFAULT_LEASE_SIZE: Final = 1 << 16  # create()'s lease_size=None, at most
_HEADER_WORD: Final = struct.Struct("=Q")  # a record header, as the ring's 8-byte words hold it
_PADDING: Final = bytes(8)
_WAIT_SLICE: Final = 0.1  # see _lock._WAIT_SLICE: lets Ctrl-C in, never delays a wake-up
MIN_CAPACITY: Final = 16
_SPINS: Final = 300  # lock-free checks (~40 ns each) before a waiter sleeps in the kernel
# A relative timeout the kernel only reads: one shared object serves every sleeping thread.
_SLICE_TIMESPEC: Final = ctypes.byref(_compat.Timespec(0, int(_WAIT_SLICE * 1e9)))

_dumps: Final = pickle.dumps
_loads: Final = pickle.loads
_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL
# syscall(2) is variadic and reads its first argument as a long: pass one.
_SYS_FUTEX: Final = ctypes.c_long(_compat.SYS_FUTEX or -1)
_trylock: Final = _compat.mutex_trylock
_unlock: Final = _compat.mutex_unlock
_consistent: Final = _compat.mutex_consistent
_NEVER: Final = math.inf
_futex_wait: Final = _compat.futex_wait_call
_futex_wake: Final = _compat.futex_wake_call
_FUTEX_WAIT: Final = _compat.FUTEX_WAIT
_FUTEX_WAKE: Final = _compat.FUTEX_WAKE


def _need(n: int) -> int:
    """Ring bytes a record with an ``n``-byte payload takes: header + payload, padded."""
    return (n + _RECORD_HEADER + 7) & ~7


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStatistics:
    """A snapshot of a :class:`SafeQueue` (see :meth:`SafeQueue.statistics`)."""

    name: str
    items: int
    bytes_used: int
    capacity: int
    maxsize: int
    raw: bool
    puts: int
    """Items ever put (since creation)."""
    gets: int
    """Items ever taken."""
    shutdown: bool
    creator_pid: int
    unfinished_tasks: int = 0
    """Items put and not yet marked done (:meth:`SafeQueue.task_done`), as
    ``queue.Queue.unfinished_tasks``."""
    consumers: int = 0
    """Consumer records in use (processes that got an item and have not been reaped)."""
    processes: int = 0
    """The size of the consumer record table."""
    leased: int = 0
    """Items out on a lease (taken with ``get_leased``, not yet acknowledged)."""
    leases: int = 0
    """The number of lease slots (``leases=``)."""


def _watch(state: memoryview, word: int, seen: int) -> None:
    """Up to _SPINS reads of ``state[word]``, until it moves from ``seen`` or the queue is
    shut down. A function of its own: on 3.13 a signal handler's exception at a loop's back
    edge can skip the enclosing ``finally`` (CPython gh-130279; tests/test_async_bytecode.py)."""
    for _ in range(_SPINS):
        if state[word] != seen or state[_SHUT]:
            return


class SafeQueue(SharedStructure, Generic[T]):
    """A bounded multi-producer, multi-consumer FIFO queue in shared memory.

    Items are pickled (or, with ``raw=True``, passed as ``bytes`` untouched) into a ring of
    ``capacity`` bytes; ``maxsize`` optionally bounds the number of items too. Any process
    of the same user can attach by name, and the handle pickles by reference, so pools
    under ``fork``, ``spawn`` and ``forkserver`` receive it as an argument.

    The methods have the standard library's semantics: ``put``/``get`` block (``timeout=None``
    waits forever) and raise :class:`queue.Full` / :class:`queue.Empty`; ``put_nowait`` and
    ``get_nowait``; ``qsize()`` and ``empty()`` are snapshots. ``put_many`` puts a batch
    atomically and ``get_many`` takes up to ``max_items`` at once. Blocked calls sleep in
    the kernel (a futex in the segment) and are woken as soon as the queue changes.

    Robustness: an item becomes visible only complete (a producer killed mid-``put`` leaves
    nothing); a process killed holding the queue's lock leaves it consistent and the others
    carry on; an item that cannot be pickled, or can never fit, raises in the caller and
    changes nothing. What ``put`` accepted is delivered exactly once, unless the consumer
    that took it dies before using it.

    ``shutdown()`` tells consumers that producers are done: further ``put`` calls raise
    :class:`~safeshm.QueueShutDown`, and ``get`` raises it once the queue is drained.

    Example:
        >>> with SafeQueue.create(1 << 16) as jobs:
        ...     jobs.put({"id": 1})
        ...     jobs.get(timeout=1)
        {'id': 1}
    """

    _KIND = Kind.QUEUE
    #: What this backend promises (``safeshm.Guarantees``): shared memory on this machine;
    #: a dead process is known at once; nothing survives a reboot.
    guarantees: ClassVar[Guarantees] = SHM_GUARANTEES
    _LAYOUT = 3  # 3: consumer records for task tracking, join futex, held/credit words
    #              2: record headers carry a check of their length (1: a constant marker)
    _MAPPED = (
        "_hot",
        "_state",
        "_fw",
        "_mutex",
        "_futex_ptrs",
        "_core",
        "_recs",
        "_slots",
        "put",
        "put_nowait",
        "put_many",
        "get",
        "get_nowait",
        "get_many",
    )

    _core: Any  # safeshm._native.Queue, where this process uses the compiled core
    _hot: tuple[memoryview, memoryview, memoryview, memoryview, Any, int, memoryview]
    # (state words, futex words, ring bytes, ring 8-byte words, mutex pointer, capacity,
    #  the mutex's owner word)
    _state: memoryview
    _fw: memoryview
    _mutex: RobustMutex
    _futex_ptrs: tuple[Any, Any, Any]  # byrefs of the not-empty, not-full, join sequence words
    _capacity: int
    _maxsize: int
    _raw: bool
    _recs: memoryview  # the consumer records, int64 words
    _nrec: int
    _mine: tuple[int, int]  # (pid, word index of this process's count), (0, -1): none yet
    _slots: memoryview  # the lease slots, bytes
    _nleases: int
    _lease_size: int

    # -- construction ----------------------------------------------------------------------
    @overload
    @classmethod
    def create(
        cls,
        capacity: int,
        *,
        name: str | None = None,
        maxsize: int = 0,
        raw: Literal[False] = False,
        processes: int = DEFAULT_PROCESSES,
        leases: int = 0,
        lease_size: int | None = None,
    ) -> SafeQueue[Any]: ...
    @overload
    @classmethod
    def create(
        cls,
        capacity: int,
        *,
        name: str | None = None,
        maxsize: int = 0,
        raw: Literal[True],
        processes: int = DEFAULT_PROCESSES,
        leases: int = 0,
        lease_size: int | None = None,
    ) -> SafeQueue[bytes]: ...
    @overload
    @classmethod
    def create(
        cls,
        capacity: int,
        *,
        name: str | None = None,
        maxsize: int = 0,
        raw: bool,
        processes: int = DEFAULT_PROCESSES,
        leases: int = 0,
        lease_size: int | None = None,
    ) -> SafeQueue[Any]: ...

    @classmethod
    def create(
        cls,
        capacity: int,
        *,
        name: str | None = None,
        maxsize: int = 0,
        raw: bool = False,
        processes: int = DEFAULT_PROCESSES,
        leases: int = 0,
        lease_size: int | None = None,
    ) -> SafeQueue[Any]:
        """Create a new, empty queue.

        Args:
            capacity: ring size in bytes (rounded up to a multiple of 8). Each item takes
                its pickled size plus 8 to 15 bytes; the largest item that fits is
                ``capacity - 8`` bytes.
            name: the name to attach by; a random one when ``None``.
            maxsize: if positive, also at most this many items.
            raw: items are ``bytes``, stored as they are (no pickling).
            leases: how many items can be out on a lease at once (:meth:`get_leased`);
                0: none (at-least-once consumption not used).
            lease_size: the largest item (pickled bytes) that can be leased; each lease
                slot holds a copy of its item. ``None``: the largest item the ring holds
                (``capacity - 8``), up to 64 KiB.
            processes: how many consumer processes task tracking can follow at once
                (one record each, claimed at a process's first ``get``, freed when it
                dies): a ``get`` in one more live process raises
                :class:`~safeshm.ProcessTableFullError` (nothing taken).

        Raises:
            ValueError: ``capacity`` below 16, negative ``maxsize``, ``processes``
                outside 1..65536.
            SegmentExistsError: a segment with this name exists (a ``FileExistsError``).
            OSError: not enough room in /dev/shm (ENOSPC).
        """
        capacity = _check_count("capacity", capacity)
        maxsize = _check_count("maxsize", maxsize)
        if capacity < MIN_CAPACITY:
            raise ValueError(f"capacity must be at least {MIN_CAPACITY} bytes, got {capacity}")
        capacity = (capacity + 7) & ~7
        nrec = _check_processes(processes)
        nleases = _check_count("leases", leases)
        lease_size = _lease_size(nleases, lease_size, capacity)

        def init(mm: mmap.mmap) -> None:
            init_mutex(mm, _MUTEX_OFFSET)

        seg = Segment.create(
            name,
            kind=cls._KIND,
            layout=cls._LAYOUT,
            payload_size=_RING_OFFSET
            - HEADER_SIZE
            + capacity
            + 8 * _REC_WORDS * nrec
            + nleases * (8 * _SLOT_WORDS + lease_size),
            init=init,
            params=_PARAMS.pack(capacity, maxsize, int(bool(raw)), nrec, nleases, lease_size),
        )
        return cls._from_segment(seg)

    @classmethod
    def attach(cls, name: str) -> SafeQueue[Any]:
        """Attach to an existing queue by name.

        Raises:
            SegmentNotFoundError: no segment has this name (a ``FileNotFoundError``).
            IncompatibleSegmentError: the segment is not a ``SafeQueue``.
        """
        return cls._from_segment(cls._attach_segment(name))

    @overload
    @classmethod
    def open(
        cls,
        name: str,
        capacity: int,
        *,
        maxsize: int | None = None,
        raw: Literal[False] = False,
        processes: int | None = None,
        leases: int | None = None,
        lease_size: int | None = None,
    ) -> SafeQueue[Any]: ...
    @overload
    @classmethod
    def open(
        cls,
        name: str,
        capacity: int,
        *,
        maxsize: int | None = None,
        raw: Literal[True],
        processes: int | None = None,
        leases: int | None = None,
        lease_size: int | None = None,
    ) -> SafeQueue[bytes]: ...
    @overload
    @classmethod
    def open(
        cls,
        name: str,
        capacity: int,
        *,
        maxsize: int | None = None,
        raw: bool,
        processes: int | None = None,
        leases: int | None = None,
        lease_size: int | None = None,
    ) -> SafeQueue[Any]: ...

    @classmethod
    def open(
        cls,
        name: str,
        capacity: int,
        *,
        maxsize: int | None = None,
        raw: bool = False,
        processes: int | None = None,
        leases: int | None = None,
        lease_size: int | None = None,
    ) -> SafeQueue[Any]:
        """Attach to ``name``, creating it first if needed (race-free).

        An existing queue must be what this call would create: the same ``capacity``
        (after rounding up to a multiple of 8) and mode (``raw``), and the same
        ``maxsize``, ``processes``, ``leases`` and ``lease_size`` if given (``None``: the
        default when creating, any when attaching) -- the rule of every ``open()``.
        Otherwise :class:`~safeshm.IncompatibleSegmentError` names what differs.
        """
        want_capacity = (_check_count("capacity", capacity) + 7) & ~7
        if maxsize is not None:
            maxsize = _check_count("maxsize", maxsize)
        if processes is not None:
            processes = _check_processes(processes)
        # Bad input is refused whether or not the queue exists (lease_size needs leases).
        _lease_size(
            0 if leases is None else _check_count("leases", leases),
            lease_size,
            max(want_capacity, MIN_CAPACITY),
        )
        want_size = (
            None if lease_size is None else (_check_count("lease_size", lease_size) + 7) & ~7
        )

        def check(seg: Segment) -> None:
            have_capacity, have_maxsize, have_raw, have_nrec, have_leases, have_size = (
                _PARAMS.unpack_from(seg.header.params)
            )
            diffs = []
            if have_capacity != want_capacity:
                diffs.append(f"capacity {have_capacity}, expected {want_capacity}")
            if maxsize is not None and have_maxsize != maxsize:
                diffs.append(f"maxsize {have_maxsize}, expected {maxsize}")
            if bool(have_raw) != bool(raw):
                diffs.append(
                    f"{'raw (bytes)' if have_raw else 'pickling'}, expected "
                    f"{'raw (bytes)' if raw else 'pickling'}"
                )
            if processes is not None and have_nrec != processes:
                diffs.append(f"{have_nrec} consumer records, expected {processes}")
            if leases is not None and have_leases != leases:
                diffs.append(f"{have_leases} lease slots, expected {leases}")
            if want_size is not None and have_size != want_size:
                diffs.append(f"lease_size {have_size}, expected {want_size}")
            if diffs:
                raise IncompatibleSegmentError(f"SafeQueue {name!r} has " + "; ".join(diffs))

        return cls._open_segment(
            name,
            lambda: cls.create(
                capacity,
                name=name,
                maxsize=maxsize or 0,
                raw=raw,
                processes=DEFAULT_PROCESSES if processes is None else processes,
                leases=leases or 0,
                lease_size=lease_size,
            ),
            check,
        )

    def _bind(self, mm: mmap.mmap) -> None:
        if _compat.SYS_FUTEX is None:  # pragma: no cover - exotic architectures
            raise SafeShmError(
                f"SafeQueue needs the futex system call, whose number safeshm does not know "
                f"on this architecture ({os.uname().machine})"
            )
        capacity, maxsize, raw, nrec, nleases, lease_size = _PARAMS.unpack_from(
            self._seg.header.params
        )
        leases_bytes = nleases * (8 * _SLOT_WORDS + lease_size)
        if (
            capacity < MIN_CAPACITY
            or capacity % 8
            or not 1 <= nrec <= MAX_PROCESSES
            or lease_size % 8
            or (
                _RING_OFFSET + capacity + 8 * _REC_WORDS * nrec + leases_bytes
                != self._seg.header.total_size
            )
        ):
            raise SegmentCorruptedError(
                f"SafeQueue {self._seg.name!r} is damaged: a {capacity}-byte ring and {nrec} "
                f"consumer records do not fit its {self._seg.header.total_size} bytes"
            )
        if raw not in (0, 1) or maxsize > INT64_MAX:
            raise SegmentCorruptedError(
                f"SafeQueue {self._seg.name!r} is damaged: its parameters say raw={raw}, "
                f"maxsize={maxsize}"
            )
        _check_state(
            memoryview(mm)[_STATE_OFFSET : _STATE_OFFSET + CACHE_LINE].cast("q"),
            capacity,
            self._seg.name,
        )
        whole = memoryview(mm)
        self._capacity = capacity
        self._maxsize = maxsize
        self._raw = bool(raw)
        self._state = whole[_STATE_OFFSET : _STATE_OFFSET + CACHE_LINE].cast("q")
        self._fw = whole[_FUTEX_OFFSET : _FUTEX_OFFSET + CACHE_LINE].cast("I")
        self._mutex = RobustMutex(mm, _MUTEX_OFFSET, f"SafeQueue {self._seg.name!r}")
        ring = whole[_RING_OFFSET : _RING_OFFSET + capacity]
        self._nrec = nrec
        recs_end = _RING_OFFSET + capacity + 8 * _REC_WORDS * nrec
        self._recs = whole[_RING_OFFSET + capacity : recs_end].cast("q")
        self._nleases = nleases
        self._lease_size = lease_size
        self._slots = whole[recs_end:]  # lease slots: bytes (see the layout)
        self._mine = (0, -1)
        self._futex_ptrs = (
            ctypes.byref(ctypes.c_uint32.from_buffer(mm, _FUTEX_OFFSET + 4 * _NE_SEQ)),
            ctypes.byref(ctypes.c_uint32.from_buffer(mm, _FUTEX_OFFSET + 4 * _NF_SEQ)),
            ctypes.byref(ctypes.c_uint32.from_buffer(mm, _FUTEX_OFFSET + 4 * _JOIN_SEQ)),
        )
        self._hot = (
            self._state,
            self._fw,
            ring,
            ring.cast("Q"),
            self._mutex.pointer,
            capacity,
            self._mutex.owner,
        )
        if _compat.native is not None:
            # The compiled core, on the same ring and the same protocol: its methods
            # shadow the ctypes ones on this handle, which stay on the class
            # (``type(q).get(q)`` runs the ctypes code on the same segment).
            name = self._seg.name
            core = _compat.native.Queue(
                mm,
                f"SafeQueue {name!r}",
                f"{type(self).__name__} {name!r} is closed on this handle",
                name,
                capacity,
                maxsize,
                bool(raw),
                _encode_raw,
                nrec,
                weakref.WeakMethod(self._claim),
            )
            self._core = core
            d = self.__dict__
            d["put"] = core.put
            d["put_nowait"] = core.put_nowait
            d["put_many"] = core.put_many
            d["get"] = core.get
            d["get_nowait"] = core.get_nowait
            d["get_many"] = core.get_many

    # -- properties --------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """The ring's size in bytes."""
        return self._capacity

    @property
    def maxsize(self) -> int:
        """The item limit (0: only the capacity limits the queue)."""
        return self._maxsize

    @property
    def raw(self) -> bool:
        """Whether items are ``bytes`` passed through unpickled."""
        return self._raw

    def qsize(self) -> int:
        """The number of items (a snapshot: other processes may change it at once)."""
        state = self._state
        count: int = state[_PUTS] - state[_GETS]
        return count

    def empty(self) -> bool:
        """Whether the queue is empty (a snapshot)."""
        state = self._state
        return bool(state[_PUTS] == state[_GETS])

    def full(self) -> bool:
        """Whether no further item would fit right now (a snapshot)."""
        state = self._state
        if self._maxsize and state[_PUTS] - state[_GETS] >= self._maxsize:
            return True
        return self._capacity - (state[_TAIL] - state[_HEAD]) < _need(0)

    # -- put -----------------------------------------------------------------------------------
    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        """Put ``item`` at the end of the queue, waiting for room if needed.

        Args:
            item: any picklable object (``bytes`` for a raw queue).
            block: wait for room; if false, raise ``queue.Full`` at once instead.
            timeout: with ``block``, wait at most this many seconds (``None``: forever).

        Raises:
            queue.Full: no room within the timeout (or at once, without ``block``).
            ValueError: the item can never fit (larger than the capacity allows); nothing
                was changed. Also a negative timeout.
            QueueShutDown: the queue was shut down.
            pickle.PicklingError, TypeError, ...: the item could not be pickled; nothing
                was changed.
        """
        data = _encode_raw(item) if self._raw else _dumps(item, _PROTOCOL)
        n = len(data)
        need = (n + 15) & ~7
        deadline = _NEVER if timeout is None and block else _deadline(block, timeout)
        state, fw, ring, words, p, cap, owner = self._hot
        if need > cap:
            raise self._too_big(n)
        # Async-exception safe: see the pattern at the top of _lock.py.
        rc = -1
        if owner[0]:
            self._mutex.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                self._finish_acquire(rc, deadline, queue.Full)
            tail = state[_TAIL]
            free = cap - (tail - state[_HEAD])
            # free > cap or a misaligned tail: damaged (the slow path says so).
            if (
                free < need
                or free > cap
                or tail & 7
                or state[_SHUT]
                or (self._maxsize and state[_PUTS] - state[_GETS] >= self._maxsize)
            ):
                tail = self._wait_for_room(need, 1, deadline)
            pos = tail % cap
            words[pos >> 3] = n | ((n ^ _MARK_KEY) << 32)
            start = pos + 8
            if start == cap:
                start = 0
            end = start + n
            if end <= cap:
                ring[start:end] = data
            else:
                split = cap - start
                view = memoryview(data)
                ring[start:] = view[:split]
                ring[: end - cap] = view[split:]
            puts = state[_PUTS]  # counters wrap, as the compiled core's (only damage gets there)
            state[_TAIL] = tail + need  # the commit: one store makes the item visible
            state[_PUTS] = puts + 1 if puts < INT64_MAX else INT64_MIN
            fw[_NE_SEQ] = (fw[_NE_SEQ] + 1) & _SEQ_MASK
            sleepers = fw[_NE_SLEEP]
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
        if sleepers:
            self._wake(_NE_SEQ, 1, sleepers)

    def put_nowait(self, item: T) -> None:
        """``put(item, block=False)``."""
        self.put(item, False)

    def put_many(  # noqa: PLR0912, PLR0915 - inlined lock pattern
        self,
        items: Iterable[T],
        block: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Put all ``items`` at the end of the queue at once: consumers see all or none of
        them, in order, with no other producer's items in between.

        Raises:
            queue.Full: not enough room for all of them within the timeout; none was put.
            ValueError: the batch can never fit (more bytes than the capacity allows, or
                more items than ``maxsize``); none was put.
            QueueShutDown: the queue was shut down.
        """
        # The whole batch is laid out -- headers, payloads, padding -- outside the mutex;
        # under it, one copy (two where the ring wraps) and one commit.
        parts: list[Any] = []
        k = 0
        if self._raw:
            encoded: Iterable[Any] = (_encode_raw(item) for item in items)
        else:
            encoded = (_dumps(item, _PROTOCOL) for item in items)
        for data in encoded:
            n = len(data)
            parts += (_HEADER_WORD.pack(n | ((n ^ _MARK_KEY) << 32)), data, _PADDING[: -n & 7])
            k += 1
        if not k:
            return
        blob = b"".join(parts)
        total = len(blob)
        deadline = _NEVER if timeout is None and block else _deadline(block, timeout)
        state, fw, ring, _, p, cap, owner = self._hot
        if total > cap:
            raise ValueError(
                f"SafeQueue {self._seg.name!r}: a batch of {k} items needs {total} bytes, "
                f"which can never fit the {cap}-byte ring; nothing was put"
            )
        if self._maxsize and k > self._maxsize:
            raise ValueError(
                f"SafeQueue {self._seg.name!r}: a batch of {k} items exceeds maxsize "
                f"{self._maxsize}; nothing was put"
            )
        rc = -1
        if owner[0]:
            self._mutex.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                self._finish_acquire(rc, deadline, queue.Full)
            tail = state[_TAIL]
            free = cap - (tail - state[_HEAD])
            if (
                free < total
                or free > cap
                or tail & 7
                or state[_SHUT]
                or (self._maxsize and state[_PUTS] - state[_GETS] + k > self._maxsize)
            ):
                tail = self._wait_for_room(total, k, deadline)
            pos = tail % cap
            end = pos + total
            if end <= cap:
                ring[pos:end] = blob
            else:  # records are 8-aligned and so is the split: no header is cut in two
                split = cap - pos
                view = memoryview(blob)
                ring[pos:] = view[:split]
                ring[: end - cap] = view[split:]
            puts = _wrap64(state[_PUTS] + k)  # computed first: no call after the commit
            state[_TAIL] = tail + total  # the commit: the whole batch becomes visible at once
            state[_PUTS] = puts
            fw[_NE_SEQ] = (fw[_NE_SEQ] + 1) & _SEQ_MASK
            sleepers = fw[_NE_SLEEP]
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
        if sleepers:
            self._wake(_NE_SEQ, k, sleepers)

    def _damaged(self, at: int) -> SegmentCorruptedError:
        state = self._state
        return SegmentCorruptedError(
            f"SafeQueue {self._seg.name!r} is damaged: no valid record at byte {at} of the "
            f"ring (read position {state[_HEAD]}, write position {state[_TAIL]}, capacity "
            f"{self._capacity}); nothing was taken or put"
        )

    def _too_big(self, n: int) -> ValueError:
        return ValueError(
            f"SafeQueue {self._seg.name!r}: an item of {n} bytes"
            f"{'' if self._raw else ' (pickled)'} can never fit a {self._capacity}-byte ring "
            f"(the largest is {self._capacity - _RECORD_HEADER} bytes); nothing was put"
        )

    # -- get -----------------------------------------------------------------------------------
    def get(self, block: bool = True, timeout: float | None = None) -> T:  # noqa: PLR0912, PLR0915 - inlined lock pattern
        """Remove and return the item at the front of the queue, waiting for one if needed.

        Raises:
            queue.Empty: no item within the timeout (or at once, without ``block``).
            QueueShutDown: the queue was shut down and is empty.
            ValueError: a negative timeout.
            ItemDecodeError: the item was taken but could not be unpickled here; its
                pickled bytes are on the exception (``undecodable``).
        """
        deadline = _NEVER if timeout is None and block else _deadline(block, timeout)
        state, fw, ring, words, p, cap, owner = self._hot
        mine, ci = self._mine
        if mine != _compat.pid:
            ci = self._claim(-1.0 if deadline is None else deadline)
        recs = self._recs
        rc = -1
        if owner[0]:
            self._mutex.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                self._finish_acquire(rc, deadline, queue.Empty)
            head = state[_HEAD]
            tail = state[_TAIL]
            if head == tail:
                head = self._wait_for_item(deadline)
                tail = state[_TAIL]
            pos = head % cap
            word = words[pos >> 3]
            n = word & _LEN_MASK
            # What the ring says must be a record (its length checks out) inside what was
            # put: otherwise damage, never returned as an item.
            need = (n + 15) & ~7
            if (word >> 32) ^ n != _MARK_KEY or head & 7 or need > tail - head or tail - head > cap:
                raise self._damaged(head)
            start = pos + 8
            if start == cap:
                start = 0
            end = start + n
            if end <= cap:
                data = ring[start:end].tobytes()
            else:
                data = ring[start:].tobytes() + ring[: end - cap].tobytes()
            count, held, gets = recs[ci], state[_HELD], state[_GETS]
            state[_HEAD] = head + need  # the commit: the item is taken
            # One more unfinished task of this process (see the layout). Counters wrap, as
            # the compiled core's: only damage takes one to the limit.
            recs[ci] = count + 1 if count < INT64_MAX else INT64_MIN
            state[_HELD] = held + 1 if held < INT64_MAX else INT64_MIN
            state[_GETS] = gets + 1 if gets < INT64_MAX else INT64_MIN
            fw[_NF_SEQ] = (fw[_NF_SEQ] + 1) & _SEQ_MASK
            sleepers = fw[_NF_SLEEP]
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
        if sleepers:
            self._wake(_NF_SEQ, 1, sleepers)
        if self._raw:
            return data  # type: ignore[return-value]
        try:
            return _loads(data)  # type: ignore[no-any-return]
        except Exception as e:
            raise self._undecodable([], [data], e) from e

    def get_nowait(self) -> T:
        """``get(block=False)``."""
        return self.get(False)

    def get_many(  # noqa: PLR0912, PLR0915 - inlined lock pattern
        self,
        max_items: int,
        block: bool = True,
        timeout: float | None = None,
    ) -> list[T]:
        """Remove and return up to ``max_items`` items from the front of the queue, waiting
        (as :meth:`get` does) only until there is at least one.

        Items are unpickled after they are taken. If some cannot be, nothing of the batch
        is lost: :class:`~safeshm.ItemDecodeError` carries the ones that could (``items``,
        in order) and the pickled bytes of the others (``undecodable``).

        Raises:
            queue.Empty: no item within the timeout (or at once, without ``block``).
            QueueShutDown: the queue was shut down and is empty.
            ValueError: ``max_items`` below 1, or a negative timeout.
            ItemDecodeError: some of the items taken could not be unpickled (see above).
        """
        if isinstance(max_items, bool) or not isinstance(max_items, int):
            raise TypeError(f"max_items must be an int, not {type(max_items).__name__}")
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        deadline = _NEVER if timeout is None and block else _deadline(block, timeout)
        state, fw, ring, words, p, cap, owner = self._hot
        mine, ci = self._mine
        if mine != _compat.pid:
            ci = self._claim(-1.0 if deadline is None else deadline)
        recs = self._recs
        rc = -1
        if owner[0]:
            self._mutex.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                self._finish_acquire(rc, deadline, queue.Empty)
            head = state[_HEAD]
            tail = state[_TAIL]
            if head == tail:
                head = self._wait_for_item(deadline)
                tail = state[_TAIL]
            # Walk the headers to see how far max_items reach, then copy that whole span
            # out at once (twice where the ring wraps) and commit; parse it after unlocking.
            end, taken = _span_end(words, head, tail, cap, max_items)
            if taken < 0:
                raise self._damaged(end)
            start = head % cap
            stop = start + (end - head)
            if stop <= cap:
                span = ring[start:stop].tobytes()
            else:
                span = ring[start:].tobytes() + ring[: stop - cap].tobytes()
            count, held, gets = (
                _wrap64(recs[ci] + taken),  # computed first: no call after the commit
                _wrap64(state[_HELD] + taken),
                _wrap64(state[_GETS] + taken),
            )
            state[_HEAD] = end  # the commit: all of them are taken at once
            recs[ci] = count
            state[_HELD] = held
            state[_GETS] = gets
            fw[_NF_SEQ] = (fw[_NF_SEQ] + 1) & _SEQ_MASK
            sleepers = fw[_NF_SLEEP]
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
        if sleepers:
            self._wake(_NF_SEQ, taken, sleepers)
        return self._decode(span, taken)

    def _decode(self, span: bytes, taken: int) -> list[Any]:
        """The ``taken`` items of a span that ``get_many`` copied out of the ring."""
        # Unpickled after the commit and outside the lock (unpickling runs arbitrary code,
        # which must never run holding the queue). An item that fails does not cost the
        # batch: the others, and its bytes, go to the caller on the exception.
        view = memoryview(span)
        out: list[Any] = []
        failed: list[bytes] = []
        failed_at: list[int] = []
        first: Exception | None = None
        at = 0
        raw = self._raw
        for k in range(taken):
            n = _HEADER_WORD.unpack_from(span, at)[0] & _LEN_MASK
            payload = view[at + 8 : at + 8 + n]
            at += (n + 15) & ~7
            if raw:
                out.append(payload.tobytes())
                continue
            try:
                out.append(_loads(payload))
            except Exception as e:  # noqa: BLE001 - re-raised below, with the batch
                failed.append(payload.tobytes())
                failed_at.append(k)
                first = first or e
        if first is not None:
            raise self._undecodable(out, failed, first, failed_at) from first
        return out

    def _undecodable(
        self,
        items: list[Any],
        failed: list[bytes],
        first: Exception,
        failed_at: list[int] | None = None,
    ) -> ItemDecodeError:
        return _undecodable_error(
            self._seg.name, items, failed, first, failed_at if failed_at is not None else [0]
        )

    # -- waiting ---------------------------------------------------------------------------------
    # The wait functions are called with the mutex held and return with it held (or raise,
    # still holding it: the caller's `finally` releases it).
    #
    # A waiter sets the direction's "sleepers" word to a token (the sequence word it saw,
    # plus one: never 0), releases the mutex and sleeps on the sequence word. A waker bumps
    # the sequence word under the mutex, notes the sleepers token, and wakes after releasing
    # the mutex (a woken process then finds it free). No wake-up can be missed: a waiter that
    # has not reached its futex wait yet finds the sequence word changed and does not sleep.
    # If a wake finds nobody asleep (a sleeper that died, or none had slept yet), the waker
    # lowers the token -- unless a new sleeper has set a new one meanwhile -- so that later
    # puts and gets make no system call at all.
    def _wait_for_room(self, need: int, k: int, deadline: float | None) -> int:
        state = self._state
        while True:
            if state[_SHUT]:
                raise QueueShutDown(f"SafeQueue {self._seg.name!r} is shut down")
            tail: int = state[_TAIL]
            if tail & 7 or not 0 <= tail - state[_HEAD] <= self._capacity:
                raise self._damaged(state[_HEAD])
            if self._capacity - (tail - state[_HEAD]) >= need and not (
                self._maxsize and state[_PUTS] - state[_GETS] + k > self._maxsize
            ):
                return tail
            # No spinning here: a producer that finds the ring full is better off asleep
            # while the consumers drain several items (measured: spinning producers
            # ping-pong the mutex with consumers copying large items out).
            if deadline is None or not self._sleep(_NF_SEQ, deadline, queue.Full):
                raise queue.Full

    def _wait_for_item(self, deadline: float | None) -> int:
        state = self._state
        spun = False
        while True:
            head: int = state[_HEAD]
            if head != state[_TAIL]:
                return head
            if state[_SHUT]:
                raise QueueShutDown(f"SafeQueue {self._seg.name!r} is shut down and empty")
            if deadline is None:
                raise queue.Empty
            if not spun and _compat.spinning_helps():
                spun = True
                self._spin(_TAIL, state[_TAIL], deadline)
            elif not self._sleep(_NE_SEQ, deadline, queue.Empty):
                raise queue.Empty

    def _spin(self, word: int, seen: int, deadline: float) -> None:
        """Briefly watch ``state[word]`` without the mutex before going to sleep.

        In a steady stream the other side usually acts within microseconds; catching that
        here saves the sleep and the wake-up (two system calls and a context switch per
        item). Bounded, and it never sleeps: past it, the caller sleeps in the kernel. Only
        when another CPU is available (see ``_compat.spinning_helps``).
        """
        state = self._state
        p = self._hot[4]
        _unlock(p)
        try:
            _watch(state, word, seen)
        finally:
            self._relock(p, deadline, queue.Empty)

    def _sleep(self, which: int, deadline: float, timed_out: type[Exception]) -> bool:
        """Sleep on a sequence word until woken or ``deadline``; False if it has passed.

        Releases and retakes the mutex (raising ``timed_out`` if that takes past the
        deadline); the caller re-checks its condition.
        """
        if deadline == math.inf:
            pts = _SLICE_TIMESPEC
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if left >= _WAIT_SLICE:
                pts = _SLICE_TIMESPEC
            else:
                frac, whole = math.modf(left)
                pts = ctypes.byref(_compat.Timespec(int(whole), int(frac * 1e9)))
        fw = self._fw
        seen = fw[which]
        if seen > _SEQ_MASK:  # only ever stored masked: the word was damaged
            raise SegmentCorruptedError(
                f"SafeQueue {self._seg.name!r} is damaged: a wake-up sequence word holds "
                f"{seen:#x}, above {_SEQ_MASK:#x}"
            )
        fw[which + 1] = seen + 1  # the sleepers token: never 0
        p = self._hot[4]
        _unlock(p)
        try:
            # futex(addr, FUTEX_WAIT, val, timeout): the kernel ignores the last two
            # arguments for this operation, so they are not passed (each costs ctypes time).
            _futex_wait(_SYS_FUTEX, self._futex_ptrs[which >> 1], _FUTEX_WAIT, seen, pts)
        finally:
            self._relock(p, deadline, timed_out)
        return True

    def _relock(self, p: Any, deadline: float, timed_out: type[Exception]) -> None:
        """Retake the mutex a wait released. The caller's ``finally`` unlocks it (an
        unlock of a mutex this thread does not hold is a harmless EPERM)."""
        rc = -1
        try:
            rc = _trylock(p)
            if rc:
                self._finish_acquire(rc, deadline, timed_out)
        except BaseException:
            if rc and rc != EDEADLK:
                # Maybe an EOWNERDEAD acquire this exception cut short: the caller's
                # finally unlocks, which must not leave the mutex unrecoverable.
                _consistent(p)
            raise

    def _wake(self, which: int, n: int, token: int) -> None:
        """Wake up to ``n`` sleepers on a sequence word. Called without the mutex."""
        ptr = self._futex_ptrs[which >> 1]
        # futex(addr, FUTEX_WAKE, n): the remaining arguments are ignored by the kernel.
        woken = _futex_wake(_SYS_FUTEX, ptr, _FUTEX_WAKE, min(n, 0x7FFFFFFF))
        if woken == 0:
            with self._mutex_held():
                fw = self._fw
                if fw[which + 1] == token:
                    fw[which + 1] = 0

    def _finish_acquire(self, rc: int, deadline: float | None, timed_out: type[Exception]) -> None:
        """The mutex's trylock returned ``rc``: wait for it until ``deadline`` (then raise
        ``timed_out``), or recover it from a dead holder (then repair what that holder may
        have left half-done). The deadline covers the mutex too: a holder that is stuck
        (SIGSTOPped) does not stretch a ``timeout=``. ``None`` (no blocking) waits for the
        mutex for at most :data:`_NOWAIT_GRACE`: a running process holds it for
        microseconds, so a holder that keeps it longer is stopped or stuck, and a call
        that must not block says it could not proceed (``queue.Empty``/``queue.Full``)."""
        if deadline is None:
            deadline = time.monotonic() + _NOWAIT_GRACE
        got = self._mutex.finish_acquire(rc, deadline)
        if got == RECOVERED:
            self._repair()
        elif got == TIMED_OUT:
            raise timed_out

    def _repair(self) -> None:
        """After a holder died: recount the items, and wake every sleeper, since the dead
        holder may have changed the queue without waking anyone.

        head and tail are only ever changed by single stores after the data is in place, so
        they are consistent whatever instant the holder died at; the put and get totals are
        updated after them and may be one commit behind.
        """
        state, _, _, words, _, cap, _ = self._hot
        head, tail = state[_HEAD], state[_TAIL]
        count = 0
        at = head
        if head & 7 or not 0 <= tail - head <= cap:
            raise self._damaged(head)
        while at != tail:
            header = words[(at % cap) >> 3]
            n = header & _LEN_MASK
            if (header >> 32) ^ n != _MARK_KEY or at + ((n + 15) & ~7) > tail:
                raise self._damaged(at)
            at += (n + 15) & ~7
            count += 1
        state[_GETS] = state[_PUTS] - count
        _rederive_tasks(state, self._recs, self._nrec)
        fw = self._fw
        for which in (_NE_SEQ, _NF_SEQ, _JOIN_SEQ):
            fw[which] = (fw[which] + 1) & _SEQ_MASK
            ptr = self._futex_ptrs[which >> 1]
            _compat.futex_wake_call(_SYS_FUTEX, ptr, _compat.FUTEX_WAKE, 0x7FFFFFFF)

    # -- shutdown --------------------------------------------------------------------------------
    def shutdown(self, immediate: bool = False) -> None:
        """Tell every process that no more items will come (as ``queue.Queue.shutdown``
        does in Python 3.13).

        Afterwards ``put`` raises :class:`~safeshm.QueueShutDown`; ``get`` returns what is
        left and then raises it -- at once if ``immediate``, which discards what is left.
        Every blocked ``put`` and ``get`` wakes up. It cannot be undone.
        """
        with self._mutex_held():
            state = self._state
            state[_SHUT] = _SHUTDOWN_NOW if immediate else max(state[_SHUT], _SHUTDOWN)
            if immediate:
                state[_HEAD] = state[_TAIL]
                state[_GETS] = state[_PUTS]
                # The discarded items are no longer unfinished tasks (as queue.Queue).
                _rederive_tasks(state, self._recs, self._nrec)
            fw = self._fw
            # Written out, not a loop: see _span_end.
            fw[_NE_SEQ] = (fw[_NE_SEQ] + 1) & _SEQ_MASK
            fw[_NF_SEQ] = (fw[_NF_SEQ] + 1) & _SEQ_MASK
            fw[_JOIN_SEQ] = (fw[_JOIN_SEQ] + 1) & _SEQ_MASK
            tokens = (
                (_NE_SEQ, fw[_NE_SEQ + 1]),
                (_NF_SEQ, fw[_NF_SEQ + 1]),
                (_JOIN_SEQ, fw[_JOIN_SEQ + 1]),
            )
        for which, token in tokens:
            self._wake(which, 0x7FFFFFFF, token)

    # -- task tracking ---------------------------------------------------------------------
    # queue.Queue's task_done()/join(), across processes: every get adds to its process's
    # record count in the section that takes the item (a process killed right after its
    # get has either not taken the item or has counted it); task_done lowers it. The
    # records of dead processes are reaped by join() while it waits (and by a claim that
    # finds the table full): their counts stop counting, and join() warns.
    @property
    def unfinished_tasks(self) -> int:
        """Items put and not yet marked done with :meth:`task_done` (a snapshot, as
        ``queue.Queue.unfinished_tasks``). A dead consumer's tasks count until a
        :meth:`join` (or a new consumer that needs its record) reaps it."""
        return max(0, _unfinished(self._state))

    def task_done(self) -> None:
        """Mark one item got from the queue as processed (``queue.Queue.task_done``).

        Counted against this process's items; a process that got none (an item handed
        over from another process) marks one of another process's done, or -- as
        ``queue.Queue`` allows -- one still in the queue.

        Raises:
            ValueError: called more times than there were items put (nothing changed).
        """
        mine, ci = self._mine
        if mine != _compat.pid:
            ci = -1
        died: list[tuple[int, int]] = []
        with self._mutex_held():
            if ci < 0 or self._recs[ci] <= 0:
                # Another process's item: a dead consumer's count must not take it (its
                # tasks stop counting; a live one's item would stay unfinished).
                died = self._reap_locked()
            left = _mark_done(self._state, self._recs, self._nrec, ci)
            token = 0
            if left == 0:
                fw = self._fw
                fw[_JOIN_SEQ] = (fw[_JOIN_SEQ] + 1) & _SEQ_MASK
                token = fw[_JOIN_SLEEP]
        if token:
            self._wake(_JOIN_SEQ, 0x7FFFFFFF, token)
        self._warn_died(died)
        if left < 0:
            raise ValueError("task_done() called too many times")

    def join(self, timeout: float | None = None) -> bool:
        """Block until every item put has been got and marked done (``queue.Queue.join``,
        plus a timeout).

        A consumer process that died with unfinished tasks does not leave it waiting:
        while it waits, ``join`` checks for dead consumers at least every 0.1 s, drops
        their counts and warns (:class:`~safeshm.HolderDiedWarning`).

        Args:
            timeout: wait at most this many seconds (``None``: until done).

        Returns:
            ``True`` when no task is unfinished, ``False`` if ``timeout`` passed first.

        Raises:
            ValueError: a negative timeout.
            SegmentClosedError: this handle was closed (also by another thread while
                ``join`` waited).
        """
        seconds = check_timeout(timeout)
        deadline = _NEVER if seconds is None else time.monotonic() + seconds
        p = self._hot[4]
        died: list[tuple[int, int]] = []
        lost: list[int] = []
        rc = -1
        if self._hot[6][0]:
            self._mutex.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                self._finish_acquire(rc, deadline, _JoinTimeout)
            done = self._wait_joined(deadline, died, lost)
        except _JoinTimeout:
            done = False
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
        self._warn_redelivered(lost)
        self._warn_died(died)
        return done

    def _wait_joined(self, deadline: float, died: list[tuple[int, int]], lost: list[int]) -> bool:
        """join()'s wait, holding the mutex (returns holding it)."""
        state = self._state
        while True:
            if self._nleases:  # before reaping: a dead holder's leased item is queued again
                self._redeliver(lost)
            died += self._reap_locked()
            if _unfinished(state) <= 0 and not (
                # a dead holder's leased item that found no room in the ring yet
                self._nleases and _due_slots(self._slots, self._nleases, self._lease_size)
            ):
                return True
            if not self._sleep(_JOIN_SEQ, deadline, _JoinTimeout):
                return False
            if self._seg.closed:  # by another thread while this one slept
                self._raise_closed()

    def _reap_locked(self) -> list[tuple[int, int]]:
        """Free the records of dead consumers (holding the mutex); ``(pid, count)`` of
        those that had unfinished tasks. Wakes joiners if any was freed."""
        died = _reap_records(self._recs, self._nrec)
        if died:
            _rederive_tasks(self._state, self._recs, self._nrec)
            fw = self._fw
            fw[_JOIN_SEQ] = (fw[_JOIN_SEQ] + 1) & _SEQ_MASK
        return [d for d in died if d[1]]

    def _warn_died(self, died: list[tuple[int, int]]) -> None:
        for pid, count in died:
            warnings.warn(
                f"SafeQueue {self._seg.name!r}: consumer process {pid} died with {count} "
                f"unfinished task(s); they no longer count for join()",
                HolderDiedWarning,
                stacklevel=user_stacklevel(),
            )

    def _claim(self, deadline: float = _NEVER) -> int:
        """Word index (in ``_recs``) of this process's count, claiming a record if needed
        (a get's first; the compiled core calls this too, through a weak reference).
        ``deadline``: the get's (negative: a non-blocking get); past it, ``queue.Empty``.
        """
        mine, ci = self._mine
        if mine == _compat.pid:
            return ci
        died: list[tuple[int, int]] = []
        p = self._hot[4]
        rc = -1
        if self._hot[6][0]:
            self._mutex.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                self._finish_acquire(rc, None if deadline < 0 else deadline, queue.Empty)
            i = self._claim_locked(died)
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
        self._warn_died(died)
        if i < 0:
            raise ProcessTableFullError(
                f"SafeQueue {self._seg.name!r}: all {self._nrec} consumer records are "
                "owned by live processes; create it with a larger processes="
            )
        self._mine = (_compat.pid, i + _R_COUNT)
        return i + _R_COUNT

    def _claim_locked(self, died: list[tuple[int, int]]) -> int:
        recs = self._recs
        i = _find_record(recs, self._nrec)
        if i < 0:
            died += self._reap_locked()
            i = _find_record(recs, self._nrec)
        return i

    # -- at-least-once consumption (leases) -----------------------------------------------
    # A leased get copies the item into a lease slot (committed: the slot's state word)
    # before it takes it from the ring (committed: head). An item whose holder died, or
    # whose lease expired, is put back in front of head (the ring's free space is there)
    # by the next get_leased()/leased()/release in any process (a blocked one checks every
    # slice): the next get of any kind returns it first.
    def get_leased(self, timeout: float | None = None, *, lease: float = 30.0) -> tuple[T, Lease]:
        """Take the item at the front with a lease: it is delivered again (at the front)
        if this process dies, or ``lease`` seconds pass, before :meth:`Lease.ack`
        (``math.inf``, or anything from ``threading.TIMEOUT_MAX`` up: never expires).

        Returns:
            ``(item, lease)``; call ``lease.ack()`` once the item is handled.

        Raises:
            queue.Empty: no item within ``timeout`` (``None``: wait forever; 0: at once).
            ValueError: a negative or NaN ``lease``/``timeout``; the queue was created
                without ``leases=``; the item is larger than ``lease_size`` (nothing taken).
            LeaseTableFullError: every lease slot is in use (nothing taken).
            QueueShutDown: the queue was shut down and is empty.
        """
        seconds = check_timeout(lease)
        if seconds is None or seconds <= 0:
            raise ValueError(f"lease must be a positive number of seconds, got {lease!r}")
        if not self._nleases:
            raise ValueError(
                f"SafeQueue {self._seg.name!r} was created without leases= (no lease slots)"
            )
        wait = check_timeout(timeout)
        deadline = _NEVER if wait is None else time.monotonic() + wait
        mine, ci = self._mine
        if mine != _compat.pid:
            ci = self._claim(deadline)
        p = self._hot[4]
        died: list[int] = []
        rc = -1
        if self._hot[6][0]:
            self._mutex.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                self._finish_acquire(rc, deadline, queue.Empty)
            data, slot, lease_id = self._take_leased(deadline, ci, seconds, died)
            fw = self._fw
            sleepers = fw[_NF_SLEEP]
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
        self._warn_redelivered(died)
        if sleepers:
            self._wake(_NF_SEQ, 1, sleepers)
        item: T = data if self._raw else _loads(data)  # type: ignore[assignment]
        return item, Lease(self, slot, lease_id)

    def leased(self, timeout: float | None = None, *, lease: float = 30.0) -> GeneratorHold[T]:
        """``with q.leased() as item:`` -- :meth:`get_leased`, acknowledged when the block
        ends normally; on an exception the item is released at once (delivered again, at
        the front) and the exception propagates."""
        return GeneratorHold(functools.partial(self._leased, timeout, lease))

    def _leased(self, timeout: float | None, lease: float) -> Generator[T | bool, object, None]:
        item, handle = self.get_leased(timeout, lease=lease)
        done = False
        try:
            done = (yield item) is None  # sent the block's exception type, or None
        finally:
            if done:
                handle.ack()
            else:
                handle.release()  # an exception, or a signal's landing right here
        yield False  # __exit__'s result: an exception from the block propagates

    def reclaim_leases(self) -> int:
        """Deliver again now the items whose holder died or whose lease expired (any
        get_leased() does this first); how many."""
        died: list[int] = []
        with self._mutex_held():
            n = self._redeliver(died)
        self._warn_redelivered(died)
        return n

    def _take_leased(
        self, deadline: float, ci: int, seconds: float, died: list[int]
    ) -> tuple[bytes, int, int]:
        """get_leased()'s section (holding the mutex)."""
        state = self._state
        while True:
            self._redeliver(died)
            head, tail = state[_HEAD], state[_TAIL]
            if head != tail:
                break
            if state[_SHUT]:
                raise QueueShutDown(f"SafeQueue {self._seg.name!r} is shut down and empty")
            if not self._sleep(_NE_SEQ, deadline, queue.Empty):
                raise queue.Empty
            if self._seg.closed:
                self._raise_closed()
        end, taken = _span_end(self._hot[3], head, tail, self._capacity, 1)
        if taken != 1:
            raise self._damaged(end)
        cap = self._capacity
        n = (self._hot[3][(head % cap) >> 3]) & _LEN_MASK
        if n > self._lease_size:
            raise ValueError(
                f"SafeQueue {self._seg.name!r}: the item at the front is {n} bytes, larger "
                f"than lease_size {self._lease_size}; nothing was taken"
            )
        slot = _free_slot(self._slots, self._nleases, self._lease_size)
        if slot < 0:
            raise LeaseTableFullError(
                f"SafeQueue {self._seg.name!r}: all {self._nleases} lease slots are in use; "
                "nothing was taken"
            )
        data = _ring_read(self._hot[2], cap, head + 8, n)
        last = state[_LEASE_SEQ]
        lease_id = last + 1 if 0 <= last < INT64_MAX else 1  # > 0; wraps, at damage only
        state[_LEASE_SEQ] = lease_id
        _fill_slot(
            self._slots,
            slot,
            self._lease_size,
            data,
            lease_id=lease_id,
            # inf (check_timeout's "forever", from threading.TIMEOUT_MAX up): never due.
            deadline=INT64_MAX
            if seconds == _NEVER
            else min(INT64_MAX, time.monotonic_ns() + int(seconds * 1e9)),
        )
        recs = self._recs
        count, held, gets = recs[ci], state[_HELD], state[_GETS]
        state[_HEAD] = end  # the commit: taken (and leased: the slot is filled)
        recs[ci] = count + 1 if count < INT64_MAX else INT64_MIN
        state[_HELD] = held + 1 if held < INT64_MAX else INT64_MIN
        state[_GETS] = gets + 1 if gets < INT64_MAX else INT64_MIN
        fw = self._fw
        fw[_NF_SEQ] = (fw[_NF_SEQ] + 1) & _SEQ_MASK
        return data, slot, lease_id

    def _redeliver(self, died: list[int]) -> int:
        """Put back in front of head the items of expired or orphaned leases, newest
        first (so the oldest ends up at the front). Holding the mutex."""
        due = _due_slots(self._slots, self._nleases, self._lease_size)
        moved = 0
        for _, slot, dead in due:  # a function call per slot: see _span_end
            if self._put_back(slot, dead, died):
                moved += 1
        if moved:
            fw = self._fw
            fw[_NE_SEQ] = (fw[_NE_SEQ] + 1) & _SEQ_MASK
            fw[_JOIN_SEQ] = (fw[_JOIN_SEQ] + 1) & _SEQ_MASK
        return moved

    def _put_back(self, slot: int, dead: bool, died: list[int]) -> bool:
        state = self._state
        words = _slot_words(self._slots, slot, self._lease_size)
        n = words[_S_LEN]
        need = (n + 15) & ~7
        head, tail = state[_HEAD], state[_TAIL]
        if self._capacity - (tail - head) < need or head < need:
            return False  # no room now: retried by the next get_leased
        at = head - need
        start = slot * (8 * _SLOT_WORDS + self._lease_size) + 8 * _SLOT_WORDS
        _ring_write(self._hot[2], self._capacity, at, n, self._slots[start : start + n])
        holder, start = words[_S_PID], words[_S_START]
        gets = state[_GETS]
        state[_HEAD] = at  # the commit: in the queue again, at the front
        words[_S_STATE] = 0  # the lease is gone (a death between: delivered twice)
        state[_GETS] = gets - 1 if gets > INT64_MIN else INT64_MAX
        # Its holder (live: expired; dead: not reaped yet) no longer holds it as a task:
        # queued again, it counts as one there.
        _drop_task(state, self._recs, self._nrec, holder, start)
        if dead:
            died.append(int(holder))
        return True

    def _warn_redelivered(self, died: list[int]) -> None:
        for pid in died:
            warnings.warn(
                f"SafeQueue {self._seg.name!r}: process {pid} died holding a leased item; "
                "it is delivered again",
                HolderDiedWarning,
                stacklevel=user_stacklevel(),
            )

    def _end_lease(self, slot: int, lease_id: int, redeliver: bool) -> None:
        died: list[int] = []
        with self._mutex_held():
            words = _slot_words(self._slots, slot, self._lease_size)
            ok = words[_S_STATE] == _ACTIVE and words[_S_ID] == lease_id
            if ok:
                if redeliver:
                    words[_S_DEADLINE] = 0
                    self._redeliver(died)
                else:
                    words[_S_STATE] = 0  # the commit: acknowledged
        if not ok:
            raise LeaseExpiredError(
                f"SafeQueue {self._seg.name!r}: lease {lease_id} ended before this "
                f"{'release' if redeliver else 'ack'} (expired, or already acknowledged): "
                "the item was or will be delivered again; nothing was changed"
            )
        if redeliver:
            self._wake(_NE_SEQ, 1, self._fw[_NE_SLEEP] or 1)

    def _before_close(self) -> None:
        # Wake the joiners (of every process: a spare wake-up for the others) so that
        # this process's see the handle closed at once.
        if not self._seg.closed:
            _futex_wake(_SYS_FUTEX, self._futex_ptrs[2], _FUTEX_WAKE, 0x7FFFFFFF)

    @property
    def is_shutdown(self) -> bool:
        """Whether :meth:`shutdown` was called (by any process)."""
        return bool(self._state[_SHUT])

    def _mutex_held(self) -> Held:
        return Held(self._mutex, self._repair)

    # -- introspection -------------------------------------------------------------------------
    def statistics(self) -> QueueStatistics:
        """A snapshot for monitoring (never blocks)."""
        state = self._state
        return QueueStatistics(
            name=self._seg.name,
            items=state[_PUTS] - state[_GETS],
            bytes_used=state[_TAIL] - state[_HEAD],
            capacity=self._capacity,
            maxsize=self._maxsize,
            raw=self._raw,
            puts=state[_PUTS],
            gets=state[_GETS],
            shutdown=bool(state[_SHUT]),
            creator_pid=self._seg.header.creator_pid,
            unfinished_tasks=self.unfinished_tasks,
            consumers=sum(1 for k in range(self._nrec) if self._recs[k * _REC_WORDS]),
            processes=self._nrec,
            leased=sum(
                1
                for k in range(self._nleases)
                if _slot_words(self._slots, k, self._lease_size)[_S_STATE] == _ACTIVE
            ),
            leases=self._nleases,
        )

    def _repr_fields(self) -> str:
        return f"capacity={self._capacity}, items={self.qsize()}" + (
            ", raw=True" if self._raw else ""
        )


def _encode_raw(item: Any) -> Any:
    """A raw queue's item as the bytes to store (the compiled core calls this too, for
    any item that is not exactly ``bytes``)."""
    if type(item) is bytes:
        return item
    if not isinstance(item, (bytes, bytearray, memoryview)):
        raise TypeError(f"a raw SafeQueue carries bytes, not {type(item).__name__}")
    try:
        return memoryview(item).cast("B")  # any C-contiguous bytes-like, by its bytes
    except TypeError:
        raise TypeError("a raw SafeQueue needs a C-contiguous bytes-like item") from None


def _undecodable_error(
    name: str, items: list[Any], failed: list[bytes], first: Exception, failed_at: list[int]
) -> ItemDecodeError:
    """The error for items taken from queue ``name`` that did not unpickle (both
    implementations: the compiled core calls this too)."""
    return ItemDecodeError(
        f"{len(failed)} of {len(items) + len(failed)} item(s) taken from SafeQueue "
        f"{name!r} could not be unpickled (first: {type(first).__name__}: "
        f"{first}); they are off the queue: the pickled bytes are in .undecodable"
        + (f", the {len(items)} other item(s) in .items" if items else ""),
        items,
        failed,
        failed_at,
    )


def _span_end(words: memoryview, head: int, tail: int, cap: int, max_items: int) -> tuple[int, int]:
    """Where the first ``max_items`` records from ``head`` end, and how many there are;
    ``(position, -1)`` if the ring holds no valid record at ``position`` (damage).

    A function of its own, called while the mutex is held, because of its loop: CPython
    (gh-108214, gh-130279) may leave a loop's backward jump out of the enclosing ``try``'s
    exception range, so a signal handler's exception raised there would skip the
    ``finally`` that releases the mutex. Raised inside a call, it reaches the caller at
    the call, which the ``try`` covers.
    """
    end = head
    taken = 0
    if head & 7 or not 0 <= tail - head <= cap:
        return head, -1
    while end != tail and taken < max_items:
        word = words[(end % cap) >> 3]
        n = word & _LEN_MASK
        # What the ring says must be a record (its length checks out) inside what was put.
        if (word >> 32) ^ n != _MARK_KEY or end + ((n + 15) & ~7) > tail:
            return end, -1
        end += (n + 15) & ~7
        taken += 1
    return end, taken


def _lease_size(nleases: int, lease_size: int | None, capacity: int) -> int:
    """create()'s lease slot payload size (``capacity``: rounded already), validated."""
    if nleases > MAX_LEASES:
        raise ValueError(f"leases must be at most {MAX_LEASES}, got {nleases}")
    if not nleases:
        if lease_size:
            raise ValueError("lease_size needs leases= (how many lease slots)")
        return 0
    if lease_size is None:
        return min(capacity - 8, DEFAULT_LEASE_SIZE)
    size = (_check_count("lease_size", lease_size) + 7) & ~7
    if not 0 < size <= capacity:
        raise ValueError(f"lease_size must be 1 to the capacity ({capacity}), got {lease_size}")
    return size


def _deadline(block: bool, timeout: float | None) -> float | None:
    """``None`` for "do not wait", ``math.inf`` for "wait forever", else a monotonic time.

    The timeout is checked even when ``block`` is false (``queue.Queue`` ignores it
    there): one rule for every ``timeout=``, a bad value never passes silently.
    """
    seconds = check_timeout(timeout)
    if not block:
        return None
    return math.inf if seconds is None else time.monotonic() + seconds


class Lease:
    """The acknowledgement handle of an item taken with :meth:`SafeQueue.get_leased`."""

    __slots__ = ("_ended", "_id", "_q", "_slot")

    def __init__(self, q: SafeQueue[Any], slot: int, lease_id: int) -> None:
        self._q = q
        self._slot = slot
        self._id = lease_id
        self._ended = ""  # "ack" or "release" once this handle ended it

    def ack(self) -> None:
        """The item is handled: it is never delivered again.

        Raises:
            LeaseExpiredError: the lease had ended (expired and delivered again, or
                acknowledged or released already); nothing changed.
        """
        self._end(redeliver=False)

    def release(self) -> None:
        """Give the item back now: it is delivered again at the front of the queue.

        Raises:
            LeaseExpiredError: as :meth:`ack`.
        """
        self._end(redeliver=True)

    def _end(self, *, redeliver: bool) -> None:
        doing = "release" if redeliver else "ack"
        if self._ended:
            raise LeaseExpiredError(
                f"SafeQueue {self._q.name!r}: lease {self._id} was already ended by "
                f"{self._ended}() on this handle; this {doing}() changed nothing"
            )
        self._q._end_lease(self._slot, self._id, redeliver=redeliver)
        self._ended = doing

    def __repr__(self) -> str:
        return f"<safeshm.Lease {self._id} of {self._q.name!r}>"


def _slot_words(slots: memoryview, slot: int, size: int) -> memoryview:
    base = slot * (8 * _SLOT_WORDS + size)
    return slots[base : base + 8 * _SLOT_WORDS].cast("q")


def _free_slot(slots: memoryview, nleases: int, size: int) -> int:
    for k in range(nleases):
        if not _slot_words(slots, k, size)[_S_STATE]:
            return k
    return -1


def _fill_slot(
    slots: memoryview, slot: int, size: int, data: bytes, *, lease_id: int, deadline: int
) -> None:
    base = slot * (8 * _SLOT_WORDS + size)
    slots[base + 8 * _SLOT_WORDS : base + 8 * _SLOT_WORDS + len(data)] = data
    w = _slot_words(slots, slot, size)
    w[_S_ID] = lease_id
    w[_S_PID] = _compat.pid
    w[_S_START] = my_start_time()
    w[_S_NS] = _compat.pid_namespace()
    w[_S_DEADLINE] = deadline
    w[_S_LEN] = len(data)
    w[_S_STATE] = _ACTIVE  # the commit: leased


def _due_slots(slots: memoryview, nleases: int, size: int) -> list[tuple[int, int, bool]]:
    """``(lease id, slot, holder dead)`` of the leases to deliver again, newest first."""
    now = time.monotonic_ns()
    out = []
    for k in range(nleases):
        w = _slot_words(slots, k, size)
        if w[_S_STATE] != _ACTIVE:
            continue
        dead = not holder_alive(w[_S_PID], w[_S_START], w[_S_NS])
        if dead or w[_S_DEADLINE] <= now:
            out.append((int(w[_S_ID]), k, dead))
    out.sort(reverse=True)
    return out


def _drop_task(state: memoryview, recs: memoryview, nrec: int, pid: int, start: int) -> None:
    """A put-back lease's holder (``pid`` started at ``start``) no longer counts the item
    as its task (a reaped holder's record is gone already, and with it the count)."""
    for k in range(nrec):
        i = k * _REC_WORDS
        if recs[i + _R_PID] == pid and recs[i + _R_START] == start and recs[i + _R_COUNT] > 0:
            held = state[_HELD]
            recs[i + _R_COUNT] -= 1
            state[_HELD] = held - 1 if held > INT64_MIN else INT64_MAX
            return


def _wrap64(value: int) -> int:
    """``value`` wrapped into int64, as the compiled core's unsigned additions wrap."""
    return ((value + (1 << 63)) & ((1 << 64) - 1)) - (1 << 63)


def _ring_read(ring: memoryview, cap: int, at: int, n: int) -> bytes:
    pos = at % cap
    if pos + n <= cap:
        return ring[pos : pos + n].tobytes()
    return ring[pos:].tobytes() + ring[: pos + n - cap].tobytes()


def _ring_write(ring: memoryview, cap: int, at: int, n: int, data: memoryview) -> None:
    """Write a record (header and payload) at ring counter ``at``."""
    pos = at % cap
    ring[pos : pos + 8] = _HEADER_WORD.pack(n | ((n ^ _MARK_KEY) << 32))
    start = (pos + 8) % cap
    if start + n <= cap:
        ring[start : start + n] = data
    else:
        split = cap - start
        ring[start:] = data[:split]
        ring[: n - split] = data[split:]


class _JoinTimeout(Exception):
    """Internal: join()'s deadline passed while it retook the mutex."""


def _unfinished(state: memoryview) -> int:
    n: int = state[_PUTS] - state[_GETS] + state[_HELD] - state[_CREDIT]
    return n


def _rederive_tasks(state: memoryview, recs: memoryview, nrec: int) -> None:
    """Recompute the held word from the records, and lower the credit so that the
    unfinished count is never below 0 (holding the mutex: after a recovery, a reap or an
    immediate shutdown)."""
    held = 0
    for k in range(nrec):
        i = k * _REC_WORDS
        if recs[i + _R_PID]:
            held += recs[i + _R_COUNT]
    state[_HELD] = held
    base = state[_PUTS] - state[_GETS] + held
    if state[_CREDIT] > base:
        state[_CREDIT] = max(0, base)


def _find_record(recs: memoryview, nrec: int) -> int:
    """This process's record (claimed if free); -1 if the table is full. Holding the
    mutex."""
    me = _compat.pid
    start = my_start_time()
    free = -1
    for k in range(nrec):
        i = k * _REC_WORDS
        owner = recs[i + _R_PID]
        if owner == me and recs[i + _R_START] == start:
            return i
        if owner == 0 and free < 0:
            free = i
    if free >= 0:
        recs[free + _R_COUNT] = 0
        recs[free + _R_START] = start
        recs[free + _R_NS] = _compat.pid_namespace()
        recs[free + _R_PID] = me  # the commit
    return free


def _reap_records(recs: memoryview, nrec: int) -> list[tuple[int, int]]:
    """Free the records of dead processes (holding the mutex); their ``(pid, count)``."""
    me = _compat.pid
    out = []
    for k in range(nrec):
        i = k * _REC_WORDS
        owner = recs[i + _R_PID]
        if not owner or owner == me:
            continue
        if holder_alive(owner, recs[i + _R_START], recs[i + _R_NS]):
            continue
        out.append((int(owner), int(recs[i + _R_COUNT])))
        recs[i + _R_COUNT] = 0
        recs[i + _R_PID] = 0
    return out


def _mark_done(state: memoryview, recs: memoryview, nrec: int, ci: int) -> int:
    """task_done()'s update (holding the mutex): the unfinished count left, or -1 (and
    nothing changed) if none was unfinished. Lowers this process's count (word ``ci``,
    -1: none), else another process's, else adds a credit against an item still queued."""
    left = _unfinished(state)
    if left <= 0:
        return -1
    if ci < 0 or recs[ci] <= 0:
        ci = -1
        for k in range(nrec):
            i = k * _REC_WORDS
            if recs[i + _R_PID] and recs[i + _R_COUNT] > 0:
                ci = i + _R_COUNT
                break
    if ci >= 0:
        held = state[_HELD]
        recs[ci] -= 1
        state[_HELD] = held - 1 if held > INT64_MIN else INT64_MAX
    else:
        credit = state[_CREDIT]
        state[_CREDIT] = credit + 1 if credit < INT64_MAX else INT64_MIN
    return left - 1


def _check_processes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"processes must be an int, not {type(value).__name__}")
    if not 1 <= value <= MAX_PROCESSES:
        raise ValueError(f"processes must be between 1 and {MAX_PROCESSES}, got {value}")
    return value


def _check_count(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    if value > INT64_MAX:
        raise OverflowError(f"{what} {value} is beyond the int64 range; nothing was created")
    return value


def _check_state(state: memoryview, capacity: int, name: str) -> None:
    """Refuse a queue whose positions cannot be right (checked when a handle binds).

    head and tail are read without the mutex: a pair is used only if head did not move
    while tail was read (head only grows, so both held at that instant).
    """
    for _ in range(1000):
        head, tail = state[_HEAD], state[_TAIL]
        if state[_HEAD] == head:
            break
    else:  # pragma: no cover - a queue this busy is checked by every get instead
        return
    gets = state[_GETS]  # first: both only grow, and gets never passes puts
    puts = state[_PUTS]
    if (
        head < 0
        or head & 7
        or tail & 7
        or not 0 <= tail - head <= capacity
        or (state[_SHUT] not in (0, _SHUTDOWN, _SHUTDOWN_NOW))
        or not (0 <= gets <= puts < _COUNT_LIMIT)
    ):
        raise SegmentCorruptedError(
            f"SafeQueue {name!r} is damaged: read position {head}, write position {tail}, "
            f"{puts} items put, {gets} taken, shutdown flag {state[_SHUT]} in a "
            f"{capacity}-byte ring"
        )
