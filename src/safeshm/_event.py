"""SafeEvent: :class:`threading.Event` shared by processes, waking every waiter at once."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Final, Self

from ._int64 import INT64_MAX
from ._segment import Kind
from ._sync import SyncPrimitive, _Timeout, deadline_of

_FLAG: Final = 0  # state word: 1 while set
_SETS: Final = 1  # state word: how many times set() set a clear flag (a wait that saw it
#                   change returns True even if clear() came first: gh-57711)


@dataclasses.dataclass(frozen=True, slots=True)
class EventStatistics:
    """A snapshot of a :class:`SafeEvent` (see :meth:`SafeEvent.statistics`)."""

    name: str
    is_set: bool
    waiters: int
    """Threads sleeping in :meth:`SafeEvent.wait` right now (any process)."""
    creator_pid: int


class SafeEvent(SyncPrimitive):
    """A flag that processes and threads wait for: :class:`threading.Event`, shared.

    :meth:`set` wakes every waiter in every process at once (they sleep on a futex in the
    segment: no polling); :meth:`wait` returns at once while the flag is set.

    Example:
        >>> with SafeEvent.create() as ready:
        ...     ready.set()
        ...     ready.wait(timeout=1.0)
        True
    """

    _KIND = Kind.EVENT
    _LAYOUT = 1

    @classmethod
    def create(cls, *, name: str | None = None) -> Self:
        """Create a new event, initially clear.

        Raises:
            SegmentExistsError: a segment with this name exists (a ``FileExistsError``).
            InvalidNameError: ``name`` is not a valid segment name.
        """
        return cls._from_segment(cls._create_segment(name, (0, 0), processes=1))

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing event by name, from any process of the same user.

        Raises:
            SegmentNotFoundError: no segment has this name (a ``FileNotFoundError``).
            IncompatibleSegmentError: the segment is not a ``SafeEvent``.
        """
        return cls._from_segment(cls._attach_segment(name))

    @classmethod
    def open(cls, name: str) -> Self:
        """Attach to the event ``name``, creating it (clear) first if needed (race-free)."""
        return cls._open_segment(name, lambda: cls.create(name=name))

    def is_set(self) -> bool:
        """Whether the flag is set (a snapshot)."""
        return bool(self._w[_FLAG])

    def isSet(self) -> bool:
        """Deprecated alias of :meth:`is_set` (as threading's)."""
        warnings.warn(
            "isSet() is deprecated, use is_set() instead", DeprecationWarning, stacklevel=2
        )
        return self.is_set()

    def set(self) -> None:
        """Set the flag and wake every waiter, in every process."""
        with self._section():
            w = self._w
            if not w[_FLAG]:
                sets = w[_SETS]  # compared for equality only: wraps (at a damaged value)
                w[_FLAG] = 1  # first: a setter that dies here has still set it
                w[_SETS] = sets + 1 if sets < INT64_MAX else 0
                self._bump()
        self._wake_all()

    def clear(self) -> None:
        """Clear the flag: later :meth:`wait` calls block until :meth:`set`."""
        with self._section():
            self._w[_FLAG] = 0

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the flag is set, or ``timeout`` seconds pass.

        Returns:
            ``True`` if the flag is set on return (as :meth:`threading.Event.wait`),
            ``False`` on a timeout.
        """
        if self._w[_FLAG]:
            return True
        deadline = deadline_of(timeout)
        try:
            with self._section(deadline):
                return self._wait_set(deadline)
        except _Timeout:
            return bool(self._w[_FLAG])

    def _wait_set(self, deadline: float) -> bool:
        w = self._w
        sets = w[_SETS]
        while not w[_FLAG] and w[_SETS] == sets:
            if not self._sleep(deadline):
                return False
        return True

    def statistics(self) -> EventStatistics:
        """A snapshot of the event's state (also shown by ``safeshm inspect``)."""
        return EventStatistics(
            self._seg.name,
            bool(self._w[_FLAG]),
            max(0, int(self._sleepers[0])),
            self._seg.header.creator_pid,
        )

    def _repr_fields(self) -> str:
        return f"is_set={self.is_set()}"
