"""SafeCounter: an exact, linearizable int64 in shared memory.

Its write-scalable sibling, ShardedCounter, lives in ``_sharded``; ``SafeCounter.create(
sharded=True)`` and ``SafeCounter.open(..., sharded=True)`` hand over to it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import operator
import struct
import sys
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Self, overload

from . import _compat
from ._errors import IncompatibleSegmentError
from ._int64 import check_int64
from ._lock import MUTEX_BLOCK, Held, RobustMutex, init_mutex
from ._protocols import SHM_GUARANTEES, Guarantees
from ._segment import HEADER_SIZE, Kind, Segment, SharedStructure
from ._sharded import ShardedCounter

# --- SafeCounter layout -------------------------------------------------------------------
#   128  value (int64), alone on its cache line
#   192  robust mutex block (used when lock-free atomics are unavailable)
_VALUE_OFFSET: Final = HEADER_SIZE
_COUNTER_MUTEX_OFFSET: Final = HEADER_SIZE + 64
_COUNTER_PAYLOAD: Final = 64 + MUTEX_BLOCK

# Header flags: which protocol every process must use on this segment. Mixing a CAS
# writer with a lock-based writer on one word would lose updates, so the choice is made
# once, at creation, and recorded.
IMPL_ATOMIC: Final = 1
IMPL_LOCKED: Final = 2
_IMPL_NAMES: Final = {
    IMPL_ATOMIC: "lock-free (atomic compare-and-swap)",
    IMPL_LOCKED: "robust lock",
}


def _new_scratch() -> tuple[memoryview, Any, Any]:
    """Private memory for one compare-and-swap: ``(words, &expected, &desired)``.

    libatomic's CAS takes both operands by pointer. A scratch is popped from a pool for
    the duration of one call, so threads -- and a signal handler that interrupts a call
    and counts into the same counter -- never share one. (A tuple, not an object: it
    unpacks faster than three attribute loads, on the hottest path of the library.)
    """
    buf = (ctypes.c_int64 * 2)()
    return memoryview(buf).cast("B").cast("q"), ctypes.byref(buf, 0), ctypes.byref(buf, 8)


# Every CAS below is ``cas(8, ptr, expected, desired, 5, 5)``: 8 bytes, and 5 is
# __ATOMIC_SEQ_CST for success and failure (_compat.ATOMIC_SEQ_CST), spelt as literals
# because a global lookup per call is measurable on this path.
_scratch_pool: list[tuple[memoryview, Any, Any]] = []
_pop_scratch: Final = _scratch_pool.pop
_push_scratch: Final = _scratch_pool.append


@dataclasses.dataclass(frozen=True, slots=True)
class CounterStatistics:
    """A snapshot of a :class:`SafeCounter` (see :meth:`SafeCounter.statistics`)."""

    name: str
    value: int
    implementation: str
    """``"lock-free (atomic compare-and-swap)"`` or ``"robust lock"``."""
    creator_pid: int


class SafeCounter(SharedStructure):
    """A signed 64-bit integer shared by processes and threads, exact under any load.

    Every operation is atomic and linearizable: ``add``, ``exchange`` and
    ``compare_and_set`` are single compare-and-swap operations on the shared word
    (through libatomic; where it is missing, under a robust lock), so no interleaving of
    processes and threads loses or duplicates an update, and no process's death can leave
    the counter locked or half-written. Leaving the int64 range raises ``OverflowError``
    and changes nothing.

    For write-heavy metrics whose increments must scale with cores, see
    :class:`ShardedCounter` (``SafeCounter.create(sharded=True)``).

    Operations are safe to call from signal handlers when the counter is lock-free (see
    :attr:`implementation`); with the robust-lock fallback, a handler that interrupts an
    operation on the same counter gets a :class:`~safeshm.LockReentryError` instead of a
    deadlock.

    Example:
        >>> with SafeCounter.create() as hits:
        ...     hits.add()
        ...     hits.add(41)
        ...     hits.value
        1
        42
        42
    """

    _KIND = Kind.COUNTER
    #: What this backend promises (``safeshm.Guarantees``): shared memory on this machine;
    #: a dead process is known at once; nothing survives a reboot.
    guarantees: ClassVar[Guarantees] = SHM_GUARANTEES
    _LAYOUT = 1
    _MAPPED = ("_value", "_hot", "_mutex", "_core", "add", "set", "exchange", "compare_and_set")

    _value: memoryview
    # (the value's one-word view, libatomic's __atomic_compare_exchange or None for the
    # locked implementation, a ctypes byref() of the value word): one attribute load and
    # a tuple unpack for everything the hot paths need.
    _hot: tuple[memoryview, Any, Any]
    _mutex: RobustMutex

    # -- construction ----------------------------------------------------------------------
    @overload
    @classmethod
    def create(
        cls, initial: int = 0, *, name: str | None = None, sharded: Literal[False] = False
    ) -> Self: ...
    @overload
    @classmethod
    def create(
        cls,
        initial: int = 0,
        *,
        name: str | None = None,
        sharded: Literal[True],
        slots: int | None = None,
    ) -> ShardedCounter: ...
    @overload
    @classmethod
    def create(
        cls, initial: int = 0, *, name: str | None = None, sharded: bool, slots: int | None = None
    ) -> SafeCounter | ShardedCounter: ...

    @classmethod
    def create(
        cls,
        initial: int = 0,
        *,
        name: str | None = None,
        sharded: bool = False,
        slots: int | None = None,
    ) -> Self | ShardedCounter:
        """Create a new counter holding ``initial``.

        Args:
            initial: the starting value (int64).
            name: the name to attach by; a random one when ``None``.
            sharded: return a :class:`ShardedCounter` instead (write-scalable metrics).
            slots: ``ShardedCounter`` only: how many per-thread slots to reserve.

        Raises:
            SegmentExistsError: a segment with this name exists (a ``FileExistsError``).
            InvalidNameError: ``name`` is not a valid segment name.
            OverflowError: ``initial`` is outside the int64 range.
            TypeError: ``initial`` is not an int.
        """
        if sharded:
            return ShardedCounter.create(initial, name=name, slots=slots)
        if slots is not None:
            raise TypeError("slots= applies to sharded counters only")
        initial = check_int64("initial value", initial)
        impl = IMPL_ATOMIC if _compat.compare_exchange is not None else IMPL_LOCKED

        def init(mm: mmap.mmap) -> None:
            struct.pack_into("=q", mm, _VALUE_OFFSET, initial)
            init_mutex(mm, _COUNTER_MUTEX_OFFSET)

        seg = Segment.create(
            name,
            kind=cls._KIND,
            layout=cls._LAYOUT,
            payload_size=_COUNTER_PAYLOAD,
            init=init,
            flags=impl,
        )
        return cls._from_segment(seg)

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing counter by name, from any process of the same user.

        Raises:
            SegmentNotFoundError: no segment has this name (a ``FileNotFoundError``).
            IncompatibleSegmentError: the segment is not a ``SafeCounter`` (the message
                says what it is).
        """
        return cls._from_segment(cls._attach_segment(name))

    @overload
    @classmethod
    def open(cls, name: str, initial: int = 0, *, sharded: Literal[False] = False) -> Self: ...
    @overload
    @classmethod
    def open(
        cls, name: str, initial: int = 0, *, sharded: Literal[True], slots: int | None = None
    ) -> ShardedCounter: ...
    @overload
    @classmethod
    def open(
        cls, name: str, initial: int = 0, *, sharded: bool, slots: int | None = None
    ) -> SafeCounter | ShardedCounter: ...

    @classmethod
    def open(
        cls, name: str, initial: int = 0, *, sharded: bool = False, slots: int | None = None
    ) -> Self | ShardedCounter:
        """Attach to the counter ``name``, creating it with ``initial`` if it does not
        exist. Race-free: many processes calling it at once all end up on one counter,
        and exactly one of them initialises it.
        """
        if sharded:
            return ShardedCounter.open(name, initial, slots=slots)
        if slots is not None:
            raise TypeError("slots= applies to sharded counters only")
        initial = check_int64("initial value", initial)
        return cls._open_segment(name, lambda: cls.create(initial, name=name))

    def _bind(self, mm: mmap.mmap) -> None:
        impl = self._seg.header.flags
        # A one-word view of the value: reads and stores index it with a constant.
        self._value = memoryview(mm)[_VALUE_OFFSET : _VALUE_OFFSET + 8].cast("q")
        self._mutex = RobustMutex(mm, _COUNTER_MUTEX_OFFSET, f"SafeCounter {self._seg.name!r}")
        if impl == IMPL_ATOMIC:
            if _compat.compare_exchange is None:
                raise IncompatibleSegmentError(
                    f"SafeCounter {self._seg.name!r} was created to use lock-free atomics, "
                    "but this process has no libatomic (or SAFESHM_DISABLE_ATOMICS is set)"
                )
            pval = ctypes.byref(ctypes.c_int64.from_buffer(mm, _VALUE_OFFSET))
            self._hot = (self._value, _compat.compare_exchange, pval)
        elif impl == IMPL_LOCKED:
            self._hot = (self._value, None, None)
        else:
            raise IncompatibleSegmentError(
                f"SafeCounter {self._seg.name!r} uses an unknown implementation ({impl})"
            )
        if _compat.native is not None:
            # The compiled core, on the same word and the same protocol (the segment's
            # flag): its methods shadow the ctypes ones on this handle, which stay on the
            # class (``type(h).add(h, 1)`` runs the ctypes code on the same segment).
            core = _compat.native.Counter(
                mm,
                f"SafeCounter {self._seg.name!r}",
                f"{type(self).__name__} {self._seg.name!r} is closed on this handle",
                _VALUE_OFFSET,
                _COUNTER_MUTEX_OFFSET,
                impl,
            )
            self._core = core
            d = self.__dict__
            d["add"] = core.add
            d["set"] = core.set
            d["exchange"] = core.exchange
            d["compare_and_set"] = core.compare_and_set

    # -- operations ------------------------------------------------------------------------
    if TYPE_CHECKING or _compat.native is None or sys.version_info >= (3, 12):
        # From 3.12 CPython inlines a Python property getter (LOAD_ATTR_PROPERTY): this
        # one-word memoryview read beats any C getter (measured: 57 ns vs 84 on 3.13).

        @property
        def value(self) -> int:
            """The current value (an atomic read)."""
            return self._value[0]

    else:
        # 3.11 calls a Python getter as a full function call: the compiled core's read,
        # through a getter that is C too, costs half (measured: 65 ns vs 124). On a closed
        # handle ``_core`` is the stand-in, which raises SegmentClosedError.
        value = property(
            operator.attrgetter("_core.value"), doc="The current value (an atomic read)."
        )

    def add(self, delta: int = 1) -> int:
        """Atomically add ``delta`` (may be negative) and return the new value.

        Raises:
            OverflowError: the result would leave the int64 range; nothing changed.
            TypeError: ``delta`` is not an int; nothing changed.
        """
        value, cas, pval = self._hot
        if cas is None:
            return self._add_locked(delta)
        try:
            scratch = _pop_scratch()
        except IndexError:
            scratch = _new_scratch()
        words, pexp, pdes = scratch
        old = value[0]
        while True:
            words[0] = old
            try:
                words[1] = new = old + delta
            except (ValueError, TypeError) as e:
                _push_scratch(scratch)
                raise self._bad_operand(e, "delta", delta, old) from None
            if cas(8, pval, pexp, pdes, 5, 5):
                _push_scratch(scratch)
                return new
            old = words[0]  # a failed CAS wrote the current value back into "expected"

    def set(self, value: int) -> None:
        """Atomically replace the value.

        Raises:
            OverflowError: ``value`` is outside the int64 range; nothing changed.
            TypeError: ``value`` is not an int; nothing changed.
        """
        word, cas, _ = self._hot
        if cas is None:
            value = check_int64("value", value)
            with Held(self._mutex):
                word[0] = value
            return
        try:
            # One aligned 8-byte store: atomic on every supported platform, and ordered
            # with respect to the compare-and-swaps on the same word.
            word[0] = value
        except (ValueError, TypeError) as e:
            raise self._bad_operand(e, "value", value, None) from None

    def exchange(self, value: int) -> int:
        """Atomically replace the value and return the previous one.

        Raises:
            OverflowError: ``value`` is outside the int64 range; nothing changed.
            TypeError: ``value`` is not an int; nothing changed.
        """
        value = check_int64("value", value)
        word, cas, pval = self._hot
        if cas is None:
            with Held(self._mutex):
                old: int = word[0]
                word[0] = value
                return old
        try:
            scratch = _pop_scratch()
        except IndexError:
            scratch = _new_scratch()
        words, pexp, pdes = scratch
        words[0] = word[0]
        words[1] = value
        while not cas(8, pval, pexp, pdes, 5, 5):
            pass  # "expected" now holds the current value: retry with it
        old = words[0]
        _push_scratch(scratch)
        return old

    def compare_and_set(self, expected: int, new: int) -> bool:
        """Atomically set the value to ``new`` if it equals ``expected``.

        Returns:
            ``True`` if the value was ``expected`` and is now ``new``; ``False`` (and
            nothing changed) otherwise.

        Raises:
            OverflowError: ``expected`` or ``new`` is outside the int64 range.
            TypeError: ``expected`` or ``new`` is not an int.
        """
        word, cas, pval = self._hot
        if cas is None:
            expected = check_int64("expected", expected)
            new = check_int64("new", new)
            with Held(self._mutex):
                if word[0] != expected:
                    return False
                word[0] = new
                return True
        try:
            scratch = _pop_scratch()
        except IndexError:
            scratch = _new_scratch()
        words, pexp, pdes = scratch
        try:
            words[0] = expected
            words[1] = new
        except (ValueError, TypeError):
            _push_scratch(scratch)
            check_int64("expected", expected)
            check_int64("new", new)
            raise  # pragma: no cover - the checks above raise the precise error
        ok: bool = cas(8, pval, pexp, pdes, 5, 5)
        _push_scratch(scratch)
        return ok

    def _add_locked(self, delta: int) -> int:
        word = self._value
        with Held(self._mutex):
            old: int = word[0]
            try:
                word[0] = new = old + delta
            except (ValueError, TypeError) as e:
                raise self._bad_operand(e, "delta", delta, old) from None
            return new

    def _bad_operand(
        self, e: Exception, what: str, operand: object, current: int | None
    ) -> Exception:
        if isinstance(e, ValueError):
            at = "" if current is None else f" (the counter is at {current})"
            return OverflowError(
                f"SafeCounter {self._seg.name!r}: {what} {operand!r} would leave the int64 "
                f"range{at}; nothing was changed"
            )
        return TypeError(f"{what} must be an int, not {type(operand).__name__}")

    # -- introspection ---------------------------------------------------------------------
    @property
    def implementation(self) -> str:
        """How updates are made atomic on this segment: lock-free CAS or a robust lock."""
        return _IMPL_NAMES[self._seg.header.flags]

    def statistics(self) -> CounterStatistics:
        """A snapshot for monitoring (never blocks)."""
        return CounterStatistics(
            name=self._seg.name,
            value=self.value,
            implementation=self.implementation,
            creator_pid=self._seg.header.creator_pid,
        )

    def _repr_fields(self) -> str:
        return f"value={self.value}"
