"""SafeRLock: :class:`threading.RLock` shared by processes, robust to its holder's death.

The lock is one robust, process-shared, **recursive** pthread mutex: the C library keeps
the owner (the robust futex word names the owning thread's kernel id) and the recursion
count, so every step -- a first acquire, a re-entry, a release at any depth -- is one C
call, and an exception from a signal handler can land only before or after it (the
pattern of ``_lock``; ``release`` and ``__exit__`` are C-level calls, as SafeLock's).

When the owning thread dies -- even by SIGKILL, at any depth -- the kernel marks the
mutex's owner dead (the thread's robust list), and the next acquirer gets it at once, at
depth 1, told with a :class:`~safeshm.HolderDiedWarning`; waiters sleep in the kernel in
0.1 s slices (for Ctrl-C and ``close()``), and a death wakes one of them at once. A
forked child never owns its parent's hold: ownership is the kernel thread id, which
differs.

The depth is read from glibc's mutex (``__count``); on another C library
``_recursion_count()`` and ``statistics().depth`` are unknown (``-1``), and the
condition variable (which releases every level) is not available.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import mmap
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Final, Self

from . import _compat
from ._errors import HolderDiedWarning, SegmentClosedError
from ._lock import (
    _LIBC_GIL,
    _RECOVERIES_OFFSET,
    MUTEX_BLOCK,
    OWNER_WORD,
    RECOVERED,
    TIMED_OUT,
    RobustMutex,
    _c_level,
    _check,
    _keep_mapping_if_held,
    _UnlockResult,
    check_mutex,
    tid_to_pid,
)
from ._segment import HEADER_SIZE, Kind, Segment, SharedStructure
from ._timeout import check_lock_timeout

PTHREAD_MUTEX_RECURSIVE: Final = 1
_GLIBC_COUNT_WORD: Final = 1  # glibc's pthread_mutex_t: unsigned __count (recursion depth)
_GLIBC_KIND_WORD: Final = 4
_FUTEX_TID_MASK: Final = 0x3FFFFFFF
_FUTEX_OWNER_DIED: Final = 0x40000000
_FUTEX_WAITERS: Final = 0x80000000
_NEVER: Final = math.inf
WAIT_SLICE: Final = 0.1
"""The longest single sleep in the kernel: a blocked acquire checks for signals and for
``close()`` at least this often (a dead owner wakes it at once)."""
_EAGAIN: Final = 11  # errno.EAGAIN on Linux: the recursion count would overflow

_trylock: Final = _compat.mutex_trylock
_unlock: Final = _compat.mutex_unlock
_consistent: Final = _compat.mutex_consistent

unlock_n: Final = functools.partial(sorted, key=_unlock)
"""``unlock_n([p] * n)``: n unlocks in ONE call (``sorted`` calls its key from C, so no
signal handler runs between them)."""
relock_n: Final = functools.partial(sorted, key=_trylock)
"""``relock_n([p] * n)``: n re-entries of a mutex this thread holds, in one call."""


def init_recursive_mutex(mm: mmap.mmap, offset: int) -> None:
    """A robust, process-shared, recursive mutex at ``mm[offset]`` (unpublished segment)."""
    attr = ctypes.create_string_buffer(_compat.PTHREAD_MUTEXATTR_SIZE)
    _check(_compat.mutexattr_init(attr), "pthread_mutexattr_init")
    try:
        _check(
            _compat.mutexattr_setpshared(attr, _compat.PTHREAD_PROCESS_SHARED),
            "pthread_mutexattr_setpshared",
        )
        _check(
            _compat.mutexattr_setrobust(attr, _compat.PTHREAD_MUTEX_ROBUST),
            "pthread_mutexattr_setrobust",
        )
        _check(
            _compat.mutexattr_settype(attr, PTHREAD_MUTEX_RECURSIVE),
            "pthread_mutexattr_settype",
        )
        target = ctypes.c_char.from_buffer(mm, offset)
        _check(_compat.mutex_init(ctypes.byref(target), attr), "pthread_mutex_init")
        del target
    finally:
        _compat.mutexattr_destroy(attr)


_reference_kind: int | None = None


def _recursive_kind() -> int:
    """glibc's ``__kind`` word for our recursive mutexes (learnt once, from a scratch one)."""
    global _reference_kind  # noqa: PLW0603 - a per-process constant
    if _reference_kind is None:
        scratch = mmap.mmap(-1, MUTEX_BLOCK)
        init_recursive_mutex(scratch, 0)
        _reference_kind = int(memoryview(scratch).cast("i")[_GLIBC_KIND_WORD])
        scratch.close()
    return _reference_kind


class _RecursiveMutex(RobustMutex):
    """A :class:`RobustMutex` view of a recursive mutex (its own type check)."""

    __slots__ = ("_seg",)

    def __init__(self, mm: mmap.mmap, offset: int, what: str, seg: Segment) -> None:
        self._seg = seg
        self._target = ctypes.c_char.from_buffer(mm, offset)
        self._p = ctypes.byref(self._target)
        self._words = memoryview(mm)[offset : offset + MUTEX_BLOCK].cast("q")
        self.owner = memoryview(mm)[offset + 4 * OWNER_WORD : offset + 4 * OWNER_WORD + 4].cast("i")
        self._what = what
        self.exit_c = None
        check_mutex(
            self._words,
            what,
            _recursive_kind(),
            "a robust recursive process-shared mutex",
        )

    def _wait(self, deadline: float) -> int:
        # RobustMutex._wait, plus: a handle closed by another thread ends the wait at the
        # next slice (SegmentClosedError), as the _sync primitives' waits do.
        ts = _compat.Timespec()
        pts = ctypes.byref(ts)
        seg = self._seg
        while True:
            if seg.closed:
                raise SegmentClosedError(f"{self._what} is closed on this handle")
            now = time.monotonic()
            if now >= deadline:
                return _compat.ETIMEDOUT
            wake = min(deadline, now + WAIT_SLICE)
            if _compat.mutex_clocklock is not None:
                frac, whole = math.modf(wake)
                ts.tv_sec, ts.tv_nsec = int(whole), int(frac * 1e9)
                rc: int = _compat.mutex_clocklock(self._p, _compat.CLOCK_MONOTONIC, pts)
            else:  # pragma: no cover - musl / glibc < 2.30
                frac, whole = math.modf(time.time() + (wake - now))
                ts.tv_sec, ts.tv_nsec = int(whole), int(frac * 1e9)
                rc = _compat.mutex_timedlock(self._p, pts)
            if rc != _compat.ETIMEDOUT:
                return rc

    def depth(self) -> int:
        """The recursion depth of the current holder (0: free; -1: unknown on this libc).
        A snapshot."""
        if not _compat.GLIBC:  # pragma: no cover
            return -1
        if not self.owner[0] & _FUTEX_TID_MASK:
            return 0
        return int(self._words.cast("B").cast("I")[_GLIBC_COUNT_WORD])


@dataclasses.dataclass(frozen=True, slots=True)
class RLockStatistics:
    """A snapshot of a :class:`SafeRLock` (see :meth:`SafeRLock.statistics`)."""

    name: str
    locked: bool
    owner_pid: int | None
    """The owning process (``None``: free, or the owner is gone)."""
    owner_tid: int | None
    """The owning thread's kernel id (``threading.get_native_id()``), ``None`` when free."""
    depth: int
    """The owner's recursion depth (0 when free; -1 unknown on a non-glibc libc)."""
    waiters: bool
    """Whether some thread sleeps in the kernel waiting for it (the futex's waiters bit:
    the mutex does not count them)."""
    holder_died: bool
    """The owner died holding it and nobody has recovered it yet (the next acquirer will)."""
    recoveries: int
    """How many times an owner died and a later acquirer recovered the lock."""
    creator_pid: int


class SafeRLock(SharedStructure):
    """A re-entrant lock shared by processes and threads: :class:`threading.RLock`, robust.

    The owning thread may acquire it again (each ``acquire`` needs its ``release``); any
    other thread, in any process, waits. If the owner dies -- even by ``SIGKILL``, at any
    depth -- the next ``acquire()`` gets it at once (depth 1) with a
    :class:`~safeshm.HolderDiedWarning`. ``with rlock:`` acquires and releases it; the
    handle's own lifecycle is :meth:`close` and :meth:`unlink`.

    Example:
        >>> rlock = SafeRLock.create()
        >>> with rlock:
        ...     with rlock:
        ...         rlock._recursion_count()
        2
        >>> rlock.close(); rlock.unlink()
    """

    _KIND = Kind.RLOCK
    _LAYOUT = 1
    _MAPPED = ("_mutex", "_hot")

    _mutex: _RecursiveMutex
    _hot: tuple[Any, _RecursiveMutex]
    # Never swapped out at close(): the owner can always release (see SafeLock).
    _unlocker: _RecursiveMutex
    _release_c: Any
    _exit_c: Any

    @classmethod
    def create(cls, *, name: str | None = None) -> Self:
        """Create a new re-entrant lock, initially free.

        Raises:
            SegmentExistsError: a segment with this name exists (a ``FileExistsError``).
            InvalidNameError: ``name`` is not a valid segment name.
        """
        seg = Segment.create(
            name,
            kind=cls._KIND,
            layout=cls._LAYOUT,
            payload_size=MUTEX_BLOCK,
            init=lambda mm: init_recursive_mutex(mm, HEADER_SIZE),
        )
        return cls._from_segment(seg)

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing re-entrant lock by name.

        Raises:
            SegmentNotFoundError: no segment has this name (a ``FileNotFoundError``).
            IncompatibleSegmentError: the segment is not a ``SafeRLock``.
        """
        return cls._from_segment(cls._attach_segment(name))

    @classmethod
    def open(cls, name: str) -> Self:
        """Attach to the lock ``name``, creating it first if needed (race-free)."""
        return cls._open_segment(name, lambda: cls.create(name=name))

    def _bind(self, mm: mmap.mmap) -> None:
        what = f"SafeRLock {self._seg.name!r}"
        mutex = _RecursiveMutex(mm, HEADER_SIZE, what, self._seg)
        self._mutex = self._unlocker = mutex
        self._hot = (mutex.pointer, mutex)
        release = _LIBC_GIL["pthread_mutex_unlock"]
        release.restype = _UnlockResult(what, self._seg).__getitem__
        self._release_c = functools.partial(release, mutex.pointer)
        exit_ = _LIBC_GIL["pthread_mutex_unlock"]
        exit_.argtypes = (ctypes.c_void_p, _AnyArg, _AnyArg, _AnyArg)  # type: ignore[assignment]
        exit_.restype = _UnlockResult(what, self._seg).__getitem__
        self._exit_c = functools.partial(exit_, mutex.pointer)
        # A held robust mutex must stay mapped while its thread lives (see SafeLock).
        weakref.finalize(self, _keep_mapping_if_held, mutex)

    def acquire(self, blocking: bool = True, timeout: float | None = -1) -> bool:  # noqa: PLR0912 - inlined lock pattern
        """Acquire the lock, like :meth:`threading.RLock.acquire`; re-entrant.

        The owning thread gets it again at once (one more level). ``timeout=-1`` and
        ``None`` wait forever; ``acquire(False)`` tries once.

        Returns:
            ``True`` once acquired; ``False`` on a timeout (or, without ``blocking``, if
            another thread owns it).

        Raises:
            ValueError: a timeout with ``blocking=False``, a negative one other than -1,
                or NaN.
            TypeError: ``timeout`` is not a number.
            OverflowError: the recursion depth would pass the C library's limit (2**32-1).

        Warns:
            HolderDiedWarning: the previous owner died holding it; it is now the caller's,
                at depth 1.
        """
        if blocking:
            if timeout is None or timeout == -1:
                deadline = _NEVER
            else:
                deadline = time.monotonic() + check_lock_timeout(timeout)  # type: ignore[operator]
        elif timeout is None or timeout == -1:
            deadline = 0.0
        else:
            raise ValueError("can't specify a timeout for a non-blocking call")
        p, mutex = self._hot
        # The pattern of _lock (an exception anywhere here leaves the depth as it was):
        # a re-entry is a trylock that returns 0, undone by one unlock.
        rc = -1
        try:
            rc = _trylock(p)
            if rc:
                if rc == _EAGAIN:
                    rc = 0x7FFF  # nothing taken: nothing to undo
                    raise OverflowError(f"{mutex._what}: recursion depth limit reached")
                got = mutex.finish_acquire(rc, deadline)
                if got == TIMED_OUT:
                    return False
                if got == RECOVERED:
                    self._warn_recovered(3)
        except BaseException:
            if not rc:
                _unlock(p)
            elif rc != 0x7FFF:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
            raise
        return True

    def _warn_recovered(self, stacklevel: int) -> None:
        warnings.warn(
            HolderDiedWarning(
                f"SafeRLock {self._seg.name!r}: the previous owner died holding it (at "
                "any depth); it was recovered and is now held by this thread at depth 1 "
                "(whatever the dead owner was changing under it may be incomplete)"
            ),
            stacklevel=stacklevel,
        )

    if TYPE_CHECKING:

        def release(self) -> None:
            """Release one level (see the runtime definition below)."""

        def __exit__(self, *exc_info: object) -> None: ...
    else:
        release = _c_level(
            "_release_c",
            doc="""\
Release one level of the lock; at depth 0 it is free for others. One C call.

Raises:
    LockNotHeldError: the calling thread does not own it (a ``RuntimeError``, as
        :meth:`threading.RLock.release` raises).
""",
        )
        __exit__ = _c_level("_exit_c")

    def __enter__(self) -> Self:
        p, mutex = self._hot
        rc = -1
        try:
            rc = _trylock(p)
            if rc:
                if rc == _EAGAIN:
                    rc = 0x7FFF
                    raise OverflowError(f"{mutex._what}: recursion depth limit reached")
                if mutex.finish_acquire(rc, _NEVER) == RECOVERED:
                    self._warn_recovered(3)
        except BaseException:
            if not rc:
                _unlock(p)
            elif rc != 0x7FFF:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
            raise
        return self

    # -- threading.RLock's private protocol (threading.Condition uses it) ------------------
    def _is_owned(self) -> bool:
        """Whether the calling thread owns the lock."""
        return self._mutex.held_here()

    def _recursion_count(self) -> int:
        """The calling thread's recursion depth (0 if it does not own the lock)."""
        mutex = self._mutex
        return mutex.depth() if mutex.held_here() else 0

    def _release_save(self) -> int:
        """Release every level at once (one C call); the depth, for :meth:`_acquire_restore`.

        Raises:
            RuntimeError: the calling thread does not own the lock.
        """
        p, mutex = self._hot
        if not mutex.held_here():
            raise RuntimeError("cannot release un-acquired lock")
        depth = mutex.depth()
        if depth < 0:  # pragma: no cover - not glibc
            raise NotImplementedError("the recursion depth is unknown on this C library")
        unlock_n([p] * depth)
        return depth

    def _acquire_restore(self, depth: int, deadline: float = _NEVER) -> bool:
        """Acquire the lock again at ``depth`` (blocking until ``deadline``; ``True`` if
        acquired). An exception leaves it free."""
        p, mutex = self._hot
        rc = -1
        try:
            rc = _trylock(p)
            if rc:
                got = mutex.finish_acquire(rc, deadline)
                if got == TIMED_OUT:
                    return False
                if got == RECOVERED:
                    self._warn_recovered(4)
            if depth > 1:
                rc = -2
                relock_n([p] * (depth - 1))
        except BaseException:
            if rc == -2:
                # relock_n is one C call that cannot fail for the owner: every level is
                # taken, as the caller asked; keep them.
                pass
            elif not rc:
                _unlock(p)
            else:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
            raise
        return True

    def locked(self) -> bool:
        """Whether any thread (of any process) owns the lock right now. A snapshot."""
        return self._mutex.locked()

    def statistics(self) -> RLockStatistics:
        """A snapshot of the lock's state (never blocks)."""
        mutex = self._mutex
        word = int(mutex.owner[0])
        tid = word & _FUTEX_TID_MASK
        return RLockStatistics(
            name=self._seg.name,
            locked=bool(tid),
            owner_pid=tid_to_pid(tid) if tid else None,
            owner_tid=tid or None,
            depth=mutex.depth(),
            waiters=bool(word & _FUTEX_WAITERS),
            holder_died=mutex.owner_died(),
            recoveries=int(mutex._words[_RECOVERIES_OFFSET // 8]),
            creator_pid=self._seg.header.creator_pid,
        )

    def _before_close(self) -> None:
        # A thread that closes the handle while owning the lock releases every level (as
        # SafeLock releases its hold): no other process should wait on a closed handle.
        mutex = self.__dict__.get("_mutex")
        if isinstance(mutex, _RecursiveMutex) and mutex.held_here():
            unlock_n([mutex.pointer] * max(1, mutex.depth()))

    def _repr_fields(self) -> str:
        return f"locked={self.locked()}"


class _AnyArg:
    """``argtypes`` entry: any object, passed as its truth value (``__exit__``'s args)."""

    from_param = bool
