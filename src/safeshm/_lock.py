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
import functools
import math
import mmap
import operator
import os
import struct
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Final, ParamSpec, Self, TypeVar

from . import _compat
from ._errors import (
    HolderDiedWarning,
    LockNotHeldError,
    LockReentryError,
    LockTimeoutError,
    SafeShmError,
    SegmentClosedError,
    SegmentCorruptedError,
)
from ._protocols import SHM_GUARANTEES, Guarantees
from ._segment import HEADER_SIZE, Kind, Segment, SharedStructure
from ._timeout import check_lock_timeout

MUTEX_BLOCK: Final = 128
"""Bytes a :class:`RobustMutex` occupies: the pthread mutex (64), a recovery count (8),
padding to two cache lines so that nothing else shares its lines."""
_RECOVERIES_OFFSET: Final = 64

OK: Final = 0
RECOVERED: Final = 1
TIMED_OUT: Final = 2
_NOT_HELD: Final = -2  # Held.__enter__: timed out, the mutex was never ours

_WAIT_SLICE: Final = 0.1
"""Longest single sleep in the kernel while blocking without a deadline. Waking every
100 ms (a system call, nothing more) lets Ctrl-C interrupt a blocked ``acquire()``; it
does not delay the hand-over, which the unlocking thread's futex wake-up drives."""

_FUTEX_TID_MASK: Final = 0x3FFFFFFF
_FUTEX_OWNER_DIED: Final = 0x40000000
_FUTEX_WAITERS: Final = 0x80000000
# glibc's pthread_mutex_t, the same on x86_64 and aarch64: int __lock (the robust futex
# word: owner tid | FUTEX_WAITERS | FUTEX_OWNER_DIED), unsigned __count, int __owner,
# unsigned __nusers, int __kind.
_GLIBC_OWNER_WORD: Final = 2
_GLIBC_KIND_WORD: Final = 4
_GLIBC_OWNER_SPECIAL: Final = (0x7FFFFFFF, 0x7FFFFFFE)  # INCONSISTENT, NOTRECOVERABLE
_reference_kind: int | None = None
_SPINS: Final = 60
"""trylock attempts (~150 ns each) before a contended acquire sleeps in the kernel."""
_NEVER: Final = math.inf

# -- async-exception safety ---------------------------------------------------------------------
# A Python signal handler (KeyboardInterrupt, a SIGALRM timeout) runs only in the main thread,
# at the eval loop's "eval breaker" checks: in CPython 3.11-3.13 at RESUME (a function's
# entry), JUMP_BACKWARD, and right after a CALL completes -- never inside a ctypes foreign
# call, never at loads, stores, arithmetic, comparisons or forward jumps. Every acquire and
# release of an internal mutex therefore follows one pattern (see _queue.SafeQueue.get):
#
#     rc = -1                       # "unknown": the locking call may not have returned yet
#     if owner[0]:                  # held by someone: raise LockReentryError *before* the try
#         mutex.check_not_mine()    #   if it is this thread, or the finally would release
#     try:                          #   the interrupted outer hold
#         rc = _trylock(p)          # an exception right after the call lands in the try
#         if rc:
#             ... mutex.finish_acquire(rc, deadline) ...
#         ... the critical section ...
#     finally:
#         if not rc:                # the common case: one C call, nothing before it
#             _unlock(p)
#         elif rc != EDEADLK:       # unknown or slow path: maybe held, maybe inconsistent
#             try:
#                 _consistent(p)    # an EOWNERDEAD acquire the exception cut short
#             finally:
#                 _unlock(p)        # not held: EPERM, harmless (an ERRORCHECK mutex)
#
# No handler can run between entering the finally and the unlock call completing (no call,
# no backward jump before it), and a Python-level helper must not be called there: its RESUME
# would be a place for the next exception. And no loop in the locked region itself: CPython
# (gh-108214, gh-130279; 3.13 for any `while` with a compound condition) may leave a loop's
# backward jump -- an eval-breaker check -- out of the enclosing try's exception range, so an
# exception raised there skips the finally. Loops go in functions called from the try (an
# exception raised in a callee reaches the caller at the call, which the try covers).
# pthread_mutex_consistent on a mutex this thread does not hold returns EINVAL or EPERM
# (glibc: only when it is inconsistent does it act, and the recovery below tolerates another
# thread having marked it consistent).


def _words_holding(words: memoryview, indexes: Iterable[int], tid: int) -> list[int]:
    """The ``indexes`` whose word holds ``tid`` (a function: no loop inside a try)."""
    return [i for i in indexes if words[i] & _FUTEX_TID_MASK == tid]


def _probe_owner_word() -> int:
    """The index (in ``int``s) of the robust futex word, which holds the owner's thread id.

    The kernel's robust-futex protocol requires the owner tid in the futex word, so every
    libc that implements robust mutexes keeps one; where it sits differs (glibc: the first
    int, musl: the second). Found once, on a private mutex: the word that reads this
    thread's tid while it holds the mutex and 0 once it released it.
    """
    buf = mmap.mmap(-1, MUTEX_BLOCK)
    init_mutex(buf, 0)
    target = ctypes.c_char.from_buffer(buf, 0)
    words = memoryview(buf).cast("i")
    try:
        tid = threading.get_native_id()
        _check(_compat.mutex_trylock(ctypes.byref(target)), "pthread_mutex_trylock")
        held = _words_holding(words, range(_compat.PTHREAD_MUTEX_SIZE // 4), tid)
        _check(_compat.mutex_unlock(ctypes.byref(target)), "pthread_mutex_unlock")
        found = _words_holding(words, held, 0)
    finally:
        words.release()
        del target
        buf.close()
    if not found:  # pragma: no cover - a libc without robust futexes
        raise ImportError(
            "safeshm: cannot find the owner thread id in this C library's "
            "robust mutexes; they do not follow the kernel's robust-futex protocol"
        )
    return found[0]


def init_mutex(mm: mmap.mmap, offset: int) -> None:
    """Initialise a robust, process-shared, error-checking mutex at ``mm[offset]``.

    Only ever called on an unpublished segment, so no other process can see it yet.
    """
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
            _compat.mutexattr_settype(attr, _compat.PTHREAD_MUTEX_ERRORCHECK),
            "pthread_mutexattr_settype",
        )
        target = ctypes.c_char.from_buffer(mm, offset)
        _check(_compat.mutex_init(ctypes.byref(target), attr), "pthread_mutex_init")
        del target  # drop the buffer export before the caller may close the mapping
    finally:
        _compat.mutexattr_destroy(attr)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise OSError(rc, f"{what}() failed: {os.strerror(rc)}")


OWNER_WORD: Final = _probe_owner_word()
"""Index of the robust futex word in a mutex, as ``int``s (0 on glibc, 1 on musl)."""

_trylock: Final = _compat.mutex_trylock
_unlock: Final = _compat.mutex_unlock
_consistent: Final = _compat.mutex_consistent
EDEADLK: Final = _compat.EDEADLK
unlock_each: Final = functools.partial(sorted, key=_unlock)
"""``unlock_each(pointers)`` unlocks every mutex of a sequence in ONE call: ``sorted``
calls its key from C, so no signal handler can run between the unlocks (a Python loop
would check for one at every backward jump)."""


# PyObject_CallOneArg(f, arg), called with two extra arguments that it ignores (every
# supported ABI passes them in registers, and the caller cleans up): __exit__(t, v, tb) as
# f(t), in C -- ``functools.partial(call_one, generator.send)``. PyDLL keeps the GIL and
# raises what f raised.
call_one: Final = ctypes.PyDLL(None)["PyObject_CallOneArg"]
call_one.restype = ctypes.py_object
call_one.argtypes = (ctypes.py_object,) * 4


class _CLevel(property):
    """A property whose getter is C (``operator.attrgetter``) and that is also callable
    from the class, as ``contextlib.ExitStack`` calls ``type(cm).__exit__(cm, ...)``."""

    def __init__(self, fget: Any, doc: str | None = None) -> None:
        super().__init__(fget)
        self.__doc__ = doc  # the class's own docstring would shadow property's doc=

    def __call__(self, instance: Any, *args: Any) -> Any:
        return self.__get__(instance)(*args)


T_co = TypeVar("T_co", covariant=True)
P = ParamSpec("P")
R = TypeVar("R")


class GeneratorHold(AbstractContextManager[T_co]):
    """``with`` around a generator that takes hold of something at its first ``next()``
    (yielding what ``with ... as`` binds) and lets go in a ``finally`` around that
    ``yield``, then yields ``False`` once more (``__exit__``'s result).

    Unlike :func:`contextlib.contextmanager`, an exception from a signal handler at any
    instant lets go: ``__enter__`` closes the generator on any exception -- also one that
    lands right after the generator took hold -- and ``__exit__`` is one C-level call that
    resumes the generator inside its ``try`` (a Python ``__exit__``'s first instruction
    would be a place to land before anything let go). The block's exception is not thrown
    into the generator: it is resumed with the exception's type sent (``None``: a normal
    end), and the exception propagates.
    """

    __slots__ = ("_entered", "_exit_c", "_gen", "_make")

    def __init__(self, make: Callable[[], Generator[Any, Any, None]]) -> None:
        """``make()`` gives the generator (called again for each call of a function that
        this object decorates, as ``contextlib.contextmanager``'s objects do)."""
        self._make = make
        self._gen = gen = make()
        self._entered = False
        # The with statement looks __exit__ up before it calls __enter__: built here.
        self._exit_c = functools.partial(call_one, gen.send)

    def __enter__(self) -> T_co:
        if self._entered:
            raise RuntimeError("this context manager can be entered only once")
        self._entered = True
        gen = self._gen
        try:
            return next(gen)  # type: ignore[no-any-return]
        except BaseException:
            gen.close()  # raised right after it took hold, or while taking it: let go
            raise

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """As a decorator: each call of ``func`` runs inside a fresh hold."""

        @functools.wraps(func)
        def held(*args: P.args, **kwargs: P.kwargs) -> R:
            with GeneratorHold[Any](self._make):
                return func(*args, **kwargs)

        return held

    if TYPE_CHECKING:

        def __exit__(self, *exc_info: object) -> None: ...
    else:
        __exit__ = _CLevel(operator.attrgetter("_exit_c"))


def _c_level(attr: str, doc: str | None = None) -> Any:
    """A class attribute that reads the instance attribute ``attr``, C-level (see
    :class:`_CLevel`): the compiled core's descriptor where it is loaded (one lookup, no
    property and attrgetter calls in between: ``with lock:`` pays it twice)."""
    if _compat.native is not None:
        return _compat.native.CLevel(attr, doc)
    return _CLevel(operator.attrgetter(attr), doc)


class _AnyArgument:
    """An ``argtypes`` entry that passes any object as a C int (its truth value) without
    running Python code: ``__exit__``'s exception arguments, which unlock ignores."""

    from_param = bool


class _UnlockResult(dict[int, None]):
    """``restype`` of the C-level unlock: 0 maps to ``None``; an error calls
    ``__missing__``, which raises (Python code, but only once nothing is held)."""

    __slots__ = ("_seg", "_what")

    def __init__(self, what: str, seg: Segment | None) -> None:
        # Neither the mutex nor the segment itself: ctypes function objects sit in a
        # reference cycle of their own (freed only by the cyclic GC), and through this
        # restype they would keep the mapping -- and, before 3.13, the descriptor mmap
        # duplicated -- alive after close().
        super().__init__({0: None})
        self._what = what
        self._seg = None if seg is None else weakref.ref(seg)

    def __missing__(self, rc: int) -> None:
        seg = None if self._seg is None else self._seg()
        if rc == _compat.EPERM and seg is not None and seg.closed:
            raise SegmentClosedError(f"{self._what} is closed on this handle")
        _release_failed(self._what, rc)


def _release_failed(what: str, rc: int) -> None:
    if rc == _compat.EPERM:
        raise LockNotHeldError(f"{what} is not held by this thread")
    raise OSError(rc, f"unlocking {what} failed: {os.strerror(rc)}")  # pragma: no cover


def _c_release(mutex: RobustMutex, seg: Segment) -> Any:
    """``release()`` for a SafeLock's ``mutex``: one C-level call."""
    release = _LIBC_GIL["pthread_mutex_unlock"]
    release.restype = _UnlockResult(mutex._what, seg).__getitem__
    return functools.partial(release, mutex.pointer)


# Indexing (not attribute access) makes a new function object each time, with its own
# restype and argtypes. PyDLL: the unlock never blocks, so it keeps the GIL.
_LIBC_GIL: Final = ctypes.PyDLL(None)


def _glibc_kind() -> int:
    """The ``__kind`` word glibc writes for our mutexes (learnt once, from a scratch one)."""
    global _reference_kind  # noqa: PLW0603 - a per-process constant, computed on first use
    if _reference_kind is None:
        scratch = mmap.mmap(-1, MUTEX_BLOCK)
        init_mutex(scratch, 0)
        _reference_kind = struct.unpack_from("=i", scratch, 4 * _GLIBC_KIND_WORD)[0]
        scratch.close()
    return _reference_kind


def check_mutex(
    words: memoryview,
    what: str,
    kind: int | None = None,
    description: str = "a robust process-shared mutex",
) -> None:
    """Refuse a mutex whose bytes cannot be a robust mutex of ours (glibc only).

    Read from shared memory when a handle binds to it, so that damage is a typed error
    at ``attach()`` instead of ``EINVAL`` on first use, a lock that silently stopped
    being robust (a damaged ``__kind`` can turn it into a plain mutex), or a lock held
    forever by a thread that cannot exist.

    ``kind``: glibc's type word of the mutex expected (default: ours, see
    :func:`init_mutex`), which ``description`` names.

    Raises:
        SegmentCorruptedError: the mutex's type, futex word or owner is not possible.
    """
    if not _compat.GLIBC:  # pragma: no cover - musl lays the mutex out differently
        return
    expected = _glibc_kind() if kind is None else kind
    ints = words.cast("B").cast("i")
    found = ints[_GLIBC_KIND_WORD]
    if found != expected:
        raise SegmentCorruptedError(
            f"{what} is damaged: its mutex has type {found}, not {description} ({expected})"
        )
    word = ints[0]
    tid = word & _FUTEX_TID_MASK
    owner = ints[_GLIBC_OWNER_WORD]
    if tid >= _compat.PID_MAX_LIMIT or not (
        0 <= owner < _compat.PID_MAX_LIMIT or owner in _GLIBC_OWNER_SPECIAL
    ):
        raise SegmentCorruptedError(
            f"{what} is damaged: its mutex names owner thread {tid} / {owner}, which no "
            "Linux thread id can be"
        )
    if not tid and word & _FUTEX_WAITERS and not word & _FUTEX_OWNER_DIED:
        # Never a robust mutex's state: an unlock stores 0 and a death sets OWNER_DIED;
        # glibc would wait forever for this word to change.
        raise SegmentCorruptedError(
            f"{what} is damaged: its mutex's futex word {word & 0xFFFFFFFF:#x} has waiters "
            "but no owner, which no robust mutex can have"
        )
    if tid and not word & _FUTEX_OWNER_DIED and _held_forever(words, tid):
        raise SegmentCorruptedError(
            f"{what} is held by thread {tid}, which no longer exists and was never marked "
            "dead, and no other process has the segment open: nobody can ever release "
            "it (damaged bytes, or a holder whose robust list was lost)"
        )


def _held_forever(words: memoryview, tid: int) -> bool:
    """Whether the mutex in ``words``, whose futex word names ``tid``, can never be freed.

    The slow path of :func:`check_mutex`, taken only when the mutex is held. A holder
    that exits is marked dead by the kernel (its robust list) before its thread id
    disappears, and a live holder maps the segment; so a held mutex naming a vanished
    thread, or one that does not map the segment (damage naming, say, thread 1), is
    stuck -- unless the holder is in another pid namespace, where its id means nothing
    here. Any holder has the segment open (its flock shows in /proc/locks; as pid 0 from
    another namespace), so the mutex is declared stuck only if no process but this one
    has the segment open.
    """
    ints = words.cast("B").cast("i")
    if ints[0] & _FUTEX_TID_MASK != tid:
        return False  # released meanwhile
    where = _mapped_file(ctypes.addressof(ctypes.c_char.from_buffer(words)))
    if where is None:
        return False
    if os.path.exists(f"/proc/{tid}") and _maps_file(tid, where) is not False:
        return False  # alive and mapping it, or we cannot tell: a real holder
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            if _flocked_by_another_process(f, where):
                return False
    except OSError:  # pragma: no cover - no /proc: cannot tell
        return False
    # Read the word again now that the thread is gone: a holder exiting while we looked
    # (its word read before the kernel marked it dead, its id gone after) was marked dead
    # before its id disappeared, so it shows here -- not stuck, the next acquirer recovers.
    word = ints[0]
    return word & _FUTEX_TID_MASK == tid and not word & _FUTEX_OWNER_DIED


def _mapped_file(address: int) -> str | None:
    """``MAJ:MIN:INODE`` (as /proc/locks writes it) of the file mapped at ``address``."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            return _file_mapped_at(f, address)
    except (OSError, ValueError):  # pragma: no cover - no /proc
        return None


# The loops over /proc files are functions of their own, called inside the `with open`:
# see the note on loops above RobustMutex's pattern (a back edge can skip a with's exit).
def _flocked_by_another_process(locks: Iterable[str], where: str) -> bool:
    """Does a line of /proc/locks show another process's flock on the file ``where``?"""
    for line in locks:
        fields = line.split()
        if (
            len(fields) >= 6
            and fields[1] == "FLOCK"
            and fields[5] == where
            and fields[4] != str(_compat.pid)
        ):
            return True
    return False


def _file_mapped_at(maps: Iterable[str], address: int) -> str | None:
    for line in maps:
        fields = line.split()
        low, _, high = fields[0].partition("-")
        if int(low, 16) <= address < int(high, 16) and len(fields) >= 5:
            return _file_id(fields)
    return None


def _file_id(fields: list[str]) -> str:
    """``MAJ:MIN:INODE`` of a /proc/PID/maps line's fields."""
    major, _, minor = fields[3].partition(":")
    return f"{int(major, 16):02x}:{int(minor, 16):02x}:{fields[4]}"


def _maps_file(tid: int, where: str) -> bool | None:
    """Whether thread ``tid``'s process maps the file ``where``; ``None``: cannot tell."""
    try:
        with open(f"/proc/{tid}/maps", encoding="ascii", errors="replace") as f:
            return any(
                len(fields) >= 5 and _file_id(fields) == where
                for fields in (line.split() for line in f)
            )
    except (OSError, ValueError):  # gone meanwhile, or not ours to read
        return None


class RobustMutex:
    """A view of a robust mutex inside a mapping (see :func:`init_mutex`).

    Internal building block: ``SafeLock`` exposes it, and structures that need a lock
    embed one in their own segment. Hot paths lock and unlock through :attr:`pointer`
    themselves, following the async-exception-safe pattern described above, and hand a
    nonzero trylock result to :meth:`finish_acquire`: the one recovery sequence.
    """

    __slots__ = ("_p", "_target", "_what", "_words", "exit_c", "owner")

    def __init__(self, mm: mmap.mmap, offset: int, what: str, *, held: bool = True) -> None:
        # from_buffer (not from_address) keeps a buffer export on the mmap for as long as
        # this object lives: the mapping cannot be unmapped under an in-flight call.
        self._target = ctypes.c_char.from_buffer(mm, offset)
        self._p = ctypes.byref(self._target)
        self._words = memoryview(mm)[offset : offset + MUTEX_BLOCK].cast("q")
        self.owner = memoryview(mm)[offset + 4 * OWNER_WORD : offset + 4 * OWNER_WORD + 4].cast("i")
        """A one-word view of the robust futex word: nonzero while some thread holds it."""
        self._what = what
        # Before exit_c: its ctypes function sits in a reference cycle that would keep the
        # mapping exported (and un-closable) after a refused, damaged mutex.
        check_mutex(self._words, what)
        self.exit_c = _c_exit(self) if held else None
        """``exit_c(t, v, tb)``: unlock as one C-level call, for ``__exit__`` methods (only
        with ``held``: a mutex that :class:`Held` or ``SafeLock`` uses)."""

    @property
    def pointer(self) -> Any:
        """The ``byref`` of the mutex, for hot paths that call trylock/unlock themselves
        and hand a nonzero trylock result to :meth:`finish_acquire`."""
        return self._p

    def acquire(self, timeout: float | None = None) -> int:
        """Lock; return ``OK``, ``RECOVERED`` (the previous holder died) or ``TIMED_OUT``.

        ``timeout=None`` waits forever, ``0`` does not wait. Not async-exception-safe by
        itself (the caller gets the result after a call returns): for diagnostics and
        tests; structures use the pattern above.

        Raises:
            LockReentryError: the calling thread already holds it.
        """
        rc = _trylock(self._p)
        if rc == 0:
            return OK
        return self.finish_acquire(rc, _NEVER if timeout is None else time.monotonic() + timeout)

    def check_not_mine(self) -> None:
        """Raise :class:`LockReentryError` if the calling thread holds the mutex.

        Called before the ``try`` of an acquire when :attr:`owner` is nonzero: a re-entry
        (e.g. a signal handler that uses the structure while the code it interrupted holds
        its mutex) must fail without its ``finally`` releasing the outer hold.
        """
        if self.owner[0] & _FUTEX_TID_MASK == threading.get_native_id():
            raise self._reentry()

    def _reentry(self) -> LockReentryError:
        return LockReentryError(
            f"{self._what} is already held by this thread; it is not reentrant, so "
            "acquiring it again would deadlock"
        )

    def finish_acquire(self, rc: int, deadline: float) -> int:
        """Complete an acquire whose ``pthread_mutex_trylock`` returned ``rc != 0``.

        Waits until the ``time.monotonic()`` instant ``deadline`` (``math.inf``: forever;
        one already past: not at all). Returns ``OK``, ``RECOVERED`` or ``TIMED_OUT``.
        """
        if rc == _compat.EBUSY:
            if deadline != _NEVER and deadline <= time.monotonic():
                return TIMED_OUT
            # Critical sections are a few microseconds of Python: retrying briefly before
            # sleeping in the kernel usually wins the lock without a context switch (what
            # glibc's adaptive mutexes do in C -- a robust mutex cannot be adaptive).
            trylock = _trylock
            p = self._p
            for _ in range(_SPINS if _compat.spinning_helps() else 0):
                rc = trylock(p)
                if rc != _compat.EBUSY:
                    break
            else:
                rc = self._wait(deadline)
                if rc == _compat.ETIMEDOUT:
                    return TIMED_OUT
        if rc == 0:
            return OK
        if rc == _compat.EOWNERDEAD:
            return self._recover()
        if rc == EDEADLK:
            raise self._reentry()
        if rc == _compat.ENOTRECOVERABLE:  # pragma: no cover - we always call consistent()
            raise SafeShmError(f"{self._what} is unrecoverable (ENOTRECOVERABLE)")
        if rc == errno.EINVAL:  # the bytes were damaged after we attached
            raise SegmentCorruptedError(
                f"{self._what} is damaged: locking its mutex failed with EINVAL"
            )
        raise OSError(rc, f"locking {self._what} failed: {os.strerror(rc)}")

    def _recover(self) -> int:
        """The one recovery sequence, right after a locking call returned EOWNERDEAD: this
        thread holds the mutex, whose holder died. Count it, then mark it consistent (a
        mutex unlocked without this becomes permanently unusable: ENOTRECOVERABLE); the
        caller then tells its user (RECOVERED)."""
        self._words[_RECOVERIES_OFFSET // 8] += 1  # counted first: a store, no call
        rc = _consistent(self._p)
        # EINVAL: an interrupted acquire's cleanup in another thread of this process
        # already marked it consistent (glibc lets any thread do so; see above).
        if rc not in (0, errno.EINVAL):  # pragma: no cover
            raise OSError(rc, f"pthread_mutex_consistent() failed: {os.strerror(rc)}")
        return RECOVERED

    def _wait(self, deadline: float) -> int:
        ts = _compat.Timespec()
        pts = ctypes.byref(ts)
        while True:
            now = time.monotonic()
            if now >= deadline:
                return _compat.ETIMEDOUT
            wake = min(deadline, now + _WAIT_SLICE)
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
        rc = _unlock(self._p)
        if rc != 0:
            self._release_failed(rc)

    def _release_failed(self, rc: int) -> None:
        _release_failed(self._what, rc)

    def held_here(self) -> bool:
        """Whether the calling thread holds the mutex."""
        return self.owner[0] & _FUTEX_TID_MASK == threading.get_native_id()

    def release_if_held_here(self) -> None:
        """Release the lock if the calling thread holds it; otherwise do nothing."""
        if self.held_here():
            _unlock(self._p)

    def held_in_this_process(self) -> bool:
        """Whether a live thread of this process holds the mutex (a snapshot)."""
        word = self.owner[0]
        tid = word & _FUTEX_TID_MASK
        if not tid or word & _FUTEX_OWNER_DIED:
            return False
        return os.path.exists(f"/proc/self/task/{tid}")

    def holder_tid(self) -> int | None:
        """The kernel thread id of the holder, 0 if free.

        A snapshot for diagnostics only: it may change the moment it is read. The robust
        futex word holds the owner's tid (see :data:`OWNER_WORD`).
        """
        return int(self.owner[0]) & _FUTEX_TID_MASK

    def owner_died(self) -> bool:
        """Whether the kernel marked the mutex's holder dead and nobody has recovered it
        yet (the next acquirer will). A snapshot; ``False`` where the libc hides it."""
        if not _compat.GLIBC:  # pragma: no cover - musl keeps the state elsewhere
            return False
        return bool(int(self._words.cast("B").cast("i")[0]) & _FUTEX_OWNER_DIED)

    def locked(self) -> bool:
        """Whether any thread holds the mutex right now. A snapshot; never blocks."""
        return self.holder_tid() != 0

    @property
    def recoveries(self) -> int:
        """How many times a holder died and the lock was recovered (since creation)."""
        return int(self._words[_RECOVERIES_OFFSET // 8])


class Held:
    """``with Held(mutex):`` -- hold an internal robust mutex for a block.

    Async-exception safe: ``__enter__`` follows the pattern above, and ``__exit__`` is a
    single C-level call (a Python ``__exit__`` would let a signal handler's exception land
    at its first instruction, before the unlock). ``on_recovered`` runs, holding the
    mutex, when the previous holder died (e.g. to repair what it left half-done).
    ``timeout`` (seconds) bounds the wait for a holder that is alive but does not release
    it (stopped by SIGSTOP or a debugger): :class:`~safeshm.LockTimeoutError` then, and
    the block does not run.
    """

    __slots__ = ("_m", "_on_recovered", "_timeout")

    def __init__(
        self, mutex: RobustMutex, on_recovered: Any = None, timeout: float | None = None
    ) -> None:
        self._m = mutex
        self._on_recovered = on_recovered
        self._timeout = timeout

    def __enter__(self) -> None:
        m = self._m
        p = m._p
        rc = -1
        if m.owner[0]:
            m.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                timeout = self._timeout
                deadline = _NEVER if timeout is None else time.monotonic() + timeout
                got = m.finish_acquire(rc, deadline)
                if got == TIMED_OUT:
                    rc = _NOT_HELD
                    raise LockTimeoutError(
                        f"{m._what} was not acquired within {timeout} s: its holder is "
                        "alive but does not release it (stopped, or stuck); nothing was changed"
                    )
                if got == RECOVERED and self._on_recovered:
                    self._on_recovered()
        except BaseException:
            if rc == _NOT_HELD:
                raise
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
        __exit__ = _CLevel(operator.attrgetter("_m.exit_c"))


def _c_exit(mutex: RobustMutex) -> Any:
    """``exit_c(t, v, tb)`` for ``mutex``: a ctypes call of pthread_mutex_unlock that
    ignores the three exception arguments (every supported ABI passes extra arguments in
    registers, and the caller cleans up), raising only if the unlock failed."""
    result = _UnlockResult(mutex._what, None)
    exit_ = _LIBC_GIL["pthread_mutex_unlock"]
    exit_.argtypes = (ctypes.c_void_p, _AnyArgument, _AnyArgument, _AnyArgument)  # type: ignore[assignment]
    exit_.restype = result.__getitem__
    return functools.partial(exit_, mutex.pointer)


def _set_timespec(ts: _compat.Timespec, t: float) -> None:
    frac, whole = math.modf(t)
    ts.tv_sec = int(whole)
    ts.tv_nsec = int(frac * 1e9)


def tid_to_pid(tid: int) -> int | None:
    """The process (thread group) a kernel thread id belongs to, if it still exists."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            return _tgid(f)
    except OSError:
        return None


def _tgid(status: Iterable[bytes]) -> int | None:
    for line in status:
        if line.startswith(b"Tgid:"):
            return int(line.split()[1])
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
    #: What this backend promises (``safeshm.Guarantees``): shared memory on this machine;
    #: a dead process is known at once; nothing survives a reboot.
    guarantees: ClassVar[Guarantees] = SHM_GUARANTEES
    _LAYOUT = 1
    # ``_core``: only with the compiled core (see _bind).
    _MAPPED = ("_mutex", "_hot", "_core")

    _mutex: RobustMutex
    _hot: tuple[Any, memoryview, RobustMutex]  # (pointer, owner word, the mutex)
    # The same mutex, never swapped out at close(): a thread that holds the lock can
    # always release it, even after another thread closed the handle (otherwise the lock
    # would stay held by a live thread, and every other process would wait for it).
    _unlocker: RobustMutex
    # C-level unlocks of that mutex, also never swapped out (see release and __exit__).
    _release_c: Any
    _exit_c: Any

    @classmethod
    def create(cls, *, name: str | None = None) -> Self:
        """Create a new lock, initially free.

        Args:
            name: the name to attach by; a random one when ``None``.

        Raises:
            SegmentExistsError: a segment with this name exists (a ``FileExistsError``).
            InvalidNameError: ``name`` is not a valid segment name.
        """
        seg = Segment.create(
            name,
            kind=cls._KIND,
            layout=cls._LAYOUT,
            payload_size=MUTEX_BLOCK,
            init=lambda mm: init_mutex(mm, HEADER_SIZE),
        )
        return cls._from_segment(seg)

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing lock by name, from any process of the same user.

        Raises:
            SegmentNotFoundError: no segment has this name (a ``FileNotFoundError``).
            IncompatibleSegmentError: the segment is not a ``SafeLock``.
        """
        return cls._from_segment(cls._attach_segment(name))

    @classmethod
    def open(cls, name: str) -> Self:
        """Attach to the lock ``name``, creating it first if needed (race-free)."""
        return cls._open_segment(name, lambda: cls.create(name=name))

    def _bind(self, mm: mmap.mmap) -> None:
        what = f"SafeLock {self._seg.name!r}"
        native = _compat.native
        # With the compiled core, the ctypes views stay bound too (the class's Python
        # methods run on them: locked(), statistics(), close(), differential tests), but
        # without their C-level unlocks (ctypes function objects sit in reference cycles).
        mutex = RobustMutex(mm, HEADER_SIZE, what, held=native is None)
        self._mutex = self._unlocker = mutex
        self._hot = (mutex.pointer, mutex.owner, mutex)
        if native is None:
            self._release_c = _c_release(mutex, self._seg)
            self._exit_c = mutex.exit_c
        else:
            core = native.Lock(
                mm, HEADER_SIZE, what, f"{what} is closed on this handle", OWNER_WORD
            )
            self._core = core
            # Never poisoned at close(), like _unlocker: they keep the core (and the
            # mapping) so that the holding thread can always release.
            self._release_c = core.release
            self._exit_c = core.exit
            hot = (core.acquire, mutex.owner, core.undo)
            self.__dict__["acquire"] = types.MethodType(_native_acquire, hot)
            self.__dict__["acquire_nowait"] = types.MethodType(_native_acquire_nowait, hot)
        # The mapping must outlive every hold of the mutex: glibc links a held robust mutex
        # into its thread's robust list, and the kernel walks that list when the thread
        # dies. Unmapping it while held -- this handle garbage-collected, or the interpreter
        # tearing down at exit -- would make the thread's next robust-mutex operation
        # segfault and keep the death from ever being seen. So when the handle goes, a
        # mutex still held here keeps its mapping for the rest of the process.
        weakref.finalize(self, _keep_mapping_if_held, mutex)

    def acquire(self, blocking: bool = True, timeout: float | None = -1) -> bool:  # noqa: PLR0912 - inlined lock pattern
        """Acquire the lock, like :meth:`threading.Lock.acquire`.

        ``acquire()`` waits as long as it takes; ``acquire(timeout=2.0)`` waits at most 2
        seconds; ``acquire(False)`` (or :meth:`acquire_nowait`) tries once. ``timeout=-1``
        and ``timeout=None`` both mean "forever". Waiting sleeps in the kernel; the lock is
        handed over as soon as it is released.

        Returns:
            ``True`` once acquired; ``False`` if the timeout expired first (or, without
            ``blocking``, if another thread holds it).

        Raises:
            LockReentryError: the calling thread already holds the lock.
            ValueError: a timeout with ``blocking=False``, or a negative timeout other
                than ``-1``, or NaN.
            TypeError: ``timeout`` is not a number.

        Warns:
            HolderDiedWarning: the previous holder died holding the lock; it is now held
                by the caller. (If warnings are turned into errors, the lock is released
                before the error propagates.)
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
        p, owner, mutex = self._hot
        # Async-exception safe (see the pattern at the top of this module): a signal
        # handler's exception anywhere from here to the return leaves the lock free.
        rc = -1
        if owner[0]:
            mutex.check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                got = mutex.finish_acquire(rc, deadline)
                if got == TIMED_OUT:
                    return False
                if got == RECOVERED:
                    self._warn_recovered(3)
        except BaseException:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
            raise
        return True

    def acquire_nowait(self) -> bool:
        """Try once: ``acquire(blocking=False)``. ``True`` if acquired."""
        return self.acquire(False)

    def _warn_recovered(self, stacklevel: int) -> None:
        warnings.warn(
            HolderDiedWarning(
                f"SafeLock {self._seg.name!r}: the previous holder died while holding "
                "it; the lock was recovered and is now held by this thread (whatever "
                "the dead holder was changing under it may be incomplete)"
            ),
            stacklevel=stacklevel,
        )

    if TYPE_CHECKING:

        def release(self) -> None:
            """Release the lock (see the runtime definition below)."""

        def __exit__(self, *exc_info: object) -> None: ...
    else:
        # Both are C-level calls (a ctypes call bound to this mutex, or the compiled core's
        # method, reached through a class attribute whose lookup is C too): a Python method
        # would give a signal handler's exception a place to land -- its first instruction
        # -- before the unlock, and the lock would stay held by this live thread.
        release = _c_level(
            "_release_c",
            doc="""\
Release the lock. Works even after :meth:`close`, for a thread that holds it.

Raises:
    LockNotHeldError: the calling thread does not hold it.
    SegmentClosedError: the handle is closed and this thread does not hold it.
""",
        )
        __exit__ = _c_level("_exit_c")

    def _enter_ctypes(self) -> Self:
        p, owner, mutex = self._hot
        # As in acquire(): no exception can leave the lock held between the trylock and
        # the with-block's start (the with statement's cleanup covers the instruction
        # right after __enter__ returns; a return from a Python frame checks nothing).
        rc = -1
        if owner[0]:
            mutex.check_not_mine()
        try:
            rc = _trylock(p)
            if rc and mutex.finish_acquire(rc, _NEVER) == RECOVERED:
                self._warn_recovered(3)
        except BaseException:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
            raise
        return self

    if TYPE_CHECKING:

        def __enter__(self) -> Self: ...
    elif _compat.native is None:
        __enter__ = _enter_ctypes
    else:
        # One C call (the core's enter(), found through a C-level class attribute): a
        # Python __enter__ would cost a frame, and its return to the with statement would
        # be a place for a signal handler's exception after the lock was taken.
        __enter__ = _compat.native.CLevel("_core", None, True)  # self._core.enter(self)

    def acquired(self, timeout: float | None = None) -> GeneratorHold[Self]:
        """``with lock.acquired(timeout=2.0):`` -- hold the lock for a block, or raise.

        Raises:
            LockTimeoutError: not acquired within ``timeout`` seconds (also a
                ``TimeoutError``).
        """
        return GeneratorHold(functools.partial(self._acquired, timeout))

    def _acquired(self, timeout: float | None) -> Generator[Self | bool, object, None]:
        if not self.acquire(timeout=timeout):
            raise LockTimeoutError(f"SafeLock {self._seg.name!r} not acquired within {timeout} s")
        try:
            yield self
        finally:
            self._release_c()
        yield False  # __exit__'s result: an exception from the block propagates

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


_kept_mappings: list[RobustMutex] = []


def _keep_mapping_if_held(mutex: RobustMutex) -> None:
    """A SafeLock handle is going away (garbage-collected, or the interpreter is exiting):
    if a thread of this process still holds its mutex, keep the mapping for good."""
    if mutex.held_in_this_process():
        _kept_mappings.append(mutex)
        # Also through interpreter teardown, which clears module globals: the kernel walks
        # the holder's robust list only when the thread exits, after all of that.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(mutex))


# -- the compiled core's acquire (see SafeLock._bind) -----------------------------------------
# The core's acquire() called directly would hand the lock back at a point where the
# interpreter checks for signals (right after any call of a C function completes), outside
# the caller's try: an exception there would leave the lock held by a live thread. Called
# from this frame instead, that point lies inside the try below, and a Python frame's
# return to its caller checks nothing. ``before`` (the owner word, read with no call in
# between) tells undo() whether the hold is this call's -- or a hold this thread had
# already, which a refused re-entry must not release. Bound (types.MethodType) to
# ``(core.acquire, owner word view, core.undo)``; the code objects are named as
# SafeLock's methods, so wrong calls get the ctypes path's messages word for word.


def _native_acquire(hot: Any, blocking: bool = True, timeout: float | None = -1) -> bool:
    acquire, owner, undo = hot
    before = owner[0]
    try:
        return acquire(blocking, timeout)  # type: ignore[no-any-return]
    except BaseException:
        undo(before)
        raise


def _native_acquire_nowait(hot: Any) -> bool:
    acquire, owner, undo = hot
    before = owner[0]
    try:
        return acquire(False, -1)  # type: ignore[no-any-return]
    except BaseException:
        undo(before)
        raise


for _f, _name in ((_native_acquire, "acquire"), (_native_acquire_nowait, "acquire_nowait")):
    _f.__code__ = _f.__code__.replace(co_name=_name, co_qualname=f"SafeLock.{_name}")
    _f.__name__, _f.__qualname__ = _name, f"SafeLock.{_name}"
    _f.__doc__ = getattr(SafeLock, _name).__doc__
del _f, _name
