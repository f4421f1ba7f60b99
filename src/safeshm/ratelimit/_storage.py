"""The ``limits`` storages ``shm://`` and ``async+shm://`` (see :mod:`safeshm.ratelimit`)."""

from __future__ import annotations

import math
import urllib.parse
from typing import Any, ClassVar, Final

try:
    from limits.aio.storage import base as _aio_base
    from limits.storage import base as _base
except ImportError as e:
    raise ImportError(
        "safeshm.ratelimit's shm:// storage needs the 'limits' library: "
        "pip install 'safeshm[limits]'"
    ) from e

from safeshm._errors import SafeShmError
from safeshm._timeout import check_timeout

from ._table import DEFAULT_LOCK_TIMEOUT, RateLimitTable

_OPTIONS: Final = ("keys", "key_bytes", "entries")


def _table_from_uri(uri: str | None, options: dict[str, Any]) -> tuple[RateLimitTable, str]:
    """Parse ``shm://NAME[?opt=value&...]`` strictly (a path, a fragment, a blank name or
    a blank, valueless or repeated option is a ``ValueError``), then open the table."""
    usage = f"rate-limit storage URI {uri!r}: expected shm://NAME[?keys=N&...]"
    if not uri:
        raise ValueError("the shm:// storage needs a table name: shm://NAME")
    parsed = urllib.parse.urlsplit(uri)
    name = parsed.netloc
    if (
        not name.strip()
        or parsed.path
        or parsed.fragment
        or "#" in uri
        or (parsed.query == "" and "?" in uri)
    ):
        raise ValueError(usage)
    query: dict[str, str] = {}
    for field in parsed.query.split("&") if parsed.query else ():
        opt, eq, value = field.partition("=")
        opt, value = urllib.parse.unquote(opt), urllib.parse.unquote(value)
        if not eq or not opt or not value.strip():
            raise ValueError(f"{usage} (option {field!r} has no value)")
        if opt not in (*_OPTIONS, "lock_timeout"):
            raise ValueError(
                f"rate-limit storage URI {uri!r}: unknown option {opt!r} "
                f"(known: {', '.join(_OPTIONS)}, lock_timeout)"
            )
        if opt in query:
            raise ValueError(f"rate-limit storage URI {uri!r}: option {opt!r} given twice")
        query[opt] = value
    sizes = {opt: _int_option(uri, opt, v) for opt, v in query.items() if opt in _OPTIONS}
    lock_timeout = (
        _seconds_option(uri, query["lock_timeout"])
        if "lock_timeout" in query
        else DEFAULT_LOCK_TIMEOUT
    )
    for opt in _OPTIONS:
        if opt in options:
            sizes[opt] = _int_option(uri, opt, options.pop(opt))
    if "lock_timeout" in options:
        lock_timeout = options.pop("lock_timeout")
    if options:  # e.g. a typo in flask-limiter's storage_options: refused like the query's
        raise ValueError(
            f"rate-limit storage {uri!r}: unknown option(s) {', '.join(map(repr, options))} "
            f"(known: {', '.join(_OPTIONS)}, lock_timeout)"
        )
    try:
        checked = check_timeout(lock_timeout)  # before anything is created
    except (TypeError, ValueError) as e:
        raise type(e)(f"rate-limit storage {uri!r}: lock_timeout: {e}") from None
    if checked == math.inf:
        raise ValueError(
            f"rate-limit storage {uri!r}: lock_timeout={lock_timeout!r} must be a finite "
            "number of seconds (none: wait forever)"
        )
    table = RateLimitTable.open(name, **sizes)
    table.lock_timeout = checked
    return table, name


def _seconds_option(uri: str, value: str) -> float | None:
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"rate-limit storage {uri!r}: lock_timeout={value!r} is not a number of seconds"
        ) from None


def _int_option(uri: str, opt: str, value: object) -> int:
    """An int, or plain decimal digits (not ``int()``'s ``1_000``, ``+16``, `` 16``)."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise ValueError(f"rate-limit storage {uri!r}: {opt}={value!r} is not an int (decimal digits)")


class SharedMemoryStorage(
    _base.Storage,
    _base.MovingWindowSupport,
    _base.SlidingWindowCounterSupport,
    _base.TimestampedSlidingWindow,
):
    """A ``limits`` storage in a :class:`RateLimitTable`: ``shm://NAME[?keys=N&key_bytes=N&
    entries=N&lock_timeout=SECONDS]`` (the same options as keyword arguments, e.g.
    flask-limiter's ``storage_options``; a path, a fragment, a blank name, an unknown,
    blank or repeated option, a size that is not decimal digits, or a ``lock_timeout``
    that is negative or not finite is a ``ValueError``, and nothing is created).
    ``lock_timeout=0`` tries the lock once: any momentary contention raises
    :class:`~safeshm.LockTimeoutError`.

    Behaves like ``limits``' ``MemoryStorage`` (fixed window, moving window and
    sliding-window counter), but every process that opens ``NAME`` shares the counts,
    and each operation is atomic across them: a sliding-window hit checks and counts in
    one step (``MemoryStorage`` increments, then takes it back if another hit won).
    Keys of any length work (longer than ``key_bytes``: stored by a digest).

    Errors: :class:`RateLimitTableFullError` when the table has no room for a new key or
    window (nothing changes), :class:`~safeshm.LockTimeoutError` when the table's lock
    was not free within ``lock_timeout`` seconds (default 5; ``none``: wait forever) --
    a process holding it is frozen. Both are :attr:`base_exceptions`, so
    ``wrap_exceptions=True`` turns them into ``limits.errors.StorageError``, and
    flask-limiter's in-memory fallback applies.
    """

    STORAGE_SCHEME: ClassVar[list[str]] = ["shm"]  # type: ignore[misc]

    def __init__(
        self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any
    ) -> None:
        self.table, self.name = _table_from_uri(uri, options)
        self._uri = uri
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._uri, self.wrap_exceptions))

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return SafeShmError

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add ``amount`` to ``key``'s fixed-window counter (starting a window of
        ``expiry`` seconds if it had none); return the count."""
        return self.table.incr(key, expiry, amount)

    def decr(self, key: str, amount: int = 1) -> int:
        """Subtract ``amount`` from ``key``'s counter, not below zero."""
        return self.table.decr(key, amount)

    def get(self, key: str) -> int:
        """``key``'s fixed-window count (0 when expired)."""
        return self.table.get(key)

    def get_expiry(self, key: str) -> float:
        """When ``key``'s window ends (``time.time()``)."""
        return self.table.get_expiry(key)

    def check(self) -> bool:
        """Whether the table is usable (always, once opened)."""
        return not self.table.closed

    def reset(self) -> int | None:
        """Forget every limit in the table (for every process); return how many were live."""
        return self.table.reset()

    def clear(self, key: str) -> None:
        """Forget ``key``'s counter and moving window."""
        self.table.clear(key)

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Moving window: take ``amount`` entries if they fit in ``limit`` per ``expiry`` s."""
        return self.table.acquire_entry(key, limit, expiry, amount)

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """Moving window: ``(start of window, entries in it)``."""
        return self.table.moving_window(key, expiry)

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        """Sliding-window counter: count ``amount`` if the weighted count allows it."""
        return self.table.acquire_sliding_window_entry(key, limit, expiry, amount)

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        """Sliding-window counter: ``(previous count, its TTL, current count, its TTL)``."""
        return self.table.sliding_window(key, expiry)

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        """Sliding-window counter: forget both windows of ``key``."""
        self.table.clear_sliding_window(key, expiry)

    def close(self) -> None:
        """Close this process's handle on the table (the table lives on)."""
        self.table.close()

    def __repr__(self) -> str:
        return f"<SharedMemoryStorage {self.name!r}>"


class AsyncSharedMemoryStorage(
    _aio_base.Storage,
    _aio_base.MovingWindowSupport,
    _aio_base.SlidingWindowCounterSupport,
    _base.TimestampedSlidingWindow,
):
    """The ``limits.aio`` variant: ``async+shm://NAME``. Operations take microseconds
    and never wait on I/O, so they run inline on the event loop (a lock held by another
    process is held for microseconds too)."""

    STORAGE_SCHEME: ClassVar[list[str]] = ["async+shm"]  # type: ignore[misc]

    def __init__(
        self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any
    ) -> None:
        if uri and uri.startswith("async+"):
            uri = uri[len("async+") :]
        self._sync = SharedMemoryStorage(uri, **options)
        self.table = self._sync.table
        self.name = self._sync.name
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._sync._uri, self.wrap_exceptions))

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return SafeShmError

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """See :meth:`SharedMemoryStorage.incr`."""
        return self.table.incr(key, expiry, amount)

    async def decr(self, key: str, amount: int = 1) -> int:
        """See :meth:`SharedMemoryStorage.decr`."""
        return self.table.decr(key, amount)

    async def get(self, key: str) -> int:
        """See :meth:`SharedMemoryStorage.get`."""
        return self.table.get(key)

    async def get_expiry(self, key: str) -> float:
        """See :meth:`SharedMemoryStorage.get_expiry`."""
        return self.table.get_expiry(key)

    async def check(self) -> bool:
        """See :meth:`SharedMemoryStorage.check`."""
        return not self.table.closed

    async def reset(self) -> int | None:
        """See :meth:`SharedMemoryStorage.reset`."""
        return self.table.reset()

    async def clear(self, key: str) -> None:
        """See :meth:`SharedMemoryStorage.clear`."""
        self.table.clear(key)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """See :meth:`SharedMemoryStorage.acquire_entry`."""
        return self.table.acquire_entry(key, limit, expiry, amount)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """See :meth:`SharedMemoryStorage.get_moving_window`."""
        return self.table.moving_window(key, expiry)

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        """See :meth:`SharedMemoryStorage.acquire_sliding_window_entry`."""
        return self.table.acquire_sliding_window_entry(key, limit, expiry, amount)

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        """See :meth:`SharedMemoryStorage.get_sliding_window`."""
        return self.table.sliding_window(key, expiry)

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        """See :meth:`SharedMemoryStorage.clear_sliding_window`."""
        self.table.clear_sliding_window(key, expiry)

    def close(self) -> None:
        """Close this process's handle on the table (the table lives on)."""
        self.table.close()

    def __repr__(self) -> str:
        return f"<AsyncSharedMemoryStorage {self.name!r}>"
