"""Counter, Gauge and Histogram: prometheus_client's signatures, a shared registry."""

from __future__ import annotations

import bisect
import functools
import math
import re
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar, Final, ParamSpec, Self, TypeVar

from ._registry import (
    COUNTER,
    DEFAULT_LOCK_TIMEOUT,
    GAUGE,
    GAUGE_MODES,
    HISTOGRAM,
    MAX_LABEL_VALUE_BYTES,
    TYPE_NAMES,
    Definition,
    Family,
    LabelValueError,
    MetricsRegistry,
    NotConfiguredError,
    SeriesRef,
    _short,
)

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["DEFAULT_BUCKETS", "Counter", "Gauge", "Histogram", "configure", "configured"]

INF: Final = float("inf")
DEFAULT_BUCKETS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    INF,
)
"""prometheus_client's default histogram buckets."""

_METRIC_NAME_RE: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME_RE: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
OVERFLOW: Final = "__overflow__"

_P = ParamSpec("_P")
_R = TypeVar("_R")

# -- the configured registry --------------------------------------------------------------
_default: MetricsRegistry | None = None
_default_lock = threading.Lock()
_metrics: weakref.WeakSet[_Metric] = weakref.WeakSet()


def configure(
    name: str,
    *,
    series: int | None = None,
    rows: int | None = None,
    cells: int | None = None,
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
) -> MetricsRegistry:
    """Open (creating it if needed) the application's registry ``name`` and make it the
    one that metrics defined without ``registry=`` use. Call it once per process, in
    any order with the metric definitions: every process that calls it with the same
    name shares the same metrics.

    Calling it again with the same name returns the same handle; with another name it
    switches every such metric to the new registry (the old handle stays open: close it
    yourself if you are done with it).

    Args:
        name: the segment name, e.g. ``"myapp.metrics"``.
        series: the most series, if this call creates the registry (see
            :meth:`MetricsRegistry.create`); given explicitly, it must match an existing
            registry's.
        rows: the most threads writing at once, on the same terms.
        cells: the values per row, on the same terms.
        lock_timeout: how long (seconds) a call waits for the registry's mutex before
            :class:`~safeshm.LockTimeoutError` (default 5 s; ``None``: no bound). Only
            a process stopped while holding it (SIGSTOP, a debugger) makes anyone wait
            that long; writes to a label set this thread already used never wait.

    Raises:
        IncompatibleSegmentError: an explicit capacity differs from the existing
            registry's, or ``name`` holds another kind of segment.
        MetricConflictError: (from the metric definitions, not this call) a metric is
            defined differently in the existing registry -- e.g. a new deploy changed
            its buckets or labels: use a new registry name per version, or remove the
            old one first (``python -m safeshm rm NAME``).
    """
    global _default  # noqa: PLW0603 - the process-wide default, as prometheus_client's REGISTRY
    with _default_lock:
        current = _default
        if current is not None and not current.closed and current.name == name:
            MetricsRegistry.open(
                name, series=series, rows=rows, cells=cells, lock_timeout=lock_timeout
            ).close()
            current._lock_timeout = lock_timeout
            return current
        reg = MetricsRegistry.open(
            name, series=series, rows=rows, cells=cells, lock_timeout=lock_timeout
        )
        _default = reg
    for metric in list(_metrics):
        if metric._registry_arg is None:
            metric._unbind()
    return reg


def configured() -> MetricsRegistry | None:
    """The registry :func:`configure` opened in this process, if any (and still open)."""
    reg = _default
    return None if reg is None or reg.closed else reg


def _default_registry() -> MetricsRegistry:
    reg = _default
    if reg is None:
        raise NotConfiguredError(
            "no metrics registry is configured in this process: call "
            "safeshm.metrics.configure('myapp.metrics') at start-up (in every process that "
            "uses or exports metrics), or pass registry= to the metric"
        )
    return reg


# -- validation ------------------------------------------------------------------------------
def _label_values(names: tuple[str, ...], raw: Iterable[object]) -> tuple[str, ...]:
    values = tuple(str(v) for v in raw)
    for n, v in zip(names, values, strict=True):
        try:
            size = len(v.encode("utf-8"))
        except UnicodeEncodeError:
            raise LabelValueError(
                f"label {n!r}: the value {_short(v)} is not valid Unicode (a lone surrogate, "
                "e.g. from os.fsdecode()); it could not be exported. Decode it with "
                "errors='replace' first"
            ) from None
        if size > MAX_LABEL_VALUE_BYTES:
            raise LabelValueError(
                f"label {n!r}: the value {_short(v)} is {size} bytes long, more than "
                f"{MAX_LABEL_VALUE_BYTES}; label values are meant to be short and few"
            )
    return values


def _full_name(kind: str, name: str, namespace: str, subsystem: str, unit: str) -> str:
    for what, v in (("name", name), ("namespace", namespace), ("subsystem", subsystem)):
        if not isinstance(v, str):
            raise TypeError(f"metric {what} must be a str, not {type(v).__name__}")
    if not isinstance(unit, str):
        raise TypeError(f"unit must be a str, not {type(unit).__name__}")
    if not name:
        raise ValueError("Metric name should not be empty")
    full = "".join(f"{p}_" for p in (namespace, subsystem) if p) + name
    if kind == "counter" and full.endswith("_total"):
        full = full[:-6]
    if unit and not full.endswith("_" + unit):
        full += "_" + unit
    if not _METRIC_NAME_RE.match(full):
        raise ValueError(f"Invalid metric name: {full!r}")
    return full


def _labelnames(labelnames: Iterable[str], *, histogram: bool) -> tuple[str, ...]:
    if isinstance(labelnames, str):
        raise TypeError(
            f"labelnames must be a sequence of names, not the str {labelnames!r} "
            f"(write [{labelnames!r}])"
        )
    names = tuple(labelnames)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"label names must be str, not {type(n).__name__}")
        if not _LABEL_NAME_RE.match(n):
            raise ValueError(f"Invalid label metric name: {n!r}")
        if n.startswith("__"):
            raise ValueError(f"Reserved label metric name: {n!r}")
        if histogram and n == "le":
            raise ValueError("Reserved label metric name: 'le' (a histogram's bucket label)")
    if len(set(names)) != len(names):
        raise ValueError(f"Duplicate label names in {list(names)}")
    return names


def _buckets(buckets: Sequence[float | str]) -> tuple[float, ...]:
    if isinstance(buckets, str | bytes):
        raise TypeError("buckets must be a sequence of numbers")
    out = [float(b) for b in buckets]
    if any(math.isnan(b) for b in out):
        raise ValueError("Buckets must not be NaN")
    if out != sorted(out):
        raise ValueError("Buckets not in sorted order")
    if len(set(out)) != len(out):
        raise ValueError("Buckets must be distinct")
    if out and out[-1] != INF:
        out.append(INF)
    if len(out) < 2:
        raise ValueError("Must have at least two buckets")
    return tuple(out)


def _as_float(value: object, what: str = "amount", *, text_ok: bool = False) -> float:
    # As prometheus_client: amounts are numbers ("0.3" is a TypeError there: the value is
    # added to a float), only Gauge.set() converts with float().
    if not text_ok and isinstance(value, str | bytes | bytearray):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}") from None


# -- timers ----------------------------------------------------------------------------------
class _Timing:
    """A context manager and decorator calling ``done(seconds)`` (prometheus_client's
    ``Timer``)."""

    def __init__(self, done: Callable[[float], None]) -> None:
        self._done = done
        self._starts = threading.local()

    def __enter__(self) -> Self:
        starts = self._starts.__dict__.setdefault("s", [])
        starts.append(time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        start = self._starts.s.pop()
        self._done(max(time.perf_counter() - start, 0.0))

    def __call__(self, f: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(f)
        def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with self:
                return f(*args, **kwargs)

        return wrapped


class _Around:
    """A context manager and decorator running ``enter()`` and ``leave(exc)``."""

    def __init__(
        self, enter: Callable[[], None], leave: Callable[[BaseException | None], None]
    ) -> None:
        self._enter = enter
        self._leave = leave

    def __enter__(self) -> None:
        self._enter()

    def __exit__(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._leave(value)

    def __call__(self, f: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(f)
        def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with self:
                return f(*args, **kwargs)

        return wrapped


# -- the metrics -----------------------------------------------------------------------------
class _Metric:
    """What Counter, Gauge and Histogram share: definition, labels, binding."""

    _TYPE: ClassVar[int]

    _def: Definition
    _registry_arg: MetricsRegistry | None
    _parent: Self | None
    _labelvalues: tuple[str, ...] | None
    _children: dict[tuple[str, ...], Self]
    _lock: threading.Lock
    _bound: tuple[MetricsRegistry, Family] | None
    _reg: MetricsRegistry
    _ref: SeriesRef
    _cell: int
    _gen: int
    _genv: memoryview | None

    def _setup(  # noqa: PLR0917 - prometheus_client's positional signature
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        namespace: str,
        subsystem: str,
        unit: str,
        registry: MetricsRegistry | None,
        max_series: int | None,
        overflow: bool,
        *,
        buckets: tuple[float, ...] = (),
        mode: str = "",
    ) -> None:
        kind = TYPE_NAMES[self._TYPE]
        full = _full_name(kind, name, namespace, subsystem, unit)
        if not isinstance(documentation, str):
            raise TypeError(f"documentation must be a str, not {type(documentation).__name__}")
        names = _labelnames(labelnames, histogram=self._TYPE == HISTOGRAM)
        if registry is not None and not isinstance(registry, MetricsRegistry):
            raise TypeError(
                f"registry must be a safeshm.metrics.MetricsRegistry (or None: the one "
                f"safeshm.metrics.configure() opens), not {type(registry).__name__}; to "
                "export through a prometheus_client CollectorRegistry, register "
                "safeshm.metrics.Collector() with it"
            )
        if max_series is not None and (type(max_series) is not int or max_series < 1):
            raise ValueError(f"max_series must be a positive int or None, got {max_series!r}")
        if not isinstance(overflow, bool):
            raise TypeError(f"overflow must be a bool, not {type(overflow).__name__}")
        if overflow and not names:
            raise ValueError("overflow=True needs label names: an unlabelled metric has one series")
        self._def = Definition(
            name=full,
            type=self._TYPE,
            documentation=documentation,
            labelnames=names,
            unit=unit,
            buckets=buckets,
            mode=mode,
            max_series=max_series,
            overflow=overflow,
        )
        self._registry_arg = registry
        self._parent = None
        self._labelvalues = None if names else ()
        self._children = {}
        self._lock = threading.Lock()
        self._bound = None
        self._genv = None
        _metrics.add(self)
        if registry is not None or configured() is not None:
            self._binding()  # conflicts and capacity errors surface at definition
            if not names:
                self._resolve()

    def __repr__(self) -> str:
        d = self._def
        labels = ""
        if self._labelvalues:
            labels = ", labels=" + repr(dict(zip(d.labelnames, self._labelvalues, strict=True)))
        return f"safeshm.metrics.{type(self).__name__}({d.name!r}{labels})"

    # -- binding -----------------------------------------------------------------------------
    def _binding(self) -> tuple[MetricsRegistry, Family]:
        bound = self._bound
        reg = self._registry_arg
        if reg is None:
            reg = _default_registry()
        if bound is not None and bound[0] is reg:
            return bound
        fam = reg.family(self._def)
        self._bound = bound = (reg, fam)
        return bound

    def _unbind(self) -> None:
        self._bound = None
        self._genv = None
        for child in list(self._children.values()):
            child._genv = None

    def collect(self) -> list[Metric]:
        """This metric's family as a scrape shows it: every series, summed over
        processes (prometheus_client's ``Metric.collect()``; tests read values with it).
        On a child (``labels(...)``), its parent's whole family.

        Raises:
            NotConfiguredError: no registry (see :func:`configure`).
            ImportError: prometheus_client is not installed (``safeshm[prometheus]``).
        """
        from ._collector import _require_prometheus_client, families  # noqa: PLC0415 - a cycle

        _require_prometheus_client()
        reg, _ = self._binding()
        return list(families(reg, self._def.name))

    def _resolve(self) -> None:
        """(Re)find this series: at first use, after a registry switch, or after the
        series was removed (its generation changed)."""
        parent = self._parent or self
        values = self._labelvalues
        if values is None:
            raise ValueError(f"{TYPE_NAMES[self._TYPE]} metric is missing label values")
        reg, fam = parent._binding()
        ref = reg.series(fam, values)
        self._reg = reg
        self._ref = ref
        self._cell = ref.cell
        self._gen = ref.gen
        self._resolved(ref)
        self._genv = ref.genv  # last: the hot path's "resolved" check

    def _resolved(self, ref: SeriesRef) -> None:
        """Hook: a subclass's extra per-series fields."""

    # -- labels ------------------------------------------------------------------------------
    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        """The child for these label values (positional, or by name; converted with
        ``str()``), created at first use.

        Raises:
            ValueError: wrong count or names of values, or no label names defined.
            LabelValueError: a value is not encodable as UTF-8 (a lone surrogate) or
                longer than 1024 bytes; nothing is stored.
            CardinalityError: a new label set that does not fit (and no overflow); the
                message says which capacity ran out.
            LockTimeoutError: a new label set needs the registry's lock and its holder
                is stopped (see ``lock_timeout`` of :func:`configure`).
        """
        names = self._def.labelnames
        if not names:
            raise ValueError(f"No label names were set when constructing {self!r}")
        if self._labelvalues is not None:
            raise ValueError(f"{self!r} already has labels set; can not chain calls to .labels()")
        if labelvalues and labelkwargs:
            raise ValueError("Can't pass both *args and **kwargs")
        if labelkwargs:
            if sorted(labelkwargs) != sorted(names):
                raise ValueError("Incorrect label names")
            values = tuple(str(labelkwargs[n]) for n in names)
        else:
            if len(labelvalues) != len(names):
                raise ValueError("Incorrect label count")
            values = tuple(str(v) for v in labelvalues)
        child = self._children.get(values)
        if child is not None:
            return child
        _label_values(names, values)
        ovf_values = (OVERFLOW,) * len(names)
        child = self._overflow_child(values, ovf_values)
        if child is not None:
            return child  # no mutex for the excess label sets
        child = self._child(values)
        if self._registry_arg is not None or configured() is not None:
            child._resolve()  # a CardinalityError here caches nothing
            ovf = child._bound_overflow()
            if ovf and values != ovf_values:
                # Not cached under its values (the excess label sets must not grow this
                # process); the overflow child is, so the next excess label set skips
                # the mutex (see would_overflow).
                with self._lock:
                    return self._children.setdefault(ovf_values, self._child(ovf_values))
        with self._lock:
            return self._children.setdefault(values, child)

    def _overflow_child(self, values: tuple[str, ...], ovf_values: tuple[str, ...]) -> Self | None:
        """The cached overflow child if ``values``, new to this process, would land in
        the overflow series now (checked without the registry's mutex)."""
        if not self._def.overflow or values == ovf_values:
            return None
        ovf_child = self._children.get(ovf_values)
        if ovf_child is None:
            return None
        reg, fam = self._binding()
        return ovf_child if reg.would_overflow(fam, values) else None

    def _bound_overflow(self) -> bool:
        """Whether this (resolved) child landed in its family's overflow series."""
        parent = self._parent or self
        reg, fam = parent._binding()
        return reg._refresh_family(fam.id).overflow_sid == self._ref.sid

    def _child(self, values: tuple[str, ...]) -> Self:
        child = object.__new__(type(self))
        child.__dict__.update(
            {k: v for k, v in self.__dict__.items() if k not in ("_children", "_lock")}
        )
        child._parent = self
        child._labelvalues = values
        child._genv = None
        return child

    def remove(self, *labelvalues: object) -> None:
        """Remove a label set: it is no longer exported, and using it again starts it
        from zero. An ``inc()`` racing the removal may count in the revived series.

        Capacity: this frees room under the metric's ``max_series`` (which counts label
        sets in use) but **not** in the registry: the registry's ``series``, cells and
        definition space are used once per distinct label set ever seen, and a removed
        label set keeps its entry (for its revival). Label values that keep changing
        fill the registry even if each is removed after use.

        Raises:
            LabelValueError: a value is not valid Unicode or too long.
        """
        names = self._def.labelnames
        if not names:
            raise ValueError(f"No label names were set when constructing {self!r}")
        if len(labelvalues) != len(names):
            raise ValueError(
                f"Incorrect label count (expected {len(names)}, got {len(labelvalues)})"
            )
        values = _label_values(names, labelvalues)
        parent = self._parent or self
        reg, fam = parent._binding()
        reg.remove(fam, values)
        with parent._lock:
            parent._children.pop(values, None)

    def clear(self) -> None:
        """Remove every label set of this metric (see :meth:`remove`: the registry's
        capacity is not given back)."""
        parent = self._parent or self
        reg, fam = parent._binding()
        reg.clear(fam)
        with parent._lock:
            parent._children.clear()


class _Value:
    """What ``metric._value`` is, for test suites written against prometheus_client
    (whose private ``counter._value.get()`` they read): ``get()`` gives this series'
    value as a scrape shows it, every process included (0 when it has no value)."""

    __slots__ = ("_metric",)

    def __init__(self, metric: _Metric) -> None:
        self._metric = metric

    def get(self) -> float:
        m = self._metric
        if m._def.labelnames and m._labelvalues is None:
            raise ValueError(
                f"{m!r} has labels: read a child's value, metric.labels(...)._value.get()"
            )
        values = m._labelvalues or ()
        reg, _ = m._binding()
        for definition, samples in reg.snapshot():
            if definition.name == m._def.name:
                for labels, cells in samples:
                    if labels == values:
                        return cells[0]
        return 0.0


class Counter(_Metric):
    """A counter shared by every process: only goes up, and never goes backwards when a
    worker dies (even by SIGKILL, even mid-``inc``).

    Same constructor as ``prometheus_client.Counter``, plus ``max_series`` (a cap on
    this metric's label sets) and ``overflow`` (count label sets beyond the capacity
    into one series whose values are all ``"__overflow__"`` instead of raising
    :class:`~safeshm.metrics.CardinalityError`).

    Example:
        >>> REQUESTS = Counter("http_requests", "Requests served", ["method"])
        >>> REQUESTS.labels("GET").inc()  # doctest: +SKIP
    """

    _TYPE = COUNTER

    def __init__(  # noqa: PLR0917 - prometheus_client's signature
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        namespace: str = "",
        subsystem: str = "",
        unit: str = "",
        registry: MetricsRegistry | None = None,
        *,
        max_series: int | None = None,
        overflow: bool = False,
    ) -> None:
        self._setup(
            name, documentation, labelnames, namespace, subsystem, unit, registry, max_series,
            overflow,
        )  # fmt: skip

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (default 1).

        Raises:
            ValueError: ``amount`` is negative, or the metric has labels and this is
                not a child (use :meth:`labels`).
        """
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        try:
            if self._genv[0] == self._gen:  # type: ignore[index]
                self._reg._tls.row[self._cell] += amount
                return
        except (AttributeError, TypeError):
            pass
        self._inc_slow(amount)

    def _inc_slow(self, amount: float) -> None:
        amount = _as_float(amount)
        genv = self._genv
        if genv is None or genv[0] != self._gen:
            self._resolve()
        self._reg.add(self._cell, amount)

    @property
    def _value(self) -> _Value:
        """``counter._value.get()``: see :class:`_Value`."""
        return _Value(self)

    def count_exceptions(
        self, exception: type[BaseException] | tuple[type[BaseException], ...] = Exception
    ) -> _Around:
        """Count exceptions of type ``exception`` raised in a block or function (they
        still propagate). A context manager and a decorator."""

        def leave(exc: BaseException | None) -> None:
            if exc is not None and isinstance(exc, exception):
                self.inc()

        return _Around(lambda: None, leave)


class Gauge(_Metric):
    """A gauge: each process has its own value, combined by ``multiprocess_mode``.

    Modes: ``livesum`` (default), ``sum``, ``max``, ``livemax``, ``min``, ``livemin``,
    ``mostrecent``, ``livemostrecent``. The ``live`` modes count only processes alive
    at the scrape; the others keep a dead process's last value (folded into the
    registry's base row when its row is reused). ``all``/``liveall`` (one series per
    pid) are refused: they would grow with worker churn.
    """

    _TYPE = GAUGE
    _mostrecent: bool

    def __init__(  # noqa: PLR0917 - prometheus_client's signature
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        namespace: str = "",
        subsystem: str = "",
        unit: str = "",
        registry: MetricsRegistry | None = None,
        *,
        multiprocess_mode: str = "livesum",
        max_series: int | None = None,
        overflow: bool = False,
    ) -> None:
        if multiprocess_mode in ("all", "liveall"):
            raise ValueError(
                f"multiprocess_mode={multiprocess_mode!r} is not supported: one series per "
                "process grows with worker churn; use one of " + ", ".join(GAUGE_MODES)
            )
        if multiprocess_mode not in GAUGE_MODES:
            raise ValueError(f"Invalid multiprocess mode: {multiprocess_mode!r}")
        self._mostrecent = multiprocess_mode.endswith("mostrecent")
        self._setup(
            name, documentation, labelnames, namespace, subsystem, unit, registry, max_series,
            overflow, mode=multiprocess_mode,
        )  # fmt: skip

    def _write(self, value: object, *, add: bool, what: str = "amount") -> None:
        v = _as_float(value, what, text_ok=not add)
        genv = self._genv
        if genv is None or genv[0] != self._gen:
            self._resolve()
        self._reg.gauge_write(self._ref, v, add=add)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` to this process's value.

        Raises:
            RuntimeError: the mode is ``mostrecent``/``livemostrecent``.
        """
        if self._mostrecent:
            raise RuntimeError("inc must not be used with the mostrecent mode")
        self._write(amount, add=True)

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount`` from this process's value (see :meth:`inc`)."""
        if self._mostrecent:
            raise RuntimeError("dec must not be used with the mostrecent mode")
        self._write(-_as_float(amount), add=True)

    def set(self, value: float) -> None:
        """Set this process's value."""
        self._write(value, add=False, what="value")

    def set_to_current_time(self) -> None:
        """Set this process's value to the current Unix time."""
        self.set(time.time())

    def track_inprogress(self) -> _Around:
        """Add 1 while a block or function runs (a context manager and a decorator)."""
        return _Around(self.inc, lambda exc: self.dec())

    def time(self) -> _Timing:
        """Set the gauge to a block's or function's duration in seconds."""
        return _Timing(self.set)

    @property
    def _value(self) -> _Value:
        """``gauge._value.get()``: see :class:`_Value`."""
        return _Value(self)

    def _own_value(self) -> float:
        """This process's own current value (for tests)."""
        genv = self._genv
        if genv is None or genv[0] != self._gen:
            self._resolve()
        return self._reg.gauge_value(self._ref)


class Histogram(_Metric):
    """A histogram shared by every process (cumulative buckets at export).

    Same constructor as ``prometheus_client.Histogram`` (``buckets`` default to its
    ``DEFAULT_BUCKETS``; ``+Inf`` is added if missing), plus ``max_series`` and
    ``overflow`` as for :class:`Counter`.
    """

    _TYPE = HISTOGRAM
    _bounds: tuple[float, ...]
    _sum_cell: int

    def __init__(  # noqa: PLR0917 - prometheus_client's signature
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        namespace: str = "",
        subsystem: str = "",
        unit: str = "",
        registry: MetricsRegistry | None = None,
        buckets: Sequence[float | str] = DEFAULT_BUCKETS,
        *,
        max_series: int | None = None,
        overflow: bool = False,
    ) -> None:
        bounds = _buckets(buckets)
        self._bounds = bounds
        self._setup(
            name, documentation, labelnames, namespace, subsystem, unit, registry, max_series,
            overflow, buckets=bounds,
        )  # fmt: skip

    def _resolved(self, ref: SeriesRef) -> None:
        self._sum_cell = ref.cell + len(self._bounds)

    def observe(self, amount: float) -> None:
        """Count ``amount`` in its bucket and add it to the sum (NaN: into the sum only,
        as prometheus_client does)."""
        try:
            if self._genv[0] == self._gen and amount == amount:  # type: ignore[index]  # noqa: PLR0124 - NaN
                row = self._reg._tls.row
                row[self._cell + bisect.bisect_left(self._bounds, amount)] += 1.0
                row[self._sum_cell] += amount
                return
        except (AttributeError, TypeError):
            pass
        self._observe_slow(amount)

    def _observe_slow(self, amount: float) -> None:
        amount = _as_float(amount)
        genv = self._genv
        if genv is None or genv[0] != self._gen:
            self._resolve()
        reg = self._reg
        if amount == amount:  # noqa: PLR0124 - NaN: the sum only
            reg.add(self._cell + bisect.bisect_left(self._bounds, amount), 1.0)
        reg.add(self._sum_cell, amount)

    def time(self) -> _Timing:
        """Observe a block's or function's duration in seconds (a context manager and a
        decorator)."""
        return _Timing(self.observe)
