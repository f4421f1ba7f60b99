"""SafeBarrier: :class:`threading.Barrier` shared by processes; a party that dies breaks it.

State words (see ``_sync``'s layout)::

    0 parties
    1 count     arrivals in the current generation (== parties while the last one runs
                the action)
    2 gen       generations passed (each pass adds one; never reset)
    3 epoch     resets done (each reset adds one)
    4 broken    1 while broken (abort(), a timeout, a failed action, a dead party)
    5 reset_gen ``gen`` at the last reset

A generation is ``(epoch, gen)``. A waiter of ``(e, k)`` has passed once ``gen > k``
unless a reset came first: if ``epoch == e`` it passed; if ``epoch == e + 1`` it passed
iff ``reset_gen > k``; after two or more resets it is told ``BrokenBarrierError`` (as
``threading.Barrier`` tells a released waiter that has not woken yet when reset() runs).

Each process's holder record marks the generation its threads last arrived in (count
words ``gen + 1`` and ``epoch``). Every way out of a generation except a pass breaks the
barrier (a timeout, an exception, close()), so a record that names the current, unbroken
generation belongs to a party still waiting in it (or running the action): if its
process died, :meth:`SafeBarrier._holder_died` breaks the barrier. Waiters reap dead
processes every :data:`~safeshm._sync.WAIT_SLICE` (0.1 s) while they sleep, so the others
raise ``BrokenBarrierError`` within about one slice of a party's death.

Recovery: a pass stores ``count = 0`` then ``gen`` (the commit); an arrival stores the
record (commit: its ``gen + 1`` word) before ``count``; a reset stores ``reset_gen``,
``epoch`` (the commit for waiters), ``count``, ``broken``. A process that dies between two
of them was a party of the current generation (its record is current: the barrier breaks
when it is reaped) or was resetting (the barrier stays broken until the next reset).
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Self

from . import _compat
from ._errors import IncompatibleSegmentError
from ._lock import RobustMutex
from ._segment import Kind, Segment
from ._sync import (
    _SEQ_MASK,
    R_COUNTS,
    STATE_OFFSET,
    WAIT_SLICE,
    SyncPrimitive,
    _Timeout,
    deadline_of,
)

__all__ = ["BarrierStatistics", "SafeBarrier"]

_PARTIES: Final = 0
_COUNT: Final = 1
_GEN: Final = 2
_EPOCH: Final = 3
_BROKEN: Final = 4
_RESET_GEN: Final = 5

# A record's count words (offsets from the record's start).
_R_GEN: Final = R_COUNTS  # gen + 1 of the generation its process last arrived in (0: none)
_R_EPOCH: Final = R_COUNTS + 1

MAX_PARTIES: Final = (1 << 31) - 1

BrokenBarrierError = threading.BrokenBarrierError


def _recoveries(mutex: RobustMutex) -> int:
    """The internal mutex's recovery count (-1 once the handle is closed)."""
    try:
        return mutex.recoveries
    except Exception:  # noqa: BLE001 - closed by another thread meanwhile
        return -1


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be None or >= 0, got {timeout!r}")
    return timeout


def _check_action(action: Callable[[], object] | None) -> Callable[[], object] | None:
    if action is not None and not callable(action):
        raise TypeError(f"action must be callable or None, not {type(action).__name__}")
    return action


def _check_parties(parties: int) -> int:
    if isinstance(parties, bool) or not isinstance(parties, int):
        raise TypeError(f"parties must be an int, not {type(parties).__name__}")
    if not 1 <= parties <= MAX_PARTIES:
        raise ValueError(f"parties must be between 1 and {MAX_PARTIES}, got {parties}")
    return parties


@dataclasses.dataclass(frozen=True, slots=True)
class BarrierStatistics:
    """A snapshot of a :class:`SafeBarrier` (see :meth:`SafeBarrier.statistics`)."""

    name: str
    parties: int
    n_waiting: int
    """Parties waiting in the current generation (0 while broken)."""
    broken: bool
    generations: int
    """Generations passed since the barrier was created."""
    resets: int
    waiters: int
    """Threads sleeping in the barrier (any process): a hint that wake-ups use, which a
    thread killed while asleep leaves counted (``n_waiting`` is exact)."""
    processes: int
    """Live processes that have used the barrier."""
    creator_pid: int


class SafeBarrier(SyncPrimitive):
    """A barrier for ``parties`` threads in any processes: :class:`threading.Barrier`,
    shared.

    Each :meth:`wait` blocks until ``parties`` calls have arrived, then all return (each
    with its arrival index, ``0 .. parties - 1``) and the barrier is ready for the next
    generation. :meth:`abort`, a timeout, an exception in the action, an exception or
    :meth:`close` interrupting a wait, and **a party that dies while waiting** all *break*
    the barrier: every waiter (in every process) and every later :meth:`wait` raises
    :class:`threading.BrokenBarrierError` until :meth:`reset`. Waiters notice a dead party
    within about 0.1 s (they check while they sleep) and warn with
    :class:`~safeshm.HolderDiedWarning`; they are not left waiting for their timeout.

    ``action`` and the default ``timeout`` belong to the handle, not to the shared
    barrier (a callable cannot live in shared memory): the action runs once per
    generation, in the process whose :meth:`wait` arrives last, from that process's
    handle (as in ``threading``, where it runs in one of the threads), before anyone is
    released. A handle with no action runs none, even if other handles have one.
    ``attach()``/``open()`` take ``action=``/``timeout=`` too; a pickled handle carries
    its default timeout, not its action.

    Example:
        >>> with SafeBarrier.create(1) as b:
        ...     b.wait(timeout=1.0)
        0
    """

    _KIND = Kind.BARRIER
    _LAYOUT = 1

    _action: Callable[[], object] | None
    _timeout: float | None

    @classmethod
    def create(
        cls,
        parties: int,
        action: Callable[[], object] | None = None,
        timeout: float | None = None,
        *,
        name: str | None = None,
        processes: int | None = None,
    ) -> Self:
        """Create a new barrier for ``parties`` parties.

        Args:
            parties: how many :meth:`wait` calls release a generation (>= 1).
            action: called (no arguments) by the last party to arrive, in its own process,
                before the generation is released; this handle's only.
            timeout: this handle's default for :meth:`wait` (``None``: wait forever).
            name: the segment name (default: a fresh unique one).
            processes: how many processes can use the barrier at once (one holder record
                each; default 128).

        Raises:
            TypeError, ValueError: a bad argument (nothing is created).
            SegmentExistsError: a segment with this name exists (a ``FileExistsError``).
        """
        _check_parties(parties)
        _check_action(action)
        _check_timeout(timeout)
        seg = cls._create_segment(name, (parties, 0, 0, 0, 0, 0), processes=processes)
        return cls._with(seg, action, timeout)

    @classmethod
    def _with(
        cls, seg: Segment, action: Callable[[], object] | None, timeout: float | None
    ) -> Self:
        self = cls._from_segment(seg)
        self._action = action
        self._timeout = timeout
        return self

    @classmethod
    def attach(
        cls,
        name: str,
        *,
        action: Callable[[], object] | None = None,
        timeout: float | None = None,
    ) -> Self:
        """Attach to an existing barrier by name, with this handle's own ``action`` and
        default ``timeout``.

        Raises:
            SegmentNotFoundError: no segment has this name (a ``FileNotFoundError``).
            IncompatibleSegmentError: the segment is not a ``SafeBarrier``.
        """
        _check_action(action)
        _check_timeout(timeout)
        return cls._with(cls._attach_segment(name), action, timeout)

    @classmethod
    def open(
        cls,
        name: str,
        parties: int,
        action: Callable[[], object] | None = None,
        timeout: float | None = None,
        *,
        processes: int | None = None,
    ) -> Self:
        """Attach to the barrier ``name``, creating it first if needed (race-free).

        If it exists, it must have this many ``parties`` (and ``processes``, if given);
        otherwise :class:`~safeshm.IncompatibleSegmentError`.
        """
        _check_parties(parties)
        _check_action(action)
        _check_timeout(timeout)

        def check(seg: Segment) -> None:
            (found,) = struct.unpack_from("=q", seg.mm, STATE_OFFSET + 8 * _PARTIES)
            nrec = struct.unpack_from("=I", seg.header.params)[0]
            if found != parties or (processes is not None and nrec != processes):
                raise IncompatibleSegmentError(
                    f"SafeBarrier {name!r} exists with parties={found}, processes={nrec}; "
                    f"asked for parties={parties}"
                    + (f", processes={processes}" if processes is not None else "")
                )

        made = cls._open_segment(
            name,
            lambda: cls.create(parties, action, timeout, name=name, processes=processes),
            check,
        )
        made._action = action
        made._timeout = timeout
        return made

    def __reduce__(self) -> tuple[Any, ...]:
        if self._seg.closed:
            self._raise_closed()
        if self._timeout is None:
            return (type(self).attach, (self._seg.name,))
        # A classmethod pickles as a reference to safeshm.SafeBarrier and its name.
        return (type(self)._unpickle, (self._seg.name, self._timeout))

    @classmethod
    def _unpickle(cls, name: str, timeout: float | None) -> Self:
        return cls.attach(name, timeout=timeout)

    # -- the barrier ---------------------------------------------------------------------
    @property
    def parties(self) -> int:
        """How many parties pass each generation."""
        return int(self._w[_PARTIES])

    @property
    def n_waiting(self) -> int:
        """How many parties wait in the current generation (0 while broken; a snapshot)."""
        w = self._w
        if w[_BROKEN]:
            return 0
        return int(min(w[_COUNT], w[_PARTIES]))

    @property
    def broken(self) -> bool:
        """Whether the barrier is broken (until :meth:`reset`)."""
        return bool(self._w[_BROKEN])

    def wait(self, timeout: float | None = None) -> int:
        """Wait until ``parties`` parties have called :meth:`wait`; return this call's
        arrival index (``0 .. parties - 1``, unique in the generation).

        Args:
            timeout: seconds to wait (``None``: this handle's default timeout). When it
                passes the barrier breaks. A negative value times out at once (as
                ``threading``).

        Raises:
            threading.BrokenBarrierError: the barrier is or got broken, or was reset,
                while this call waited.
            SegmentClosedError: this handle was closed (by another thread) meanwhile;
                the barrier is then broken.
        """
        if timeout is None:
            timeout = self._timeout
        deadline = deadline_of(timeout)
        if timeout is not None and timeout < 0:  # threading: times out at once
            deadline = time.monotonic()
        # Local references: a close() by another thread poisons the attributes, and the
        # break on the way out still needs the mapping (which these keep alive).
        w = self._w
        seq = self._seq
        arrived: list[int] = []  # [epoch, gen, index] once this call has arrived
        # [True] once this call has only watched others pass or break the generation (it
        # changed nothing, so it wakes nobody: a wake-up would only send the next
        # generation's first sleeper round its loop) -- unless the internal mutex was
        # recovered meanwhile (the recovery's changes are this call's to announce).
        quiet = [False]
        mutex = self._mutex
        recoveries = mutex.recoveries
        try:
            with self._section(deadline):
                try:
                    outcome = self._arrive_and_wait(w, arrived, deadline, quiet)
                except _Timeout:
                    raise
                except BaseException:
                    # Holding the mutex (a sleep retakes it before raising).
                    if arrived:
                        self._break_in(w, seq, arrived[0], arrived[1])
                    raise
        except _Timeout:
            # The internal mutex could not be had by the deadline (a stopped process holds
            # it): break without it (a single store) rather than stretch the timeout.
            if arrived:
                self._break_in(w, seq, arrived[0], arrived[1])
            raise BrokenBarrierError from None
        finally:
            if not quiet[0] or _recoveries(mutex) != recoveries:
                self._wake(seq)
        if outcome is None:
            return self._run_action(w, seq, arrived)
        if outcome < 0:
            raise BrokenBarrierError
        return outcome

    def _arrive_and_wait(
        self, w: memoryview, arrived: list[int], deadline: float, quiet: list[bool]
    ) -> int | None:
        """Holding the mutex: wait to enter (while an action runs), arrive, and wait for
        the outcome. The index on a pass, -1 when broken, ``None`` when this call is the
        last party and must run an action."""
        while True:
            if w[_BROKEN]:
                return -1
            if w[_COUNT] < w[_PARTIES]:
                break
            # The last party runs the action: the next generation starts after it.
            if not self._sleep(deadline):
                return -1  # timed out before entering: nothing to break
            self._reap()
        if w[_COUNT] and w[_COUNT] + 1 == w[_PARTIES]:
            # The last arrival: a party that died waiting while nobody slept here to reap
            # it must break the generation, not pass it (once per generation).
            self._reap()
            if self.broken:  # (not w[_BROKEN]: mypy holds it false since the loop)
                return -1
        e = int(w[_EPOCH])
        k = int(w[_GEN])
        self._check_counter(e, "reset count")
        self._check_counter(k, "generation")
        index = int(w[_COUNT])
        parties = int(w[_PARTIES])
        rec = self._record()
        w[rec + _R_EPOCH] = e
        w[rec + _R_GEN] = k + 1  # the record's commit
        arrived[:] = (e, k, index)
        if index + 1 == parties:
            if self._action is not None:
                w[_COUNT] = parties  # the action runs: later arrivals wait for the pass
                return None
            self._pass(w, k)
            return index
        w[_COUNT] = index + 1
        return self._await_outcome(w, e, k, index, deadline, quiet)

    def _await_outcome(  # noqa: PLR0917 - internal, positional (tests stand in for it)
        self, w: memoryview, e: int, k: int, index: int, deadline: float, quiet: list[bool]
    ) -> int:
        reaped = False
        reaped_at = -math.inf
        while True:
            if w[_GEN] != k or w[_EPOCH] != e:
                quiet[0] = not reaped
                return index if self._passed(w, e, k) else -1
            if w[_BROKEN]:
                quiet[0] = not reaped
                return -1
            if not self._sleep(deadline):
                self._break_in(w, self._seq, e, k)
                return -1
            if w[_GEN] == k and w[_EPOCH] == e and not w[_BROKEN]:
                # A dead party of this generation breaks it. Looked for once a slice
                # (and on the first wake-up): each look reads /proc for every process.
                now = time.monotonic()
                if now - reaped_at >= WAIT_SLICE:
                    reaped_at = now
                    if self._reap():
                        reaped = True

    @staticmethod
    def _passed(w: memoryview, e: int, k: int) -> bool:
        epoch = w[_EPOCH]
        return w[_GEN] > k and (epoch == e or (epoch == e + 1 and w[_RESET_GEN] > k))

    def _pass(self, w: memoryview, k: int) -> None:
        w[_COUNT] = 0
        w[_GEN] = k + 1  # the commit
        self._bump()

    @staticmethod
    def _break_in(w: memoryview, seq: memoryview, e: int, k: int) -> None:
        """Break generation ``(e, k)`` if it is still the current one."""
        if w[_GEN] == k and w[_EPOCH] == e and not w[_BROKEN]:
            w[_BROKEN] = 1
            seq[0] = (seq[0] + 1) & _SEQ_MASK

    def _wake(self, seq: memoryview) -> None:
        # _wake_all with references that survive a close() by another thread.
        sleepers = self.__dict__.get("_sleepers")
        ptr = self.__dict__.get("_seq_ptr")
        try:
            if sleepers[0]:  # type: ignore[index]
                _compat.futex_wake_call(_compat.SYS_FUTEX, ptr, _compat.FUTEX_WAKE, 0x7FFFFFFF)
        except Exception:  # noqa: BLE001, S110 - closed meanwhile: sleepers wake within a slice
            pass

    def _run_action(self, w: memoryview, seq: memoryview, arrived: list[int]) -> int:
        """This call arrived last with an action to run: run it outside the mutex, then
        release the generation (or break it if the action raised)."""
        e, k, index = arrived
        action = self._action
        assert action is not None
        try:
            action()
        except BaseException:
            try:
                with self._section():
                    self._break_in(w, seq, e, k)
            finally:
                self._wake(seq)
            raise
        try:
            with self._section():
                ok = w[_GEN] == k and w[_EPOCH] == e and not w[_BROKEN]
                if ok:
                    self._pass(w, k)
        finally:
            self._wake(seq)
        if not ok:  # aborted or reset while the action ran
            raise BrokenBarrierError
        return index

    def reset(self) -> None:
        """Return the barrier to its initial state: waiters of the current generation
        raise :class:`threading.BrokenBarrierError`, and it is no longer broken."""
        with self._section():
            w = self._w
            epoch = w[_EPOCH]
            self._check_counter(epoch, "reset count")
            w[_RESET_GEN] = w[_GEN]
            w[_EPOCH] = epoch + 1  # the commit for waiters
            w[_COUNT] = 0
            w[_BROKEN] = 0
            self._bump()
        self._wake_all()

    def abort(self) -> None:
        """Break the barrier: every waiter and later :meth:`wait` raises
        :class:`threading.BrokenBarrierError` until :meth:`reset`."""
        with self._section():
            if not self._w[_BROKEN]:
                self._w[_BROKEN] = 1
                self._bump()
        self._wake_all()

    # -- hooks ---------------------------------------------------------------------------
    def _waits_now(self, counts: tuple[int, ...]) -> bool:
        w = self._w
        gen1, epoch = counts[0], counts[1]
        return bool(gen1 == w[_GEN] + 1 and epoch == w[_EPOCH] and not w[_BROKEN])

    def _holds(self, counts: tuple[int, ...]) -> bool:
        return self._waits_now(counts)

    def _holder_died(self, pid: int, counts: tuple[int, ...]) -> None:
        if self._waits_now(counts):
            self._w[_BROKEN] = 1
            self._bump()

    def _describe_counts(self, counts: tuple[int, ...]) -> str:
        return f"a place in generation {counts[0] - 1} of the barrier, which is now broken"

    def _rederive(self) -> None:
        w = self._w
        if not 0 <= w[_COUNT] <= w[_PARTIES]:  # pragma: no cover - defensive
            w[_BROKEN] = 1

    # -- introspection ---------------------------------------------------------------------
    def statistics(self) -> BarrierStatistics:
        """A snapshot of the barrier's state (also shown by ``safeshm inspect``)."""
        w = self._w
        return BarrierStatistics(
            self._seg.name,
            int(w[_PARTIES]),
            self.n_waiting,
            bool(w[_BROKEN]),
            int(w[_GEN]),
            int(w[_EPOCH]),
            max(0, int(self._sleepers[0])),
            len(self._live_records()),
            self._seg.header.creator_pid,
        )

    def _repr_fields(self) -> str:
        if self.broken:
            return f"parties={self.parties}, broken=True"
        return f"parties={self.parties}, n_waiting={self.n_waiting}"

    def _bind(self, mm: mmap.mmap) -> None:
        super()._bind(mm)
        self._action = None
        self._timeout = None
