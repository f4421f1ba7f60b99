"""SafeSemaphore and SafeBoundedSemaphore: :class:`threading.Semaphore` shared by processes,
whose permits come back when a process holding them dies.

State (see ``_sync``'s recovery rule): the authoritative words are ``_BASE`` (the initial
value plus every release that returned no permit of the releasing process's own: a "free"
release) and each process's record count (the permits it holds). The available value is
derived, ``_BASE - sum(counts)``, and cached in ``_VALUE``: every operation commits with
one store to an authoritative word and then updates the cache; :meth:`_rederive`
recomputes it after a recovery or a reap. A dead process's record is freed by the reap,
and with it the permits it held.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import operator
import struct
import time
from typing import Any, Final, Self

from . import _compat
from ._errors import (
    IncompatibleSegmentError,
    ProcessTableFullError,
    SafeShmError,
    SegmentClosedError,
    SegmentCorruptedError,
)
from ._int64 import INT64_MAX, check_int64
from ._lock import EDEADLK, RECOVERED, TIMED_OUT, RobustMutex
from ._segment import Kind, Segment
from ._sync import (
    _PARAMS,
    _SEQ_MASK,
    R_COUNTS,
    RECORD_WORDS,
    STATE_OFFSET,
    STATE_WORDS,
    WAIT_SLICE,
    Section,
    SyncPrimitive,
    _consistent,
    _Timeout,
    _trylock,
    _unlock,
)

_BASE: Final = 0  # authoritative: initial value + free releases (- a bound's clamp)
_VALUE: Final = 1  # derived: _BASE - every record's _HELD (the available permits)
_INITIAL: Final = 2  # the value create() was given: a bounded semaphore's bound. Constant
_HELD: Final = R_COUNTS  # record count word: permits the record's process holds

_F_BOUNDED: Final = 1  # header flag: a SafeBoundedSemaphore

_NEVER: Final = math.inf
_MUTEX_GRACE: Final = WAIT_SLICE
"""How long a call with a shorter (or no) timeout still waits for the internal mutex: a
non-blocking acquire never fails only because another thread was inside a release."""

_monotonic: Final = time.monotonic


def _check_value(value: object) -> int:
    v = check_int64("semaphore initial value", value)
    if v < 0:
        raise ValueError("semaphore initial value must be >= 0")
    return v


def _check_release(n: object) -> int:
    """``release()``'s count, validated."""
    try:
        count = operator.index(n)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"n must be an int, not {type(n).__name__}") from None
    if count < 1:
        raise ValueError("n must be one or more")
    if count > INT64_MAX:
        raise OverflowError(f"n {count} is outside the int64 range; nothing was released")
    return count


def _deadlines(blocking: bool, timeout: object) -> tuple[float, float]:
    """``(deadline, mutex_deadline)`` of an acquire (``time.monotonic()`` instants).

    As :meth:`threading.Semaphore.acquire`: ``timeout=None`` waits forever, and a timeout
    of zero or less tries once. The internal mutex is waited for until the later of the
    deadline and :data:`_MUTEX_GRACE` from now.
    """
    if not blocking:
        if timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        return -_NEVER, _monotonic() + _MUTEX_GRACE
    if timeout is None:
        return _NEVER, _NEVER
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
    if timeout != timeout:  # noqa: PLR0124 - NaN
        raise ValueError("timeout must not be NaN")
    now = _monotonic()
    deadline = now + timeout
    return deadline, max(deadline, now + _MUTEX_GRACE)


class _ClosedSection:
    """Stands in for a closed handle's section: entering raises."""

    __slots__ = ("_message",)

    def __init__(self, message: str) -> None:
        self._message = message

    def __enter__(self) -> None:
        raise SegmentClosedError(self._message)

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - never entered
        pass


@dataclasses.dataclass(frozen=True, slots=True)
class SemaphoreStatistics:
    """A snapshot of a :class:`SafeSemaphore` (see :meth:`SafeSemaphore.statistics`)."""

    name: str
    value: int
    """Permits available now."""
    initial_value: int
    """The value it was created with (a bounded semaphore's bound)."""
    bounded: bool
    holders: dict[int, int]
    """Permits held, by pid, of every live process holding at least one."""
    waiters: int
    """Threads sleeping in :meth:`SafeSemaphore.acquire` right now (any process)."""
    creator_pid: int


class SafeSemaphore(SyncPrimitive):
    """A counter of permits that processes and threads acquire and release:
    :class:`threading.Semaphore`, shared -- and robust: **the permits of a process that
    dies come back.**

    Each process's permits are counted in its own record in the segment (pid, start time
    and pid namespace identify the process). :meth:`acquire` takes a permit into the
    calling process's record; :meth:`release` returns one of the calling process's own
    permits if it holds any, and otherwise adds a permit (a "free" release, which raises
    the value as ``threading.Semaphore.release()`` does). When a process dies -- SIGKILL
    included, even inside the semaphore's own internal critical section -- or exits
    holding permits, the next call that looks (a blocked :meth:`acquire` does so at least
    every 0.1 s; any :meth:`acquire` that finds no permit does so at once) frees its
    record: its permits are available again, and that call warns with
    :class:`~safeshm.HolderDiedWarning`, once per death. A process counts as dead once
    it is gone, or has exited and is waiting for its parent to reap it (a zombie).

    Permits are held by processes, not threads: a thread that ends holding permits in a
    live process keeps them held (as with :class:`threading.Semaphore`), and a permit one
    thread acquired may be released by another thread of the same process.

    **Acquire in one process, release in another** (a hand-off, or a producer/consumer
    count): the releasing process returns none of its own permits, so its release is a
    free one that adds a permit, while the acquirer's record still counts the permit it
    took. Without deaths the value is exactly ``threading``'s. But if the acquirer then
    exits or dies without releasing, the permits its record still counts come back *as
    well*: the value grows by what was handed off (a bounded semaphore's available plus
    held permits are then capped at its bound). The semaphore cannot tell a permit consumed for
    good from one held: for counting items between processes, use a
    :class:`~safeshm.SafeQueue`.

    ``with sem:`` acquires and releases (as ``threading.Semaphore``; it returns the
    semaphore, as ``SafeLock`` does, where ``threading`` returns ``True``). The handle's
    lifecycle is :meth:`close` and :meth:`unlink`, not ``with``.

    Example:
        >>> sem = SafeSemaphore.create(2)
        >>> sem.acquire(), sem.acquire(), sem.acquire(blocking=False)
        (True, True, False)
        >>> sem.release(2)
        >>> with sem:
        ...     sem.value
        1
        >>> sem.close(); sem.unlink()
    """

    _KIND = Kind.SEMAPHORE
    _LAYOUT = 1
    _MAPPED = (*SyncPrimitive._MAPPED, "_hot")
    _BOUNDED: bool = False
    _hot: tuple[Any, memoryview, RobustMutex]  # (pointer, owner word, the internal mutex)
    # One section object for every wait-forever entry of the internal mutex (a Section
    # keeps no state between entries, so threads can share it): building one per call
    # costs a good part of an acquire. Swapped for a stand-in at close() (the views'
    # stand-in has no __exit__, which a ``with`` looks up first).
    _sec: Section | _ClosedSection

    def _bind(self, mm: mmap.mmap) -> None:
        super()._bind(mm)
        if self._w[_INITIAL] < 0:  # a constant, from create(): never negative
            raise SegmentCorruptedError(
                f"{self._what} is damaged: its initial value is {self._w[_INITIAL]}"
            )
        self._sec = Section(self)
        m = self._mutex
        self._hot = (m.pointer, m.owner, m)

    def _before_close(self) -> None:
        self._sec = _ClosedSection(f"{self._what} is closed on this handle")
        super()._before_close()

    # -- building ----------------------------------------------------------------------
    @classmethod
    def create(
        cls, value: int = 1, *, name: str | None = None, processes: int | None = None
    ) -> Self:
        """Create a new semaphore holding ``value`` permits.

        Args:
            value: the initial number of permits (a bounded semaphore's bound too).
            name: the name to attach by (a fresh one if ``None``).
            processes: how many processes can hold permits at once (their records;
                default 128). A process claims a record at its first :meth:`acquire`
                and keeps it until it exits.

        Raises:
            ValueError: ``value`` is negative, or ``processes`` is out of range.
            TypeError: ``value`` or ``processes`` is not an int.
            OverflowError: ``value`` does not fit in 64 bits.
            SegmentExistsError: a segment with this name exists (a ``FileExistsError``).
            InvalidNameError: ``name`` is not a valid segment name.
        """
        v = _check_value(value)
        seg = cls._create_segment(
            name, (v, v, v), processes=processes, flags=_F_BOUNDED if cls._BOUNDED else 0
        )
        return cls._from_segment(seg)

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing semaphore by name, from any process of the same user.

        ``SafeSemaphore.attach`` of a bounded semaphore returns a
        :class:`SafeBoundedSemaphore` (a subclass: the bound belongs to the semaphore, and
        every handle enforces it); ``SafeBoundedSemaphore.attach`` of an unbounded one
        raises :class:`~safeshm.IncompatibleSegmentError`.

        Raises:
            SegmentNotFoundError: no segment has this name (a ``FileNotFoundError``).
            IncompatibleSegmentError: the segment is not a semaphore of this class.
        """
        seg = cls._attach_segment(name)
        try:
            target = cls._class_of(seg, exact=False)
        except BaseException:
            seg.close()
            raise
        return target._from_segment(seg)

    @classmethod
    def open(cls, name: str, value: int | None = None, *, processes: int | None = None) -> Self:
        """Attach to the semaphore ``name``, creating it first if needed (race-free).

        An existing semaphore must be what this call would create -- the rule of every
        ``open()``: the same class (bounded or not: whether the bound applies must not
        depend on which process won the race to create it), and the same ``value`` (the
        value it was *created* with, not the current one) and ``processes`` if they are
        given (``None``: 1 and 128 when creating, any when attaching). Otherwise
        :class:`~safeshm.IncompatibleSegmentError` names what differs.
        """
        want = None if value is None else _check_value(value)
        if processes is not None and (
            isinstance(processes, bool) or not isinstance(processes, int)
        ):
            raise TypeError(f"processes must be an int, not {type(processes).__name__}")

        def check(seg: Segment) -> None:
            cls._class_of(seg, exact=True)
            diffs = []
            have = struct.unpack_from("=q", seg.mm, STATE_OFFSET + 8 * _INITIAL)[0]
            if want is not None and have != want:
                diffs.append(f"initial value {have}, expected {want}")
            (nrec,) = _PARAMS.unpack_from(seg.header.params)
            if processes is not None and nrec != processes:
                diffs.append(f"{nrec} process records, expected {processes}")
            if diffs:
                raise IncompatibleSegmentError(
                    f"{cls.__name__} {seg.name!r} differs: {'; '.join(diffs)}"
                )

        return cls._open_segment(
            name,
            lambda: cls.create(1 if want is None else want, name=name, processes=processes),
            check,
        )

    @classmethod
    def _class_of(cls, seg: Segment, *, exact: bool) -> type[Self]:
        bounded = bool(seg.header.flags & _F_BOUNDED)
        if bounded == cls._BOUNDED:
            return cls
        if bounded and not exact:
            return SafeBoundedSemaphore  # type: ignore[return-value] # a subclass of cls
        have = "SafeBoundedSemaphore" if bounded else "SafeSemaphore (unbounded)"
        raise IncompatibleSegmentError(
            f"segment {seg.name!r} is a {have}, expected a {cls.__name__}"
        )

    # -- the operations ------------------------------------------------------------------
    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:  # noqa: PLR0912 - inlined lock pattern
        """Take a permit, waiting for one if there is none -- as
        :meth:`threading.Semaphore.acquire`.

        With ``blocking`` false, take one only if one is available now. Otherwise wait up
        to ``timeout`` seconds (``None``: forever; zero or less: try once). Returns whether
        a permit was taken. A waiter wakes at once when a permit is released in any
        process, and within 0.1 s when a holder died (whose permits it then takes back,
        warning :class:`~safeshm.HolderDiedWarning`). A process stopped inside the
        semaphore's internal mutex (SIGSTOP) does not stretch ``timeout`` (beyond 0.1 s
        for shorter ones).

        Raises:
            ValueError: ``timeout`` given with ``blocking=False``, or NaN.
            TypeError: ``timeout`` is not a number.
            ProcessTableFullError: every process record is held by a live process.
            SegmentClosedError: the handle is closed (also by another thread while this
                one waits: it wakes and raises).
        """
        if blocking is True and timeout is None:  # the common case, without a call
            deadline = mutex_deadline = _NEVER
        else:
            deadline, mutex_deadline = _deadlines(blocking, timeout)
        # The internal mutex is taken and released inline (the pattern in _lock's comment;
        # a Section costs more than the rest of an uncontended acquire): one trylock, the
        # commit in plain stores, one unlock. Waiting, claiming this process's record and
        # reaping happen in functions called from the try.
        p, owner, mutex = self._hot
        w = self._w
        got = reaped = False
        rc = -1
        if owner[0]:
            mutex.check_not_mine()
        try:
            try:
                rc = _trylock(p)
                if rc:
                    rc = self._lock_slow(rc, mutex_deadline)
                    if rc:
                        return False  # the internal mutex stayed taken (a stuck holder)
                mpid, rec = self._mine
                if mpid == _compat.pid and w[_VALUE] > 0:
                    w[rec + _HELD] += 1  # the commit
                    w[_VALUE] -= 1
                    got = True
                else:
                    got, reaped = self._acquire_slow(deadline)
            finally:
                if not rc:
                    _unlock(p)  # EPERM (ignored) after a wait's relock gave up
                elif rc != EDEADLK:
                    try:
                        _consistent(p)
                    finally:
                        _unlock(p)
        except _Timeout:
            return False  # a wait's relock gave up at the deadline (never with the permit)
        except BaseException:
            if got:  # taken, but the caller will not know: give it back
                self._undo_acquire()
            raise
        if reaped:
            self._wake_all()
        return got

    def _lock_slow(self, rc: int, deadline: float) -> int:
        """The internal mutex's trylock returned ``rc``: wait for it until ``deadline``.
        0: held; ``EDEADLK``: not held (timed out). Runs the recovery when its last
        holder died."""
        got = self._hot[2].finish_acquire(rc, deadline)
        if got == TIMED_OUT:
            return EDEADLK
        if got == RECOVERED:
            self._recovered()
        return 0

    def _undo_acquire(self) -> None:
        """Give back a permit this process's record holds (an acquire that an exception
        cut short after it took the permit)."""
        with self._sec:
            w = self._w
            rec = self._record()
            held = w[rec + _HELD]
            if held > 0:
                w[rec + _HELD] = held - 1  # the commit
                w[_VALUE] += 1
                self._bump()
        self._wake_all()

    def _acquire_slow(self, deadline: float) -> tuple[bool, bool]:
        """Wait for a permit and take it, holding the mutex: ``(taken, reaped)``. Reaps
        dead holders at once and then after each slice of waiting."""
        w = self._w
        reaped = False
        reaped_at = -_NEVER
        while w[_VALUE] <= 0:
            now = _monotonic()
            if now - reaped_at >= WAIT_SLICE:
                reaped_at = now
                if self._reap():  # which rederives
                    self._bump()
                    reaped = True
                    continue
                # The value is a cache (see the module docstring): recompute it, so that
                # a damaged one cannot keep a waiter from a free permit.
                if w[_BASE] < 0:
                    raise SegmentCorruptedError(
                        f"{self._what} is damaged: its permit count is {w[_BASE]}"
                    )
                self._rederive()
                if w[_VALUE] > 0:
                    continue
            if not self._sleep(deadline):
                return False, reaped
        rec = self._record()
        w[rec + _HELD] += 1  # the commit
        w[_VALUE] -= 1
        return True, reaped

    def release(self, n: int = 1) -> None:  # noqa: PLR0912 - inlined lock pattern
        """Return ``n`` permits, waking waiters -- as :meth:`threading.Semaphore.release`.

        The calling process's own permits are returned first; the rest (or all, for a
        process holding none) are free releases that add permits (see the class
        docstring).

        A release completes even when a signal handler's exception (``KeyboardInterrupt``)
        lands inside it; the exception then propagates.

        Raises:
            ValueError: ``n`` is less than 1; for a :class:`SafeBoundedSemaphore`, the
                value would exceed the bound (nothing is released).
            TypeError: ``n`` is not an int.
            OverflowError: the count would overflow 64 bits (nothing is released).
        """
        done = [False]
        rc = -1
        try:
            if n.__class__ is not int or n != 1:
                n = _check_release(n)
            p, owner, mutex = self._hot
            w = self._w
            seq = self._seq
            if owner[0]:
                mutex.check_not_mine()
            try:
                rc = _trylock(p)
                if rc:
                    rc = self._lock_slow(rc, _NEVER)
                mpid, rec = self._mine
                if (
                    n == 1
                    and mpid == _compat.pid
                    and w[rec + _HELD] > 0
                    and not (self._BOUNDED and w[_VALUE] >= w[_INITIAL])
                ):
                    # One of this process's own permits back: the record's count is the
                    # commit.
                    w[rec + _HELD] -= 1
                    w[_VALUE] += 1
                    done[0] = True
                    seq[0] = (seq[0] + 1) & _SEQ_MASK
                else:
                    self._release_locked(n, done)
            finally:
                if not rc:
                    _unlock(p)
                elif rc != EDEADLK:
                    try:
                        _consistent(p)
                    finally:
                        _unlock(p)
        except (SafeShmError, ValueError, OverflowError, TypeError):
            raise  # bad input, a closed handle, a bound: nothing was released
        except BaseException:
            # An exception from a signal handler before the release committed: a release
            # completes all the same (the caller's ``finally`` has run; it cannot tell),
            # then the exception propagates (first order: one such exception per call).
            if not done[0]:
                self.release(n)
            raise
        if self._sleepers[0]:
            self._wake_all()

    def _release_locked(self, n: int, done: list[bool] | None = None) -> None:
        """:meth:`release`'s general case, holding the mutex: computes, then stores;
        ``done[0]`` is set right after the last store (no check for signals between)."""
        w = self._w
        try:
            rec = self._record()
        except ProcessTableFullError:
            rec = -1  # holds nothing: a free release needs no record
        held = w[rec + _HELD] if rec >= 0 else 0
        value = w[_VALUE] + n
        if self._BOUNDED and value > w[_INITIAL]:
            raise ValueError("Semaphore released too many times")
        own = min(held, n)
        base = w[_BASE] + (n - own)
        if base > INT64_MAX:
            raise OverflowError(
                f"{self._what}: releasing {n} would overflow its count; nothing was released"
            )
        # Base first: if this process dies between the two stores, its record (and
        # with it the count not yet lowered) is reaped, which is what lowering it does.
        w[_BASE] = base
        if own:
            w[rec + _HELD] = held - own
        w[_VALUE] = value
        if done is not None:
            done[0] = True
        self._bump()

    def __enter__(self) -> Self:  # acquires, as threading's (not the lifecycle)
        # acquire()'s body for the wait-forever case, inline: a call to acquire() would
        # cost a frame, and an exception right after it returned would keep the permit
        # with nobody to release it (the with statement covers only what follows the
        # return of __enter__).
        p, owner, mutex = self._hot
        w = self._w
        got = reaped = False
        rc = -1
        if owner[0]:
            mutex.check_not_mine()
        try:
            try:
                rc = _trylock(p)
                if rc:
                    rc = self._lock_slow(rc, _NEVER)
                mpid, rec = self._mine
                if mpid == _compat.pid and w[_VALUE] > 0:
                    w[rec + _HELD] += 1  # the commit
                    w[_VALUE] -= 1
                    got = True
                else:
                    got, reaped = self._acquire_slow(_NEVER)
            finally:
                if not rc:
                    _unlock(p)
                elif rc != EDEADLK:
                    try:
                        _consistent(p)
                    finally:
                        _unlock(p)
        except BaseException:
            if got:
                self._undo_acquire()
            raise
        if reaped:
            self._wake_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # release(1)'s body, inline (a frame less).
        p, owner, mutex = self._hot
        w = self._w
        seq = self._seq
        done = [False]
        rc = -1
        try:
            if owner[0]:
                mutex.check_not_mine()
            try:
                rc = _trylock(p)
                if rc:
                    rc = self._lock_slow(rc, _NEVER)
                mpid, rec = self._mine
                if (
                    mpid == _compat.pid
                    and w[rec + _HELD] > 0
                    and not (self._BOUNDED and w[_VALUE] >= w[_INITIAL])
                ):
                    w[rec + _HELD] -= 1  # the commit
                    w[_VALUE] += 1
                    done[0] = True
                    seq[0] = (seq[0] + 1) & _SEQ_MASK
                else:
                    self._release_locked(1, done)
            finally:
                if not rc:
                    _unlock(p)
                elif rc != EDEADLK:
                    try:
                        _consistent(p)
                    finally:
                        _unlock(p)
        except (SafeShmError, ValueError, OverflowError):
            raise
        except BaseException:
            # An exception from a signal handler before the release committed: the block
            # is left all the same, so the permit goes back (first order, as everywhere:
            # one such exception per call).
            if not done[0]:
                self.release()
            raise
        if self._sleepers[0]:
            self._wake_all()

    # -- introspection -------------------------------------------------------------------
    @property
    def value(self) -> int:
        """Permits available now (a snapshot). Permits of a holder that died are not
        counted until a call reaps it (the next :meth:`acquire` that finds none)."""
        return int(self._w[_VALUE])

    @property
    def initial_value(self) -> int:
        """The value the semaphore was created with (a bounded semaphore's bound)."""
        return int(self._w[_INITIAL])

    def statistics(self) -> SemaphoreStatistics:
        """A snapshot of the semaphore's state (also shown by ``safeshm inspect``)."""
        return SemaphoreStatistics(
            self._seg.name,
            int(self._w[_VALUE]),
            int(self._w[_INITIAL]),
            self._BOUNDED,
            {pid: counts[0] for pid, counts in self._live_records() if counts[0]},
            max(0, int(self._sleepers[0])),
            self._seg.header.creator_pid,
        )

    def _repr_fields(self) -> str:
        return f"value={self.value}"

    # -- hooks -----------------------------------------------------------------------------
    def _held_total(self) -> int:
        w = self._w
        first = STATE_WORDS + _HELD
        return sum(w[first + k * RECORD_WORDS] for k in range(self._nrec))

    def _rederive(self) -> None:
        w = self._w
        w[_VALUE] = w[_BASE] - self._held_total()

    def _describe_counts(self, counts: tuple[int, ...]) -> str:
        return f"{counts[0]} permit{'s' if counts[0] != 1 else ''}"


class SafeBoundedSemaphore(SafeSemaphore):
    """A :class:`SafeSemaphore` whose value never exceeds the value it was created with,
    as :class:`threading.BoundedSemaphore`: a :meth:`release` that would exceed it raises
    ``ValueError("Semaphore released too many times")`` and releases nothing.

    When a dead holder's permits come back, the permits available plus those held by
    live processes are capped at the bound: releases that other processes made on a
    holder's behalf (hand-offs, see :class:`SafeSemaphore`) are then matched against
    the holders' permits, so each holder can still release its own.

    Example:
        >>> sem = SafeBoundedSemaphore.create(1)
        >>> sem.release()
        Traceback (most recent call last):
        ...
        ValueError: Semaphore released too many times
        >>> sem.close(); sem.unlink()
    """

    _BOUNDED = True

    def _rederive(self) -> None:
        # After a death (or a recovery): available plus held permits never exceed the
        # bound -- unless more than the bound are held, after hand-offs; then none are
        # available. Idempotent: a recomputation from the authoritative words.
        w = self._w
        held = self._held_total()
        cap = max(w[_INITIAL], held)
        w[_BASE] = min(w[_BASE], cap)
        w[_VALUE] = w[_BASE] - held

    def _repr_fields(self) -> str:
        return f"value={self.value}/{self.initial_value}"
