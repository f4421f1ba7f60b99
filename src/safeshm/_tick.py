"""TickLeader: run a scheduled job in one worker per tick, across processes and threads.

"Run this every minute, in one of my gunicorn/uvicorn workers only" -- every worker runs
the same schedule, and each tick (``floor((time.time() - offset) / every)``, so every
process of the machine agrees on the numbering) is led by exactly one of them.

Two segments named from the leader's name carry it, both ordinary safeshm structures:

* ``NAME.tick``, a :class:`SafeArray` of int64: a layout tag, ``every`` and ``offset``
  in nanoseconds (the schedule, checked by every process that opens it), the last
  tick *claimed*, and counts of runs and skipped ticks;
* ``NAME.lock``, a :class:`SafeLock`, held by the leader for as long as its job runs.

Leading a tick is two non-blocking steps: a compare-and-set moves the last claimed
tick forward to this tick (exactly one caller wins it: at most once per tick, whatever
the timing), then the winner tries the lock once. If the previous tick's job still runs,
the lock is busy and the tick is skipped: lost, not run late, so runs never overlap and
never pile up. A leader that dies mid-job (even by SIGKILL) leaves the lock to the
kernel's robust-mutex recovery: the next tick's leader gets it and is told with a
:class:`HolderDiedWarning`; the tick that died is not run again.

A leader that hangs, or whose process is stopped (SIGSTOP, a debugger, a frozen
container), is alive: its lock is never taken from it, and every later tick is skipped
until it ends. With ``max_run`` set, each tick skipped that way issues a
:class:`TickOverrunWarning` naming the holder's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import math
import numbers
import operator
import sys
import time
import warnings
from collections.abc import AsyncGenerator, Generator
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, Self

from . import _compat
from ._array import SafeArray
from ._errors import (
    HolderDiedWarning,
    IncompatibleSegmentError,
    InvalidNameError,
    LockNotHeldError,
    SegmentClosedError,
    SegmentNotFoundError,
    TickOverrunWarning,
)
from ._int64 import INT64_MAX, INT64_MIN
from ._lock import EDEADLK, RECOVERED, RobustMutex, SafeLock, _CLevel, call_one, tid_to_pid
from ._lock import _consistent as _mutex_consistent
from ._lock import _trylock as _mutex_trylock
from ._lock import _unlock as _mutex_unlock
from ._segment import NAME_MAX, random_name, validate_name

# -- the state array (NAME.tick): eight int64 words ---------------------------------------------
_TAG: Final = 0  # _TAG_VALUE: this array is a TickLeader's, layout 1
_EVERY_NS: Final = 1
_OFFSET_NS: Final = 2  # normalised to 0 <= offset < every
_LAST: Final = 3  # the last tick claimed (INT64_MIN: none yet)
_RUNS: Final = 4  # ticks led (the lock taken, the job started)
_SKIPPED: Final = 5  # ticks claimed while the previous run still held the lock
_MAX_RUN_NS: Final = 6  # part of the schedule: warn when a run holds the lock longer (0: never)
_STARTED_NS: Final = 7  # time.monotonic_ns() when the running job took the lock (0: none)
_LENGTH: Final = 8
_TAG_VALUE: Final = 0x5353_5449_434B_0001  # "SSTICK", layout 1

_SUFFIX_STATE: Final = ".tick"
_SUFFIX_LOCK: Final = ".lock"
_NAME_MAX: Final = NAME_MAX - max(len(_SUFFIX_STATE), len(_SUFFIX_LOCK))

_MIN_EVERY_NS: Final = 1_000_000
"""Ticks shorter than a millisecond are refused: no scheduler sleeps that precisely."""

_NS: Final = 1_000_000_000


class StopSignal(Protocol):
    """What :meth:`TickLeader.iter_ticks` accepts as ``stop``: a :class:`threading.Event`,
    a :class:`multiprocessing.Event` or a :class:`~safeshm.SafeEvent` (to stop the loops
    of every process at once)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


@dataclasses.dataclass(frozen=True, slots=True)
class TickLeaderStatistics:
    """A snapshot of a :class:`TickLeader` (see :meth:`TickLeader.statistics`)."""

    name: str
    every: float
    """Seconds per tick."""
    offset: float
    """Where ticks begin, in seconds after a multiple of ``every`` (``0 <= offset < every``)."""
    current_tick: int
    """The tick under way now, by this machine's wall clock."""
    last_tick: int | None
    """The last tick claimed by a caller of ``lead()`` (``None``: never)."""
    runs: int
    """Ticks led: the job started, in some process (since the leader was created)."""
    skipped: int
    """Ticks claimed while the previous run still held the lock: not run."""
    leader_deaths: int
    """Leaders that died while running the job (their lock was recovered)."""
    running: bool
    """Whether a job is running right now (in some process)."""
    max_run: float | None = None
    """Seconds a run may hold the lead before skipped ticks warn (``None``: no limit)."""
    holder_pid: int | None = None
    """The process running the job now (``None``: none, or it cannot be seen)."""
    running_for: float | None = None
    """Seconds the job running now has held the lead (``None``: none is running)."""


def _to_ns(value: object, what: str) -> int:
    """Seconds (a real number or a :class:`datetime.timedelta`) as integer nanoseconds."""
    if isinstance(value, datetime.timedelta):
        return (value // datetime.timedelta(microseconds=1)) * 1000
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{what} must be a number of seconds or a datetime.timedelta, "
            f"not {type(value).__name__}"
        )
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    return round(seconds * _NS)


def _duration(value: object, what: str) -> int:
    """A duration of at least a millisecond (``every``, ``max_run``) in nanoseconds."""
    ns = _to_ns(value, what)
    if ns < _MIN_EVERY_NS:
        raise ValueError(f"{what} must be at least 0.001 seconds, got {value!r}")
    if ns > INT64_MAX:
        raise ValueError(f"{what} must be at most {INT64_MAX // _NS} seconds, got {value!r}")
    return ns


def _schedule(every: object, offset: object, max_run: object) -> tuple[int, int, int]:
    """Validate the schedule: ``(every_ns, offset_ns, max_run_ns)``, the offset normalised,
    ``max_run=None`` as 0."""
    every_ns = _duration(every, "every")
    offset_ns = _to_ns(offset, "offset") % every_ns
    return every_ns, offset_ns, 0 if max_run is None else _duration(max_run, "max_run")


def _warn(warning: Warning) -> None:
    """Issue ``warning`` at the first caller outside this module: the user's ``with``,
    ``async with``, ``for`` or ``async for`` line (whichever path led there)."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
        level += 1
    warnings.warn(warning, stacklevel=level)


def _check_name(name: object) -> str:
    name = validate_name(name)
    if len(name) > _NAME_MAX:
        raise InvalidNameError(
            f"a TickLeader's name is at most {_NAME_MAX} characters (its segments add "
            f"{_SUFFIX_STATE!r} and {_SUFFIX_LOCK!r}); {name[:20]!r}... has {len(name)}"
        )
    return name


def _seconds(ns: int) -> float:
    return ns / _NS


class TickLead(
    contextlib.AbstractContextManager[bool], contextlib.AbstractAsyncContextManager[bool]
):
    """What :meth:`TickLeader.lead` returns: ``with`` or ``async with`` it, once.

    Entering never blocks and never awaits anything: it gives ``True`` if this caller
    leads the tick (the job may run; the leader's lock is held until the block ends) and
    ``False`` otherwise.
    """

    __slots__ = ("_began", "_entered", "_exit_c", "_leader", "_mutex", "_run", "_state", "_tick")

    def __init__(self, leader: TickLeader, tick: int | None) -> None:
        self._leader = leader
        self._tick = tick
        self._entered = False
        self._mutex: RobustMutex | None = None  # set while this lead holds the lock
        self._state: SafeArray[int] | None = None  # the state, while it holds the lock
        self._began = 0  # the tick under way when the run began
        # The with statement looks __exit__ up before it calls __enter__: built here.
        self._run = self._life()
        self._exit_c = functools.partial(call_one, self._run.send)

    def __bool__(self) -> NoReturn:
        # ``if leader.lead():`` would always be true: every worker would run the job.
        raise TypeError(
            "TickLeader.lead() is a context manager, not a yes/no answer: write "
            "'with leader.lead() as leading: if leading: ...' (or 'async with')"
        )

    def __enter__(self) -> bool:
        if self._entered:
            raise RuntimeError("a TickLeader.lead() context can be entered only once")
        self._entered = True
        run = self._run
        try:
            return next(run)  # takes the lead (or raises, holding nothing)
        except BaseException:
            run.close()  # an exception right after next() returned: let go of the lead
            raise

    if TYPE_CHECKING:

        def __exit__(self, *exc_info: object) -> None: ...
    else:
        # One C-level call that resumes _life with the exception type: a Python __exit__
        # would give a signal handler's exception a place to land -- its first
        # instruction -- before anything let go of the lead (which would then stay held
        # by this live thread, skipping every later tick in every worker).
        __exit__ = _CLevel(operator.attrgetter("_exit_c"))

    def _life(self) -> Generator[bool, object, None]:
        """The lead's life: take it (``__enter__``'s result); then, resumed by
        ``__exit__``, end the run and let go -- in a ``finally`` that the resumption lands
        inside, so that an exception from a signal handler there lets go too."""
        taken = self._take()
        if taken is None:
            yield False
            yield False  # __exit__'s result
            return
        mutex, state, p = taken  # p: read before, not in the finally (a property: Python)
        try:
            yield True
        finally:
            try:
                if mutex.held_here():
                    _end_run(state, self._began)
            finally:
                failed = _mutex_unlock(p)
        self._mutex = self._state = None
        if failed:
            raise LockNotHeldError(
                f"TickLeader {self._leader.name!r}: the lead was not released by the "
                "thread that took it"
            )
        yield False  # __exit__'s result: an exception from the block propagates

    def _take(self) -> tuple[RobustMutex, SafeArray[int], Any] | None:
        """Claim the tick and take the lead (the mutex, the state, the mutex's pointer), or
        not (``None``)."""
        leader = self._leader
        state, mutex = leader._state, leader._mutex  # SegmentClosedError once closed
        tick = leader._resolve(self._tick)
        if not _claim(state, tick):
            return None
        if mutex.held_here():
            # This thread runs the job already (a coroutine of the same event loop, or a
            # nested lead()): the claimed tick overlaps it. (Checked before trylock: the
            # error-checking mutex would answer EDEADLK.)
            state.add(_SKIPPED, 1)
            _warn_if_overrun(leader.name, state, mutex, tick)
            return None
        # The async-exception-safe locking pattern of _lock.py: whatever is raised from
        # here on (a signal handler's KeyboardInterrupt, a HolderDiedWarning turned into an
        # error) leaves the lock free, never held by this live thread forever.
        p = mutex.pointer
        rc = -1
        try:
            rc = _mutex_trylock(p)
            if rc == _compat.EBUSY:
                state.add(_SKIPPED, 1)  # the previous run still holds it: no overlap
                _warn_if_overrun(leader.name, state, mutex, tick)
                return None
            recovered = rc != 0 and mutex.finish_acquire(rc, 0.0) == RECOVERED
            self._mutex, self._state = mutex, state
            self._began = _tick_now(state)
            state[_STARTED_NS] = time.monotonic_ns()
            state.add(_RUNS, 1)
            if recovered:
                _warn(
                    HolderDiedWarning(
                        f"TickLeader {leader.name!r}: the leader of an earlier tick died "
                        "while running the job, which may be incomplete (that tick is not "
                        f"run again); this thread now leads tick {tick}"
                    )
                )
        except BaseException:
            try:
                if self._state is not None:  # this call took the lock and timed its run
                    state[_STARTED_NS] = 0
            except Exception:  # noqa: BLE001, S110 - best effort (a handle closed meanwhile)
                pass
            finally:  # even if another signal's exception lands in the lines above
                self._mutex = self._state = None
                if rc not in (_compat.EBUSY, EDEADLK):
                    if rc:  # unknown (-1), or recovered: maybe still inconsistent
                        _mutex_consistent(p)
                    _mutex_unlock(p)  # not held: EPERM, harmless on an error-checking mutex
            raise
        return mutex, state, p

    async def __aenter__(self) -> bool:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__(*exc_info)


def _tick_now(state: SafeArray[int]) -> int:
    return (time.time_ns() - state[_OFFSET_NS]) // state[_EVERY_NS]


def _end_run(state: SafeArray[int], began: int) -> None:
    """At the end of a run, still holding the lead: no run is timed any more, and the tick
    under way now, if it began after the run did (``began``: the tick under way then), is
    skipped -- claimed before the lock is free, so that nobody leads it late, whether or
    not anyone asked for it meanwhile. Best effort: a handle closed in the block leaves
    it to the next leader."""
    with contextlib.suppress(Exception):
        state[_STARTED_NS] = 0
        now = _tick_now(state)
        if now > began:
            last = _claim_last(state, now)
            if last is not None:  # every tick after max(began, last) began during the run
                state.add(_SKIPPED, now - max(began, last))


def _warn_if_overrun(name: str, state: SafeArray[int], mutex: RobustMutex, tick: int) -> None:
    """``tick`` was skipped, the lock busy: warn if the run holding it is past max_run."""
    max_run_ns = state[_MAX_RUN_NS]
    if not max_run_ns:
        return
    tid = mutex.holder_tid()
    started = state[_STARTED_NS]
    if not tid or not started:
        return  # it just ended (or just began)
    running_ns = time.monotonic_ns() - started
    if running_ns <= max_run_ns:
        return
    pid = tid_to_pid(tid)
    holder = "an unseen process" if pid is None else f"pid {pid}"
    running_for = _seconds(running_ns)
    _warn(
        TickOverrunWarning(
            f"TickLeader {name!r}: tick {tick} skipped: the job running in {holder} has "
            f"held the lead for {running_for:.3f} s, longer than max_run="
            f"{_seconds(max_run_ns)} s. It may be hung or its process stopped: no tick "
            "runs until it ends or its process dies (the next tick then recovers the lead)",
            name=name,
            tick=tick,
            holder_pid=pid,
            running_for=running_for,
        )
    )


def _claim(state: SafeArray[int], tick: int) -> bool:
    """Move the last claimed tick forward to ``tick``; ``True`` for exactly one caller."""
    return _claim_last(state, tick) is not None


def _claim_last(state: SafeArray[int], tick: int) -> int | None:
    """:func:`_claim`, giving the last claimed tick it moved forward from (``None``: not
    this caller's)."""
    while True:
        last = state[_LAST]
        if last >= tick:
            return None  # claimed already (or a later tick was)
        if state.compare_and_set(_LAST, last, tick):
            return last
        # Another caller moved it meanwhile (to this tick, or to an earlier one that a
        # slow caller claimed): look again.


class _TickLock(SafeLock):
    """The leader's lock: a SafeLock that closing a handle never releases.

    ``SafeLock.close()`` releases the lock if the closing thread holds it -- through any
    handle. A worker that closes a leader (any handle of it) while one of its threads
    runs the job would end the job's protection early; the job's block releases it."""

    def _before_close(self) -> None:
        pass


class TickLeader:
    """Lead each tick of a schedule in exactly one of many processes and threads.

    Every worker opens the same leader (same name, same schedule) and asks, at each tick,
    whether it leads; one does, the others are told at once that they do not. Ticks are
    numbered by the wall clock -- ``floor((time.time() - offset) / every)`` -- so every
    process on the machine agrees on them; loops sleep on the monotonic clock.

    What is promised:

    * **At most once per tick**: one caller, in any process or thread, leads a tick;
      no later call for that tick, or for an earlier one, leads.
    * **No overlap**: a leader holds a robust lock for as long as its job runs. A tick
      that begins while the previous run still holds it is **skipped** (lost, not run
      late), and counted in :attr:`TickLeaderStatistics.skipped`.
    * **A crash loses that tick only**: if a leader dies while running the job (even by
      SIGKILL), the kernel marks its lock; the next tick's leader takes it over and gets
      a :class:`~safeshm.HolderDiedWarning` from ``lead()`` (the dead run may have left
      work half-done). The tick that died is not run again. If that warning is turned
      into an error, the lock is released before it propagates, and that tick is lost
      too.
    * **Never blocks**: ``lead()`` takes no lock that another process could hold for
      long; it returns at once.

    Not promised: progress past a **hung** job. A job that never ends, or a worker that
    is stopped while it leads (``SIGSTOP``, a debugger, a frozen container), is alive:
    its lock is never taken from it, and every later tick is skipped, in every worker,
    until the job ends or its process dies. Bound the job yourself (timeouts on its I/O,
    :func:`asyncio.timeout`), and give ``max_run`` to be told: each tick skipped because
    a run has held the lead longer than that issues a :class:`TickOverrunWarning` naming
    the holder's pid, in the caller that claimed the tick (once per tick);
    :meth:`statistics` shows ``running_for`` and ``holder_pid``.

    A tick is led when some worker asks during it: with the loops (:meth:`aiter_ticks`,
    :meth:`iter_ticks`) every worker asks right at each boundary.

    The wall clock decides the numbering: a clock stepped forward skips ticks; a clock
    stepped back delays the next lead until it has caught up with the last tick claimed
    (at most once per tick is kept).

    Lifecycle is every structure's: ``with TickLeader.create(...)`` closes and removes it,
    ``with TickLeader.open(...)`` only closes (workers never remove what others use).
    The leader lives in two segments, ``NAME.tick`` (a ``SafeArray``) and ``NAME.lock``
    (a ``SafeLock``), listed by ``safeshm ls``.

    Example:
        >>> with TickLeader.create(every=60.0) as leader:
        ...     with leader.lead() as leading:
        ...         leading  # the first caller in this minute leads it
        ...     with leader.lead() as leading:
        ...         leading  # the minute is led already
        True
        False
    """

    __slots__ = ("_created_here", "_creator_pid", "_handles", "_lock", "_mutex", "_name", "_state")

    _name: str
    _state: SafeArray[int]
    _handles: tuple[SafeArray[int], _TickLock]  # kept after close(), for unlink()
    _lock: _TickLock
    _mutex: RobustMutex
    _created_here: bool
    _creator_pid: int

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "use TickLeader.open(name, every=...), .create(every=...) or .attach(name) "
            "to get a TickLeader"
        )

    @classmethod
    def _make(cls, name: str, state: SafeArray[int], lock: _TickLock, created: bool) -> Self:
        self = cls.__new__(cls)
        self._name = name
        self._state = state
        self._lock = lock
        self._handles = (state, lock)
        # The lock's own robust mutex view: lead() trylocks it itself to tell a recovered
        # lock (its own HolderDiedWarning) from a busy one, without SafeLock's warning.
        self._mutex = lock._mutex
        self._created_here = created
        self._creator_pid = _compat.pid
        return self

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        every: float | datetime.timedelta,
        *,
        offset: float | datetime.timedelta = 0.0,
        max_run: float | datetime.timedelta | None = None,
        name: str | None = None,
    ) -> Self:
        """Create a new leader; ``with TickLeader.create(...)`` also removes it at the end.

        Args:
            every: seconds per tick (a real number, at least 0.001, or a
                :class:`datetime.timedelta`).
            offset: where ticks begin, in seconds after each multiple of ``every`` since
                the Unix epoch (UTC): ``every=3600, offset=900`` leads at a quarter past
                each hour. Taken modulo ``every``.
            max_run: seconds (at least 0.001, or a timedelta) a run may hold the lead
                before the ticks it makes skipped issue a :class:`TickOverrunWarning`
                naming its process; ``None``: never warn. Part of the schedule, like
                ``every``: stored in the leader, the same for every worker.
            name: the name other processes open it by; a random one when ``None``. At
                most 59 characters (the segments add ``.tick`` and ``.lock``).

        Raises:
            SegmentExistsError: a leader with this name exists (a ``FileExistsError``).
            InvalidNameError: ``name`` is not a valid segment name, or too long.
            TypeError: ``every`` or ``offset`` is not a number or a timedelta.
            ValueError: ``every`` or ``max_run`` is below 0.001 s, huge, infinite or NaN;
                ``offset`` is infinite or NaN. Nothing was created.
        """
        every_ns, offset_ns, max_run_ns = _schedule(every, offset, max_run)
        name = random_name() if name is None else _check_name(name)
        lock = _TickLock.create(name=name + _SUFFIX_LOCK)
        try:
            state = SafeArray.create(
                "q", _initial(every_ns, offset_ns, max_run_ns), name=name + _SUFFIX_STATE
            )
        except BaseException:
            lock.close()
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            raise
        return cls._make(name, state, lock, created=True)

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing leader by name (its schedule is read from it).

        Raises:
            SegmentNotFoundError: no leader has this name (a ``FileNotFoundError``).
            IncompatibleSegmentError: the segments under this name are not a
                ``TickLeader``'s.
        """
        name = _check_name(name)
        state: SafeArray[int] = SafeArray.attach(name + _SUFFIX_STATE, "q")
        try:
            _check_state(name, state, None)
            lock = _TickLock.attach(name + _SUFFIX_LOCK)
        except BaseException:
            state.close()
            raise
        return cls._make(name, state, lock, created=False)

    @classmethod
    def open(
        cls,
        name: str,
        every: float | datetime.timedelta,
        *,
        offset: float | datetime.timedelta = 0.0,
        max_run: float | datetime.timedelta | None = None,
    ) -> Self:
        """Attach to the leader ``name``, creating it first if needed (race-free): what
        every worker calls, with the same schedule (``every``, ``offset``, ``max_run``).

        Args: as :meth:`create`.

        Raises:
            IncompatibleSegmentError: the leader exists with another schedule (``every``,
                ``offset`` or ``max_run``), or the segments under this name are not a
                ``TickLeader``'s.
            InvalidNameError, TypeError, ValueError: as :meth:`create`.
        """
        schedule = _schedule(every, offset, max_run)
        name = _check_name(name)
        state: SafeArray[int] = SafeArray.open(name + _SUFFIX_STATE, "q", _initial(*schedule))
        try:
            _check_state(name, state, schedule)
            lock = _TickLock.open(name + _SUFFIX_LOCK)
        except BaseException:
            state.close()
            raise
        return cls._make(name, state, lock, created=False)

    # -- the schedule ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The name other processes open it by."""
        return self._name

    @property
    def every(self) -> float:
        """Seconds per tick."""
        return _seconds(self._state[_EVERY_NS])

    @property
    def offset(self) -> float:
        """Where ticks begin, in seconds after a multiple of :attr:`every`."""
        return _seconds(self._state[_OFFSET_NS])

    @property
    def max_run(self) -> float | None:
        """Seconds a run may hold the lead before skipped ticks warn (``None``: never)."""
        ns = self._state[_MAX_RUN_NS]
        return _seconds(ns) if ns else None

    def current_tick(self) -> int:
        """The number of the tick under way now: ``floor((time.time() - offset) / every)``,
        in exact integer nanoseconds (every process on the machine gets the same number)."""
        return _tick_now(self._state)

    def tick_time(self, tick: int) -> float:
        """When ``tick`` begins, as a ``time.time()`` timestamp."""
        state = self._state
        return _seconds(tick * state[_EVERY_NS] + state[_OFFSET_NS])

    def _resolve(self, tick: int | None) -> int:
        current = self.current_tick()
        if tick is None:
            return current
        if type(tick) is not int:
            raise TypeError(f"tick must be an int or None, not {type(tick).__name__}")
        if tick > current:
            raise ValueError(f"tick {tick} has not begun yet (the current tick is {current})")
        return tick

    # -- leading -------------------------------------------------------------------------------
    def lead(self, tick: int | None = None) -> TickLead:
        """``with leader.lead() as leading:`` (or ``async with``): lead this tick, or not.

        Gives ``True`` in exactly one caller per tick, across every process and thread,
        ``False`` in the others -- at once, never waiting. While a leading block runs,
        the leader's lock is held: a tick that begins meanwhile gives ``False``
        everywhere (skipped). Leave the block when the job is done.

        Args:
            tick: the tick to lead (from :meth:`current_tick`, read earlier); ``None``:
                the current one. A tick that is over can still be led if nobody claimed
                it, nor any later one.

        Raises:
            SegmentClosedError: the leader is closed (on entering the block).
            TypeError, ValueError: ``tick`` is not an int, or has not begun yet.

        Warns:
            HolderDiedWarning: the leader of an earlier tick died while running the job;
                this caller leads. Turned into an error, the lock is released first (and
                this tick is not led).
            TickOverrunWarning: this caller claimed the tick, but a run that has held
                the lead longer than ``max_run`` still runs: the tick is skipped.
        """
        if tick is not None:
            self._resolve(tick)  # bad input raises here, before the block
        return TickLead(self, tick)

    async def aiter_ticks(self) -> AsyncGenerator[int, None]:
        """``async for tick in leader.aiter_ticks():`` -- the job, once per tick, in one
        worker.

        Sleeps (``asyncio.sleep``, on the monotonic clock) until each tick begins and
        leads it (see :meth:`lead`); yields the tick's number in the worker that leads,
        with the lock held until the loop body ends. The first tick is the next one to
        begin. A body that runs past the next boundary makes the ticks it overlaps
        skipped, in every worker; the loop goes on with the next boundary after it.

        Stop it by cancelling its task or leaving the loop. Leaving early with
        ``break`` or an exception releases the lock when the generator is closed: wrap
        it in :func:`contextlib.aclosing` to release at once.
        """
        seen = self.current_tick()
        while True:
            while (delay := self._delay_after(seen)) > 0:
                await asyncio.sleep(delay)
            seen = self.current_tick()
            async with self.lead(seen) as leading:
                if leading:
                    yield seen
            seen = max(seen, self.current_tick())

    def iter_ticks(self, stop: StopSignal | None = None) -> Generator[int, None, None]:
        """``for tick in leader.iter_ticks(stop):`` -- :meth:`aiter_ticks` for a thread.

        Args:
            stop: ends the loop when set (checked while sleeping, so it ends promptly,
                and after each run): a :class:`threading.Event`, or a
                :class:`~safeshm.SafeEvent` to stop every process's loop at once.
                ``None``: loop forever (run it in a daemon thread).
        """
        seen = self.current_tick()
        while True:
            while (delay := self._delay_after(seen)) > 0:
                if stop is None:
                    time.sleep(delay)
                elif stop.wait(delay):
                    return
            if stop is not None and stop.is_set():
                return
            seen = self.current_tick()
            with self.lead(seen) as leading:
                if leading:
                    yield seen
            seen = max(seen, self.current_tick())

    def _delay_after(self, tick: int) -> float:
        """Seconds until ``tick + 1`` begins, by the wall clock (``<= 0``: it has)."""
        state = self._state
        begins = (tick + 1) * state[_EVERY_NS] + state[_OFFSET_NS]
        return _seconds(begins - time.time_ns())

    # -- introspection -------------------------------------------------------------------------
    def statistics(self) -> TickLeaderStatistics:
        """A snapshot of the schedule and of what happened (never blocks)."""
        words = self._state.to_list()
        lock = self._lock.statistics()
        now = time.monotonic_ns()
        started = self._state[_STARTED_NS]  # read after the lock: 0 if it ended meanwhile
        last = words[_LAST]
        return TickLeaderStatistics(
            name=self._name,
            every=_seconds(words[_EVERY_NS]),
            offset=_seconds(words[_OFFSET_NS]),
            current_tick=(time.time_ns() - words[_OFFSET_NS]) // words[_EVERY_NS],
            last_tick=None if last == INT64_MIN else last,
            runs=words[_RUNS],
            skipped=words[_SKIPPED],
            leader_deaths=lock.recoveries,
            running=lock.locked,
            max_run=_seconds(words[_MAX_RUN_NS]) if words[_MAX_RUN_NS] else None,
            holder_pid=lock.holder_pid,
            running_for=_seconds(max(0, now - started)) if lock.locked and started else None,
        )

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called on this handle."""
        return self._state.closed

    def close(self) -> None:
        """Detach this handle (both segments). Idempotent; a later ``lead()`` raises
        :class:`~safeshm.SegmentClosedError`. A leading block under way keeps the lock
        until it ends (closing never cuts a running job's protection short)."""
        if self._state.closed:
            return
        self._state.close()
        self._lock.close()
        # Any later use names the leader, not one of its segments.
        closed: Any = _Closed(f"TickLeader {self._name!r} is closed on this handle")
        self._state = self._mutex = closed

    def unlink(self) -> None:
        """Remove the leader's segments for everyone (memory is freed when the last
        process closes its handle). A worker that opens the name again gets a new one.

        Raises:
            SegmentNotFoundError: it was already removed (a ``FileNotFoundError``).
        """
        missing = 0
        for handle in self._handles:
            try:
                handle.unlink()
            except SegmentNotFoundError:
                missing += 1
        if missing == 2:
            raise SegmentNotFoundError(f"TickLeader {self._name!r} was already removed")

    def __enter__(self) -> Self:
        if self.closed:
            raise SegmentClosedError(f"TickLeader {self._name!r} is closed on this handle")
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close; and remove too if this handle came from ``create()`` in this process."""
        unlink = self._created_here and self._creator_pid == _compat.pid
        self.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                self.unlink()

    def __reduce__(self) -> tuple[Any, ...]:
        if self.closed:
            raise SegmentClosedError(f"TickLeader {self._name!r} is closed on this handle")
        return (type(self).attach, (self._name,))

    def __repr__(self) -> str:
        cls = "safeshm.TickLeader"
        name = getattr(self, "_name", None)
        if name is None:
            return f"<{cls} (uninitialised)>"
        if self.closed:
            return f"{cls}(name={name!r}, closed=True)"
        try:
            return f"{cls}(name={name!r}, every={self.every!r}, offset={self.offset!r})"
        except Exception:  # noqa: BLE001 - repr must never raise
            return f"{cls}(name={name!r})"


def _initial(every_ns: int, offset_ns: int, max_run_ns: int) -> list[int]:
    words = [0] * _LENGTH
    words[_TAG] = _TAG_VALUE
    words[_EVERY_NS] = every_ns
    words[_OFFSET_NS] = offset_ns
    words[_MAX_RUN_NS] = max_run_ns
    words[_LAST] = INT64_MIN
    return words


def _describe(every_ns: int, offset_ns: int, max_run_ns: int) -> str:
    limit = f"max_run {_seconds(max_run_ns)} s" if max_run_ns else "no max_run"
    return f"every {_seconds(every_ns)} s (offset {_seconds(offset_ns)} s, {limit})"


def _check_state(name: str, state: SafeArray[int], schedule: tuple[int, int, int] | None) -> None:
    """Refuse an array that is not a TickLeader's, or (``open``) has another schedule."""
    if len(state) != _LENGTH or state[_TAG] != _TAG_VALUE:
        raise IncompatibleSegmentError(
            f"segment {name + _SUFFIX_STATE!r} is a SafeArray of {len(state)} int64, not "
            "a TickLeader's state"
        )
    stored = state[_EVERY_NS], state[_OFFSET_NS], state[_MAX_RUN_NS]
    every_ns, offset_ns, max_run_ns = stored
    if not (every_ns >= _MIN_EVERY_NS and 0 <= offset_ns < every_ns and max_run_ns >= 0):
        raise IncompatibleSegmentError(
            f"TickLeader {name!r} is damaged: its schedule reads every={every_ns} ns, "
            f"offset={offset_ns} ns, max_run={max_run_ns} ns"
        )
    if schedule is not None and schedule != stored:
        raise IncompatibleSegmentError(
            f"TickLeader {name!r} ticks {_describe(*stored)}, not {_describe(*schedule)}: "
            "every worker must open it with one schedule"
        )


class _Closed:
    """Stands in for the state array and the lock's mutex of a closed leader: any use
    raises :class:`SegmentClosedError` naming the leader."""

    closed = True

    def __init__(self, message: str) -> None:
        self._message = message

    def __getattr__(self, attr: str) -> Any:
        raise SegmentClosedError(self._message)

    def __getitem__(self, index: object) -> Any:
        raise SegmentClosedError(self._message)
