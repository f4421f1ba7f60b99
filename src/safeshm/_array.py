"""SafeArray[T]: a fixed-length typed array in shared memory, with lock striping."""

from __future__ import annotations

import array
import ctypes
import dataclasses
import mmap
import operator
import struct
import sys
import warnings
from collections.abc import Generator, Iterable, Iterator
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Final,
    Generic,
    Literal,
    SupportsIndex,
    TypeVar,
    cast,
    overload,
)

from . import _compat
from ._errors import (
    HolderDiedWarning,
    IncompatibleSegmentError,
    LockedViewLeakedError,
    SegmentCorruptedError,
)
from ._lock import (
    EDEADLK,
    MUTEX_BLOCK,
    OWNER_WORD,
    RECOVERED,
    GeneratorHold,
    RobustMutex,
    _CLevel,
    init_mutex,
    unlock_each,
)
from ._segment import CACHE_LINE, HEADER_SIZE, MAX_SEGMENT_SIZE, Kind, Segment, SharedStructure
from ._sync import user_stacklevel

T = TypeVar("T", int, float)

IntTypecode = Literal["b", "B", "h", "H", "i", "I", "l", "L", "q", "Q"]
FloatTypecode = Literal["f", "d"]
TYPECODES: Final = "bBhHiIlLqQfd"

MAX_STRIPES: Final = 64
"""Element writes lock one of up to 64 stripes (element ``i`` -> stripe ``i % stripes``),
so writers of different elements rarely wait for each other; whole-array operations lock
every stripe, in order, so they see and make consistent snapshots."""

# --- layout -----------------------------------------------------------------------------------
#   128  control line: the "bulk write in progress" flag (int64) -- set while a holder of
#        every stripe writes; still set after its death means "may hold a partial update"
#   192  stripes: MUTEX_BLOCK bytes each
#   ...  data, cache-line aligned: length * itemsize bytes
_CTL_OFFSET: Final = HEADER_SIZE
_DIRTY: Final = 0  # index in the control line's int64 view
_STRIPES_OFFSET: Final = HEADER_SIZE + CACHE_LINE
_PARAMS: Final = struct.Struct("=cxxxIQ")  # typecode, stripes, length


def _data_offset(stripes: int) -> int:
    end = _STRIPES_OFFSET + stripes * MUTEX_BLOCK
    return -(-end // CACHE_LINE) * CACHE_LINE


def _default_stripes(length: int) -> int:
    return max(1, min(MAX_STRIPES, length))


@dataclasses.dataclass(frozen=True, slots=True)
class ArrayStatistics:
    """A snapshot of a :class:`SafeArray` (see :meth:`SafeArray.statistics`)."""

    name: str
    typecode: str
    length: int
    stripes: int
    partial_update_suspected: bool
    """A holder of the whole array died in the middle of a bulk write (``locked()``,
    ``fill``, a slice assignment); set until a later bulk write completes."""
    recoveries: int
    """How many times a lock holder died and its stripe was recovered."""
    creator_pid: int


_trylock: Final = _compat.mutex_trylock
_unlock: Final = _compat.mutex_unlock
_consistent: Final = _compat.mutex_consistent
_NEVER: Final = float("inf")
_REPORTED: Final = 2  # the control flag once a recovery told someone about the partial update


class SafeArray(SharedStructure, Generic[T]):
    """A fixed-length array of ``int`` or ``float`` in shared memory, typed by an
    :mod:`array` typecode (``b B h H i I l L q Q`` give ``SafeArray[int]``, ``f d`` give
    ``SafeArray[float]``).

    * ``a[i]`` reads one element without locking (an aligned load is atomic);
      ``a[i] = v``, :meth:`add` and :meth:`compare_and_set` are atomic per element and
      lock only the element's stripe, so processes updating different elements -- a slot
      per worker, a bucket per key -- rarely wait for each other.
    * Whole-array operations -- iteration, :meth:`to_list`, slices (read and write),
      :meth:`fill`, :meth:`locked` -- hold every stripe, so they read and write consistent
      snapshots: no reader ever sees half of a bulk update.
    * ``with a.locked() as view:`` gives a writable :class:`memoryview` of the whole array
      (``numpy.asarray(view)`` is zero-copy) while every other writer is excluded. If a
      process dies inside such a block, the next holder of the array is told with a
      :class:`~safeshm.HolderDiedWarning` that it may hold a partial update.
    * Errors follow :class:`array.array`: ``IndexError``, ``TypeError``,
      ``OverflowError`` for a value the typecode cannot hold, ``ValueError`` for a slice
      assignment of the wrong length; a failed call changes nothing.

    Example:
        >>> with SafeArray.create("q", 4) as hits:
        ...     hits.add(2, 5)
        ...     hits[0] = 7
        ...     hits.to_list()
        5
        [7, 0, 5, 0]
    """

    _KIND = Kind.ARRAY
    _LAYOUT = 1
    _MAPPED: ClassVar[tuple[str, ...]] = ("_data", "_hot", "_stripes", "_ctl", "_bytes")
    if _compat.native is not None:
        # The compiled core and its methods, bound per handle in _bind (see _bind_native).
        _MAPPED += ("_core", "_c_getitem", "_c_setitem", "add", "compare_and_set")

    _data: memoryview[Any]  # elements: int or float, per the typecode
    # (data, stripe pointers, stripe count, the stripes' owner words, and prefixes[n]: the
    # first n stripe pointers, a tuple, for unlock_each)
    _hot: tuple[memoryview[Any], list[Any], int, memoryview, tuple[tuple[Any, ...], ...]]
    _stripes: list[RobustMutex]
    _ctl: memoryview
    _bytes: memoryview
    _typecode: str
    _data_offset: int

    # -- construction ----------------------------------------------------------------------
    @overload
    @classmethod
    def create(
        cls,
        typecode: IntTypecode,
        length_or_initializer: int | Iterable[int],
        *,
        name: str | None = None,
        stripes: int | None = None,
    ) -> SafeArray[int]: ...
    @overload
    @classmethod
    def create(
        cls,
        typecode: FloatTypecode,
        length_or_initializer: int | Iterable[float],
        *,
        name: str | None = None,
        stripes: int | None = None,
    ) -> SafeArray[float]: ...
    @overload
    @classmethod
    def create(
        cls,
        typecode: str,
        length_or_initializer: int | Iterable[Any],
        *,
        name: str | None = None,
        stripes: int | None = None,
    ) -> SafeArray[Any]: ...

    @classmethod
    def create(
        cls,
        typecode: str,
        length_or_initializer: int | Iterable[Any],
        *,
        name: str | None = None,
        stripes: int | None = None,
    ) -> SafeArray[int] | SafeArray[float]:
        """Create a new array.

        Args:
            typecode: an :mod:`array` typecode: ``b B h H i I l L q Q`` (int) or ``f d``
                (float).
            length_or_initializer: the length (zero-filled), or an iterable of the initial
                values.
            name: the name to attach by; a random one when ``None``.
            stripes: how many locks element writes are spread over (default:
                ``min(64, length)``).

        Raises:
            ValueError: bad typecode, negative length, or bad stripe count.
            TypeError, OverflowError: an initial value the typecode cannot hold (as
                :class:`array.array` raises them).
            SegmentExistsError: a segment with this name exists (a ``FileExistsError``).
        """
        _check_typecode(typecode)
        initial: array.array[Any] | None
        if isinstance(length_or_initializer, bool):
            raise TypeError(
                "length_or_initializer must be a length or an iterable of values, not bool"
            )
        if isinstance(length_or_initializer, int):
            length = length_or_initializer
            if length < 0:
                raise ValueError(f"array length must be >= 0, got {length}")
            initial = None
        else:
            initial = _to_array(typecode, length_or_initializer)
            length = len(initial)
        nstripes = _default_stripes(length) if stripes is None else stripes
        if isinstance(nstripes, bool) or not isinstance(nstripes, int):
            raise TypeError(f"stripes must be an int, not {type(nstripes).__name__}")
        if not 1 <= nstripes <= MAX_STRIPES:
            raise ValueError(f"stripes must be between 1 and {MAX_STRIPES}, got {nstripes}")
        itemsize = array.array(typecode).itemsize
        data_offset = _data_offset(nstripes)
        if length > (MAX_SEGMENT_SIZE - data_offset) // itemsize:
            raise OverflowError(
                f"an array of {length} elements of {itemsize} bytes is beyond safeshm's "
                f"segment size limit ({MAX_SEGMENT_SIZE} bytes); nothing was created"
            )

        def init(mm: mmap.mmap) -> None:
            for k in range(nstripes):
                init_mutex(mm, _STRIPES_OFFSET + k * MUTEX_BLOCK)
            if initial is not None and length:
                mm[data_offset : data_offset + length * itemsize] = initial.tobytes()

        seg = Segment.create(
            name,
            kind=cls._KIND,
            layout=cls._LAYOUT,
            payload_size=data_offset - HEADER_SIZE + length * itemsize,
            init=init,
            params=_PARAMS.pack(typecode.encode(), nstripes, length),
        )
        return cls._from_segment(seg)

    @overload
    @classmethod
    def attach(cls, name: str) -> SafeArray[Any]: ...
    @overload
    @classmethod
    def attach(cls, name: str, typecode: IntTypecode) -> SafeArray[int]: ...
    @overload
    @classmethod
    def attach(cls, name: str, typecode: FloatTypecode) -> SafeArray[float]: ...
    @overload
    @classmethod
    def attach(cls, name: str, typecode: str) -> SafeArray[Any]: ...

    @classmethod
    def attach(cls, name: str, typecode: str | None = None) -> SafeArray[Any]:
        """Attach to an existing array by name.

        Args:
            name: the array's name.
            typecode: if given, the array must have this typecode (and type checkers then
                know the element type).

        Raises:
            SegmentNotFoundError: no segment has this name (a ``FileNotFoundError``).
            IncompatibleSegmentError: the segment is not a ``SafeArray``, or not of
                ``typecode``.
        """
        seg = cls._attach_segment(name)
        try:
            if typecode is not None:
                _check_typecode(typecode)
                _check_params(seg, typecode, None)
        except BaseException:
            seg.close()
            raise
        return cls._from_segment(seg)

    @overload
    @classmethod
    def open(
        cls,
        name: str,
        typecode: IntTypecode,
        length_or_initializer: int | Iterable[int],
        *,
        stripes: int | None = None,
    ) -> SafeArray[int]: ...
    @overload
    @classmethod
    def open(
        cls,
        name: str,
        typecode: FloatTypecode,
        length_or_initializer: int | Iterable[float],
        *,
        stripes: int | None = None,
    ) -> SafeArray[float]: ...
    @overload
    @classmethod
    def open(
        cls,
        name: str,
        typecode: str,
        length_or_initializer: int | Iterable[Any],
        *,
        stripes: int | None = None,
    ) -> SafeArray[Any]: ...

    @classmethod
    def open(
        cls,
        name: str,
        typecode: str,
        length_or_initializer: int | Iterable[Any],
        *,
        stripes: int | None = None,
    ) -> SafeArray[Any]:
        """Attach to ``name``, creating it first if needed (race-free).

        If the array exists, it must have this typecode and length, and ``stripes`` if
        given (its contents are left as they are); otherwise
        :class:`~safeshm.IncompatibleSegmentError`.
        """
        _check_typecode(typecode)
        if isinstance(length_or_initializer, bool):
            raise TypeError(
                "length_or_initializer must be a length or an iterable of values, not bool"
            )
        values: int | array.array[Any]
        if isinstance(length_or_initializer, int):
            length = values = length_or_initializer
        else:
            values = _to_array(typecode, length_or_initializer)  # validate once, up front
            length = len(values)

        def create() -> SafeArray[Any]:
            return cls.create(typecode, values, name=name, stripes=stripes)

        return cls._open_segment(
            name, create, lambda seg: _check_params(seg, typecode, length, stripes)
        )

    def _bind(self, mm: mmap.mmap) -> None:
        tc, nstripes, length = _PARAMS.unpack_from(self._seg.header.params)
        typecode = tc.decode("ascii", "replace")
        if typecode not in TYPECODES or not 1 <= nstripes <= MAX_STRIPES:
            raise SegmentCorruptedError(
                f"SafeArray {self._seg.name!r} is damaged: typecode {typecode!r}, "
                f"{nstripes} stripes"
            )
        itemsize = array.array(typecode).itemsize
        start = _data_offset(nstripes)
        if start + length * itemsize != self._seg.header.total_size:
            raise SegmentCorruptedError(
                f"SafeArray {self._seg.name!r} is damaged: {length} elements of "
                f"{itemsize} bytes do not fit its {self._seg.header.total_size} bytes"
            )
        self._typecode = typecode
        self._data_offset = start
        whole = memoryview(mm)
        self._bytes = whole[start : start + length * itemsize]
        self._data = self._bytes.cast(typecode)
        self._ctl = whole[_CTL_OFFSET : _CTL_OFFSET + CACHE_LINE].cast("q")
        what = f"SafeArray {self._seg.name!r}"
        self._stripes = [
            RobustMutex(mm, _STRIPES_OFFSET + k * MUTEX_BLOCK, what, held=False)
            for k in range(nstripes)
        ]
        ptrs = [m.pointer for m in self._stripes]
        owners = whole[_STRIPES_OFFSET : _STRIPES_OFFSET + nstripes * MUTEX_BLOCK].cast("i")
        self._hot = (
            self._data,
            ptrs,
            nstripes,
            owners[OWNER_WORD :: MUTEX_BLOCK // 4],
            tuple(tuple(ptrs[:n]) for n in range(nstripes + 1)),
        )
        if _compat.native is not None:
            self._bind_native(mm, typecode, nstripes, start, length)

    def _bind_native(
        self, mm: mmap.mmap, typecode: str, nstripes: int, start: int, length: int
    ) -> None:
        """Bind the compiled core's element operations over the ctypes methods.

        ``a[i]`` and ``a[i] = v`` (``__getitem__``/``__setitem__``, looked up on the type,
        are C-level properties returning ``_c_getitem``/``_c_setitem``), :meth:`add` and
        :meth:`compare_and_set` run in C for an ``int`` index and ``int``/``float`` values;
        every other call (slices, numpy scalars, errors...) is handed by the core to this
        class's Python method, the ctypes implementation, on a shadow of this handle: the
        same object but for the core, so the core holds no reference cycle.
        """
        cls: Any = SafeArray  # its Python methods: the ctypes implementation
        shadow = object.__new__(type(self))
        shadow.__dict__.update(self.__dict__)
        name = self._seg.name
        core = cast(Any, _compat.native).Array(
            mm,
            f"SafeArray {name!r}",
            f"{type(self).__name__} {name!r} is closed on this handle",
            typecode,
            _CTL_OFFSET,
            _STRIPES_OFFSET,
            nstripes,
            start,
            length,
            shadow,
            cls._py_getitem,
            cls._py_setitem,
            cls.add,
            cls.compare_and_set,
        )
        d = self.__dict__
        d["_core"] = core
        d["_c_getitem"] = core.get
        d["_c_setitem"] = core.set
        # A subclass's own add / compare_and_set stay in charge.
        if type(self).add is SafeArray.add:
            d["add"] = core.add
        if type(self).compare_and_set is SafeArray.compare_and_set:
            d["compare_and_set"] = core.compare_and_set

    # -- elements ----------------------------------------------------------------------------
    @property
    def typecode(self) -> str:
        """The :mod:`array` typecode of the elements."""
        return self._typecode

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return array.array(self._typecode).itemsize

    def __len__(self) -> int:
        return len(self._data)

    @overload
    def __getitem__(self, index: SupportsIndex) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: SupportsIndex | slice) -> T | list[T]:
        """``a[i]``: one element (a lock-free atomic read); ``a[i:j:k]``: a list, read as
        a consistent snapshot under every stripe."""
        if isinstance(index, slice):
            hold = self._all_stripes(writing=False)
            try:
                next(hold)
                part: list[T] = cast(Any, self._data[index].tolist())
                return part
            finally:
                hold.close()
        try:
            return self._data[index]  # type: ignore[no-any-return]
        except IndexError:
            raise IndexError("array index out of range") from None
        except TypeError:
            raise TypeError("array indices must be integers") from None

    _py_getitem = __getitem__

    @overload
    def __setitem__(self, index: SupportsIndex, value: T) -> None: ...
    @overload
    def __setitem__(self, index: slice, value: Iterable[T]) -> None: ...

    def __setitem__(self, index: SupportsIndex | slice, value: Any) -> None:
        """``a[i] = v`` (atomic, under the element's stripe) or ``a[i:j:k] = values``
        (all or nothing, under every stripe).

        Raises:
            IndexError, TypeError, OverflowError: as :class:`array.array`.
            ValueError: a slice assignment of another length (the array's length is fixed).
        """
        if isinstance(index, slice):
            self._set_slice(index, value)
            return
        # The index checks and stripe lookup are written out in each element method rather
        # than shared: a helper call would add ~50 ns to every one of them.
        data, ptrs, nstripes, owners, _ = self._hot
        n = len(data)
        i = index if type(index) is int else _index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("array assignment index out of range")
        s = i % nstripes
        p = ptrs[s]
        # Async-exception safe: see the pattern at the top of _lock.py.
        rc = -1
        if owners[s]:
            self._stripes[s].check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                self._finish_acquire(s, rc)
            data[i] = value
        except (ValueError, TypeError) as e:
            raise self._bad_value(e, value) from None
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)

    _py_setitem = __setitem__

    if _compat.native is not None and not TYPE_CHECKING:
        # Special methods are looked up on the type: C-level properties returning the
        # handle's bound core methods (see _bind_native and _lock._CLevel).
        __getitem__ = _CLevel(operator.attrgetter("_c_getitem"), __getitem__.__doc__)
        __setitem__ = _CLevel(operator.attrgetter("_c_setitem"), __setitem__.__doc__)

    def add(self, index: SupportsIndex, delta: T) -> T:
        """Atomically add ``delta`` to element ``index`` and return its new value.

        Raises:
            IndexError: ``index`` is out of range.
            OverflowError: the result does not fit the typecode; nothing changed.
            TypeError: ``delta`` (or the index) has the wrong type; nothing changed.
        """
        data, ptrs, nstripes, owners, _ = self._hot
        n = len(data)
        i = index if type(index) is int else _index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("array index out of range")
        s = i % nstripes
        p = ptrs[s]
        rc = -1
        if owners[s]:
            self._stripes[s].check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                self._finish_acquire(s, rc)
            new = data[i] + delta
            try:
                data[i] = new
            except (ValueError, TypeError) as e:
                raise self._bad_value(e, new) from None
            new = data[i]  # as stored: a float32 element rounds
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)
        return new  # type: ignore[no-any-return]

    def compare_and_set(self, index: SupportsIndex, expected: T, new: T) -> bool:
        """Atomically set element ``index`` to ``new`` if it equals ``expected``.

        Returns:
            ``True`` if it was ``expected`` (compared by value: a NaN never matches) and is
            now ``new``; ``False``, with nothing changed, otherwise.

        Raises:
            IndexError, TypeError, OverflowError: as :class:`array.array`, for the index
                or ``new``; nothing changed.
        """
        data, ptrs, nstripes, owners, _ = self._hot
        n = len(data)
        i = index if type(index) is int else _index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("array index out of range")
        s = i % nstripes
        p = ptrs[s]
        probe = self._check_value(new)
        rc = -1
        if owners[s]:
            self._stripes[s].check_not_mine()
        try:
            rc = _trylock(p)
            if rc:
                self._finish_acquire(s, rc)
            if data[i] != expected:
                return False
            data[i] = probe
            return True
        finally:
            if not rc:
                _unlock(p)
            elif rc != EDEADLK:
                try:
                    _consistent(p)
                finally:
                    _unlock(p)

    def _finish_acquire(self, stripe: int, rc: int) -> None:
        """A stripe's trylock did not simply succeed: wait, recover, or raise."""
        if self._stripes[stripe].finish_acquire(rc, _NEVER) == RECOVERED:
            self._recovered(stacklevel=4)

    def _recovered(self, stacklevel: int) -> None:
        """A stripe was recovered from a dead holder: if that holder died in the middle of
        a bulk write, say so -- once per such death, not at every later acquire (the flag
        stays set, as :attr:`partial_update_suspected`, until a bulk write completes)."""
        ctl = self._ctl
        if ctl[_DIRTY] == 1:
            ctl[_DIRTY] = _REPORTED
            self._warn_partial(stacklevel=stacklevel + 1)

    def _check_value(self, value: Any) -> Any:
        """Validate one element value exactly as :class:`array.array` would."""
        try:
            return array.array(self._typecode, (value,))[0]
        except (OverflowError, TypeError) as e:
            raise type(e)(str(e)) from None

    def _bad_value(self, e: Exception, value: Any) -> Exception:
        # memoryview raises ValueError for an out-of-range value and TypeError for a wrong
        # type; array.array raises OverflowError and TypeError with better messages.
        try:
            array.array(self._typecode, (value,))
        except (OverflowError, TypeError) as precise:
            return precise
        if isinstance(e, ValueError):  # pragma: no cover - array.array accepted it
            return OverflowError(f"value {value!r} does not fit typecode {self._typecode!r}")
        return TypeError(str(e))  # pragma: no cover

    # -- the whole array ---------------------------------------------------------------------
    def _all_stripes(self, *, writing: bool) -> Generator[None, None, None]:
        """Hold every stripe, in order (no deadlock with element writers, who hold one),
        from the first ``next()`` until the generator is closed: ``hold =
        self._all_stripes(...)``, then ``try: next(hold) ... finally: hold.close()`` -- an
        exception from a signal handler right after ``next()`` returned lands in that
        ``try`` (a ``contextmanager``'s ``__enter__`` would hold the stripes until the
        exception was collected).

        While ``writing``, the control line says "bulk write in progress": if this
        process dies before the end, the next holder learns the array may be partial.
        """
        _, ptrs, nstripes, owners, prefixes = self._hot
        stripes = self._stripes
        # Async-exception safe (see _lock.py): the finally releases every stripe that may
        # be held -- including one whose trylock result is unknown -- in one C-level call.
        # held = [n, rc, recovered]: a list, so that _take_stripes (a function, for its
        # loop: see _queue._span_end) updates it as it goes.
        held = [0, 0, False]
        try:
            _take_stripes(stripes, ptrs, owners, nstripes, held)
            ctl = self._ctl
            if held[2]:
                self._recovered(stacklevel=user_stacklevel() + 1)
            if writing:
                ctl[_DIRTY] = 1
                try:
                    yield
                finally:
                    # Completed, or failed in this live process, which reports it: either
                    # way no *dead* holder's partial write is pending any more. Only a
                    # death before this line leaves the flag set.
                    ctl[_DIRTY] = 0
            else:
                yield
        finally:
            try:
                if held[1]:
                    _consistent(ptrs[held[0] - 1])  # maybe an EOWNERDEAD acquire cut short
            finally:
                unlock_each(prefixes[held[0]])

    def _warn_partial(self, stacklevel: int) -> None:
        warnings.warn(
            HolderDiedWarning(
                f"SafeArray {self._seg.name!r}: a process died in the middle of a bulk update "
                "(locked(), fill() or a slice assignment); the array may hold a partial update "
                "until the next bulk write completes"
            ),
            stacklevel=stacklevel,
        )

    def to_list(self) -> list[T]:
        """All elements, as a consistent snapshot."""
        hold = self._all_stripes(writing=False)
        try:
            next(hold)
            snapshot: list[T] = cast(Any, self._data.tolist())
            return snapshot
        finally:
            hold.close()

    def __iter__(self) -> Iterator[T]:
        """Iterate over a consistent snapshot taken when iteration starts."""
        return iter(self.to_list())

    def fill(self, value: T) -> None:
        """Set every element to ``value``, atomically for every reader.

        Raises:
            TypeError, OverflowError: as :class:`array.array`; nothing changed.
        """
        item = array.array(self._typecode, (self._check_value(value),)).tobytes()
        raw = self._bytes
        total = len(raw)
        hold = self._all_stripes(writing=True)
        try:
            next(hold)
            if total:
                _fill_bytes(raw, item, total)  # a function for its loop: see _take_stripes
        finally:
            hold.close()

    def _set_slice(self, index: slice, values: Iterable[Any]) -> None:
        data = self._data
        positions = range(*index.indices(len(data)))
        source = _to_buffer(self._typecode, values)
        if len(source) != len(positions):
            raise ValueError(
                f"attempt to assign {len(source)} values to a slice of {len(positions)} "
                "elements (a SafeArray's length is fixed)"
            )
        hold = self._all_stripes(writing=True)
        try:
            next(hold)
            data[index] = source
        finally:
            hold.close()

    def locked(self) -> GeneratorHold[memoryview]:
        """Hold the whole array: ``with a.locked() as view:``.

        ``view`` is a writable :class:`memoryview` of every element (format = typecode,
        shape ``(len(a),)``), so ``numpy.asarray(view)`` is a zero-copy array. No other
        process or thread can write (or take a snapshot) until the block ends; then the
        view is released, and using it raises ``ValueError``.

        Do not keep references to the view (or numpy arrays made from it) past the block:
        if one is still alive at the end, the lock is released anyway and a
        :class:`~safeshm.SafeShmError` (also a ``BufferError``) is raised, because writes
        through it would no longer be protected.

        Warns:
            HolderDiedWarning: a previous holder died in the middle of a bulk update;
                the array may be partial.

        Raises:
            LockReentryError: this thread is already inside ``locked()`` on this array.
        """
        return GeneratorHold(self._locked)

    def _locked(self) -> Generator[memoryview | bool, object, None]:
        hold = self._all_stripes(writing=True)
        try:
            next(hold)
            # The view comes from a private exporter (a ctypes array over the data), so
            # that at the end we can tell whether anything derived from it is still alive:
            # numpy.asarray(view) makes a memoryview of its own on the same exporter,
            # which view.release() cannot see, but which keeps the exporter referenced.
            nbytes = len(self._bytes)
            raw: Any = (ctypes.c_char * nbytes).from_buffer(self._seg.mm, self._data_offset)
            view = memoryview(raw).cast("B").cast(self._typecode)  # type: ignore[call-overload]
            try:
                yield view
            finally:
                try:
                    view.release()
                    # Only our local reference (and getrefcount's argument) remain unless
                    # a view made from ours still exists.
                    leaked = sys.getrefcount(raw) > 2
                except BufferError:
                    leaked = True
                del view, raw
        finally:
            hold.close()
        if leaked:
            raise LockedViewLeakedError(
                f"SafeArray {self._seg.name!r}: a view made from locked()'s view (a numpy "
                "array?) is still referenced after the block; writes through it are no longer "
                "protected by the lock"
            )
        yield False  # __exit__'s result: an exception from the block propagates

    @property
    def partial_update_suspected(self) -> bool:
        """Whether a holder died in the middle of a bulk write that no later bulk write has
        completed since (see :class:`~safeshm.HolderDiedWarning`)."""
        return bool(self._ctl[_DIRTY])

    def statistics(self) -> ArrayStatistics:
        """A snapshot for monitoring (never blocks)."""
        return ArrayStatistics(
            name=self._seg.name,
            typecode=self._typecode,
            length=len(self._data),
            stripes=len(self._stripes),
            partial_update_suspected=bool(self._ctl[_DIRTY]),
            recoveries=sum(m.recoveries for m in self._stripes),
            creator_pid=self._seg.header.creator_pid,
        )

    def _repr_fields(self) -> str:
        return f"typecode={self._typecode!r}, length={len(self._data)}"


def _take_stripes(
    stripes: list[RobustMutex], ptrs: list[Any], owners: memoryview, nstripes: int, held: list[Any]
) -> None:
    """Lock every stripe, in order; ``held = [n, rc, recovered]`` says at every instant
    how many stripes may be held (stripe ``n - 1``'s trylock result is ``rc``, -1 while
    unknown) and whether a dead holder's stripe was recovered.

    A function, not a loop in the caller's ``try``: CPython (gh-108214, gh-130279) may leave
    a loop's backward jump out of the enclosing ``try``'s exception range, so a signal
    handler's exception raised there would skip the ``finally``; raised in here, it reaches
    the caller at the call, which the ``try`` covers.
    """
    for k in range(nstripes):
        if owners[k]:
            stripes[k].check_not_mine()
        held[0] = k + 1
        held[1] = -1
        held[1] = rc = _trylock(ptrs[k])
        if rc and stripes[k].finish_acquire(rc, _NEVER) == RECOVERED:
            held[2] = True


def _fill_bytes(raw: memoryview, item: bytes, total: int) -> None:
    """Write one element, then double the filled prefix: log2(n) memcpys."""
    raw[: len(item)] = item
    done = len(item)
    while done < total:
        step = min(done, total - done)
        raw[done : done + step] = raw[:step]
        done += step


def _index(index: Any) -> int:
    try:
        return operator.index(index)
    except TypeError:
        raise TypeError("array indices must be integers") from None


def _check_typecode(typecode: object) -> None:
    if not isinstance(typecode, str) or len(typecode) != 1 or typecode not in TYPECODES:
        raise ValueError(f"bad typecode {typecode!r} (must be one of {', '.join(TYPECODES)})")


def _to_array(typecode: str, values: Iterable[Any]) -> array.array[Any]:
    """``values`` as an array of ``typecode``, validated exactly as array.array does."""
    try:
        return array.array(typecode, values)
    except TypeError:
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(
                f"expected a length or an iterable of values, not {type(values).__name__}"
            ) from None
        return array.array(typecode, list(values))


def _to_buffer(typecode: str, values: Iterable[Any]) -> memoryview[Any]:
    """``values`` as a 1-D buffer of ``typecode``: zero-copy if it already is one (an
    array.array, a numpy array of the matching dtype), else validated through array."""
    try:
        view = memoryview(values)  # type: ignore[arg-type]
    except TypeError:
        return memoryview(_to_array(typecode, values))
    if (
        view.ndim == 1
        and view.c_contiguous
        and _format_class(view.format) == _format_class(typecode)
        and view.itemsize == array.array(typecode).itemsize
    ):
        # e.g. numpy int64 (format 'l') into 'q': the same bytes, relabelled.
        return view.cast("B").cast(typecode)  # type: ignore[call-overload, no-any-return]
    return memoryview(_to_array(typecode, view.tolist()))


def _format_class(fmt: str) -> str:
    """'s' signed integer, 'u' unsigned integer, 'f' floating point, '' anything else."""
    code = fmt.lstrip("@=")
    if len(code) != 1:
        return ""
    return "s" if code in "bhilq" else "u" if code in "BHILQ" else "f" if code in "fd" else ""


def _check_params(
    seg: Segment, typecode: str, length: int | None, stripes: int | None = None
) -> None:
    tc, have_stripes, have_length = _PARAMS.unpack_from(seg.header.params)
    have = tc.decode("ascii", "replace")
    if (
        have != typecode
        or (length is not None and have_length != length)
        or (stripes is not None and have_stripes != stripes)
    ):
        want = (
            f"typecode {typecode!r}"
            + ("" if length is None else f", length {length}")
            + ("" if stripes is None else f", {stripes} stripes")
        )
        raise IncompatibleSegmentError(
            f"SafeArray {seg.name!r} has typecode {have!r}, length {have_length}, "
            f"{have_stripes} stripes; expected {want}"
        )
