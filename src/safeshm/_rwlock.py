"""SafeRWLock: a read-write lock shared by processes and threads, robust to a holder's death.

Many readers or one writer, with **writer preference**: once a writer waits, new readers
wait too (readers that already hold it finish), so a stream of readers never starves a
writer.

Shared state (see ``_sync``'s layout): the state words hold the derived totals (read holds,
waiting readers, waiting writers) and the writer's identity (pid, thread id); each process's
holder record holds its own read holds, its write hold and its waiting readers/writers.
A record's count is the store that commits each step, so when a process dies -- holding
reads, holding the write lock, or waiting for it -- reaping its record undoes exactly what
it held, and :meth:`SafeRWLock._rederive` recomputes the totals from the live records.
A blocked attempt (also ``blocking=False``) and every waiter, at each wake-up, look for
dead holders when nobody in any process has for :data:`~safeshm._sync.WAIT_SLICE`
(0.1 s), and at once when the writer's process is gone; waiters wake at least once per
slice. So a dead holder's lock passes to a waiter within about one slice of its death
(a try-acquire sees a dead *writer* at once, dead readers within a slice); whoever
reaps it gets a :class:`HolderDiedWarning`, once per dead process.

Ownership: a read hold belongs to the thread that took it (per thread, per process and per
lock -- any handle of the same lock in that process can release it); the write hold
belongs to the thread that took it. Re-entrancy:

* a thread that holds a read lock may take more read holds (each needs its own release);
  they are granted at once, even while a writer waits (making them wait would deadlock);
* the write lock while holding it, the read lock while holding the write lock, and the
  write lock while holding a read lock (an upgrade) raise :class:`LockReentryError`: each
  would deadlock;
* releasing what the calling thread does not hold raises :class:`LockNotHeldError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
from typing import Any, Final, Self

from . import _compat
from ._errors import LockNotHeldError, LockReentryError, LockTimeoutError, SafeShmError
from ._int64 import INT64_MAX
from ._lock import _FUTEX_TID_MASK, EDEADLK, RECOVERED, TIMED_OUT, RobustMutex
from ._segment import Kind
from ._sync import (
    _SEQ_MASK,
    R_COUNTS,
    R_PID,
    RECORD_WORDS,
    STATE_WORDS,
    WAIT_SLICE,
    SyncPrimitive,
    _Timeout,
)
from ._timeout import check_lock_timeout, check_timeout

_trylock: Final = _compat.mutex_trylock
_unlock: Final = _compat.mutex_unlock
_consistent: Final = _compat.mutex_consistent

# State words (derived ones are recomputed by _rederive).
_READERS: Final = 0  # derived: read holds, all processes
_WPID: Final = 1  # the writer's pid (0: no writer)
_WTID: Final = 2  # the writer's native thread id
_WWAIT: Final = 3  # derived: writers waiting
_RWAIT: Final = 4  # derived: readers waiting
_RECOVERIES: Final = 5  # dead holders whose holds were released
_REAPED: Final = 6  # time.monotonic_ns() of the last look for dead holders (any process)

# Count words of a holder record (offsets in the record).
_C_READ: Final = R_COUNTS + 0  # read holds of this process (the commit of a read step)
_C_WRITE: Final = R_COUNTS + 1  # 1 while a thread of this process holds the write lock
_C_WWAIT: Final = R_COUNTS + 2  # threads of this process waiting to write
_C_RWAIT: Final = R_COUNTS + 3  # threads of this process waiting to read

_GRACE: Final = 0.005
"""How long any call (also ``blocking=False``) may wait for the *internal* mutex, which
is held for microseconds at a time: a free lock is never refused for that alone."""
_NEVER: Final = math.inf
_SLICE_NS: Final = int(WAIT_SLICE * 1e9)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        pass
    return True


class _ThisThread(threading.local):
    """Per thread: its native id (a system call to ask each time) and its read holds,
    ``{(segment dev/inode, pid): holds}`` (the pid: a forked child holds nothing)."""

    def __init__(self) -> None:
        self.tid = threading.get_native_id()
        self.reads: dict[tuple[Any, ...], int] = {}


_tls = _ThisThread()


def _after_fork_in_child() -> None:
    global _tls  # noqa: PLW0603 - the forking thread's locals name the parent's thread
    _tls = _ThisThread()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _reads() -> dict[tuple[Any, ...], int]:
    """The calling thread's read holds (see :class:`_ThisThread`)."""
    return _tls.reads


def _deadline(blocking: bool, timeout: float | None) -> float:
    if blocking:
        if timeout is None or timeout == -1:
            return _NEVER
        return time.monotonic() + check_lock_timeout(timeout)  # type: ignore[operator]
    if timeout is None or timeout == -1:
        return 0.0
    raise ValueError("can't specify a timeout for a non-blocking call")


@dataclasses.dataclass(frozen=True, slots=True)
class RWLockStatistics:
    """A snapshot of a :class:`SafeRWLock` (see :meth:`SafeRWLock.statistics`)."""

    name: str
    readers: int
    """Read holds right now, in all processes."""
    readers_by_pid: dict[int, int]
    """Read holds per live process that has any."""
    writer_pid: int | None
    """The process holding the write lock (``None``: nobody)."""
    writer_tid: int | None
    """Its thread (native id)."""
    waiting_readers: int
    """Threads waiting for a read lock (any process). A dead waiter's count goes at the
    next look for dead holders (at least every 0.1 s while anyone waits)."""
    waiting_writers: int
    """Threads waiting for the write lock (as ``waiting_readers``). A dead one's place in
    line keeps new readers out until then: up to about 0.1 s."""
    recoveries: int
    """How many dead processes' holds (read or write) were released."""
    processes: int
    """Holder records: how many processes can use the lock at once."""
    creator_pid: int


class RWLockHold:
    """``with rw.read():`` / ``with rw.write(timeout=1.0):`` (see :meth:`SafeRWLock.read`)."""

    __slots__ = ("_acquire", "_release", "_rw", "_timeout", "_what")

    def __init__(self, rw: SafeRWLock, write: bool, timeout: float | None) -> None:
        self._rw = rw
        self._timeout = -1 if timeout is None else timeout
        self._acquire = rw.acquire_write if write else rw.acquire_read
        self._release = rw.release_write if write else rw.release_read
        self._what = "write" if write else "read"

    def __enter__(self) -> SafeRWLock:
        if not self._acquire(True, self._timeout):
            raise LockTimeoutError(
                f"{self._rw._what}: {self._what} lock not acquired within {self._timeout} s"
            )
        return self._rw

    def __exit__(self, *exc_info: object) -> None:
        rw = self._rw
        write = self._what == "write"
        before = -1
        try:
            if not write:
                # No call until the store (a signal handler runs at calls): the count
                # this thread holds, to tell afterwards whether the release committed.
                key = (rw._key, _compat.pid)
                reads = _tls.reads
                before = reads[key] if key in reads else 0  # noqa: SIM401 - no call
            self._release()
        except SafeShmError:
            raise
        except BaseException:
            # An exception from a signal handler before the release committed (its
            # stores, the thread's own count included, are all or nothing): the block is
            # left all the same, so the hold goes (first order: one such exception).
            if write:
                w = rw._w
                if w[_WTID] == _tls.tid and w[_WPID] == _compat.pid:
                    rw._release_write()
            elif before > 0:
                reads = _reads()
                key = (rw._key, _compat.pid)
                if reads.get(key, 0) == before:
                    rw._release_read(reads, key)
            raise


class SafeRWLock(SyncPrimitive):
    """A read-write lock shared by processes and threads: many readers or one writer.

    Writer preference: once a writer waits, new readers wait behind it. When a process
    dies holding read locks, the write lock, or while waiting for it, what it held is
    released: a waiter notices within 0.1 s, and the next acquirer is told with a
    :class:`~safeshm.HolderDiedWarning`.

    Holds belong to the acquiring thread. A thread may nest read holds; asking for the
    write lock while holding any hold (or for a read hold while writing) raises
    :class:`~safeshm.LockReentryError` instead of deadlocking, and releasing what the
    thread does not hold raises :class:`~safeshm.LockNotHeldError`. ``close()`` releases
    nothing: a hold ends with its release (through any handle of the lock in the same
    process) or with its process.

    Example:
        >>> with SafeRWLock.create() as rw:
        ...     with rw.read():
        ...         pass  # any number of readers, in any process
        ...     with rw.write():
        ...         pass  # one writer, no readers
    """

    _KIND = Kind.RWLOCK
    _LAYOUT = 1

    _MAPPED = (*SyncPrimitive._MAPPED, "_hot")

    _key: tuple[int, int]
    _hot: tuple[Any, memoryview, RobustMutex]  # (pointer, owner word, the mutex)
    _read_cm: RWLockHold
    _write_cm: RWLockHold

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, *, name: str | None = None, processes: int | None = None) -> Self:
        """Create a new read-write lock, initially free.

        Args:
            name: the name to attach by; a random one when ``None``.
            processes: how many processes can use it at the same time (one holder record
                each; records of dead processes are reused). Default 128.

        Raises:
            SegmentExistsError: a segment with this name exists (a ``FileExistsError``).
            InvalidNameError: ``name`` is not a valid segment name.
            TypeError, ValueError: ``processes`` is not an int from 1 to 65536.
        """
        return cls._from_segment(cls._create_segment(name, (0,) * 6, processes=processes))

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing read-write lock by name, from any process of the same user.

        Raises:
            SegmentNotFoundError: no segment has this name (a ``FileNotFoundError``).
            IncompatibleSegmentError: the segment is not a ``SafeRWLock``.
        """
        return cls._from_segment(cls._attach_segment(name))

    @classmethod
    def open(cls, name: str, *, processes: int | None = None) -> Self:
        """Attach to the lock ``name``, creating it (free) first if needed (race-free);
        ``processes`` applies only if this call creates it."""
        return cls._open_segment(name, lambda: cls.create(name=name, processes=processes))

    def _bind(self, mm: Any) -> None:
        super()._bind(mm)
        self._key = self._seg.dev_ino
        self._hot = (self._mutex.pointer, self._mutex.owner, self._mutex)
        self._read_cm = RWLockHold(self, False, None)
        self._write_cm = RWLockHold(self, True, None)

    # -- reading ---------------------------------------------------------------------------
    def acquire_read(self, blocking: bool = True, timeout: float | None = -1) -> bool:  # noqa: PLR0912 - inlined lock pattern
        """Take a read hold, like :meth:`threading.Lock.acquire`'s signature.

        Waits while a writer holds the lock or waits for it (unless this thread already
        holds a read: nested reads are granted at once).

        Returns:
            ``True`` once held; ``False`` if the timeout expired first (or, without
            ``blocking``, if it is not available at once).

        Raises:
            LockReentryError: the calling thread holds the write lock.
            ValueError: a timeout with ``blocking=False``, a negative timeout other than
                ``-1``, or NaN.
            TypeError: ``timeout`` is not a number.
            ProcessTableFullError: every holder record is owned by a live process.
            SegmentClosedError: the handle is closed (also by another thread while this
                one waits).

        Warns:
            HolderDiedWarning: a process died holding the lock (or waiting for it); what
                it held was released.
        """
        deadline = _deadline(blocking, timeout)
        w = self._w
        me = _tls
        tid = me.tid
        pid = _compat.pid
        if w[_WTID] == tid and w[_WPID] == pid:
            raise LockReentryError(
                f"{self._what}: this thread holds the write lock; taking a read hold too "
                "would deadlock (release the write lock first)"
            )
        reads = me.reads
        key = (self._key, pid)
        mine = reads.get(key, 0)
        p, owner, mutex = self._hot
        got = False
        # The internal mutex is taken and released inline (the pattern in _lock's comment):
        # a Section object costs more than the rest of an uncontended read.
        rc = -1
        if owner[0]:
            mutex.check_not_mine()
        try:
            try:
                rc = _trylock(p)
                if rc:
                    rc = self._lock_slow(rc, deadline)
                    if rc:
                        return False
                mpid, rec = self._mine
                if mpid != pid:
                    rec = self._record()
                if (
                    not mine
                    and (w[_WPID] or w[_WWAIT])
                    and not self._wait(rec, deadline, _free_for_reader, _C_RWAIT, _RWAIT)
                ):
                    return False
                if w[_READERS] >= INT64_MAX:  # only damage: the total is derived
                    self._rederive()
                # Commit (the record's count), then the derived total and this thread's
                # count: plain stores, which no signal handler can interrupt.
                w[rec + _C_READ] += 1
                w[_READERS] += 1
                reads[key] = mine + 1
                got = True
            finally:
                if not rc:
                    _unlock(p)  # EPERM (ignored) after a wait's relock gave up
                elif rc != EDEADLK:
                    try:
                        _consistent(p)
                    finally:
                        _unlock(p)
        except _Timeout:
            return False  # the wait's relock gave up at the deadline (never with the hold)
        except BaseException:
            if got:  # held, but the caller will not know: give it back
                self._release_read(reads, key)
            raise
        return True

    def _lock_slow(self, rc: int, deadline: float) -> int:
        """The internal mutex's trylock returned ``rc``: wait for it (a short grace even
        for ``blocking=False``: see :data:`_GRACE`). 0: held; ``EDEADLK``: not held (timed
        out). Runs the recovery when its last holder died."""
        got = self._hot[2].finish_acquire(rc, max(deadline, time.monotonic() + _GRACE))
        if got == TIMED_OUT:
            return EDEADLK
        if got == RECOVERED:
            self._recovered()
        return 0

    def release_read(self) -> None:
        """Give back one read hold of the calling thread.

        A release completes even when a signal handler's exception (``KeyboardInterrupt``)
        lands inside it; the exception then propagates.

        Raises:
            LockNotHeldError: the calling thread holds no read hold (a ``RuntimeError``).
            SegmentClosedError: this handle is closed (release through another handle of
                the same lock, or let the process end).
        """
        before = -1
        try:
            if self._seg.closed:
                self._raise_closed()
            reads = _reads()
            key = (self._key, _compat.pid)
            before = reads.get(key, 0)
            if not before:
                raise LockNotHeldError(f"{self._what}: this thread holds no read lock")
            self._release_read(reads, key)
        except SafeShmError:
            raise
        except BaseException:
            # A signal handler's exception before the release committed (its stores, the
            # thread's count included, are all or nothing): complete it, then propagate.
            reads = _reads()
            key = (self._key, _compat.pid)
            held = reads.get(key, 0)
            if held and (before < 0 or held == before):
                self._release_read(reads, key)
            raise

    def _release_read(self, reads: dict[tuple[Any, ...], int], key: tuple[Any, ...]) -> None:
        p, owner, mutex = self._hot
        w = self._w
        seq = self._seq
        pid = _compat.pid
        wake = False
        rc = -1
        if owner[0]:
            mutex.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                rc = self._lock_slow(rc, _NEVER)
            mpid, rec = self._mine
            if mpid != pid:
                rec = self._record()
            mine = reads[key]
            w[rec + _C_READ] -= 1  # the commit
            w[_READERS] -= 1
            if mine == 1:
                del reads[key]  # no entry left behind per lock ever read
            else:
                reads[key] = mine - 1
            if not w[_READERS] and w[_WWAIT]:
                seq[0] = (seq[0] + 1) & _SEQ_MASK
                wake = True
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
        if wake:
            self._wake_all()

    # -- writing ---------------------------------------------------------------------------
    def acquire_write(self, blocking: bool = True, timeout: float | None = -1) -> bool:  # noqa: PLR0912 - inlined lock pattern
        """Take the write lock (no readers, no other writer), like
        :meth:`threading.Lock.acquire`'s signature.

        While it waits, new readers wait too (writer preference); readers that hold the
        lock finish first.

        Returns:
            ``True`` once held; ``False`` if the timeout expired first (or, without
            ``blocking``, if it is not free at once).

        Raises:
            LockReentryError: the calling thread already holds the write lock, or a read
                hold (an upgrade would deadlock: release the read hold first).
            ValueError, TypeError: as :meth:`acquire_read`.
            ProcessTableFullError: every holder record is owned by a live process.
            SegmentClosedError: the handle is closed (also by another thread while this
                one waits).

        Warns:
            HolderDiedWarning: a process died holding the lock (or waiting for it); what
                it held was released.
        """
        deadline = _deadline(blocking, timeout)
        w = self._w
        me = _tls
        tid = me.tid
        pid = _compat.pid
        if w[_WTID] == tid and w[_WPID] == pid:
            raise LockReentryError(
                f"{self._what}: this thread already holds the write lock; it is not "
                "reentrant, so acquiring it again would deadlock"
            )
        if me.reads.get((self._key, pid)):
            raise LockReentryError(
                f"{self._what}: this thread holds a read lock; upgrading to the write "
                "lock would deadlock (release the read hold first)"
            )
        p, owner, mutex = self._hot
        got = False
        rc = -1
        if owner[0]:
            mutex.check_not_mine()
        try:
            try:
                rc = _trylock(p)
                if rc:
                    rc = self._lock_slow(rc, deadline)
                    if rc:
                        return False
                mpid, rec = self._mine
                if mpid != pid:
                    rec = self._record()
                if (w[_WPID] or w[_READERS]) and not self._wait(
                    rec, deadline, _free_for_writer, _C_WWAIT, _WWAIT
                ):
                    return False
                w[_WTID] = tid
                w[_WPID] = pid
                w[rec + _C_WRITE] = 1  # the commit (a dead writer's record releases it)
                got = True
            finally:
                if not rc:
                    _unlock(p)
                elif rc != EDEADLK:
                    try:
                        _consistent(p)
                    finally:
                        _unlock(p)
        except _Timeout:
            return False
        except BaseException:
            if got:
                self._release_write()
            raise
        return True

    def release_write(self) -> None:
        """Release the write lock held by the calling thread.

        A release completes even when a signal handler's exception (``KeyboardInterrupt``)
        lands inside it; the exception then propagates.

        Raises:
            LockNotHeldError: the calling thread does not hold it (a ``RuntimeError``).
            SegmentClosedError: this handle is closed (release through another handle of
                the same lock, or let the process end).
        """
        w = self._w
        if w[_WTID] != _tls.tid or w[_WPID] != _compat.pid:
            raise LockNotHeldError(f"{self._what}: this thread does not hold the write lock")
        try:
            self._release_write()
        except SafeShmError:
            raise
        except BaseException:
            # A signal handler's exception before the release committed (its stores are
            # all or nothing): complete it, then propagate.
            if w[_WTID] == _tls.tid and w[_WPID] == _compat.pid:
                self._release_write()
            raise

    def _release_write(self) -> None:
        p, owner, mutex = self._hot
        w = self._w
        seq = self._seq
        pid = _compat.pid
        rc = -1
        if owner[0]:
            mutex.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                rc = self._lock_slow(rc, _NEVER)
            mpid, rec = self._mine
            if mpid != pid:
                rec = self._record()
            w[rec + _C_WRITE] = 0  # the commit
            w[_WPID] = 0
            w[_WTID] = 0
            seq[0] = (seq[0] + 1) & _SEQ_MASK
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
        self._wake_all()

    # -- context managers --------------------------------------------------------------------
    def read(self, timeout: float | None = None) -> RWLockHold:
        """``with rw.read():`` -- hold a read lock for a block; ``with rw.read(2.0):``
        waits at most 2 seconds.

        Raises:
            LockTimeoutError: not acquired within ``timeout`` (a ``TimeoutError``).
        """
        if timeout is None:
            return self._read_cm
        check_timeout(timeout)
        return RWLockHold(self, False, timeout)

    def write(self, timeout: float | None = None) -> RWLockHold:
        """``with rw.write():`` -- hold the write lock for a block; ``with
        rw.write(2.0):`` waits at most 2 seconds.

        Raises:
            LockTimeoutError: not acquired within ``timeout`` (a ``TimeoutError``).
        """
        if timeout is None:
            return self._write_cm
        check_timeout(timeout)
        return RWLockHold(self, True, timeout)

    # -- waiting and recovery ------------------------------------------------------------------
    def _wait(self, rec: int, deadline: float, free: Any, mine: int, total: int) -> bool:
        """Wait (holding the mutex) until ``free(words)`` or ``deadline``; whether it is.

        Looks for dead holders first (see :meth:`_reap_due`; also for ``blocking=False``),
        then registers as a waiter (count word ``mine`` of the record, derived total
        ``total``: waiting writers are what keeps new readers out) and sleeps, looking
        again at each wake-up. Holds the mutex on return, unless
        the relock raised ``_Timeout``.
        """
        w = self._w
        self._reap_due(w)
        if free(w):
            return True
        if deadline <= time.monotonic():
            return False
        tid = _tls.tid
        owner = self._mutex.owner
        seq = self._seq
        ok = False
        if w[total] >= INT64_MAX:  # only damage: the total is derived
            self._rederive()
        w[rec + mine] += 1  # the commit
        w[total] += 1
        try:
            ok = self._wait_until(free, deadline)
            return ok
        finally:
            if owner[0] & _FUTEX_TID_MASK == tid:
                w[rec + mine] -= 1
                w[total] -= 1
                # The last waiting writer gave up (a timeout, an exception): readers that
                # waited behind it may go.
                if not ok and total == _WWAIT and not w[_WWAIT] and w[_RWAIT] and not w[_WPID]:
                    seq[0] = (seq[0] + 1) & _SEQ_MASK
                    self._wake_all()
            else:  # the relock gave up at the deadline: undo once the mutex is free
                self._undo_later(rec + mine, total)

    def _reap_due(self, w: memoryview) -> None:
        """Look for dead holders if nobody (in any process) has for a slice, or at once
        if the writer's process is gone: each look costs a pass over the records and a
        check per live process, too much for every blocked attempt under contention."""
        now = time.monotonic_ns()
        writer = w[_WPID]
        if not 0 <= now - w[_REAPED] < _SLICE_NS or (writer and not _pid_exists(writer)):
            w[_REAPED] = now
            if self._reap():
                self._rederive()
                self._bump()
                self._wake_all()  # others may go too (woken threads queue on the mutex)
            else:
                self._rederive()  # the derived words, as the records say (heals damage)

    def _wait_until(self, free: Any, deadline: float) -> bool:
        w = self._w
        while True:
            if not self._sleep(deadline):
                return False
            self._reap_due(w)
            if free(w):
                return True

    def _undo_later(self, record_word: int, total_word: int) -> None:
        """A wait ended without the mutex (its relock gave up at the deadline: a stuck
        holder): take back its registration once the mutex is free, in a thread of its
        own, so that the caller's timeout is not stretched. Uses the views as they are
        now, so that it also works if the handle is closed meanwhile."""
        m = self._mutex
        w = self._w
        seq = self._seq
        sleepers = self._sleepers
        seq_ptr = self._seq_ptr

        def undo() -> None:
            if m.acquire() == RECOVERED:
                with contextlib.suppress(SafeShmError):  # closed meanwhile
                    self._recovered()
            try:
                w[record_word] -= 1  # this process lives: its record is still its own
                w[total_word] -= 1
                seq[0] = (seq[0] + 1) & _SEQ_MASK
            finally:
                m.release()
            if sleepers[0]:
                _compat.futex_wake_call(_compat.SYS_FUTEX, seq_ptr, _compat.FUTEX_WAKE, 0x7FFFFFFF)

        threading.Thread(target=undo, name="safeshm-rwlock-undo", daemon=True).start()

    def _holder_died(self, pid: int, counts: tuple[int, ...]) -> None:
        if counts[_C_READ - R_COUNTS] or counts[_C_WRITE - R_COUNTS]:
            self._w[_RECOVERIES] += 1
        if counts[_C_WRITE - R_COUNTS] and self._w[_WPID] == pid:
            self._w[_WTID] = 0
            self._w[_WPID] = 0

    def _rederive(self) -> None:
        w = self._w
        readers = wwait = rwait = 0
        writer = 0
        for k in range(self._nrec):
            i = STATE_WORDS + k * RECORD_WORDS
            if not w[i + R_PID]:
                continue
            readers += w[i + _C_READ]
            wwait += w[i + _C_WWAIT]
            rwait += w[i + _C_RWAIT]
            if w[i + _C_WRITE]:
                writer = w[i + R_PID]
        w[_READERS] = readers
        w[_WWAIT] = wwait
        w[_RWAIT] = rwait
        if w[_WPID] != writer:
            w[_WTID] = 0
            w[_WPID] = writer

    def _describe_counts(self, counts: tuple[int, ...]) -> str:
        parts = []
        if counts[0]:
            parts.append(f"{counts[0]} read hold(s)")
        if counts[1]:
            parts.append("the write lock")
        if counts[2]:
            parts.append(f"{counts[2]} place(s) in line for the write lock")
        if counts[3]:
            parts.append(f"{counts[3]} place(s) in line for a read lock")
        return ", ".join(parts) or "nothing"

    # -- inspection --------------------------------------------------------------------------
    def statistics(self) -> RWLockStatistics:
        """A snapshot of the lock's state (never blocks; also shown by ``safeshm inspect``)."""
        w = self._w
        by_pid: dict[int, int] = {}
        for pid, counts in self._live_records():
            if counts[0]:
                by_pid[pid] = by_pid.get(pid, 0) + int(counts[0])
        writer = int(w[_WPID])
        return RWLockStatistics(
            name=self._seg.name,
            readers=int(w[_READERS]),
            readers_by_pid=by_pid,
            writer_pid=writer or None,
            writer_tid=int(w[_WTID]) or None if writer else None,
            waiting_readers=int(w[_RWAIT]),
            waiting_writers=int(w[_WWAIT]),
            recoveries=int(w[_RECOVERIES]),
            processes=self._nrec,
            creator_pid=self._seg.header.creator_pid,
        )

    def _repr_fields(self) -> str:
        w = self._w
        return f"readers={int(w[_READERS])}, writer={int(w[_WPID]) or None}"


def _free_for_reader(w: Any) -> bool:
    return not w[_WPID] and not w[_WWAIT]


def _free_for_writer(w: Any) -> bool:
    return not w[_WPID] and not w[_READERS]


__all__ = ["RWLockHold", "RWLockStatistics", "SafeRWLock"]
