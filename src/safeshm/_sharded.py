"""ShardedCounter: a shared integer for write-heavy metrics, one slot per thread.

The slot layout, claiming a slot (a free one, else one whose owner died), releasing it
when its thread ends, and forgetting the parent's slots after a fork.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import mmap
import operator
import os
import struct
import threading
import time
import warnings
import weakref
from typing import ClassVar, Final, Self

from . import _compat
from ._errors import (
    IncompatibleSegmentError,
    SafeShmWarning,
    SegmentClosedError,
    SegmentCorruptedError,
)
from ._int64 import INT64_MAX, INT64_MIN, check_int64
from ._lock import Held, RobustMutex, init_mutex
from ._protocols import SHM_GUARANTEES, Guarantees
from ._segment import HEADER_SIZE, Kind, Segment, SharedStructure

# --- ShardedCounter layout ----------------------------------------------------------------
#   128  base (int64): the value not held in any slot; changed only under the mutex
#   136  high-water mark: how many slots were ever claimed (reads sum only these)
#   192  robust mutex block (claims, set, exchange)
#   384  slots, 128 bytes each (two cache lines: no false sharing even with the
#        adjacent-line prefetcher), each:
#          +0  value (int64), written only by the owning thread
#          +8  owner pid (0 = free) -- written last when claiming: the commit
#          +16 owner start time     +24 owner pid namespace     +32 owner thread id
#          +40 claim token: unique per claim in the owning process; a release frees
#              the slot only if it still holds the releasing claim's token
_BASE_OFFSET: Final = HEADER_SIZE
_BASE: Final = _BASE_OFFSET // 8
_HIGH: Final = _BASE + 1
_SHARD_MUTEX_OFFSET: Final = HEADER_SIZE + 64
_SLOTS_OFFSET: Final = 384
_SLOT_SIZE: Final = 128
_SLOT_WORDS: Final = _SLOT_SIZE // 8
_S_VALUE, _S_PID, _S_START, _S_NS, _S_TID, _S_TOKEN = range(6)
DEFAULT_SLOTS: Final = 256
MAX_SLOTS: Final = 1 << 16
_PARAMS: Final = struct.Struct("=I")
_CLAIM_RETRY_S: Final = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class ShardedCounterStatistics:
    """A snapshot of a :class:`ShardedCounter` (see :meth:`ShardedCounter.statistics`)."""

    name: str
    value: int
    slots: int
    """Slots reserved at creation."""
    slots_in_use: int
    """Slots owned by a live thread right now (owners that died are not counted)."""
    slots_ever_used: int
    creator_pid: int


class _Lease:
    """One thread's claim on one slot; releasing it lets the slot be reused.

    Stored in the owning thread's ``threading.local``, so CPython drops it when that
    thread ends, and it holds its own views of the mapping, so it can release the slot
    then even if the handle was closed meanwhile. The slot's value stays where it is --
    it is still part of the sum -- only the ownership is given up.
    """

    __slots__ = ("index", "mutex", "mv", "pid", "token")

    def __init__(self, mv: memoryview, mutex: RobustMutex, index: int, token: int) -> None:
        self.mv = mv
        self.mutex = mutex
        self.index = index
        self.pid = _compat.pid
        self.token = token

    def release(self) -> None:
        """Free the slot if this claim still owns it. Idempotent."""
        # os.getpid(), not _compat.pid: a forked child clears the copies of the parent's
        # other threads' states -- dropping their leases -- before any at-fork hook runs,
        # so _compat.pid still names the parent then (a system call; releases are rare).
        me = os.getpid()
        if self.pid != me:
            return  # a forked child's copy: the slot belongs to the parent
        self.pid = 0
        w = self.index - _S_VALUE
        mv = self.mv
        with Held(self.mutex):
            if mv[w + _S_PID] == me and mv[w + _S_TOKEN] == self.token:
                mv[w + _S_PID] = 0

    def __del__(self) -> None:
        # A finalizer must not raise. If releasing fails (interpreter shutdown, or this
        # thread holds the counter's lock), the slot stays owned until this process exits
        # and is reclaimed then; its value is never lost either way.
        with contextlib.suppress(Exception):
            self.release()


_claim_tokens = itertools.count(1)

_live_sharded: weakref.WeakSet[ShardedCounter] = weakref.WeakSet()


def _forget_slots_after_fork() -> None:
    # A forked child inherits its parent's thread-locals, and with them the parent's slot
    # indices; two processes adding into one slot would lose updates. Start afresh.
    for counter in list(_live_sharded):
        if counter.closed:
            continue
        counter.__dict__["_tls"] = threading.local()


os.register_at_fork(after_in_child=_forget_slots_after_fork)


class ShardedCounter(SharedStructure):
    """A shared integer for write-heavy metrics: increments scale with cores.

    Each thread of each process adds into its own cache-line slot with a plain store,
    so concurrent ``add()`` calls never contend; ``value`` sums the slots. A slot's value
    is never lost: when its owning thread ends (or its process dies, even by SIGKILL),
    the value stays in the sum and the slot is handed to the next thread that needs one.
    If every slot is owned by a live thread, ``add()`` falls back to a shared word under
    the robust lock -- slower, never wrong -- and a :class:`~safeshm.SafeShmWarning` says
    so once per handle.

    Compared with :class:`SafeCounter`:

    * ``add()`` returns ``None``: the new total would need a read of every slot.
    * ``value`` is exact once adds are quiet; while adds run concurrently it returns a sum
      that counts each completed add exactly once (never a torn value).
    * ``set()`` and ``exchange()`` are exact accounting operations: every add lands either
      in the value ``exchange()`` returns or in the value after it -- never both, never
      neither -- so ``exchange(0)`` is a loss-free "read and reset". There is no
      ``compare_and_set()``.
    * Each slot is an int64; ``value`` is their exact sum.

    Example:
        >>> with ShardedCounter.create() as requests:
        ...     for _ in range(1000):
        ...         requests.add()
        ...     requests.value
        1000
    """

    _KIND = Kind.SHARDED_COUNTER
    #: What this backend promises (``safeshm.Guarantees``): shared memory on this machine;
    #: a dead process is known at once; nothing survives a reboot.
    guarantees: ClassVar[Guarantees] = SHM_GUARANTEES
    _LAYOUT = 1
    _MAPPED = ("_mv", "_tls", "_mutex", "_core", "add")

    _mv: memoryview
    _tls: threading.local
    _mutex: RobustMutex
    _nslots: int
    _warned_full: bool

    @classmethod
    def create(cls, initial: int = 0, *, name: str | None = None, slots: int | None = None) -> Self:
        """Create a new sharded counter holding ``initial``.

        Args:
            initial: the starting value (int64).
            name: the name to attach by; a random one when ``None``.
            slots: how many threads (across all processes) can own a slot at once;
                default 256. More concurrent writers still work, through a locked
                fallback.

        Raises:
            SegmentExistsError: a segment with this name exists (a ``FileExistsError``).
            ValueError: ``slots`` is not between 1 and 65536.
        """
        initial = check_int64("initial value", initial)
        nslots = DEFAULT_SLOTS if slots is None else slots
        if isinstance(nslots, bool) or not isinstance(nslots, int):
            raise TypeError(f"slots must be an int, not {type(nslots).__name__}")
        if not 1 <= nslots <= MAX_SLOTS:
            raise ValueError(f"slots must be between 1 and {MAX_SLOTS}, got {nslots}")

        def init(mm: mmap.mmap) -> None:
            struct.pack_into("=q", mm, _BASE_OFFSET, initial)
            init_mutex(mm, _SHARD_MUTEX_OFFSET)

        seg = Segment.create(
            name,
            kind=cls._KIND,
            layout=cls._LAYOUT,
            payload_size=_SLOTS_OFFSET - HEADER_SIZE + nslots * _SLOT_SIZE,
            init=init,
            params=_PARAMS.pack(nslots),
        )
        return cls._from_segment(seg)

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing sharded counter by name.

        Raises:
            SegmentNotFoundError: no segment has this name (a ``FileNotFoundError``).
            IncompatibleSegmentError: the segment is not a ``ShardedCounter``.
        """
        return cls._from_segment(cls._attach_segment(name))

    @classmethod
    def open(cls, name: str, initial: int = 0, *, slots: int | None = None) -> Self:
        """Attach to ``name``, creating it with ``initial`` first if needed (race-free).

        ``initial`` applies only if this call creates the counter.

        Raises:
            IncompatibleSegmentError: ``slots`` is given and the existing counter has
                another number of slots (one rule for every ``open()``: a parameter
                given explicitly must match the existing segment).
        """
        initial = check_int64("initial value", initial)

        def check(seg: Segment) -> None:
            (have,) = _PARAMS.unpack_from(seg.header.params)
            if slots is not None and have != slots:
                raise IncompatibleSegmentError(
                    f"ShardedCounter {seg.name!r} has {have} slots; expected {slots}"
                )

        return cls._open_segment(name, lambda: cls.create(initial, name=name, slots=slots), check)

    def _bind(self, mm: mmap.mmap) -> None:
        (nslots,) = _PARAMS.unpack_from(self._seg.header.params)
        if not 1 <= nslots <= MAX_SLOTS or (
            _SLOTS_OFFSET + nslots * _SLOT_SIZE != self._seg.header.total_size
        ):
            raise SegmentCorruptedError(
                f"ShardedCounter {self._seg.name!r} is damaged: {nslots} slots do not fit "
                f"its {self._seg.header.total_size} bytes"
            )
        self._mv = memoryview(mm).cast("q")
        self._mutex = RobustMutex(mm, _SHARD_MUTEX_OFFSET, f"ShardedCounter {self._seg.name!r}")
        self._nslots = nslots
        self._tls = threading.local()
        self._warned_full = False
        _live_sharded.add(self)
        if _compat.native is not None:
            # The compiled add (same slots, same protocol: it asks _native_slot() for this
            # thread's slot once and caches it), shadowing the ctypes one on this handle.
            # The core holds the handle, as a bound method does, so a kept add keeps the
            # thread-locals owning its slots; close() breaks that cycle, and the cyclic
            # GC frees a handle dropped without close().
            core = _compat.native.Sharded(
                mm,
                f"ShardedCounter {self._seg.name!r}",
                f"{type(self).__name__} {self._seg.name!r} is closed on this handle",
                self,
            )
            self._core = core
            self.__dict__["add"] = core.add

    # -- the hot path ----------------------------------------------------------------------
    def add(self, delta: int = 1) -> None:
        """Add ``delta`` (may be negative) into this thread's slot.

        Raises:
            OverflowError: this thread's slot and the shared overflow word would both
                leave the int64 range; nothing changed.
            TypeError: ``delta`` is not an int; nothing changed.
        """
        try:
            slot = self._tls.slot  # a one-word view of this thread's slot, None if none
        except AttributeError:
            slot = self._claim()
        try:
            # Only this thread ever writes its slot: a plain read-modify-write is safe,
            # and the 8-byte store is atomic for concurrent readers.
            slot[0] += delta
        except SegmentClosedError:
            raise
        except (ValueError, TypeError):
            self._add_slow(delta)

    def _native_slot(self) -> int | None:
        """The compiled add's miss path: the byte offset of the calling thread's slot,
        claimed now if it has none; ``None`` when every slot is owned (the add then goes
        through :meth:`_add_slow`)."""
        tls = self._tls
        try:
            slot = tls.slot
        except AttributeError:
            slot = self._claim()
        if slot is None:
            return None
        index: int = tls.lease.index
        return index * 8

    def _add_slow(self, delta: int) -> None:
        """No slot (all taken), a full slot, or a bad ``delta``."""
        try:
            delta = operator.index(delta)
        except TypeError:
            raise TypeError(f"delta must be an int, not {type(delta).__name__}") from None
        tls = self._tls
        if tls.slot is None and time.monotonic() >= tls.retry_at:
            slot = self._claim()
            if slot is not None:
                self.add(delta)
                return
        with Held(self._mutex):
            mv = self._mv
            new = mv[_BASE] + delta
            if not INT64_MIN <= new <= INT64_MAX:
                raise OverflowError(
                    f"ShardedCounter {self._seg.name!r}: adding {delta} would overflow "
                    "both this thread's slot and the shared int64 word; nothing was changed"
                )
            mv[_BASE] = new

    # -- slots ------------------------------------------------------------------------------
    def _claim(self) -> memoryview | None:
        """Give the calling thread a slot: a free one, else one whose owner died."""
        mv = self._mv
        tls = self._tls
        me = _compat.pid
        tid = threading.get_native_id()
        token = next(_claim_tokens)
        start = _owner_start_time()
        ns = _compat.pid_namespace()
        chosen: int | None = None
        with Held(self._mutex):
            high = self._check_high(mv[_HIGH])
            chosen = _free_slot(mv, self._nslots, high, me)
            if chosen is not None:
                w = (_SLOTS_OFFSET + chosen * _SLOT_SIZE) // 8
                mv[w + _S_START] = start
                mv[w + _S_NS] = ns
                mv[w + _S_TID] = tid
                mv[w + _S_TOKEN] = token
                mv[w + _S_PID] = me  # the commit: a crash before this leaves it free
                if chosen >= high:
                    mv[_HIGH] = chosen + 1
        if chosen is None:
            tls.slot = None
            tls.retry_at = time.monotonic() + _CLAIM_RETRY_S
            if not self._warned_full:
                self._warned_full = True
                warnings.warn(
                    SafeShmWarning(
                        f"ShardedCounter {self._seg.name!r}: all {self._nslots} slots are owned "
                        "by live threads; adds from threads without a slot go through a shared "
                        "word under a lock (exact, but slower). Create it with more slots="
                    ),
                    stacklevel=3,
                )
            return None
        index = (_SLOTS_OFFSET + chosen * _SLOT_SIZE) // 8 + _S_VALUE
        tls.lease = _Lease(mv, self._mutex, index, token)
        tls.slot = slot = mv[index : index + 1]
        return slot

    def _before_close(self) -> None:
        tls = self.__dict__.get("_tls")
        if not isinstance(tls, threading.local):
            return
        # The calling thread is not mid-add: its slot can be freed now. Other threads may
        # be in the middle of an add on their slot, so theirs are freed only when those
        # threads end (their leases hold their own views of the mapping). Keep the
        # thread-local alive for that: dropping it would release every lease at once.
        lease = getattr(tls, "lease", None)
        if lease is not None:
            lease.release()
        self.__dict__["_retired_tls"] = tls

    def _check_high(self, high: int) -> int:
        """``high`` (the high-water mark of used slots, read from the segment) if possible."""
        if not 0 <= high <= self._nslots:
            raise SegmentCorruptedError(
                f"ShardedCounter {self._seg.name!r} is damaged: its high-water mark of used "
                f"slots is {high}, with {self._nslots} slots"
            )
        return high

    def _slot_sum(self, high: int) -> int:
        self._check_high(high)
        first = _SLOTS_OFFSET // 8 + _S_VALUE
        return sum(self._mv[first : first + high * _SLOT_WORDS : _SLOT_WORDS])

    # -- reads and resets ---------------------------------------------------------------------
    @property
    def value(self) -> int:
        """The sum of all slots and the shared word: exact once concurrent adds settle."""
        mv = self._mv
        return mv[_BASE] + self._slot_sum(mv[_HIGH])

    def set(self, value: int) -> None:
        """Make the value ``value``; adds that race with it land after it.

        Raises:
            OverflowError, TypeError: bad ``value``; nothing changed.
        """
        self.exchange(value)

    def exchange(self, value: int) -> int:
        """Replace the value and return the previous one, with exact accounting: each
        concurrent add is counted in exactly one of the two.

        Raises:
            OverflowError: ``value`` is outside the int64 range, or the shared word could
                not represent it; nothing changed.
            TypeError: ``value`` is not an int; nothing changed.
        """
        value = check_int64("value", value)
        mv = self._mv
        with Held(self._mutex):
            slots = self._slot_sum(mv[_HIGH])
            base = value - slots
            if not INT64_MIN <= base <= INT64_MAX:
                raise OverflowError(
                    f"ShardedCounter {self._seg.name!r}: cannot represent {value} while the "
                    f"slots hold {slots}; nothing was changed"
                )
            old: int = mv[_BASE] + slots
            mv[_BASE] = base  # one store: a crash leaves the old value or the new
        return old

    # -- introspection -------------------------------------------------------------------------
    def statistics(self) -> ShardedCounterStatistics:
        """A snapshot for monitoring. Reads ownership without taking the lock."""
        mv = self._mv
        high = self._check_high(mv[_HIGH])
        in_use = 0
        for k in range(high):
            w = (_SLOTS_OFFSET + k * _SLOT_SIZE) // 8
            owner = mv[w + _S_PID]
            if owner and _compat.process_alive(owner, mv[w + _S_START], mv[w + _S_NS]):
                in_use += 1
        return ShardedCounterStatistics(
            name=self._seg.name,
            value=self.value,
            slots=self._nslots,
            slots_in_use=in_use,
            slots_ever_used=high,
            creator_pid=self._seg.header.creator_pid,
        )

    def _repr_fields(self) -> str:
        return f"value={self.value}"


def _free_slot(mv: memoryview, nslots: int, high: int, me: int) -> int | None:
    """A free slot, else one whose owner died; ``None`` if every slot is owned.

    Called holding the mutex, and a function because of its loops: CPython (gh-108214,
    gh-130279) may leave a loop's backward jump out of the enclosing ``with`` block's
    exception range, so a signal handler's exception raised there would skip the exit
    that releases the mutex; raised in here, it reaches the caller at the call.
    """
    for k in range(nslots):  # an int: survives close, unlike the views
        w = (_SLOTS_OFFSET + k * _SLOT_SIZE) // 8
        if mv[w + _S_PID] == 0:
            return k
    for k in range(high):
        w = (_SLOTS_OFFSET + k * _SLOT_SIZE) // 8
        owner = mv[w + _S_PID]
        if owner != me and not _compat.process_alive(owner, mv[w + _S_START], mv[w + _S_NS]):
            return k
    return None


_start_time_cache: dict[int, int] = {}


def _owner_start_time() -> int:
    pid = _compat.pid
    start = _start_time_cache.get(pid)
    if start is None:
        start = _start_time_cache[pid] = _compat.process_start_time(pid) or 0
    return start
