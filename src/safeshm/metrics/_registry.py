"""MetricsRegistry: one fixed-size segment holding every metric of an application.

Layout (offsets in bytes from the start of the mapping)::

    128  control words (int64 unless noted)
           +0 rows ever claimed (the high-water mark: scrapes read only these rows)
           +8 families defined        +16 series defined (directory entries)
           +24 cells allocated        +32 definition bytes used
           +40 fold journal: active   +48 row   +56 cell
           +64 old base value (double) +72 old base time stamp (double)
           +80 adds that went through the locked base row (no row was free)
           +88 series epoch: bumped after any series is added, removed or revived (and
               when a holder died), so a process may cache that a metric overflows
    256  robust mutex (definitions, series, claims, folds, the base row)
    384  family table, 64 bytes each: state, type, definition offset, length, cells per
         series, gauge mode, overflow series + 1 (0: none), reserved
         directory, 64 bytes each: state (0 free, _ACTIVE, _REMOVED: constants that
         differ in several bytes), family, first cell, cells, label values offset,
         length, generation, revive time (double)
         definitions and label values (append-only records: a CRC-32 of the record and
         of the words that locate and size it -- its family or series number, type,
         cells... -- then JSON), so a damaged entry or record is detected when read
         the base row: one double per cell, changed only under the mutex
         rows, each on its own cache lines: a 64-byte owner header (pid -- written last
         when claiming: the commit -- start time, pid namespace, thread id (0: the
         process's gauge row), claim token, flags) then one double per cell

A counter is one cell, a histogram one cell per bucket (not cumulative, +Inf included)
and one for the sum, a gauge two: its value and the time it was written (0: never, in
this row). The value of a counter or histogram cell is the sum of that cell over every
row ever claimed plus the base row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import mmap
import operator
import os
import struct
import threading
import time
import warnings
import weakref
import zlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Final, Self

from safeshm import _compat
from safeshm._errors import (
    IncompatibleSegmentError,
    LockReentryError,
    LockTimeoutError,
    SafeShmError,
    SafeShmWarning,
    SegmentCorruptedError,
)
from safeshm._lock import Held, RobustMutex, init_mutex
from safeshm._protocols import SHM_GUARANTEES, Guarantees
from safeshm._segment import HEADER_SIZE, Kind, Segment, SharedStructure

__all__ = [
    "CardinalityError",
    "LabelValueError",
    "MetricConflictError",
    "MetricsRegistry",
    "MetricsRegistryStatistics",
    "NotConfiguredError",
]


class CardinalityError(SafeShmError, ValueError):
    """A new label set (or metric) does not fit: the registry's fixed capacity (series,
    cells, definition space) or the metric's ``max_series`` is reached. Nothing was
    changed. Define the metric with ``overflow=True`` to count the excess into one
    ``"__overflow__"`` series instead, or create the registry with more capacity."""


class MetricConflictError(SafeShmError, ValueError):
    """A metric name is already defined in the registry with another type, other label
    names, other buckets or another gauge mode. Nothing was changed.

    The registry outlives the processes: a new version of the application that changes
    a metric finds the old definition. Give each version its own registry name, or
    remove the old registry (``python -m safeshm rm NAME``) before starting it."""


class LabelValueError(SafeShmError, ValueError):
    """A label value cannot be stored: it is not encodable as UTF-8 (e.g. a lone
    surrogate from ``os.fsdecode``) or is longer than ``MAX_LABEL_VALUE_BYTES``.
    Nothing was changed."""


class NotConfiguredError(SafeShmError, RuntimeError):
    """A metric defined without ``registry=`` was used before
    :func:`safeshm.metrics.configure` was called in this process."""


# -- layout ---------------------------------------------------------------------------------
_CTRL: Final = HEADER_SIZE // 8
_C_HIGH, _C_NFAM, _C_NSERIES, _C_CELLS, _C_BLOB = range(5)
_C_JACTIVE, _C_JROW, _C_JCELL, _C_JOLDV, _C_JOLDTS, _C_FALLBACKS, _C_EPOCH = range(5, 12)
_MUTEX_OFFSET: Final = 256
_FAM_OFFSET: Final = 384
_ENTRY: Final = 64
_ENTRY_WORDS: Final = _ENTRY // 8
_F_STATE, _F_TYPE, _F_OFF, _F_LEN, _F_NCELLS, _F_MODE, _F_OVERFLOW = range(7)
_D_STATE, _D_FAM, _D_FIRST, _D_NCELLS, _D_OFF, _D_LEN, _D_GEN, _D_REVIVE = range(8)
_ROW_HEADER: Final = 64
_R_PID, _R_START, _R_NS, _R_TID, _R_TOKEN, _R_FLAGS = range(6)
_ROW_HAS_GAUGE: Final = 1
_FREE: Final = 0
_ACTIVE: Final = 0x41435449564531  # b"1EVITCA": one damaged byte cannot turn one state
_REMOVED: Final = 0x52454D4F564544  # into another
_STATES: Final = (_ACTIVE, _REMOVED)
_REC_CRC: Final = struct.Struct("=I")
_REC_KEY: Final = struct.Struct("=qqqq")
_WORD_MAX: Final = (1 << 63) - 1
_REVIVE_SLACK_S: Final = 366 * 86400.0  # a later revival time is damage (clocks may step back)

COUNTER: Final = 1
GAUGE: Final = 2
HISTOGRAM: Final = 3
TYPE_NAMES: Final = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}
GAUGE_MODES: Final = (
    "sum",
    "livesum",
    "max",
    "livemax",
    "min",
    "livemin",
    "mostrecent",
    "livemostrecent",
)

DEFAULT_SERIES: Final = 1024
DEFAULT_ROWS: Final = 256
MAX_SERIES: Final = 1 << 20
MAX_ROWS: Final = 1 << 16
MAX_CELLS: Final = 1 << 24
_BLOB_PER_SERIES: Final = 384
_PARAMS: Final = struct.Struct("=IIII")  # series, rows, cells, definition bytes
_CLAIM_RETRY_S: Final = 1.0
DEFAULT_LOCK_TIMEOUT: Final = 5.0
"""Seconds a registry call waits for its mutex before :class:`~safeshm.LockTimeoutError`.

Legitimate holds are short (the longest, a scrape of 256 rows x 4096 cells, ~50 ms);
only a holder that is alive but stopped (SIGSTOP, ``docker pause``, a debugger) holds
it longer. 5 s fails the request well before gunicorn's 30 s worker timeout and
Prometheus' 10 s scrape timeout, instead of hanging every worker."""
_RELEASE_WAIT_S: Final = 0.1
MAX_LABEL_VALUE_BYTES: Final = 1024
"""The longest label value (UTF-8 bytes): one value must not eat the definition space
every future label set shares."""

_fold_hook: Callable[[str], None] | None = None
"""Tests only: called at each step of a gauge fold ("journal", "base") holding the mutex."""


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclasses.dataclass(frozen=True, slots=True)
class _Geometry:
    series: int
    rows: int
    cells: int
    blob: int

    @property
    def dir_offset(self) -> int:
        return _FAM_OFFSET + self.series * _ENTRY

    @property
    def blob_offset(self) -> int:
        return self.dir_offset + self.series * _ENTRY

    @property
    def base_offset(self) -> int:
        return _round_up(self.blob_offset + self.blob, 128)

    @property
    def stride(self) -> int:
        return _round_up(_ROW_HEADER + self.cells * 8, 128)

    @property
    def rows_offset(self) -> int:
        return _round_up(self.base_offset + self.cells * 8, 128)

    @property
    def total(self) -> int:
        return self.rows_offset + self.rows * self.stride


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsRegistryStatistics:
    """A snapshot of a :class:`MetricsRegistry` (see :meth:`MetricsRegistry.statistics`)."""

    name: str
    families: int
    """Metrics defined (each name once)."""
    series: int
    """Label sets ever used (removed ones included: their entry is kept for revival)."""
    series_active: int
    series_capacity: int
    cells: int
    """Cells allocated to series."""
    cells_capacity: int
    rows: int
    """Rows reserved at creation: how many threads can write at once without the lock."""
    rows_in_use: int
    """Rows owned by a live process right now."""
    rows_ever_used: int
    """The high-water mark of claimed rows: what a scrape reads."""
    definition_bytes: int
    definition_capacity: int
    locked_adds: int
    """Writes that went through the shared base row because no row was free."""
    creator_pid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Definition:
    """What a metric is: stored in the segment, so any process can export it."""

    name: str
    type: int
    documentation: str
    labelnames: tuple[str, ...]
    unit: str = ""
    buckets: tuple[float, ...] = ()
    mode: str = ""
    max_series: int | None = None
    overflow: bool = False

    @property
    def ncells(self) -> int:
        if self.type == COUNTER:
            return 1
        if self.type == GAUGE:
            return 2
        return len(self.buckets) + 1

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["labelnames"] = list(self.labelnames)
        d["buckets"] = [repr(b) for b in self.buckets]  # inf survives, exact
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Definition:
        """Parse a stored definition.

        Raises:
            ValueError: it is not a valid definition (damaged).
        """
        try:
            d = json.loads(raw.decode("utf-8"))
            strs = ("name", "documentation", "unit", "mode")
            if not isinstance(d, dict) or not all(isinstance(d[k], str) for k in strs):
                raise ValueError("not a definition")
            names, raw_buckets, limit = d["labelnames"], d["buckets"], d["max_series"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("bad label names")
            if not isinstance(raw_buckets, list) or not all(
                isinstance(b, str) for b in raw_buckets
            ):
                raise ValueError("bad buckets")
            if limit is not None and (type(limit) is not int or limit < 1):
                raise ValueError("bad max_series")
            if type(d["type"]) is not int or type(d["overflow"]) is not bool:
                raise ValueError("bad type or overflow")
            definition = cls(
                name=d["name"],
                type=d["type"],
                documentation=d["documentation"],
                labelnames=tuple(names),
                unit=d["unit"],
                buckets=tuple(float(b) for b in raw_buckets),
                mode=d["mode"],
                max_series=limit,
                overflow=d["overflow"],
            )
        except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError, JSONDecodeError
            raise ValueError(f"not a valid metric definition ({type(e).__name__})") from None
        b = definition.buckets
        if (
            definition.type not in TYPE_NAMES
            or (definition.type == GAUGE) != (definition.mode in GAUGE_MODES)
            or (definition.type != GAUGE and definition.mode)
            or (definition.type == HISTOGRAM) != bool(b)
            or (b and (len(b) < 2 or b[-1] != math.inf or list(b) != sorted(set(b))))
            or len(set(definition.labelnames)) != len(definition.labelnames)
            or (definition.overflow and not definition.labelnames)
        ):
            raise ValueError("not a valid metric definition (inconsistent fields)")
        return definition

    def conflict(self, other: Definition) -> str | None:
        """Why ``other`` cannot share this definition's name, or ``None`` if it can."""
        if self.type != other.type:
            return f"it is a {TYPE_NAMES[self.type]}, not a {TYPE_NAMES[other.type]}"
        if self.labelnames != other.labelnames:
            return f"its label names are {list(self.labelnames)}, not {list(other.labelnames)}"
        if self.buckets != other.buckets:
            return f"its buckets are {list(self.buckets)}, not {list(other.buckets)}"
        if self.mode != other.mode:
            return f"its gauge mode is {self.mode!r}, not {other.mode!r}"
        if self.unit != other.unit:
            return f"its unit is {self.unit!r}, not {other.unit!r}"
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Family:
    """A process-local view of one defined family (as stored in the segment)."""

    id: int
    definition: Definition
    overflow_sid: int | None


class SeriesRef:
    """Where one series lives, as the writers cache it."""

    __slots__ = ("cell", "gen", "genv", "revive", "sid")

    def __init__(self, sid: int, cell: int, genv: memoryview, gen: int, revive: float) -> None:
        self.sid = sid
        self.cell = cell
        self.genv = genv
        self.gen = gen
        self.revive = revive


class _Lease:
    """One claim on one row; releasing it lets the row be reused (its counter and
    histogram cells stay where they are: still part of the sums)."""

    __slots__ = ("mutex", "pid", "q", "token", "w")

    def __init__(self, q: memoryview, mutex: RobustMutex, w: int, token: int) -> None:
        self.q = q
        self.mutex = mutex
        self.w = w
        self.pid = _compat.pid
        self.token = token

    def release(self) -> None:
        me = os.getpid()  # not _compat.pid: see safeshm._sharded._Lease.release
        if self.pid != me:
            return
        self.pid = 0
        q = self.q
        w = self.w
        try:
            with Held(self.mutex, timeout=_RELEASE_WAIT_S):
                if q[w + _R_PID] == me and q[w + _R_TOKEN] == self.token:
                    q[w + _R_PID] = 0
        except LockTimeoutError:
            # The holder is stopped: a thread that ends must not wait for it. Release
            # without the mutex: while this process lives and the row names it, no
            # other claimer may take the row (claims take only free rows and dead
            # owners'), so the check and the store cannot race a claim.
            if q[w + _R_PID] == me and q[w + _R_TOKEN] == self.token:
                q[w + _R_PID] = 0

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


_claim_tokens = itertools.count(1)
_live: weakref.WeakSet[MetricsRegistry] = weakref.WeakSet()


def _forget_rows_after_fork() -> None:
    # The child inherits the parent's thread-locals and gauge row: writing into them would
    # race the parent. Start afresh (rows are claimed again on first use).
    for reg in list(_live):
        if reg.closed:
            continue
        reg.__dict__["_tls"] = threading.local()
        reg.__dict__["_glock"] = threading.RLock()
        reg.__dict__["_slock"] = threading.RLock()
        reg._grow = None
        reg._glease = None
        reg._gretry = 0.0


os.register_at_fork(after_in_child=_forget_rows_after_fork)


class MetricsRegistry(SharedStructure):
    """The shared-memory segment behind :mod:`safeshm.metrics`: one per application.

    Holds the metric definitions, a directory of label sets (series) and a fixed array of
    rows: each writing thread owns one row and adds into it with a plain store, so
    counters and histograms never contend. A row whose thread ended, or whose process
    died (even by SIGKILL), is handed to the next thread that needs one *with its values
    kept*: they stay in the sums, so counters never go backwards and nothing grows with
    worker churn. Gauges are per process (one row each); a dead process's gauge values
    are folded into a base row, by the gauge's mode, exactly once when its row is reused.

    Capacity is fixed at creation: ``series`` label sets (each distinct label set ever
    used takes one, removed ones included: re-creating it revives the same entry),
    ``cells`` doubles per row (a counter takes 1, a gauge 2, a histogram one per bucket
    plus one) and ``rows`` concurrent writing threads (more still work, through a locked
    fallback). Exceeding the first two raises :class:`CardinalityError`.

    Most programs never touch this class: :func:`safeshm.metrics.configure` opens it.
    """

    _KIND = Kind.METRICS
    guarantees: ClassVar[Guarantees] = SHM_GUARANTEES
    _LAYOUT = 1
    _MAPPED = ("_q", "_d", "_tls", "_mutex", "_glock")

    _q: memoryview
    _d: memoryview[float]
    _tls: threading.local
    _mutex: RobustMutex
    _glock: threading.RLock
    _slock: threading.RLock
    _geo: _Geometry
    _grow: memoryview[float] | None
    _glease: _Lease | None
    _gretry: float
    _warned_full: bool
    _fams_by_name: dict[str, Family]
    _fams: list[Family]
    _nfam_seen: int
    _sindex: dict[tuple[int, tuple[str, ...]], int]
    _slabels: list[tuple[str, ...]]
    _sfam: list[int]
    _by_fam: dict[int, list[int]]
    _sfirst: list[int]
    _send: int
    _ovf_cache: dict[int, tuple[int, bool]]
    _lock_timeout: float | None

    @classmethod
    def create(
        cls,
        *,
        name: str | None = None,
        series: int | None = None,
        rows: int | None = None,
        cells: int | None = None,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    ) -> Self:
        """Create a new, empty registry.

        Args:
            name: the name to attach by; a random one when ``None``.
            series: how many label sets (over all metrics) it can hold; default 1024.
            rows: how many threads, over all processes, can write at once without a
                lock; default 256.
            cells: doubles per row (the sum of all series' cells); default
                ``4 * series``.
            lock_timeout: the most seconds a call of this handle waits for the
                registry's mutex (held briefly by definitions, new label sets, row
                claims and scrapes) before :class:`~safeshm.LockTimeoutError`: a holder
                stopped by SIGSTOP or a debugger then fails the call instead of hanging
                it. ``None``: wait as long as it takes. Writes through a series and a
                row this thread already has never wait.

        Raises:
            SegmentExistsError: a segment with this name exists.
            ValueError, TypeError: a capacity or ``lock_timeout`` is out of range or of
                the wrong type.
        """
        geo = _geometry(series, rows, cells)
        timeout = _check_lock_timeout(lock_timeout)

        def init(mm: mmap.mmap) -> None:
            init_mutex(mm, _MUTEX_OFFSET)

        seg = Segment.create(
            name,
            kind=cls._KIND,
            layout=cls._LAYOUT,
            payload_size=geo.total - HEADER_SIZE,
            init=init,
            params=_PARAMS.pack(geo.series, geo.rows, geo.cells, geo.blob),
        )
        reg = cls._from_segment(seg)
        reg._lock_timeout = timeout
        return reg

    @classmethod
    def attach(cls, name: str, *, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> Self:
        """Attach to an existing registry by name (``lock_timeout`` as in :meth:`create`).

        Raises:
            SegmentNotFoundError: no segment has this name.
            IncompatibleSegmentError: the segment is not a ``MetricsRegistry``.
        """
        timeout = _check_lock_timeout(lock_timeout)
        reg = cls._from_segment(cls._attach_segment(name))
        reg._lock_timeout = timeout
        return reg

    @classmethod
    def open(
        cls,
        name: str,
        *,
        series: int | None = None,
        rows: int | None = None,
        cells: int | None = None,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    ) -> Self:
        """Attach to ``name``, creating it first if needed (race-free).

        The capacities apply if this call creates it; given explicitly, each must match
        an existing registry's. ``lock_timeout`` is this handle's (see :meth:`create`).

        Raises:
            IncompatibleSegmentError: an explicitly given capacity differs from the
                existing registry's.
        """
        _geometry(series, rows, cells)  # bad arguments fail before anything happens
        timeout = _check_lock_timeout(lock_timeout)

        def check(seg: Segment) -> None:
            have = dict(
                zip(
                    ("series", "rows", "cells", "blob"),
                    _PARAMS.unpack_from(seg.header.params),
                    strict=True,
                )
            )
            for what, want in (("series", series), ("rows", rows), ("cells", cells)):
                if want is not None and have[what] != want:
                    raise IncompatibleSegmentError(
                        f"MetricsRegistry {seg.name!r} has {what}={have[what]}; expected {want}"
                    )

        reg = cls._open_segment(
            name, lambda: cls.create(name=name, series=series, rows=rows, cells=cells), check
        )
        reg._lock_timeout = timeout
        return reg

    def _bind(self, mm: mmap.mmap) -> None:
        series, rows, cells, blob = _PARAMS.unpack_from(self._seg.header.params)
        geo = _Geometry(series, rows, cells, blob)
        if not (
            1 <= series <= MAX_SERIES
            and 1 <= rows <= MAX_ROWS
            and 1 <= cells <= MAX_CELLS
            and geo.total == self._seg.header.total_size
        ):
            raise SegmentCorruptedError(
                f"MetricsRegistry {self._seg.name!r} is damaged: its parameters do not fit "
                f"its {self._seg.header.total_size} bytes"
            )
        self._geo = geo
        self._q = memoryview(mm).cast("q")
        self._d = memoryview(mm).cast("d")
        self._mutex = RobustMutex(mm, _MUTEX_OFFSET, f"MetricsRegistry {self._seg.name!r}")
        self._tls = threading.local()
        self._glock = threading.RLock()  # an RLock only for _gauge_lock's check
        self._slock = threading.RLock()  # this process's index of the directory
        self._grow = None
        self._glease = None
        self._gretry = 0.0
        self._warned_full = False
        self._fams_by_name = {}
        self._fams = []
        self._nfam_seen = 0
        self._sindex = {}
        self._slabels = []
        self._sfam = []
        self._by_fam = {}
        self._sfirst = []
        self._send = 0
        self._ovf_cache = {}
        self._lock_timeout = DEFAULT_LOCK_TIMEOUT
        _live.add(self)

    # -- capacity errors and damage -----------------------------------------------------------
    def _what(self) -> str:
        return f"MetricsRegistry {self._seg.name!r}"

    def _corrupt(self, detail: str) -> SegmentCorruptedError:
        return SegmentCorruptedError(f"{self._what()} is damaged: {detail}")

    def _ctrl(self, word: int, limit: int) -> int:
        v: int = self._q[_CTRL + word]
        if not 0 <= v <= limit:
            raise self._corrupt(f"control word {word} is {v}, beyond {limit}")
        return v

    def _high(self) -> int:
        return self._ctrl(_C_HIGH, self._geo.rows)

    # -- definitions (under the mutex) ------------------------------------------------------
    def _repair(self) -> None:
        """The previous mutex holder died: undo a gauge fold it left half-done (and
        invalidate what other processes cached about series it may have changed)."""
        _repair_fold(self)
        _bump(self._q, _CTRL + _C_EPOCH)

    def _held(self) -> Held:
        return Held(self._mutex, self._repair, self._lock_timeout)

    def family(self, definition: Definition) -> Family:
        """The family for ``definition``: defined now if it is new (with its overflow
        series, and its one series if it has no labels).

        Raises:
            MetricConflictError: the name is defined with another type, labels, buckets,
                unit or mode.
            CardinalityError: no room for another definition.
        """
        fam = self._fams_by_name.get(definition.name)
        if fam is None or (definition.overflow and fam.overflow_sid is None):
            with self._held():
                fam = _define_locked(self, definition)
        why = fam.definition.conflict(definition)
        if why is not None:
            raise MetricConflictError(
                f"metric {definition.name!r} is already defined in {self._what()} and {why}. "
                "The registry outlives the processes: if a new version of the application "
                f"changed this metric, run `python -m safeshm rm {self._seg.name}` before "
                "starting it, or give each version a new registry name"
            )
        return fam

    def _sync_families(self) -> None:
        """Read definitions other processes added (call holding the mutex or not: the
        count is committed after the entry)."""
        with self._slock:
            self._sync_families_locked()

    def _sync_families_locked(self) -> None:
        geo = self._geo
        nfam = self._ctrl(_C_NFAM, geo.series)
        q = self._q
        for fid in range(self._nfam_seen, nfam):
            w = (_FAM_OFFSET + fid * _ENTRY) // 8
            typ, ncells, mode = q[w + _F_TYPE], q[w + _F_NCELLS], q[w + _F_MODE]
            raw = self._record(q[w + _F_OFF], q[w + _F_LEN], (-1 - fid, typ, ncells, mode))
            if raw is None:
                raise self._corrupt(f"the record of metric #{fid} does not match its checksum")
            try:
                definition = Definition.from_json(raw)
            except ValueError as e:
                raise self._corrupt(f"metric #{fid}: {e}") from None
            if (
                definition.type != typ
                or definition.ncells != ncells
                or (GAUGE_MODES.index(definition.mode) if definition.mode else 0) != mode
                or definition.name in self._fams_by_name
            ):
                raise self._corrupt(f"metric #{fid}'s table entry contradicts its definition")
            fam = Family(fid, definition, None)
            self._fams.append(fam)
            self._fams_by_name[definition.name] = fam
        self._nfam_seen = max(self._nfam_seen, nfam)

    def _refresh_family(self, fid: int) -> Family:
        q = self._q
        w = (_FAM_OFFSET + fid * _ENTRY) // 8
        fam = self._fams[fid]
        ovf = q[w + _F_OVERFLOW]
        if ovf and fam.overflow_sid is None:
            sid = ovf - 1
            if 0 <= sid < self._geo.series and sid >= len(self._slabels):
                self._sync_series()
            if not (
                fam.definition.overflow
                and 0 <= sid < len(self._slabels)
                and self._sfam[sid] == fid
                and self._slabels[sid] == ("__overflow__",) * len(fam.definition.labelnames)
            ):
                raise self._corrupt(f"metric #{fid}'s overflow series number {ovf} is wrong")
            fam = dataclasses.replace(fam, overflow_sid=sid)
            self._fams[fid] = fam
            self._fams_by_name[fam.definition.name] = fam
        return fam

    def _record(self, off: int, length: int, key: tuple[int, int, int, int]) -> bytes | None:
        """A record's JSON, ``None`` if its checksum (over ``key`` too) does not match."""
        geo = self._geo
        if off < 0 or length < _REC_CRC.size or off + length > self._ctrl(_C_BLOB, geo.blob):
            raise self._corrupt(f"a record at {off}+{length} lies outside its definitions area")
        start = geo.blob_offset + off
        raw = bytes(self._seg.mm[start : start + length])
        body = raw[_REC_CRC.size :]
        if _REC_CRC.unpack_from(raw)[0] != zlib.crc32(body, zlib.crc32(_REC_KEY.pack(*key))):
            return None
        return body

    def _append_record(self, body: bytes, key: tuple[int, int, int, int]) -> tuple[int, int]:
        """Append a record (room checked by the caller): its offset and length."""
        geo = self._geo
        data = _REC_CRC.pack(zlib.crc32(body, zlib.crc32(_REC_KEY.pack(*key)))) + body
        used = self._ctrl(_C_BLOB, geo.blob)
        assert used + len(data) <= geo.blob  # checked by the caller
        start = geo.blob_offset + used
        self._seg.mm[start : start + len(data)] = data
        self._q[_CTRL + _C_BLOB] = used + len(data)
        return used, len(data)

    def _sync_series(self) -> None:
        """Index the directory entries other processes added (labels are immutable),
        checking each: a damaged one raises before anything uses it. Holding the
        mutex or not, as :meth:`_sync_families`."""
        with self._slock:
            self._sync_series_locked()

    def _sync_series_locked(self) -> None:
        q = self._q
        geo = self._geo
        nseries = self._ctrl(_C_NSERIES, geo.series)
        if nseries <= len(self._slabels):
            return
        self._sync_families()
        used = self._ctrl(_C_CELLS, geo.cells)
        for sid in range(len(self._slabels), nseries):
            w = self._dir_w(sid)
            fid, first, ncells = q[w + _D_FAM], q[w + _D_FIRST], q[w + _D_NCELLS]
            if not (
                0 <= fid < len(self._fams)
                and ncells == self._fams[fid].definition.ncells
                and self._send <= first
                and first + ncells <= used
            ):
                raise self._corrupt(
                    f"series #{sid}'s entry (metric #{fid}, cells {first}+{ncells}) is "
                    f"impossible ({len(self._fams)} metrics, {used} cells)"
                )
            self._check_state(sid, w)
            raw = self._record(q[w + _D_OFF], q[w + _D_LEN], (sid, fid, first, ncells))
            if raw is None:
                raise self._corrupt(f"series #{sid}'s label values do not match their checksum")
            try:
                labels = tuple(json.loads(raw.decode("utf-8")))
            except (ValueError, TypeError):
                raise self._corrupt(f"series #{sid}'s label values are not valid") from None
            if (
                len(labels) != len(self._fams[fid].definition.labelnames)
                or not all(isinstance(v, str) for v in labels)
                or (fid, labels) in self._sindex
            ):
                raise self._corrupt(f"series #{sid}'s label values are not valid")
            self._slabels.append(labels)
            self._sfam.append(fid)
            self._sfirst.append(first)
            self._send = first + ncells
            self._sindex[(fid, labels)] = sid
            self._by_fam.setdefault(fid, []).append(sid)

    def _check_state(self, sid: int, w: int) -> int:
        state: int = self._q[w + _D_STATE]
        revive: float = self._d[w + _D_REVIVE]
        if state not in _STATES:
            raise self._corrupt(f"series #{sid}'s state is {state:#x}")
        if not 0.0 <= revive <= time.time() + _REVIVE_SLACK_S:  # NaN too
            raise self._corrupt(f"series #{sid}'s revival time is {revive!r}")
        return state

    def _entry(self, sid: int) -> tuple[int, int]:
        """A synced series' (state, first cell), checked against what was read at sync:
        entries never change but for their state, generation and revival time."""
        q = self._q
        w = self._dir_w(sid)
        first = self._sfirst[sid]
        fid = self._sfam[sid]
        if (
            q[w + _D_FAM] != fid
            or q[w + _D_FIRST] != first
            or q[w + _D_NCELLS] != self._fams[fid].definition.ncells
        ):
            raise self._corrupt(f"series #{sid}'s directory entry changed")
        return self._check_state(sid, w), first

    def _dir_w(self, sid: int) -> int:
        return (self._geo.dir_offset + sid * _ENTRY) // 8

    def _ref(self, sid: int) -> SeriesRef:
        w = self._dir_w(sid)
        _, first = self._entry(sid)
        return SeriesRef(
            sid,
            first,
            self._q[w + _D_GEN : w + _D_GEN + 1],
            self._q[w + _D_GEN],
            self._d[w + _D_REVIVE],
        )

    def series(self, fam: Family, labels: tuple[str, ...]) -> SeriesRef:
        """The series of ``fam`` with these label values: created, or revived if it was
        removed (its total restarting at 0); the overflow series when there is no room
        and the family has one.

        Raises:
            CardinalityError: no room for it and no overflow series; nothing changed.
        """
        sid = self._sindex.get((fam.id, labels))
        if sid is not None and self._q[self._dir_w(sid) + _D_STATE] == _ACTIVE:
            return self._ref(sid)
        with self._held():
            sid = _series_locked(self, fam, labels)
            return self._ref(sid)

    def would_overflow(self, fam: Family, labels: tuple[str, ...]) -> bool:
        """Without the mutex: whether a label set this process has not used would go to
        ``fam``'s overflow series now (the family is at its ``max_series``, or the
        registry is full). A label set already in the registry never would: it has its
        own series. ``False`` also when in doubt (the locked path decides then)."""
        q = self._q
        geo = self._geo
        epoch = q[_CTRL + _C_EPOCH]  # before reading what it guards
        cached = self._ovf_cache.get(fam.id)
        if cached is not None and cached[0] == epoch:
            full = cached[1]  # no series added, removed or revived since
        else:
            self._sync_series()
            fam = self._refresh_family(fam.id)
            if fam.overflow_sid is None:
                return False
            limit = fam.definition.max_series
            full = (
                self._ctrl(_C_NSERIES, geo.series) >= geo.series
                or self._ctrl(_C_CELLS, geo.cells) + fam.definition.ncells > geo.cells
            )
            if limit is not None and not full:
                active = 0
                for s in self._by_fam.get(fam.id, ()):
                    if s != fam.overflow_sid and q[self._dir_w(s) + _D_STATE] == _ACTIVE:
                        active += 1
                full = active >= limit
            self._ovf_cache[fam.id] = (epoch, full)
        if (fam.id, labels) in self._sindex:
            return False
        if full:
            return True
        raw = json.dumps(list(labels), separators=(",", ":")).encode()
        return self._ctrl(_C_BLOB, geo.blob) + _REC_CRC.size + len(raw) > geo.blob

    def remove(self, fam: Family, labels: tuple[str, ...]) -> None:
        """Hide a series from the collector; its next use revives it from 0. Its
        entry, cells and label record stay: the registry's capacity is not freed."""
        with self._held():
            self._sync_series()
            sid = self._sindex.get((fam.id, labels))
            if sid is not None:
                _remove_locked(self, sid)

    def clear(self, fam: Family) -> None:
        """Remove every series of ``fam``."""
        with self._held():
            _clear_locked(self, fam.id)

    # -- rows -----------------------------------------------------------------------------
    def add(self, cell: int, amount: float) -> None:
        """Add ``amount`` into ``cell`` of this thread's row (claimed now if it has none),
        or of the base row under the mutex when no row is free."""
        tls = self._tls
        row = getattr(tls, "row", _UNSET)
        if row is _UNSET or (row is None and time.monotonic() >= tls.retry_at):
            row = self._claim(gauge=False)
        if row is not None:
            row[cell] += amount
            return
        with self._held():
            self._locked_add(cell, amount)

    def add_pair(self, cell: int, amount: float, cell2: int, amount2: float) -> None:
        """Two adds into this thread's row (a histogram's bucket and sum)."""
        self.add(cell, amount)
        self.add(cell2, amount2)

    def _locked_add(self, cell: int, amount: float) -> None:
        d = self._d
        w = self._geo.base_offset // 8 + cell
        d[w] += amount
        _bump(self._q, _CTRL + _C_FALLBACKS)

    def _row_w(self, k: int) -> int:
        return (self._geo.rows_offset + k * self._geo.stride) // 8

    def _claim(self, *, gauge: bool) -> memoryview[float] | None:
        """Give the calling thread (or, for gauges, this process) a row: a free one, else
        one whose owner died, after folding any gauge values it holds into the base."""
        me = _compat.pid
        tid = 0 if gauge else threading.get_native_id()
        token = next(_claim_tokens)
        start = _owner_start_time()
        ns = _compat.pid_namespace()
        with self._held():
            chosen = _claim_locked(self, me, start, ns, tid, token, gauge)
        tls = self._tls
        if chosen is None:
            if gauge:
                self._gretry = time.monotonic() + _CLAIM_RETRY_S
            else:
                tls.row = None
                tls.retry_at = time.monotonic() + _CLAIM_RETRY_S
            if not self._warned_full:
                self._warned_full = True
                warnings.warn(
                    SafeShmWarning(
                        f"{self._what()}: all {self._geo.rows} rows are owned by live "
                        "threads; writes from threads without a row go through a shared row "
                        "under a lock (exact, but slower). Create it with more rows="
                    ),
                    stacklevel=4,
                )
            return None
        w = self._row_w(chosen)
        lease = _Lease(self._q, self._mutex, w, token)
        row = self._d[w + _ROW_HEADER // 8 : w + _ROW_HEADER // 8 + self._geo.cells]
        if gauge:
            self._glease = lease
            self._grow = row
        else:
            tls.lease = lease
            tls.row = row
        return row

    # -- gauges (per process) ---------------------------------------------------------------
    def _gauge_lock(self) -> threading.RLock:
        """This process's gauge lock, to be taken by ``with``; a thread that holds it
        already -- a signal handler (or a GC callback) that uses a gauge while the code it
        interrupted writes one -- gets LockReentryError instead of a deadlock."""
        glock = self._glock
        if glock._is_owned():  # type: ignore[attr-defined]
            raise LockReentryError(
                f"MetricsRegistry {self._seg.name!r}: this thread is already writing a gauge "
                "(a signal handler or GC callback that uses a gauge while the code it "
                "interrupted writes one?)"
            )
        return glock

    def gauge_write(self, ref: SeriesRef, value: float, *, add: bool) -> None:
        """Set (or add to) this process's value of a gauge series."""
        with self._gauge_lock():
            row = self._grow
            if row is None and time.monotonic() >= self._gretry:
                row = self._claim(gauge=True)
            c = ref.cell
            now = time.time()
            if now <= ref.revive:
                now = math.nextafter(ref.revive, math.inf)
            if row is not None:
                if add:
                    ts = row[c + 1]
                    value += row[c] if ts >= ref.revive and ts > 0 else 0.0
                row[c] = value
                row[c + 1] = now
                return
        with self._held():
            d = self._d
            w = self._geo.base_offset // 8 + c
            if add:
                ts = d[w + 1]
                value += d[w] if ts >= ref.revive and ts > 0 else 0.0
            d[w] = value
            d[w + 1] = now
            _bump(self._q, _CTRL + _C_FALLBACKS)

    def gauge_value(self, ref: SeriesRef) -> float:
        """This process's current value of a gauge series (tests and ``Gauge._value``)."""
        with self._gauge_lock():
            row = self._grow
            if row is None:
                return 0.0
            ts = row[ref.cell + 1]
            return float(row[ref.cell]) if ts > 0 and ts >= ref.revive else 0.0

    def _before_close(self) -> None:
        tls = self.__dict__.get("_tls")
        if isinstance(tls, threading.local):
            lease = getattr(tls, "lease", None)
            if lease is not None:
                lease.release()
                del tls.lease
                tls.row = None
                tls.retry_at = math.inf
            # Other threads' leases are released when those threads end.
            self.__dict__["_retired_tls"] = tls
        glease = self.__dict__.get("_glease")
        if glease is not None:
            glease.release()
            self._glease = None
            self._grow = None
        _live.discard(self)

    # -- reading ----------------------------------------------------------------------------
    def snapshot(self) -> list[tuple[Definition, list[tuple[tuple[str, ...], list[float]]]]]:
        """Every family with the current values of its active series.

        Counter: ``[total]``; gauge: ``[value]`` by its mode; histogram: the per-bucket
        counts (not cumulative) then the sum.
        """
        geo = self._geo
        with self._held():
            self._sync_families()
            self._sync_series()
            high = self._high()
            used = self._ctrl(_C_CELLS, geo.cells)
            if used < self._send:
                raise self._corrupt(f"{used} cells are marked used, its series use {self._send}")
            _check_rows_past(self, high)
            states = _series_states(self)
            gauges = _read_gauges(self, states, high)
            nfams = len(self._fams)
        totals = _column_sums(self, high, used)
        out: list[tuple[Definition, list[tuple[tuple[str, ...], list[float]]]]] = []
        # What the lock showed: another thread may add families and series from here on
        # (their lists only grow), and they are in the next snapshot.
        nseries = len(states)
        for fam in self._fams[:nfams]:
            d = fam.definition
            samples: list[tuple[tuple[str, ...], list[float]]] = []
            for sid in self._by_fam.get(fam.id, ()):
                if sid >= nseries or states[sid] != _ACTIVE:
                    continue
                if d.type == GAUGE:
                    samples.append((self._slabels[sid], [gauges[sid]]))
                else:
                    first = self._sfirst[sid]
                    samples.append((self._slabels[sid], totals[first : first + d.ncells]))
            out.append((d, samples))
        return out

    def statistics(self) -> MetricsRegistryStatistics:
        """A snapshot for monitoring and ``safeshm inspect``."""
        geo = self._geo
        q = self._q
        high = self._high()
        in_use = 0
        for k in range(high):
            w = self._row_w(k)
            owner = q[w + _R_PID]
            if owner and _compat.process_alive(owner, q[w + _R_START], q[w + _R_NS]):
                in_use += 1
        nseries = self._ctrl(_C_NSERIES, geo.series)
        active = sum(1 for s in range(nseries) if q[self._dir_w(s) + _D_STATE] == _ACTIVE)
        return MetricsRegistryStatistics(
            name=self._seg.name,
            families=self._ctrl(_C_NFAM, geo.series),
            series=nseries,
            series_active=active,
            series_capacity=geo.series,
            cells=self._ctrl(_C_CELLS, geo.cells),
            cells_capacity=geo.cells,
            rows=geo.rows,
            rows_in_use=in_use,
            rows_ever_used=high,
            definition_bytes=self._ctrl(_C_BLOB, geo.blob),
            definition_capacity=geo.blob,
            locked_adds=q[_CTRL + _C_FALLBACKS],
            creator_pid=self._seg.header.creator_pid,
        )

    def _repr_fields(self) -> str:
        geo = self._geo
        return (
            f"families={self._ctrl(_C_NFAM, geo.series)}, "
            f"series={self._ctrl(_C_NSERIES, geo.series)}/{geo.series}, "
            f"rows_ever_used={self._high()}/{geo.rows}"
        )


_UNSET: Final[Any] = object()


def _check_lock_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"lock_timeout must be a number or None, not {type(timeout).__name__}")
    if not 0 < timeout < math.inf:
        raise ValueError(f"lock_timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _geometry(series: int | None, rows: int | None, cells: int | None) -> _Geometry:
    def check(what: str, v: int | None, default: int, limit: int) -> int:
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{what} must be an int, not {type(v).__name__}")
        if not 1 <= v <= limit:
            raise ValueError(f"{what} must be between 1 and {limit}, got {v}")
        return v

    s = check("series", series, DEFAULT_SERIES, MAX_SERIES)
    r = check("rows", rows, DEFAULT_ROWS, MAX_ROWS)
    c = check("cells", cells, min(MAX_CELLS, max(64, 4 * s)), MAX_CELLS)
    blob = _round_up(4096 + _BLOB_PER_SERIES * s, 128)
    return _Geometry(s, r, c, blob)


# -- the critical sections: functions, because of their loops (see _sharded._free_slot) ------
def _define_locked(reg: MetricsRegistry, definition: Definition) -> Family:
    reg._sync_families()
    fam = reg._fams_by_name.get(definition.name)
    q = reg._q
    if fam is None:
        nfam = len(reg._fams)
        if nfam >= reg._geo.series:
            raise CardinalityError(
                f"{reg._what()} has no room for metric {definition.name!r}: all "
                f"{reg._geo.series} definitions are used; nothing was changed"
            )
        raw = definition.to_json()
        blob_used = reg._ctrl(_C_BLOB, reg._geo.blob)
        if blob_used + _REC_CRC.size + len(raw) > reg._geo.blob:
            raise CardinalityError(
                f"{reg._what()} has no room for the definition of {definition.name!r} "
                f"({len(raw)} bytes): its definitions space is full ({blob_used}/"
                f"{reg._geo.blob} bytes); nothing was changed"
            )
        cells_needed = definition.ncells * (
            1 if not definition.labelnames or definition.overflow else 0
        )
        if reg._ctrl(_C_CELLS, reg._geo.cells) + cells_needed > reg._geo.cells or (
            cells_needed and reg._ctrl(_C_NSERIES, reg._geo.series) >= reg._geo.series
        ):
            raise CardinalityError(
                f"{reg._what()} has no room for the series of {definition.name!r} "
                f"({reg._ctrl(_C_NSERIES, reg._geo.series)}/{reg._geo.series} series, "
                f"{reg._ctrl(_C_CELLS, reg._geo.cells)}/{reg._geo.cells} cells used); "
                "nothing was changed"
            )
        mode = GAUGE_MODES.index(definition.mode) if definition.mode else 0
        off, length = reg._append_record(raw, (-1 - nfam, definition.type, definition.ncells, mode))
        w = (_FAM_OFFSET + nfam * _ENTRY) // 8
        q[w + _F_TYPE] = definition.type
        q[w + _F_OFF] = off
        q[w + _F_LEN] = length
        q[w + _F_NCELLS] = definition.ncells
        q[w + _F_MODE] = mode
        q[w + _F_OVERFLOW] = 0
        q[w + _F_STATE] = 1
        q[_CTRL + _C_NFAM] = nfam + 1  # the commit
        reg._sync_families()
        fam = reg._fams[nfam]
        if not definition.labelnames:
            _series_locked(reg, fam, ())
    if fam.definition.overflow and fam.definition.labelnames and fam.overflow_sid is None:
        fam = reg._refresh_family(fam.id)
        if fam.overflow_sid is None:
            ovf = ("__overflow__",) * len(fam.definition.labelnames)
            reg._sync_series()
            sid = reg._sindex.get((fam.id, ovf))
            if sid is None:
                sid = _new_series(reg, fam, ovf)
            q[(_FAM_OFFSET + fam.id * _ENTRY) // 8 + _F_OVERFLOW] = sid + 1
            fam = reg._refresh_family(fam.id)
    return fam


def _new_series(reg: MetricsRegistry, fam: Family, labels: tuple[str, ...]) -> int:
    """Append a directory entry (capacity checked by the caller, or raising here)."""
    geo = reg._geo
    q = reg._q
    nseries = reg._ctrl(_C_NSERIES, geo.series)
    ncells = fam.definition.ncells
    used = reg._ctrl(_C_CELLS, geo.cells)
    raw = json.dumps(list(labels), separators=(",", ":")).encode()
    blob_used = reg._ctrl(_C_BLOB, geo.blob)
    full = []
    if nseries >= geo.series:
        full.append(f"all {geo.series} series are used (series=)")
    if used + ncells > geo.cells:
        full.append(f"{used}/{geo.cells} cells are used and it needs {ncells} (cells=)")
    if blob_used + _REC_CRC.size + len(raw) > geo.blob:
        full.append(
            f"its definitions space has {geo.blob - blob_used} of {geo.blob} bytes left "
            f"and the label values need {len(raw) + _REC_CRC.size} (series= sizes it)"
        )
    if full:
        raise CardinalityError(
            f"{reg._what()} is full: {'; '.join(full)}. No room for "
            f"{fam.definition.name}{_fmt_labels(fam, labels)}; nothing was changed. Create "
            "the registry with more capacity, or define the metric with overflow=True"
        )
    off, length = reg._append_record(raw, (nseries, fam.id, used, ncells))
    q[_CTRL + _C_CELLS] = used + ncells
    w = reg._dir_w(nseries)
    q[w + _D_FAM] = fam.id
    q[w + _D_FIRST] = used
    q[w + _D_NCELLS] = ncells
    q[w + _D_OFF] = off
    q[w + _D_LEN] = length
    q[w + _D_GEN] = 1
    reg._d[w + _D_REVIVE] = 0.0
    q[w + _D_STATE] = _ACTIVE
    q[_CTRL + _C_NSERIES] = nseries + 1  # the commit
    _bump(q, _CTRL + _C_EPOCH)
    reg._sync_series()
    return nseries


def _fmt_labels(fam: Family, labels: tuple[str, ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f"{k}={_short(v)}" for k, v in zip(fam.definition.labelnames, labels, strict=True)
    )
    return "{" + inner + "}"


def _short(value: str, limit: int = 60) -> str:
    """A label value for a message: ``repr``, cut to ``limit`` characters (hostile values
    must not flood the logs)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _series_locked(reg: MetricsRegistry, fam: Family, labels: tuple[str, ...]) -> int:
    reg._sync_series()
    sid = reg._sindex.get((fam.id, labels))
    if sid is not None and reg._entry(sid)[0] == _ACTIVE:
        return sid
    fam = reg._refresh_family(fam.id)
    limit = fam.definition.max_series
    is_overflow = fam.overflow_sid is not None and sid == fam.overflow_sid
    if limit is not None and labels and not is_overflow:
        active = sum(
            1
            for s in reg._by_fam.get(fam.id, ())
            if s != fam.overflow_sid and reg._entry(s)[0] == _ACTIVE
        )
        if active >= limit:
            return _overflow_or_raise(
                reg,
                fam,
                labels,
                f"metric {fam.definition.name!r} has reached its max_series={limit}",
            )
    if sid is not None:
        _revive(reg, sid)
        return sid
    try:
        return _new_series(reg, fam, labels)
    except CardinalityError as e:
        return _overflow_or_raise(reg, fam, labels, str(e))


def _overflow_or_raise(reg: MetricsRegistry, fam: Family, labels: tuple[str, ...], why: str) -> int:
    ovf = fam.overflow_sid
    if ovf is None:
        raise CardinalityError(
            f"{why}: no room for {fam.definition.name}{_fmt_labels(fam, labels)}; nothing "
            "was changed (define the metric with overflow=True to count the excess into "
            "one '__overflow__' series)"
            if "nothing was changed" not in why
            else why
        )
    if reg._entry(ovf)[0] != _ACTIVE:
        _revive(reg, ovf)
    return ovf


def _revive(reg: MetricsRegistry, sid: int) -> None:
    """Make a removed series active again, its total restarting at 0: the base cells
    cancel what the rows hold. Idempotent until the final store (the state)."""
    q = reg._q
    d = reg._d
    w = reg._dir_w(sid)
    _, first = reg._entry(sid)  # checked: a damaged entry raises before any write
    definition = reg._fams[reg._sfam[sid]].definition
    ncells = definition.ncells
    high = reg._high()
    base = reg._geo.base_offset // 8
    now = time.time()
    if definition.type == GAUGE:
        d[base + first] = 0.0
        d[base + first + 1] = 0.0
    else:
        for c in range(first, first + ncells):
            s = 0.0
            for k in range(high):
                s += d[reg._row_w(k) + _ROW_HEADER // 8 + c]
            d[base + c] = -s
    d[w + _D_REVIVE] = max(now, d[w + _D_REVIVE])
    _bump(q, w + _D_GEN)
    q[w + _D_STATE] = _ACTIVE
    _bump(q, _CTRL + _C_EPOCH)


def _remove_locked(reg: MetricsRegistry, sid: int) -> None:
    q = reg._q
    w = reg._dir_w(sid)
    if reg._entry(sid)[0] == _ACTIVE:
        q[w + _D_STATE] = _REMOVED
        _bump(q, w + _D_GEN)
        _bump(q, _CTRL + _C_EPOCH)


def _clear_locked(reg: MetricsRegistry, fid: int) -> None:
    reg._sync_series()
    for sid in reg._by_fam.get(fid, ()):
        _remove_locked(reg, sid)


def _bump(q: memoryview, w: int) -> None:
    """Add 1 to a counter word compared only for change (epochs, generations, counts
    for statistics), wrapping instead of overflowing: a damaged huge value must not make
    the store raise after the change it counts has landed."""
    q[w] = (q[w] + 1) & _WORD_MAX


def _check_rows_past(reg: MetricsRegistry, high: int) -> None:
    """Rows past the mark of rows ever claimed are never written, but for the one a
    claimer killed before raising the mark left with a dead owner: a live owner there,
    or any owner further on, means the mark was damaged (a scrape would leave their
    counts out, and counters would go backwards)."""
    q = reg._q
    for k in range(high, reg._geo.rows):
        w = reg._row_w(k)
        owner = q[w + _R_PID]
        if owner and (k > high or _compat.process_alive(owner, q[w + _R_START], q[w + _R_NS])):
            raise reg._corrupt(f"row {k}, past the {high} rows ever claimed, has an owner")


def _claim_locked(  # noqa: PLR0917 - internal
    reg: MetricsRegistry, me: int, start: int, ns: int, tid: int, token: int, gauge: bool
) -> int | None:
    q = reg._q
    geo = reg._geo
    high = reg._high()
    # A free row among those ever used, else one whose owner died, and only then a new
    # row: a scrape reads every row ever used, so reuse keeps it as cheap as the peak
    # number of concurrent writers allows.
    chosen: int | None = None
    for k in range(high):
        if q[reg._row_w(k) + _R_PID] == 0:
            chosen = k
            break
    if chosen is None:
        for k in range(high):
            w = reg._row_w(k)
            owner = q[w + _R_PID]
            if owner != me and not _compat.process_alive(owner, q[w + _R_START], q[w + _R_NS]):
                chosen = k
                break
    if chosen is None and high < geo.rows:
        _check_rows_past(reg, high)  # taking a live row would mix two writers' counts
        chosen = high
    if chosen is None:
        return None
    w = reg._row_w(chosen)
    if q[w + _R_FLAGS] & _ROW_HAS_GAUGE:
        _fold_row(reg, chosen)
    q[w + _R_START] = start
    q[w + _R_NS] = ns
    q[w + _R_TID] = tid
    q[w + _R_TOKEN] = token
    q[w + _R_FLAGS] = _ROW_HAS_GAUGE if gauge else 0
    q[w + _R_PID] = me  # the commit: a crash before this leaves the row unclaimed
    if chosen >= high:
        q[_CTRL + _C_HIGH] = chosen + 1
    return chosen


def _fold_row(reg: MetricsRegistry, k: int) -> None:
    """Fold row ``k``'s gauge values into the base row, each exactly once, by mode.

    A sum fold is journalled (row, cell, the base's old value and time) before the base
    changes, and a cell is emptied (time first) after: a folder killed in between is
    completed by the next mutex holder (:func:`_repair_fold`). The other folds are
    idempotent.
    """
    reg._sync_families()
    reg._sync_series()
    q = reg._q
    d = reg._d
    rw = reg._row_w(k) + _ROW_HEADER // 8
    base = reg._geo.base_offset // 8
    ctrl = _CTRL
    for sid, fid in enumerate(reg._sfam):
        definition = reg._fams[fid].definition
        if definition.type != GAUGE:
            continue
        w = reg._dir_w(sid)
        _, c = reg._entry(sid)
        v = d[rw + c]
        ts = d[rw + c + 1]
        if ts == 0:
            continue
        revive = d[w + _D_REVIVE]
        mode = definition.mode
        bv = d[base + c]
        bts = d[base + c + 1]
        base_set = bts > 0 and bts >= revive
        if ts < revive or mode.startswith("live"):
            pass  # not part of the series any more / dropped with its process
        elif mode == "sum":
            q[ctrl + _C_JROW] = k
            q[ctrl + _C_JCELL] = c
            d[ctrl + _C_JOLDV] = bv
            d[ctrl + _C_JOLDTS] = bts
            q[ctrl + _C_JACTIVE] = 1
            if _fold_hook is not None:
                _fold_hook("journal")
            d[base + c] = (bv if base_set else 0.0) + v
            d[base + c + 1] = max(ts, bts)
            if _fold_hook is not None:
                _fold_hook("base")
        elif mode in {"max", "min"}:
            better = v > bv if mode == "max" else v < bv
            if not base_set or better:
                d[base + c] = v
            d[base + c + 1] = max(ts, bts)
        elif not base_set or ts > bts:  # mostrecent
            d[base + c] = v
            d[base + c + 1] = ts
        d[rw + c + 1] = 0.0  # emptied: the time first, it says whether a value is there
        d[rw + c] = 0.0
        q[ctrl + _C_JACTIVE] = 0
        q[ctrl + _C_JCELL] = -1  # nothing to replay: a damaged "active" is seen as damage
    q[reg._row_w(k) + _R_FLAGS] = 0


def _repair_fold(reg: MetricsRegistry) -> None:
    q = reg._q
    d = reg._d
    if not q[_CTRL + _C_JACTIVE]:
        return
    k = q[_CTRL + _C_JROW]
    c = q[_CTRL + _C_JCELL]
    reg._sync_families()
    reg._sync_series()
    sum_gauge_cells = {
        reg._sfirst[sid]
        for sid, fid in enumerate(reg._sfam)
        if reg._fams[fid].definition.type == GAUGE and reg._fams[fid].definition.mode == "sum"
    }
    if not (0 <= k < reg._geo.rows and c >= 0 and c + 1 < reg._geo.cells) or (
        c not in sum_gauge_cells
    ):
        raise reg._corrupt(f"its gauge fold journal names row {k}, cell {c}")
    if d[reg._row_w(k) + _ROW_HEADER // 8 + c + 1] != 0:
        # The row still holds the value: the base may or may not have it. Restore the
        # base; the row is folded again when it is claimed.
        base = reg._geo.base_offset // 8
        d[base + c] = d[_CTRL + _C_JOLDV]
        d[base + c + 1] = d[_CTRL + _C_JOLDTS]
    q[_CTRL + _C_JACTIVE] = 0


def _series_states(reg: MetricsRegistry) -> list[int]:
    """Each known series' state (holding the mutex; the loop in a function of its own: the
    comment above safeshm._store._log._foreign_files)."""
    return [reg._entry(s)[0] for s in range(len(reg._slabels))]


def _read_gauges(reg: MetricsRegistry, states: Sequence[int], high: int) -> dict[int, float]:
    """Each active gauge series' value by its mode (holding the mutex: no fold runs)."""
    q = reg._q
    d = reg._d
    base = reg._geo.base_offset // 8
    alive: dict[int, bool] = {}

    def live(k: int) -> bool:
        got = alive.get(k)
        if got is None:
            w = reg._row_w(k)
            owner = q[w + _R_PID]
            got = alive[k] = bool(owner) and _compat.process_alive(
                owner, q[w + _R_START], q[w + _R_NS]
            )
        return got

    out: dict[int, float] = {}
    rows = [reg._row_w(k) + _ROW_HEADER // 8 for k in range(high)]
    for sid, state in enumerate(states):
        if state != _ACTIVE:
            continue
        definition = reg._fams[reg._sfam[sid]].definition
        if definition.type != GAUGE:
            continue
        w = reg._dir_w(sid)
        c = reg._sfirst[sid]  # states were read through _entry: checked
        revive = d[w + _D_REVIVE]
        mode = definition.mode
        only_live = mode.startswith("live")
        values: list[tuple[float, float]] = []
        bts = d[base + c + 1]
        if bts > 0 and bts >= revive:
            values.append((d[base + c], bts))
        for k, rw in enumerate(rows):
            ts = d[rw + c + 1]
            if ts > 0 and ts >= revive and (not only_live or live(k)):
                values.append((d[rw + c], ts))
        out[sid] = _aggregate(mode.removeprefix("live"), values)
    return out


def _aggregate(mode: str, values: list[tuple[float, float]]) -> float:
    if not values:
        return 0.0
    if mode == "sum":
        return sum(v for v, _ in values)
    if mode == "max":
        return max(v for v, _ in values)
    if mode == "min":
        return min(v for v, _ in values)
    return max(values, key=operator.itemgetter(1))[0]


def _column_sums(reg: MetricsRegistry, high: int, used: int) -> list[float]:
    """Per cell: the rows' sum (in row order, as :func:`_revive` adds them) plus the base."""
    d = reg._d
    acc = [0.0] * used
    off = _ROW_HEADER // 8
    add = operator.add
    for k in range(high):
        w = reg._row_w(k) + off
        acc = list(map(add, acc, d[w : w + used]))
    b = reg._geo.base_offset // 8
    return list(map(add, acc, d[b : b + used]))


_start_time_cache: dict[int, int] = {}


def _owner_start_time() -> int:
    pid = _compat.pid
    start = _start_time_cache.get(pid)
    if start is None:
        start = _start_time_cache[pid] = _compat.process_start_time(pid) or 0
    return start
