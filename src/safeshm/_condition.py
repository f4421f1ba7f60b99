"""SafeCondition: :class:`threading.Condition` shared by processes, over a SafeLock or
SafeRLock, robust to waiters that die.

Layout: the :mod:`._sync` base (internal robust mutex, futex sequence word, per-process
records), then this class's region::

    +0    int64 lock kind (Kind.LOCK or Kind.RLOCK)
    +8    int64 1 if the condition made the lock (``create(lock=None)``): ``unlink()``
          removes both
    +16   int64 length of the lock's name, then its UTF-8 bytes (at most NAME_MAX)
    +128  WAITER_SLOTS waiter slots, 4 int64 words each:
            +0 ticket: > 0 waiting, < 0 notified (-ticket), 0 free -- the commit word
            +1 the waiter process's record (word index), +2 its pid, +3 its thread id

State word 0 is the last ticket handed out. A waiter claims a free slot with a new ticket
(one store commits it), releases the lock fully (an RLock at any depth, saved and
restored as threading's ``_release_save``/``_acquire_restore``), sleeps on the futex
until its slot reads ``-ticket`` or its deadline passes, frees the slot and takes the lock
back -- also on a timeout or an exception. ``notify(n)`` marks the ``n`` oldest waiting
slots notified (one store each), so it wakes at most ``n`` of the waiters that were
waiting when it was called (in FIFO order, as threading does), and wakes the sleepers.
A slot whose process has died is freed instead of being notified, so a waiter killed
inside ``wait()`` never swallows a notification meant for the living.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import mmap
import operator
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

from . import _compat
from ._errors import SegmentCorruptedError, SegmentNotFoundError, TooManyWaitersError
from ._int64 import INT64_MAX
from ._lock import SafeLock, _CLevel
from ._rlock import SafeRLock, unlock_n
from ._segment import NAME_MAX, Kind, validate_name
from ._sync import (
    R_NS,
    R_PID,
    R_START,
    STATE_OFFSET,
    SyncPrimitive,
    _Timeout,
    deadline_of,
    holder_alive,
)

_T = TypeVar("_T")

WAITER_SLOTS: Final = 256
"""Threads (of all processes together) that can wait on one condition at a time."""
SLOT_WORDS: Final = 4
_INFO_SIZE: Final = 128
_LAST_TICKET: Final = 0  # state word
_HIGH: Final = 1  # state word: slots ever used (a bound for scans; raised before a slot's
#                   commit, never lowered, so every taken slot lies below it)
_NEVER: Final = float("inf")


@dataclasses.dataclass(frozen=True, slots=True)
class ConditionStatistics:
    """A snapshot of a :class:`SafeCondition` (see :meth:`SafeCondition.statistics`)."""

    name: str
    lock_name: str
    lock_type: str
    """``"SafeRLock"`` or ``"SafeLock"``."""
    owns_lock: bool
    """The condition made its lock (``create(lock=None)``): ``unlink()`` removes both."""
    waiters: int
    """Threads waiting and not yet notified, in live processes (any)."""
    notified: int
    """Threads notified that have not yet woken and left ``wait()``, in live processes."""
    creator_pid: int


LockLike = SafeLock | SafeRLock


class SafeCondition(SyncPrimitive):
    """A condition variable shared by processes: :class:`threading.Condition` over a
    :class:`SafeLock` or :class:`SafeRLock`.

    ``with cond:`` holds the lock (as threading's); :meth:`wait` releases it fully while
    it sleeps and takes it back before returning (also on a timeout or an exception);
    :meth:`notify` and :meth:`notify_all` wake waiters in any process. Another process
    attaches by the condition's name alone: the segment records the lock's name.

    Lifecycle: a condition made with ``lock=None`` owns the SafeRLock it made (named
    ``<condition name>``'s ``lock_name``): :meth:`close` closes this handle's lock handle
    and :meth:`unlink` removes both segments. With a lock of yours, :meth:`unlink`
    removes only the condition, and :meth:`close` leaves your handle open.

    Example:
        >>> cond = SafeCondition.create()
        >>> with cond:
        ...     cond.notify_all()
        ...     cond.wait(timeout=0.01)
        False
        >>> cond.close(); cond.unlink()
    """

    _KIND = Kind.CONDITION
    _LAYOUT = 1
    _EXTRA_SIZE = _INFO_SIZE + WAITER_SLOTS * SLOT_WORDS * 8

    _lock: LockLike
    _close_lock: bool
    _owns_lock: bool
    _slot0: int  # word index (in _w) of the first waiter slot
    _lock_acquire: Any
    _lock_release: Any
    _lock_enter: Any
    _lock_exit: Any

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(
        cls, lock: LockLike | None = None, *, name: str | None = None, processes: int | None = None
    ) -> Self:
        """Create a condition over ``lock`` (a :class:`SafeLock` or :class:`SafeRLock`
        handle), or over a new :class:`SafeRLock` that it owns when ``lock`` is ``None``.

        Args:
            processes: how many processes can use it at once (holder records; default 128).

        Raises:
            TypeError: ``lock`` is not a SafeLock or SafeRLock.
            SegmentClosedError: ``lock`` is closed.
            SegmentExistsError: a segment with this name exists.
        """
        if lock is not None and not isinstance(lock, (SafeLock, SafeRLock)):
            raise TypeError(
                f"lock must be a SafeLock or SafeRLock (a process-shared lock), not "
                f"{type(lock).__name__}"
            )
        if lock is not None and lock.closed:
            lock._raise_closed()
        owned = lock is None
        the_lock: LockLike = SafeRLock.create() if lock is None else lock
        try:
            kind = the_lock._KIND
            lock_name = the_lock.name.encode()

            def init(mm: mmap.mmap, offset: int) -> None:
                words = memoryview(mm)[offset : offset + 24].cast("q")
                words[0] = int(kind)
                words[1] = int(owned)
                words[2] = len(lock_name)
                words.release()
                mm[offset + 24 : offset + 24 + len(lock_name)] = lock_name

            seg = cls._create_segment(name, (0, 0), processes=processes, init_extra=init)
        except BaseException:
            if owned:
                the_lock.close()
                the_lock.unlink()
            raise
        try:
            self = cls._from_segment(seg)
        except BaseException:
            if owned:
                the_lock.close()
                the_lock.unlink()
            raise
        self._set_lock(the_lock, close_it=owned)
        return self

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing condition by name (and to its lock, by the name it
        recorded).

        Raises:
            SegmentNotFoundError: no condition (or its lock is gone).
            IncompatibleSegmentError: the segment is not a ``SafeCondition``.
        """
        self = cls._from_segment(cls._attach_segment(name))
        try:
            kind, lock_name = self._lock_info()
            lock: LockLike = (
                SafeRLock.attach(lock_name) if kind == Kind.RLOCK else SafeLock.attach(lock_name)
            )
        except BaseException:
            self.close()
            raise
        self._set_lock(lock, close_it=True)
        return self

    @classmethod
    def open(cls, name: str) -> Self:
        """Attach to the condition ``name``, creating it (over a new SafeRLock that it
        owns) if needed. Race-free: the create is exclusive, and a loser attaches."""
        validate_name(name)
        for _ in range(100):
            try:
                made = cls.create(name=name)
            except FileExistsError:
                pass
            else:
                made._unlink_on_exit = False
                return made
            try:
                return cls.attach(name)
            except FileNotFoundError:  # unlinked in between (or its lock was): try again
                continue
        raise SegmentNotFoundError(  # pragma: no cover - pathological churn
            errno.ENOENT, f"SafeCondition {name!r} kept vanishing while being opened"
        )

    @classmethod
    def _from_segment(cls, seg: Any) -> Self:
        self = super()._from_segment(seg)
        self._close_lock = False
        return self

    def _bind(self, mm: mmap.mmap) -> None:
        super()._bind(mm)
        self._slot0 = (self._extra_offset + _INFO_SIZE - STATE_OFFSET) // 8
        self._owns_lock = bool(self._w[(self._extra_offset - STATE_OFFSET) // 8 + 1])

    def _lock_info(self) -> tuple[int, str]:
        base = (self._extra_offset - STATE_OFFSET) // 8
        w = self._w
        kind, size = int(w[base]), int(w[base + 2])
        if kind not in (Kind.LOCK, Kind.RLOCK) or not 0 < size <= NAME_MAX:
            raise SegmentCorruptedError(f"{self._what} is damaged: its lock record is invalid")
        off = self._extra_offset + 24
        try:
            return kind, bytes(self._seg.mm[off : off + size]).decode()
        except UnicodeDecodeError:
            raise SegmentCorruptedError(f"{self._what} is damaged: its lock name") from None

    def _set_lock(self, lock: LockLike, *, close_it: bool) -> None:
        self._lock = lock
        self._close_lock = close_it
        self._lock_acquire = lock.acquire
        self._lock_release = lock.release
        self._lock_enter = lock.__enter__
        self._lock_exit = lock.__exit__

    def close(self) -> None:
        """Detach this handle; also closes the lock handle it opened (on ``attach``, or
        the lock it made). A lock handle you passed to :meth:`create` stays open."""
        lock = self.__dict__.get("_lock")
        super().close()
        if lock is not None and self.__dict__.get("_close_lock"):
            lock.close()

    def unlink(self) -> None:
        """Destroy the condition; and its lock too if the condition made it
        (``create(lock=None)``).

        Raises:
            SegmentNotFoundError: the condition was already unlinked.
        """
        super().unlink()
        lock = self.__dict__.get("_lock")
        if self._owns_lock and lock is not None:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    @property
    def lock(self) -> LockLike:
        """The lock this condition waits with (this handle's own handle of it)."""
        return self._lock

    # -- the lock's methods ------------------------------------------------------------------
    if TYPE_CHECKING:

        def acquire(self, blocking: bool = True, timeout: float | None = -1) -> bool: ...
        def release(self) -> None: ...
        def __enter__(self) -> LockLike: ...  # type: ignore[override] # the lock's: the lock
        def __exit__(self, *exc_info: object) -> None: ...
    else:
        # The lock's own bound methods, found by a C-level getter (no Python frame between
        # the caller and the lock: see _lock's async-exception notes).
        acquire = _CLevel(operator.attrgetter("_lock_acquire"))
        release = _CLevel(operator.attrgetter("_lock_release"))
        __enter__ = _CLevel(operator.attrgetter("_lock_enter"))
        __exit__ = _CLevel(operator.attrgetter("_lock_exit"))

    def _is_owned(self) -> bool:
        lock = self._lock
        if isinstance(lock, SafeRLock):
            return lock._is_owned()
        return lock._mutex.held_here()

    def _depth(self) -> int:
        lock = self._lock
        if isinstance(lock, SafeRLock):
            depth = lock._mutex.depth()
            if depth < 0:  # pragma: no cover - not glibc
                raise NotImplementedError(
                    "SafeCondition over a SafeRLock needs the C library's recursion count "
                    "(glibc); use a SafeLock"
                )
            return depth
        return 1

    def _release_all(self, depth: int) -> None:
        lock = self._lock
        if isinstance(lock, SafeRLock):
            unlock_n([lock._mutex.pointer] * depth)  # one C call
        else:
            lock.release()

    def _acquire_restore(self, saved: int) -> None:
        lock = self._lock
        if isinstance(lock, SafeRLock):
            lock._acquire_restore(saved)
        else:
            lock.acquire()

    # -- waiting ---------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, sleep until notified or ``timeout`` seconds pass, and take
        the lock back (at the depth it was held) before returning -- also on a timeout
        or an exception.

        Returns:
            ``True`` if notified, ``False`` on a timeout.

        Raises:
            RuntimeError: the calling thread does not hold the lock.
            TooManyWaitersError: every waiter slot is taken.
            SegmentClosedError: another thread closed this handle meanwhile (the lock is
                held again on return).
        """
        deadline = deadline_of(timeout)
        if timeout is not None and timeout < 0:
            deadline = 0.0  # as threading: a negative timeout does not wait
        if not self._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        # Async-exception safe (first order: one exception per call, as _lock's rule):
        # - the lock's owner word, not a variable set after a call, tells the finally
        #   whether the lock must be taken back; if so, it is taken back at full depth in
        #   ONE C-level call (``list`` over a prepared ``map`` of lock calls), so that an
        #   exception that cut the normal restore short cannot leave it free;
        # - the slot is found by (pid, thread) when an exception came between its claim
        #   and ``slot, ticket = `` (see _forget).
        depth = self._depth()
        mutex = self._lock._mutex
        owner, me = mutex.owner, threading.get_native_id()
        relock = _lock_calls(mutex.pointer, depth)
        slot = ticket = 0
        try:
            with self._section():
                slot, ticket = self._enqueue()
            self._release_all(depth)
            try:
                with self._section(deadline):
                    got = self._await(slot, ticket, deadline)
            except _Timeout:  # a stopped process holds the internal mutex past our deadline
                got = self._leave(slot, ticket)
            self._acquire_restore(depth)  # interruptible (Ctrl-C while the lock is busy)
            return got
        finally:
            if owner[0] & _FUTEX_TID_MASK != me:
                rcs = list(relock)
                if rcs[0] == _compat.EOWNERDEAD:
                    mutex._recover()
            self._forget(slot, ticket)

    def _enqueue(self) -> tuple[int, int]:
        w = self._w
        rec = self._record()
        slot = self._free_slot()
        last = w[_LAST_TICKET]
        # > 0 (a waiting ticket); wraps past the int64 limit, which only damage reaches.
        ticket = last + 1 if 0 <= last < INT64_MAX else 1
        high = (slot - self._slot0) // SLOT_WORDS + 1
        if high > w[_HIGH]:  # noqa: PLR1730 - plain stores, no call (async-exception rule)
            w[_HIGH] = high
        w[slot + 1] = rec
        w[slot + 2] = _compat.pid
        w[slot + 3] = threading.get_native_id()
        w[slot] = ticket  # the commit
        w[_LAST_TICKET] = ticket
        return slot, ticket

    def _free_slot(self) -> int:
        w = self._w
        for k in range(WAITER_SLOTS):
            i = self._slot0 + k * SLOT_WORDS
            if w[i] == 0:
                return i
        # Full: free the slots of dead processes, then try once more.
        self._free_dead_slots()
        for k in range(WAITER_SLOTS):
            i = self._slot0 + k * SLOT_WORDS
            if w[i] == 0:
                return i
        raise TooManyWaitersError(f"{self._what}: all {WAITER_SLOTS} waiter slots are taken")

    def _slot_alive(self, i: int) -> bool:
        w = self._w
        pid = w[i + 2]
        if pid == _compat.pid:
            return True
        rec = w[i + 1]
        if not 0 <= rec < len(w) - R_NS or w[rec + R_PID] != pid:
            return False  # its record was reaped (or damaged): the process is gone
        # One /proc read: a zombie (killed, its parent not waiting for it) is dead, as for
        # every primitive -- kill(pid, 0) alone would let a notify() go to its slot.
        return holder_alive(int(pid), int(w[rec + R_START]), int(w[rec + R_NS]))

    def _free_dead_slots(self) -> None:
        w = self._w
        for k in range(WAITER_SLOTS):
            i = self._slot0 + k * SLOT_WORDS
            if w[i] and not self._slot_alive(i):
                w[i] = 0

    def _await(self, slot: int, ticket: int, deadline: float) -> bool:
        # Our own view: another thread's close() swaps self._w for a stand-in, and the
        # slot must still be freed (holding the mutex, which _sleep retook) on the way out.
        w = self._w
        try:
            self._sleep_while_waiting(w, slot, ticket, deadline)
        except _Timeout:
            raise
        except BaseException:
            _leave_held(w, slot, ticket)
            raise
        return _leave_held(w, slot, ticket)

    def _sleep_while_waiting(self, w: memoryview, slot: int, ticket: int, deadline: float) -> None:
        while w[slot] == ticket:
            if not self._sleep(deadline):
                return

    def _forget(self, slot: int, ticket: int) -> None:
        """After a wait: make sure its slot is free (normally it is already)."""
        if self._seg.closed:
            return  # _await freed it on its way out (see there)
        if slot:
            t = self._w[slot]
            if t in (ticket, -ticket):
                self._leave(slot, ticket)
            return
        # The exception came between the claim and its result's store: find ours.
        with self._section():
            _free_mine(self._w, self._slot0, threading.get_native_id())

    def _leave(self, slot: int, ticket: int) -> bool:
        with self._section():
            return _leave_held(self._w, slot, ticket)

    def wait_for(self, predicate: Callable[[], _T], timeout: float | None = None) -> _T:
        """Wait until ``predicate()`` is true (as :meth:`threading.Condition.wait_for`):
        checked first, then after each wake-up, holding the lock.

        Returns:
            The last value of ``predicate()`` (false if the timeout passed).
        """
        endtime = None
        waittime = timeout
        result = predicate()
        while not result:
            if waittime is not None:
                if endtime is None:
                    endtime = _monotonic() + waittime
                else:
                    waittime = endtime - _monotonic()
                    if waittime <= 0:
                        break
            self.wait(waittime)
            result = predicate()
        return result

    # -- notifying ---------------------------------------------------------------------------
    def notify(self, n: int = 1) -> None:
        """Wake at most ``n`` of the threads waiting now (any process), oldest first.

        Raises:
            RuntimeError: the calling thread does not hold the lock.
            TypeError: ``n`` is not an int.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        if n <= 0 or not self._anyone_waiting():
            return
        with self._section():
            woke = self._grant(n)
        if woke:
            self._wake_all()

    def notify_all(self) -> None:
        """Wake every thread waiting now.

        Raises:
            RuntimeError: the calling thread does not hold the lock.
        """
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        if not self._anyone_waiting():
            return
        with self._section():
            woke = self._grant(WAITER_SLOTS)
        if woke:
            self._wake_all()

    def notifyAll(self) -> None:
        """Deprecated alias of :meth:`notify_all` (as threading's)."""
        warnings.warn(
            "notifyAll() is deprecated, use notify_all() instead", DeprecationWarning, stacklevel=2
        )
        self.notify_all()

    def _anyone_waiting(self) -> bool:
        """Whether some slot holds a waiter not yet notified, read without the internal
        mutex. The caller holds the lock, and a waiter claims its slot before it releases
        the lock, so every waiter that a notify must see is seen; a slot freed meanwhile
        (a timeout) reads either way, and a notify needs no waiter that left."""
        w = self._w
        slot0 = self._slot0
        end = slot0 + min(WAITER_SLOTS, max(0, w[_HIGH])) * SLOT_WORDS
        return any(w[i] > 0 for i in range(slot0, end, SLOT_WORDS))

    def _grant(self, n: int) -> int:
        """Mark the ``n`` oldest live waiting slots notified; free dead ones. Holding the
        internal mutex. How many were notified."""
        w = self._w
        end = self._slot0 + min(WAITER_SLOTS, max(0, w[_HIGH])) * SLOT_WORDS
        waiting = sorted((w[i], i) for i in range(self._slot0, end, SLOT_WORDS) if w[i] > 0)
        done = 0
        for ticket, i in waiting:
            if done >= n:
                break
            if not self._slot_alive(i):
                w[i] = 0
                continue
            w[i] = -ticket  # the commit: this waiter is notified
            done += 1
        if done:
            self._bump()
        return done

    # -- monitoring --------------------------------------------------------------------------
    def statistics(self) -> ConditionStatistics:
        """A snapshot of the condition's state (never blocks)."""
        w = self._w
        tickets = [
            w[i]
            for i in range(self._slot0, self._slot0 + WAITER_SLOTS * SLOT_WORDS, SLOT_WORDS)
            if w[i] and self._slot_alive(i)
        ]
        kind, lock_name = self._lock_info()
        return ConditionStatistics(
            name=self._seg.name,
            lock_name=lock_name,
            lock_type=Kind(kind).type_name,
            owns_lock=self._owns_lock,
            waiters=sum(1 for t in tickets if t > 0),
            notified=sum(1 for t in tickets if t < 0),
            creator_pid=self._seg.header.creator_pid,
        )

    def _repr_fields(self) -> str:
        s = self.statistics()
        return f"lock={s.lock_name!r}, waiters={s.waiters}"


_FUTEX_TID_MASK: Final = 0x3FFFFFFF
_FOREVER: Final = ctypes.byref(_compat.Timespec(2**31 - 1, 0))
_FOREVER_REALTIME: Final = ctypes.byref(_compat.Timespec(2**62, 0))


def _lock_calls(p: Any, depth: int) -> Iterator[int]:
    """A lazy ``map`` that locks the mutex at ``p`` ``depth`` times, waiting as long as it
    takes (the first call blocks, the others re-enter); run with ``list()``: one C call."""
    clock = _compat.CLOCK_MONOTONIC
    if _compat.mutex_clocklock is not None:
        return map(_compat.mutex_clocklock, [p] * depth, [clock] * depth, [_FOREVER] * depth)
    return map(  # pragma: no cover - glibc < 2.30
        _compat.mutex_timedlock, [p] * depth, [_FOREVER_REALTIME] * depth
    )


def _free_mine(w: memoryview, slot0: int, tid: int) -> None:
    """Free the slot of thread ``tid`` of this process, if one is taken (holding the
    internal mutex)."""
    end = slot0 + min(WAITER_SLOTS, max(0, w[_HIGH])) * SLOT_WORDS
    for i in range(slot0, end, SLOT_WORDS):
        if w[i] and w[i + 2] == _compat.pid and w[i + 3] == tid:
            w[i] = 0


def _leave_held(w: memoryview, slot: int, ticket: int) -> bool:
    """Free a waiter's slot (holding the internal mutex); whether it was notified."""
    t = w[slot]
    if t in (ticket, -ticket):
        w[slot] = 0
    return bool(t == -ticket)


_monotonic: Final = time.monotonic
