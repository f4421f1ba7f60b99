"""The robust lock: a process-shared pthread mutex that survives its holder's death.

The mutex is ``PTHREAD_PROCESS_SHARED`` (it lives in the segment, so unrelated
processes can use it), ``PTHREAD_MUTEX_ROBUST`` (when the holding thread dies -- even by
SIGKILL -- the kernel walks its robust list and the next locker gets ``EOWNERDEAD``
at once instead of waiting forever) and ``PTHREAD_MUTEX_ERRORCHECK`` (relocking from
the holding thread returns ``EDEADLK`` instead of deadlocking; unlocking from another
thread returns ``EPERM``).

Recovering a dead holder's lock never "steals" a live one: the kernel, not a timeout,
decides that the holder is gone.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import math
import mmap
import os
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, Self

from . import _compat
from ._errors import (
    HolderDiedWarning,
    LockNotHeldError,
    LockReentryError,
    LockTimeoutError,
    SafeShmError,
    SegmentCorruptedError,
)
from ._segment import HEADER_SIZE, Kind, Segment, SharedStructure

MUTEX_BLOCK: Final = 128
"""Bytes a :class:`RobustMutex` occupies: the pthread mutex (64), a recovery count (8),
padding to two cache lines so that nothing else shares its lines."""
_RECOVERIES_OFFSET: Final = 64

OK: Final = 0
RECOVERED: Final = 1
TIMED_OUT: Final = 2

_WAIT_SLICE: Final = 0.1
"""Longest single sleep in the kernel while blocking without a deadline. Waking every
100 ms (a system call, nothing more) lets Ctrl-C interrupt a blocked ``acquire()``; it
does not delay the hand-over, which the unlocking thread's futex wake-up drives."""

_FUTEX_TID_MASK: Final = 0x3FFFFFFF
_FUTEX_OWNER_DIED: Final = 0x40000000
# glibc's pthread_mutex_t, the same on x86_64 and aarch64: int __lock (the robust futex
# word: owner tid | FUTEX_WAITERS | FUTEX_OWNER_DIED), unsigned __count, int __owner,
# unsigned __nusers, int __kind.
_GLIBC_OWNER_WORD: Final = 2
_GLIBC_KIND_WORD: Final = 4
_GLIBC_OWNER_SPECIAL: Final = (0x7FFFFFFF, 0x7FFFFFFE)  # INCONSISTENT, NOTRECOVERABLE
_reference_kind: int | None = None
_SPINS: Final = 60
"""trylock attempts (~150 ns each) before a contended acquire sleeps in the kernel."""


def init_mutex(mm: mmap.mmap, offset: int) -> None:
    """Initialise a robust, process-shared, error-checking mutex at ``mm[offset]``.

    Only ever called on an unpublished segment, so no other process can see it yet.
    """
    attr = ctypes.create_string_buffer(_compat.PTHREAD_MUTEXATTR_SIZE)
    _check(_compat.mutexattr_init(attr), "pthread_mutexattr_init")
    try:
        _check(_compat.mutexattr_setpshared(attr, _compat.PTHREAD_PROCESS_SHARED),
               "pthread_mutexattr_setpshared")
        _check(_compat.mutexattr_setrobust(attr, _compat.PTHREAD_MUTEX_ROBUST),
               "pthread_mutexattr_setrobust")
        _check(_compat.mutexattr_settype(attr, _compat.PTHREAD_MUTEX_ERRORCHECK),
               "pthread_mutexattr_settype")
        target = ctypes.c_char.from_buffer(mm, offset)
        _check(_compat.mutex_init(ctypes.byref(target), attr), "pthread_mutex_init")
        del target  # drop the buffer export before the caller may close the mapping
    finally:
        _compat.mutexattr_destroy(attr)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise OSError(rc, f"{what}() failed: {os.strerror(rc)}")


def _glibc_kind() -> int:
    """The ``__kind`` word glibc writes for our mutexes (learnt once, from a scratch one)."""
    global _reference_kind  # noqa: PLW0603 - a per-process constant, computed on first use
    if _reference_kind is None:
        scratch = mmap.mmap(-1, MUTEX_BLOCK)
        init_mutex(scratch, 0)
        _reference_kind = struct.unpack_from("=i", scratch, 4 * _GLIBC_KIND_WORD)[0]
        scratch.close()
    return _reference_kind


def check_mutex(words: memoryview, what: str) -> None:
    """Refuse a mutex whose bytes cannot be a robust mutex of ours (glibc only).

    Read from shared memory when a handle binds to it, so that damage is a typed error
    at ``attach()`` instead of ``EINVAL`` on first use, a lock that silently stopped
    being robust (a damaged ``__kind`` can turn it into a plain mutex), or a lock held
    forever by a thread that cannot exist.

    Raises:
        SegmentCorruptedError: the mutex's type, futex word or owner is not possible.
    """
    if not _compat.GLIBC:  # pragma: no cover - musl lays the mutex out differently
        return
    ints = words.cast("B").cast("i")
    kind = ints[_GLIBC_KIND_WORD]
    if kind != _glibc_kind():
        raise SegmentCorruptedError(
            f"{what} is damaged: its mutex has type {kind}, not a robust process-shared "
            f"mutex ({_glibc_kind()})")
    word = ints[0]
    tid = word & _FUTEX_TID_MASK
    owner = ints[_GLIBC_OWNER_WORD]
    if tid >= _compat.PID_MAX_LIMIT or not (0 <= owner < _compat.PID_MAX_LIMIT
                                     or owner in _GLIBC_OWNER_SPECIAL):
        raise SegmentCorruptedError(
            f"{what} is damaged: its mutex names owner thread {tid} / {owner}, which no "
            "Linux thread id can be")
    if tid and not word & _FUTEX_OWNER_DIED and _held_forever(words, tid):
        raise SegmentCorruptedError(
            f"{what} is held by thread {tid}, which no longer exists and was never marked "
            "dead, and no other process has the segment open: nobody can ever release "
            "it (damaged bytes, or a holder whose robust list was lost)")


def _held_forever(words: memoryview, tid: int) -> bool:
    """Whether the mutex in ``words``, whose futex word names ``tid``, can never be freed.

    The slow path of :func:`check_mutex`, taken only when the holder thread does not exist
    here. A holder that exits is marked dead by the kernel (its robust list) before its
    thread id disappears; so a held mutex naming a vanished thread is stuck -- unless the
    holder is in another pid namespace, where its id means nothing here. Any holder has
    the segment open (its flock shows in /proc/locks; as pid 0 from another namespace), so
    the mutex is declared stuck only if no process but this one has the segment open.
    """
    if os.path.exists(f"/proc/{tid}"):
        return False  # alive (or its id reused: then we cannot tell, and assume alive)
    ints = words.cast("B").cast("i")
    if ints[0] & _FUTEX_TID_MASK != tid:
        return False  # released meanwhile
    where = _mapped_file(ctypes.addressof(ctypes.c_char.from_buffer(words)))
    if where is None:
        return False
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if (len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where
                        and fields[4] != str(_compat.pid)):
                    return False
    except OSError:  # pragma: no cover - no /proc: cannot tell
        return False
    return True


def _mapped_file(address: int) -> str | None:
    """``MAJ:MIN:INODE`` (as /proc/locks writes it) of the file mapped at ``address``."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                low, _, high = fields[0].partition("-")
                if int(low, 16) <= address < int(high, 16) and len(fields) >= 5:
                    major, _, minor = fields[3].partition(":")
                    return f"{int(major, 16):02x}:{int(minor, 16):02x}:{fields[4]}"
    except (OSError, ValueError):  # pragma: no cover - no /proc
        return None
    return None  # pragma: no cover - we map it


class RobustMutex:
    """A view of a robust mutex inside a mapping (see :func:`init_mutex`).

    Internal building block: ``SafeLock`` exposes it, and structures that need a lock
    embed one in their own segment.
    """

    __slots__ = ("_p", "_target", "_what", "_words")

    def __init__(self, mm: mmap.mmap, offset: int, what: str) -> None:
        # from_buffer (not from_address) keeps a buffer export on the mmap for as long as
        # this object lives: the mapping cannot be unmapped under an in-flight call.
        self._target = ctypes.c_char.from_buffer(mm, offset)
        self._p = ctypes.byref(self._target)
        self._words = memoryview(mm)[offset : offset + MUTEX_BLOCK].cast("q")
        self._what = what
        check_mutex(self._words, what)

    def acquire(self, timeout: float | None = None) -> int:
        """Lock; return ``OK``, ``RECOVERED`` (the previous holder died) or ``TIMED_OUT``.

        ``timeout=None`` waits forever, ``0`` does not wait.

        Raises:
            LockReentryError: the calling thread already holds it.
        """
        rc = _compat.mutex_trylock(self._p)
        if rc == 0:
            return OK
        return self.finish_acquire(rc, timeout)

    @property
    def pointer(self) -> Any:
        """The ``byref`` of the mutex, for hot paths that call trylock/unlock themselves
        and hand a nonzero trylock result to :meth:`finish_acquire`."""
        return self._p

    def finish_acquire(self, rc: int, timeout: float | None) -> int:
        """Complete an acquire whose ``pthread_mutex_trylock`` returned ``rc != 0``."""
        if rc == _compat.EBUSY:
            if timeout is not None and timeout <= 0:
                return TIMED_OUT
            # Critical sections are a few microseconds of Python: retrying briefly before
            # sleeping in the kernel usually wins the lock without a context switch (what
            # glibc's adaptive mutexes do in C -- a robust mutex cannot be adaptive).
            trylock = _compat.mutex_trylock
            p = self._p
            for _ in range(_SPINS if _compat.spinning_helps() else 0):
                rc = trylock(p)
                if rc != _compat.EBUSY:
                    break
            else:
                rc = self._wait(timeout)
                if rc == _compat.ETIMEDOUT:
                    return TIMED_OUT
        if rc == 0:
            return OK
        if rc == _compat.EOWNERDEAD:
            # We hold it now. Mark it consistent at once: a lock unlocked without this
            # becomes permanently unusable (ENOTRECOVERABLE).
            _check(_compat.mutex_consistent(self._p), "pthread_mutex_consistent")
            self._words[_RECOVERIES_OFFSET // 8] += 1
            return RECOVERED
        if rc == _compat.EDEADLK:
            raise LockReentryError(
                f"{self._what} is already held by this thread; it is not reentrant, so "
                "acquiring it again would deadlock")
        if rc == _compat.ENOTRECOVERABLE:  # pragma: no cover - we always call consistent()
            raise SafeShmError(f"{self._what} is unrecoverable (ENOTRECOVERABLE)")
        if rc == errno.EINVAL:  # the bytes were damaged after we attached
            raise SegmentCorruptedError(
                f"{self._what} is damaged: locking its mutex failed with EINVAL")
        raise OSError(rc, f"locking {self._what} failed: {os.strerror(rc)}")

    def _wait(self, timeout: float | None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        ts = _compat.Timespec()
        pts = ctypes.byref(ts)
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return _compat.ETIMEDOUT
            wake = now + _WAIT_SLICE if deadline is None else min(deadline, now + _WAIT_SLICE)
            if _compat.mutex_clocklock is not None:
                _set_timespec(ts, wake)
                rc: int = _compat.mutex_clocklock(self._p, _compat.CLOCK_MONOTONIC, pts)
            else:  # pragma: no cover - musl / glibc < 2.30
                _set_timespec(ts, time.time() + (wake - now))
                rc = _compat.mutex_timedlock(self._p, pts)
            if rc != _compat.ETIMEDOUT:
                return rc

    def release(self) -> None:
        """Unlock.

        Raises:
            LockNotHeldError: the calling thread does not hold it.
        """
        rc = _compat.mutex_unlock(self._p)
        if rc != 0:
            self._release_failed(rc)

    def _release_failed(self, rc: int) -> None:
        if rc == _compat.EPERM:
            raise LockNotHeldError(f"{self._what} is not held by this thread")
        raise OSError(rc, f"unlocking {self._what} failed: {os.strerror(rc)}")  # pragma: no cover

    def release_if_held_here(self) -> None:
        """Release the lock if the calling thread holds it; otherwise do nothing."""
        if _compat.GLIBC and self.holder_tid() != threading.get_native_id():
            # Not ours: leave it untouched. A trylock here would take a free lock for a
            # moment and, worse, recover a dead holder's lock on the quiet, so the next
            # acquirer would never be told (a `safeshm ls` closes every handle it opens).
            return
        rc = _compat.mutex_trylock(self._p)
        if rc == _compat.EOWNERDEAD:
            _compat.mutex_consistent(self._p)
            self._words[_RECOVERIES_OFFSET // 8] += 1
            rc = 0
        if rc in (0, _compat.EDEADLK):
            _compat.mutex_unlock(self._p)

    def holder_tid(self) -> int | None:
        """The kernel thread id of the holder, 0 if free, ``None`` if this libc hides it.

        A snapshot for diagnostics only: it may change the moment it is read. On glibc
        the robust futex word (the first ``int`` of the mutex) holds the owner's tid.
        """
        if not _compat.GLIBC:  # pragma: no cover - musl keeps the owner elsewhere
            return None
        return int(self._words.cast("B").cast("i")[0]) & _FUTEX_TID_MASK

    def owner_died(self) -> bool:
        """Whether the kernel marked the mutex's holder dead and nobody has recovered it
        yet (the next acquirer will). A snapshot; ``False`` where the libc hides it."""
        if not _compat.GLIBC:  # pragma: no cover - musl keeps the state elsewhere
            return False
        return bool(int(self._words.cast("B").cast("i")[0]) & _FUTEX_OWNER_DIED)

    def locked(self) -> bool:
        """Whether any thread holds the mutex right now. A snapshot; never blocks."""
        tid = self.holder_tid()
        if tid is not None:
            return tid != 0
        rc = _compat.mutex_trylock(self._p)  # pragma: no cover - non-glibc: probe
        if rc == _compat.EOWNERDEAD:  # pragma: no cover
            _compat.mutex_consistent(self._p)
            self._words[_RECOVERIES_OFFSET // 8] += 1
            rc = 0
        if rc == 0:  # pragma: no cover
            _compat.mutex_unlock(self._p)
            return False
        return True  # pragma: no cover

    @property
    def recoveries(self) -> int:
        """How many times a holder died and the lock was recovered (since creation)."""
        return int(self._words[_RECOVERIES_OFFSET // 8])


def _set_timespec(ts: _compat.Timespec, t: float) -> None:
    frac, whole = math.modf(t)
    ts.tv_sec = int(whole)
    ts.tv_nsec = int(frac * 1e9)


def tid_to_pid(tid: int) -> int | None:
    """The process (thread group) a kernel thread id belongs to, if it still exists."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None  # pragma: no cover


@dataclasses.dataclass(frozen=True, slots=True)
class LockStatistics:
    """A snapshot of a :class:`SafeLock` (see :meth:`SafeLock.statistics`)."""

    name: str
    locked: bool
    """Whether some thread held the lock when the snapshot was taken."""
    holder_pid: int | None
    """The process holding it (``None`` when free, dead, or unknown on this libc)."""
    holder_died: bool
    """The last holder died holding it: either the kernel marked it so (``locked`` is
    then false and the next ``acquire()`` recovers it, with a :class:`HolderDiedWarning`),
    or its thread no longer exists although the lock still names it (``locked`` true:
    unrecoverable; seen only when a process exits in a way that skips the kernel's robust
    list, or when the holder runs in another pid namespace and cannot be seen)."""
    recoveries: int
    """How many times a holder died and a later acquirer recovered the lock."""
    creator_pid: int


class SafeLock(SharedStructure):
    """A named mutex shared by processes and threads, robust to its holder's death.

    Any process of the same user can attach to it by name. If the holding thread or
    process dies -- even by ``SIGKILL`` -- the next ``acquire()`` gets the lock at once
    and is told with a :class:`~safeshm.HolderDiedWarning` (it never deadlocks, and a
    live holder is never robbed on a timeout). The lock is owned by the acquiring
    thread: acquiring it again from that thread raises :class:`~safeshm.LockReentryError`
    instead of deadlocking, and only that thread may release it.

    ``with lock:`` acquires and releases it, like :class:`threading.Lock`; the handle's
    own lifecycle is :meth:`close` and :meth:`unlink`.

    Example:
        >>> lock = SafeLock.create()
        >>> with lock:
        ...     pass  # one thread in any process at a time
        >>> lock.close(); lock.unlink()
    """

    _KIND = Kind.LOCK
    _LAYOUT = 1
    _MAPPED = ("_mutex",)

    _mutex: RobustMutex
    # The same mutex, never swapped out at close(): a thread that holds the lock can
    # always release it, even after another thread closed the handle (otherwise the lock
    # would stay held by a live thread, and every other process would wait for it).
    _unlocker: RobustMutex

    @classmethod
    def create(cls, *, name: str | None = None) -> Self:
        """Create a new lock, initially free.

        Args:
            name: the name to attach by; a random one when ``None``.

        Raises:
            FileExistsError: a segment with this name exists.
            InvalidNameError: ``name`` is not a valid segment name.
        """
        seg = Segment.create(name, kind=cls._KIND, layout=cls._LAYOUT,
                             payload_size=MUTEX_BLOCK,
                             init=lambda mm: init_mutex(mm, HEADER_SIZE))
        return cls._from_segment(seg)

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing lock by name, from any process of the same user.

        Raises:
            FileNotFoundError: no segment has this name.
            IncompatibleSegmentError: the segment is not a ``SafeLock``.
        """
        return cls._from_segment(cls._attach_segment(name))

    @classmethod
    def open(cls, name: str) -> Self:
        """Attach to the lock ``name``, creating it first if needed (race-free)."""
        return cls._open_segment(name, lambda: cls.create(name=name))

    def _bind(self, mm: mmap.mmap) -> None:
        self._mutex = self._unlocker = RobustMutex(mm, HEADER_SIZE,
                                                   f"SafeLock {self._seg.name!r}")

    def acquire(self, timeout: float | None = None, *, blocking: bool = True) -> bool:
        """Acquire the lock, waiting up to ``timeout`` seconds (forever if ``None``).

        Waiting sleeps in the kernel; the lock is handed over as soon as it is released.

        Returns:
            ``True`` once acquired; ``False`` if the timeout expired first.

        Raises:
            LockReentryError: the calling thread already holds the lock.
            ValueError: ``timeout`` is negative or NaN, or given with ``blocking=False``.
            TypeError: ``timeout`` is not a number (``acquire(True)`` is a mistake: the
                first argument is the timeout, not ``blocking``).

        Warns:
            HolderDiedWarning: the previous holder died holding the lock; it is now held
                by the caller. (If warnings are turned into errors, the lock is released
                before the error propagates.)
        """
        mutex = self._mutex
        if timeout is None and blocking:
            result = mutex.acquire(None)
        else:
            result = mutex.acquire(_check_timeout(timeout, blocking))
        if result == OK:
            return True
        if result == TIMED_OUT:
            return False
        self._warn_recovered(3)
        return True

    def _warn_recovered(self, stacklevel: int) -> None:
        try:
            warnings.warn(
                HolderDiedWarning(
                    f"SafeLock {self._seg.name!r}: the previous holder died while holding "
                    "it; the lock was recovered and is now held by this thread (whatever "
                    "the dead holder was changing under it may be incomplete)"),
                stacklevel=stacklevel)
        except BaseException:
            self._mutex.release()
            raise

    def release(self) -> None:
        """Release the lock. Works even after :meth:`close`, for a thread that holds it.

        Raises:
            LockNotHeldError: the calling thread does not hold it.
            SegmentClosedError: the handle is closed and this thread does not hold it.
        """
        try:
            self._unlocker.release()
        except LockNotHeldError:
            if self._seg.closed:
                self._raise_closed()
            raise

    def __enter__(self) -> Self:
        if self._mutex.acquire(None) == RECOVERED:
            self._warn_recovered(3)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._unlocker.release()

    @contextmanager
    def acquired(self, timeout: float | None = None) -> Iterator[Self]:
        """``with lock.acquired(timeout=2.0):`` -- hold the lock for a block, or raise.

        Raises:
            LockTimeoutError: not acquired within ``timeout`` seconds (also a
                ``TimeoutError``).
        """
        if not self.acquire(timeout):
            raise LockTimeoutError(
                f"SafeLock {self._seg.name!r} not acquired within {timeout} s")
        try:
            yield self
        finally:
            self.release()

    def locked(self) -> bool:
        """Whether any thread (of any process) holds the lock right now. A snapshot."""
        return self._mutex.locked()

    def statistics(self) -> LockStatistics:
        """A snapshot of the lock's state, for monitoring (never blocks)."""
        mutex = self._mutex
        tid = mutex.holder_tid()
        holder = tid_to_pid(tid) if tid else None
        # A holder thread that is gone while the lock still names it (read again: it may
        # just have released the lock and exited).
        gone = bool(tid) and holder is None and mutex.holder_tid() == tid
        return LockStatistics(
            name=self._seg.name,
            locked=mutex.locked(),
            holder_pid=holder,
            holder_died=gone or mutex.owner_died(),
            recoveries=mutex.recoveries,
            creator_pid=self._seg.header.creator_pid,
        )

    def _before_close(self) -> None:
        mutex = self.__dict__.get("_mutex")
        if isinstance(mutex, RobustMutex):
            mutex.release_if_held_here()

    def _repr_fields(self) -> str:
        return f"locked={self.locked()}"


def _check_timeout(timeout: Any, blocking: bool) -> float | None:
    if not blocking:
        if timeout is not None:
            raise ValueError("a timeout cannot be given with blocking=False")
        return 0.0
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__}"
            + (" (use blocking=False for a non-blocking acquire)"
               if isinstance(timeout, bool) else ""))
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    return float(timeout)
