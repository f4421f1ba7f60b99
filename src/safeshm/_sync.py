"""The shared base of the synchronization primitives (SafeEvent, SafeSemaphore, SafeBarrier,
SafeCondition, SafeRLock, SafeRWLock): a robust mutex guarding a few state words, a futex
word that waiters sleep on, and a table of per-process holder records whose owners, when
they die, are found and undone.

Layout, after the segment header (offsets from the start of the mapping)::

    128  robust mutex block (MUTEX_BLOCK bytes): guards everything below
    256  futex line: +0 uint32 sequence word (bumped under the mutex by every change a
         waiter may care about; waiters sleep on it), +8 int64 sleepers (how many
         threads are in, or about to enter, a futex wait: wake-ups are skipped at 0;
         a sleeper that died leaves it high, which costs only a spare wake-up)
    320  STATE_WORDS int64 state words: the structure's own
    384  holder records, RECORD_WORDS int64 words (one cache line) each:
           +0 owner pid (0: free) -- written last when claiming, so a record is
              either free or completely claimed
           +1 owner start time  +2 owner pid namespace (with the pid: which process)
           +3 .. +7  counts: the structure's own (permits held, read holds...)

**Recovery rule.** A holder can die anywhere, also while it holds the mutex between two
stores (the next acquirer recovers the mutex: ``EOWNERDEAD``). So each structure keeps its
authoritative state where a single store commits each step (a record's count, a state
word), and anything derived from several words is recomputed by :meth:`_rederive`, which
runs after the mutex was recovered and after dead holders were reaped.

**Async-exception rule.** A Python signal handler (``KeyboardInterrupt``) can raise at a
call or a backward jump (see the comment in ``_lock``). Inside a critical section, call
first and store last: compute what to write, then write it in plain stores, so that an
exception leaves either nothing or everything done. No loops in the locked region itself:
put them in functions called from it.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import operator
import os
import struct
import sys
import time
import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final

from . import _compat
from ._errors import HolderDiedWarning, ProcessTableFullError, SegmentCorruptedError
from ._int64 import INT64_MAX
from ._lock import (
    _LIBC_GIL,
    EDEADLK,
    MUTEX_BLOCK,
    RECOVERED,
    TIMED_OUT,
    RobustMutex,
    _AnyArgument,
    _CLevel,
    init_mutex,
)
from ._segment import HEADER_SIZE, Segment, SharedStructure
from ._timeout import check_timeout, deadline

MUTEX_OFFSET: Final = HEADER_SIZE
FUTEX_OFFSET: Final = HEADER_SIZE + MUTEX_BLOCK  # 256
STATE_OFFSET: Final = FUTEX_OFFSET + 64  # 320
STATE_WORDS: Final = 8
RECORDS_OFFSET: Final = STATE_OFFSET + 8 * STATE_WORDS  # 384
RECORD_WORDS: Final = 8
RECORD_SIZE: Final = 8 * RECORD_WORDS
R_PID: Final = 0
R_START: Final = 1
R_NS: Final = 2
R_COUNTS: Final = 3
"""Index of a record's first count word (counts are R_COUNTS .. RECORD_WORDS - 1)."""
COUNTS: Final = RECORD_WORDS - R_COUNTS

DEFAULT_PROCESSES: Final = 128
MAX_PROCESSES: Final = 1 << 16
_PARAMS: Final = struct.Struct("=I")  # the number of holder records

_SEQ_MASK: Final = 0x7FFFFFFF  # futex values travel through ctypes as C ints
WAIT_SLICE: Final = 0.1
"""The longest single sleep: blocked waits check for signals, ``close()`` and dead
holders at least this often."""

_trylock: Final = _compat.mutex_trylock
_unlock: Final = _compat.mutex_unlock
_consistent: Final = _compat.mutex_consistent
_NEVER: Final = math.inf

# The sleeper's timespec for a full slice, made once.
_SLICE_TIMESPEC: Final = ctypes.byref(_compat.Timespec(0, int(WAIT_SLICE * 1e9)))
_SLEEPERS_HIGH: Final = 1 << 62  # the sleepers hint never goes above (see _sleep)


class _Timeout(Exception):
    """Internal: the deadline passed while taking the internal mutex (a stuck holder)."""


def deadline_of(timeout: object) -> float:
    """``time.monotonic()`` instant at which a wait with ``timeout`` gives up (``inf``:
    never), for ``wait()``-style calls: ``None`` waits forever, a negative timeout does
    not wait at all (as :meth:`threading.Condition.wait`); otherwise the library's one
    validator (:func:`~safeshm._timeout.check_timeout`: its errors and messages).
    ``acquire()``-style calls handle threading's ``timeout=-1`` ("forever") first."""
    if isinstance(timeout, (int, float)) and type(timeout) is not bool and timeout < 0:
        timeout = 0  # (NaN is not < 0: check_timeout refuses it)
    return deadline(check_timeout(timeout))


_start_time_cache: dict[int, int] = {}


def my_start_time() -> int:
    pid = _compat.pid
    start = _start_time_cache.get(pid)
    if start is None:
        start = _start_time_cache[pid] = _compat.process_start_time(pid) or 0
    return start


_namespace: tuple[int, int] = (0, 0)  # (pid, pid namespace of that process)


def _my_namespace() -> int:
    """:func:`_compat.pid_namespace`, read once per process (a system call otherwise)."""
    global _namespace  # noqa: PLW0603 - a per-process constant
    pid, ns = _namespace
    if pid != _compat.pid:
        _namespace = (_compat.pid, _compat.pid_namespace())
        pid, ns = _namespace
    return ns


_PACKAGE_DIR: Final = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn`, called right here, that names the
    first frame outside safeshm: a warning points at the user's call, whichever of the
    library's paths (of any depth) found what it warns about."""
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == _PACKAGE_DIR:
        frame = frame.f_back
        level += 1
    return level


def holder_alive(pid: int, start: int, namespace: int) -> bool:
    """Whether the process that was ``(pid, start)`` in ``namespace`` lives: as
    :func:`_compat.process_alive`, and a zombie -- a process that exited but that its
    parent has not waited for yet (a parent blocked in a wait of its own never would) --
    counts as dead. One read of ``/proc/PID/stat`` (a reap checks every record: this is
    its cost).

    Errs on the side of "alive" as process_alive does: another pid namespace, or a
    process we cannot inspect.
    """
    if not 0 < pid < _compat.PID_MAX_LIMIT:  # also a pid read from a damaged segment
        return False
    if namespace != _my_namespace():
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:  # pragma: no cover - /proc unreadable: cannot tell
        return True
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # field 3, the state: exited
        return False
    now = int(fields[19])  # field 22: the start time
    # 0 on either side means "unknown": assume it is the same process.
    return start == 0 or now in (0, start)


class Section:
    """``with Section(prim, deadline):`` -- hold ``prim``'s internal mutex for a block.

    Follows ``_lock.Held``'s async-exception-safe pattern; raises :class:`_Timeout` if
    the mutex cannot be had by ``deadline`` (``inf``: waits). When the previous holder
    died, runs ``prim._recovered()`` holding the mutex (which reaps and rederives).
    """

    __slots__ = ("_d", "_m", "_prim", "_x")

    def __init__(self, prim: SyncPrimitive, deadline: float = _NEVER) -> None:
        self._prim = prim
        self._m = prim._mutex
        self._x = prim._exit_c
        self._d = deadline

    def __enter__(self) -> None:
        m = self._m
        p = m.pointer
        rc = -1
        if m.owner[0]:
            m.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                got = m.finish_acquire(rc, self._d)
                if got == TIMED_OUT:
                    rc = EDEADLK  # not held: nothing to undo
                    raise _Timeout
                if got == RECOVERED:
                    self._prim._recovered()
        except BaseException:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
            raise

    if TYPE_CHECKING:

        def __exit__(self, *exc_info: object) -> None: ...
    else:
        __exit__ = _CLevel(operator.attrgetter("_x"))


class _LenientUnlock(dict[int, None]):
    """``restype`` of a section's C-level unlock: 0 and EPERM map to ``None`` (EPERM: a
    wait's relock gave up at its deadline, so the section ends without the mutex); any
    other error raises."""

    def __init__(self, what: str) -> None:
        super().__init__({0: None, _compat.EPERM: None})
        self._what = what

    def __missing__(self, rc: int) -> None:
        raise OSError(rc, f"unlocking {self._what} failed")  # pragma: no cover


def _section_exit(mutex: RobustMutex, what: str) -> Any:
    exit_ = _LIBC_GIL["pthread_mutex_unlock"]
    exit_.argtypes = (ctypes.c_void_p, _AnyArgument, _AnyArgument, _AnyArgument)  # type: ignore[assignment]
    exit_.restype = _LenientUnlock(what).__getitem__
    return functools.partial(exit_, mutex.pointer)


class SyncPrimitive(SharedStructure):
    """Lifecycle and shared machinery of the synchronization primitives (see the module
    docstring). Subclasses set ``_KIND``/``_LAYOUT``, build their segment with
    :meth:`_create_segment`, and override :meth:`_rederive` and :meth:`_holder_died`."""

    _MAPPED: ClassVar[tuple[str, ...]] = (
        "_mutex",
        "_w",
        "_seq",
        "_sleepers",
        "_seq_ptr",
        "_exit_c",
    )

    _mutex: RobustMutex
    _w: memoryview  # int64 words from STATE_OFFSET: state words, then the records
    _seq: memoryview  # the uint32 futex sequence word
    _sleepers: memoryview  # one int64
    _seq_ptr: Any  # byref of the sequence word, for futex calls
    # Poisoned at close() like the views: a Section takes its own reference when it is
    # made, so a thread inside one can always leave it (the reference keeps the mutex,
    # and with it the mapping), while a closed handle keeps no export that would hold
    # the mapping -- and, before 3.13, mmap's duplicate of the descriptor -- open.
    _exit_c: Any
    _nrec: int
    _mine: tuple[int, int]  # (pid, word index of this process's record), (0, -1): none yet
    _EXTRA_SIZE: ClassVar[int] = 0
    """Bytes a subclass keeps after the holder records (its own region, fixed per class;
    it starts at ``self._extra_offset``)."""
    _extra_offset: int

    # -- building ----------------------------------------------------------------------
    @classmethod
    def _create_segment(
        cls,
        name: str | None,
        state: tuple[int, ...] = (),
        *,
        processes: int | None = None,
        flags: int = 0,
        init_extra: Callable[[mmap.mmap, int], None] | None = None,
    ) -> Segment:
        """A new segment with ``state`` in the first state words and ``processes``
        holder records (default :data:`DEFAULT_PROCESSES`); ``init_extra(mm, offset)``
        fills the subclass's region (``_EXTRA_SIZE`` bytes at ``offset``) before the
        segment is published."""
        nrec = DEFAULT_PROCESSES if processes is None else processes
        if isinstance(nrec, bool) or not isinstance(nrec, int):
            raise TypeError(f"processes must be an int, not {type(nrec).__name__}")
        if not 1 <= nrec <= MAX_PROCESSES:
            raise ValueError(f"processes must be between 1 and {MAX_PROCESSES}, got {nrec}")
        if len(state) > STATE_WORDS:  # pragma: no cover - programming error
            raise ValueError("too many state words")

        def init(mm: mmap.mmap) -> None:
            init_mutex(mm, MUTEX_OFFSET)
            struct.pack_into(f"={len(state)}q", mm, STATE_OFFSET, *state)
            if init_extra is not None:
                init_extra(mm, RECORDS_OFFSET + nrec * RECORD_SIZE)

        return Segment.create(
            name,
            kind=cls._KIND,
            layout=cls._LAYOUT,
            payload_size=RECORDS_OFFSET - HEADER_SIZE + nrec * RECORD_SIZE + cls._EXTRA_SIZE,
            init=init,
            params=_PARAMS.pack(nrec),
            flags=flags,
        )

    def _bind(self, mm: mmap.mmap) -> None:
        (nrec,) = _PARAMS.unpack_from(self._seg.header.params)
        if not 1 <= nrec <= MAX_PROCESSES or (
            RECORDS_OFFSET + nrec * RECORD_SIZE + self._EXTRA_SIZE != self._seg.header.total_size
        ):
            raise SegmentCorruptedError(
                f"{self._what} is damaged: {nrec} holder records do not fit its "
                f"{self._seg.header.total_size} bytes"
            )
        self._nrec = nrec
        self._extra_offset = RECORDS_OFFSET + nrec * RECORD_SIZE
        self._mutex = RobustMutex(mm, MUTEX_OFFSET, self._what, held=False)
        self._exit_c = _section_exit(self._mutex, self._what)
        self._w = memoryview(mm)[STATE_OFFSET:].cast("q")
        self._seq = memoryview(mm)[FUTEX_OFFSET : FUTEX_OFFSET + 4].cast("I")
        self._sleepers = memoryview(mm)[FUTEX_OFFSET + 8 : FUTEX_OFFSET + 16].cast("q")
        self._seq_ptr = ctypes.byref(ctypes.c_uint32.from_buffer(mm, FUTEX_OFFSET))
        self._mine = (0, -1)

    @property
    def _what(self) -> str:
        return f"{type(self).__name__} {self._seg.name!r}"

    def _section(self, deadline: float = _NEVER) -> Section:
        return Section(self, deadline)

    # -- hooks ---------------------------------------------------------------------------
    def _rederive(self) -> None:
        """Recompute derived state words from authoritative ones. Holding the mutex."""

    def _holder_died(self, pid: int, counts: tuple[int, ...]) -> None:
        """A dead process's record is about to be freed; ``counts`` are its count words.
        Holding the mutex. Called before the record is cleared, so it may run again for
        the same death if this process dies too: make it idempotent, or commit through
        the record itself (the default: clearing the counts is the whole effect)."""

    def _holds(self, counts: tuple[int, ...]) -> bool:
        """Whether a dead process whose record has ``counts`` held something (then
        :meth:`_reap` warns with :class:`HolderDiedWarning`). Holding the mutex; called
        before :meth:`_holder_died`. Default: any count is non-zero."""
        return any(counts)

    def _recovered(self) -> None:
        """The internal mutex's previous holder died while holding it."""
        self._reap()
        self._rederive()
        self._bump()

    # -- holder records ------------------------------------------------------------------
    def _record(self) -> int:
        """Word index (in ``_w``) of this process's record, claimed if needed. Holding the
        mutex.

        Raises:
            ProcessTableFullError: every record is owned by a live process.
        """
        pid, index = self._mine
        if pid == _compat.pid:
            return index
        index = self._find_record()
        self._mine = (_compat.pid, index)
        return index

    def _find_record(self) -> int:
        w = self._w
        me = _compat.pid
        start = my_start_time()
        free = -1
        for k in range(self._nrec):
            i = STATE_WORDS + k * RECORD_WORDS
            owner = w[i + R_PID]
            if owner == me and w[i + R_START] == start:
                return i
            if owner == 0 and free < 0:
                free = i
        if free < 0:
            if self._reap():
                self._rederive()
            for k in range(self._nrec):
                i = STATE_WORDS + k * RECORD_WORDS
                if w[i + R_PID] == 0:
                    free = i
                    break
            else:
                raise ProcessTableFullError(
                    f"{self._what}: all {self._nrec} holder records are owned by live "
                    "processes; create it with a larger processes="
                )
        for c in range(R_COUNTS, RECORD_WORDS):
            w[free + c] = 0
        w[free + R_START] = start
        w[free + R_NS] = _compat.pid_namespace()
        w[free + R_PID] = me  # the commit
        return free

    def _reap(self) -> int:
        """Free the records of dead processes (after :meth:`_holder_died`); how many.
        Holding the mutex. Warns with :class:`HolderDiedWarning` for each that held
        something -- after running :meth:`_rederive`, so that a warning turned into an
        exception (``-W error``) leaves the derived state consistent."""
        w = self._w
        me = _compat.pid
        died = 0
        dead: list[tuple[int, tuple[int, ...]]] = []
        for k in range(self._nrec):
            i = STATE_WORDS + k * RECORD_WORDS
            owner = w[i + R_PID]
            if not owner or owner == me:
                continue
            if holder_alive(owner, w[i + R_START], w[i + R_NS]):
                continue
            counts = tuple(w[i + R_COUNTS : i + RECORD_WORDS])
            held = self._holds(counts)
            self._holder_died(owner, counts)
            for c in range(R_COUNTS, RECORD_WORDS):
                w[i + c] = 0
            w[i + R_PID] = 0
            died += 1
            if held:
                dead.append((int(owner), counts))
        if died:
            self._rederive()
        for owner, counts in dead:
            warnings.warn(
                f"{self._what}: process {owner} died holding "
                f"{self._describe_counts(counts)}; released",
                HolderDiedWarning,
                stacklevel=user_stacklevel(),
            )
        return died

    def _describe_counts(self, counts: tuple[int, ...]) -> str:
        return "counts " + ", ".join(map(str, counts))

    def _live_records(self) -> list[tuple[int, tuple[int, ...]]]:
        """``(pid, counts)`` of every claimed record whose process lives (a snapshot,
        without the mutex: for statistics)."""
        w = self._w
        out = []
        for k in range(self._nrec):
            i = STATE_WORDS + k * RECORD_WORDS
            owner = w[i + R_PID]
            if owner and holder_alive(owner, w[i + R_START], w[i + R_NS]):
                out.append((int(owner), tuple(w[i + R_COUNTS : i + RECORD_WORDS])))
        return out

    # -- waiting -------------------------------------------------------------------------
    def _check_counter(self, value: int, what: str) -> None:
        """Raise :class:`SegmentCorruptedError` unless ``value`` -- a shared counter about to
        be raised by one -- can be: only damage takes one to the int64 limit."""
        if not 0 <= value < INT64_MAX:
            raise SegmentCorruptedError(f"{self._what} is damaged: its {what} is {value}")

    def _bump(self) -> None:
        """Change the sequence word (holding the mutex): sleepers that read it before will
        not sleep, and :meth:`_wake_all` after the section wakes those already asleep."""
        self._seq[0] = (self._seq[0] + 1) & _SEQ_MASK

    def _sleep(self, deadline: float) -> bool:
        """Sleep until the sequence word changes, a slice passes or ``deadline``; ``False``
        (without sleeping) if the deadline has passed. Called holding the mutex; holds it
        again on return. The caller re-checks its condition (and whether holders died).

        Raises:
            _Timeout: the mutex could not be retaken by ``deadline``.
        """
        if deadline == _NEVER:
            pts = _SLICE_TIMESPEC
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if left >= WAIT_SLICE:
                pts = _SLICE_TIMESPEC
            else:
                frac, whole = math.modf(left)
                pts = ctypes.byref(_compat.Timespec(int(whole), int(frac * 1e9)))
        seen = self._seq[0]
        sleepers = self._sleepers
        n = sleepers[0]
        # A hint (see the layout): a damaged count stays high, which only costs wake-ups.
        sleepers[0] = n + 1 if n < _SLEEPERS_HIGH else _SLEEPERS_HIGH
        # The views are taken before sleeping: close() in another thread meanwhile swaps
        # the handle's attributes for stand-ins, and the relock must still retake this
        # mutex (the caller's cleanup runs holding it; its section's exit unlocks it).
        m = self._mutex
        seq_ptr = self._seq_ptr
        _unlock(m.pointer)
        try:
            _compat.futex_wait_call(_compat.SYS_FUTEX, seq_ptr, _compat.FUTEX_WAIT, seen, pts)
        finally:
            self._relock(deadline, m)
            sleepers[0] = max(0, sleepers[0] - 1)
        if self._seg.closed:  # by another thread while this one slept
            self._raise_closed()
        return True

    def _relock(self, deadline: float, m: RobustMutex | None = None) -> None:
        """Retake the mutex that :meth:`_sleep` released (the caller's section unlocks);
        ``m``: the handle's mutex, as :meth:`_sleep` saw it before sleeping."""
        if m is None:
            m = self._mutex
        p = m.pointer
        rc = -1
        try:
            rc = _trylock(p)
            if rc:
                got = m.finish_acquire(rc, deadline)
                if got == TIMED_OUT:
                    raise _Timeout
                if got == RECOVERED:
                    self._recovered()
        except BaseException:
            if rc and rc != EDEADLK:
                _consistent(p)
            raise

    def _wake_all(self) -> None:
        """Wake every sleeper (call after the section that changed the state and bumped)."""
        if self._sleepers[0]:
            _compat.futex_wake_call(
                _compat.SYS_FUTEX, self._seq_ptr, _compat.FUTEX_WAKE, 0x7FFFFFFF
            )

    def _before_close(self) -> None:
        # Wake this process's sleepers so that they see the handle closed at once.
        if not self._seg.closed and self._sleepers[0]:
            _compat.futex_wake_call(
                _compat.SYS_FUTEX, self._seq_ptr, _compat.FUTEX_WAKE, 0x7FFFFFFF
            )
