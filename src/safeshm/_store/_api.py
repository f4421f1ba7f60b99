"""``SafeFileStore``: the mapping API, ``modify``, ``transaction`` and ``Transaction``."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import operator
import threading
from collections.abc import (
    Callable,
    Generator,
    ItemsView,
    Iterable,
    Iterator,
    MutableMapping,
    ValuesView,
)
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    overload,
)

from safeshm import _compat
from safeshm._errors import (
    LockReentryError,
    StoreClosedError,
    StoreNotFoundError,
)
from safeshm._lock import _CLevel, call_one
from safeshm._protocols import STORE_DURABLE, STORE_NOT_DURABLE, Guarantees
from safeshm._timeout import check_timeout, deadline

if TYPE_CHECKING:
    from _typeshed import SupportsKeysAndGetItem

    from ._check import RecoveryReport
from ._files import (
    open_directory,
)
from ._format import (
    COMPACT_MIN_BYTES,
    DEL,
    SET,
    StrPath,
    T,
    V,
    _check_size,
    _key_bytes,
)
from ._log import (
    _DEFAULT,
    _MISSING,
    _Log,
)
from ._serializers import (
    BytesSerializer,
    JSONSerializer,
    PickleSerializer,
    Serializer,
    SerializerName,
    _RawSerializer,
    _resolve_serializer,
)
from ._writer import (
    _process_writer,
    _ProcessWriter,
)


# --- the handle -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StoreStatistics:
    """A snapshot of a :class:`SafeFileStore` (see :meth:`SafeFileStore.statistics`)."""

    path: str
    keys: int
    generation: int
    """The log generation; each compaction starts a new one."""
    log_bytes: int
    """Size of the current log file."""
    live_bytes: int
    """Bytes of the records that hold current values (what a compaction would keep)."""
    durable: bool
    serializer: str
    compactions: int
    """Compactions this handle ran."""
    torn_tails_discarded: int
    """Half-written records left by killed writers that this handle discarded."""


class SafeFileStore(_Log[V], MutableMapping[str, V]):
    """A durable key-value store in a directory, safe across processes and threads.

    A typed ``MutableMapping[str, V]``. Values are JSON by default; ``serializer="bytes"``
    stores raw bytes, ``serializer="pickle"`` any picklable value (opt-in: unpickling runs
    code named by the data), and any :class:`Serializer` object works too.

    Guarantees:

    * Every operation is atomic and the history of all processes is serializable: a
      reader sees the old value or the new one, never a torn one; :meth:`modify` and
      :meth:`transaction` read and write under the store's write lock, so no update is
      lost, and a transaction is all-or-nothing even if its process is killed while it
      commits.
    * A writer killed at any instant (even by SIGKILL) leaves every key with a complete,
      committed value; the next writer discards its half-written record. (A write killed
      after its record was whole, while it synced, may still take effect -- whole -- when
      the next writer syncs.)
    * ``durable=True`` (the default): a write returns only after ``fdatasync``, so it
      survives power loss, and other handles see it only once it is on disk. Concurrent
      durable writers sync outside the write lock, so their syncs overlap (group commit);
      a lone one syncs holding it, which saves a second round trip through the lock.
      ``durable=False`` leaves flushing to the kernel (a crash of the machine may lose the
      last writes, never tear them).
    * Corruption on disk (a flipped byte, a truncated file) is detected by CRC-32 checksums,
      checked on every read, and raised as :class:`StoreCorruptedError`, never returned as
      data. Until the machine reboots the store also knows how far its writers got, so
      damage to the last acknowledged write, or a log cut short, raises too; after a
      reboot, or in a copy of the store, damage to the very last record or a cut exactly
      between two records looks like a write that never finished (the state before it is
      shown). :meth:`recover` saves what checks out of a damaged store.
    * Writes wait for the write lock as long as ``timeout`` says (per call, or the
      store's default); one that times out raises :class:`StoreTimeoutError` and writes
      nothing.
    * The directory is created ``0700`` and the files ``0600``; a directory that another
      user owns or can write into is refused (:class:`InsecureDirectoryError`); the store's
      own files are never opened through a symlink.
    * Space of overwritten and deleted values is reclaimed by compaction, automatically
      (when the log is over 4 MiB and more than twice the live data) or by
      :meth:`compact`, while other processes keep reading and writing.

    Reads take no lock (one ``fstat`` to notice other processes' writes); writes take a
    lock file (``fcntl.flock``, released by the kernel if the writer dies).

    Args:
        path: the store's directory (created, with its parents, if missing and ``create``).
        durable: ``fdatasync`` each write before returning.
        serializer: ``"json"``, ``"bytes"``, ``"pickle"`` or a :class:`Serializer`.
        create: with ``False``, a missing store raises ``StoreNotFoundError`` instead.
        timeout: how long a write waits for the write lock, in seconds, unless it says
            otherwise (``modify(..., timeout=)``, ``transaction(timeout=)``, ...):
            ``None`` (the default) waits as long as it takes, ``0`` tries once. A write
            that times out raises :class:`StoreTimeoutError` and writes nothing. Reads
            never wait for writers.

    Raises:
        InsecureDirectoryError: the directory or a file in it belongs to another user or
            can be written by others, or a store file is a symlink.
        IncompatibleStoreError: the directory holds other files and no store, or a store
            of another format or written with another serializer.
        StoreCorruptedError: a checksum does not match.
        StoreNotFoundError: ``create=False`` and there is no store (also a
            ``FileNotFoundError``).

    Example:
        >>> with SafeFileStore(path) as store:                       # doctest: +SKIP
        ...     store["job:42"] = {"batch": 17}
        ...     store.modify("processed", lambda n: n + 1, default=0)
        ...     with store.transaction() as tx:
        ...         tx["job:42"] = {"batch": 18}
        ...         tx["processed"] = tx["processed"] + 1
    """

    @overload
    def __init__(
        self: SafeFileStore[Any],
        path: StrPath,
        *,
        durable: bool = ...,
        serializer: Literal["json"] = ...,
        create: bool = ...,
        timeout: float | None = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: SafeFileStore[bytes],
        path: StrPath,
        *,
        durable: bool = ...,
        serializer: Literal["bytes"],
        create: bool = ...,
        timeout: float | None = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: SafeFileStore[Any],
        path: StrPath,
        *,
        durable: bool = ...,
        serializer: Literal["pickle"],
        create: bool = ...,
        timeout: float | None = ...,
    ) -> None: ...

    @overload
    def __init__(
        self,
        path: StrPath,
        *,
        durable: bool = ...,
        serializer: Serializer[V],
        create: bool = ...,
        timeout: float | None = ...,
    ) -> None: ...

    def __init__(
        self,
        path: StrPath,
        *,
        durable: bool = True,
        serializer: SerializerName | Serializer[Any] = "json",
        create: bool = True,
        timeout: float | None = None,
    ) -> None:
        self._closed = True  # until fully open: close() and __del__ must work on a failure
        self._log_fd = -1
        self._dir_fd = -1
        if not isinstance(durable, bool):
            raise TypeError(f"durable must be a bool, not {type(durable).__name__}")
        self._timeout = check_timeout(timeout)
        self._serializer: Serializer[V] = _resolve_serializer(serializer)
        # `safeshm store check/dump`: take the recorded serializer's name, and read every
        # byte of the log, not only what writers published.
        self._adopt_serializer_name = isinstance(serializer, _RawSerializer)
        self._durable = durable
        self._mutex = threading.RLock()
        self._pid = _compat.pid
        self._compactions = 0
        self._torn = 0
        self._compact_min = COMPACT_MIN_BYTES
        self._suspect = False  # a record that did not check out awaits _settle()
        self._stamp = 0  # see _stamp_of: set for each log this handle reads
        # A torn tail that a reader has seen (a writer discards it): what lies past _end,
        # so that later reads skip it until the log changes.
        self._torn_tail: bytes | None = None
        self._exclusive = False  # inside _settle(): writers are excluded
        # The trusted `position` end, read before the data that _apply is parsing: every
        # record before it was whole when written (see _acknowledged_end).
        self._ack = 0
        self._dir_fd, self._path = open_directory(path, create=create)
        try:
            if not create and self._read_current() is None:
                # Before anything is created: looking at a non-store leaves no trace.
                raise StoreNotFoundError(errno.ENOENT, "no SafeFileStore at this path", self._path)
            self._writer: _ProcessWriter | None = _process_writer(self._dir_fd, self._path)
            self._reset_log()
            self._refuse_reentry()
            with self._mutex:
                self._load_current(create=create)
            self._closed = False
            if self._suspect:
                self._settle()
        except BaseException:
            self._closed = True
            self._close_fds()
            raise

    # --- construction -----------------------------------------------------------------------
    @overload
    @classmethod
    def open(
        cls,
        path: StrPath,
        *,
        durable: bool = ...,
        serializer: Literal["json"] = ...,
        create: bool = ...,
        timeout: float | None = ...,
    ) -> SafeFileStore[Any]: ...

    @overload
    @classmethod
    def open(
        cls,
        path: StrPath,
        *,
        durable: bool = ...,
        serializer: Literal["bytes"],
        create: bool = ...,
        timeout: float | None = ...,
    ) -> SafeFileStore[bytes]: ...

    @overload
    @classmethod
    def open(
        cls,
        path: StrPath,
        *,
        durable: bool = ...,
        serializer: Literal["pickle"],
        create: bool = ...,
        timeout: float | None = ...,
    ) -> SafeFileStore[Any]: ...

    @overload
    @classmethod
    def open(
        cls,
        path: StrPath,
        *,
        durable: bool = ...,
        serializer: Serializer[T],
        create: bool = ...,
        timeout: float | None = ...,
    ) -> SafeFileStore[T]: ...

    @classmethod
    def open(
        cls,
        path: StrPath,
        *,
        durable: bool = True,
        serializer: SerializerName | Serializer[Any] = "json",
        create: bool = True,
        timeout: float | None = None,
    ) -> SafeFileStore[Any]:
        """Open the store at ``path``, creating it if needed: the same as the constructor
        (named like the shared-memory structures' ``open``)."""
        return cls(path, durable=durable, serializer=serializer, create=create, timeout=timeout)

    @staticmethod
    def recover(
        source: StrPath, destination: StrPath, *, serializer: str | None = None
    ) -> RecoveryReport:
        """Copy every record of the store at ``source`` that checks out into a new store
        at ``destination``, and say exactly what was lost: ``safeshm store recover``.

        For a store that cannot be opened because a record is damaged. The log is replayed
        from its start; each stretch that does not check out is skipped (and reported,
        with the keys it wrote as far as they can be read), every record that does is
        applied, so each key ends with its last write that survived. ``source`` is only
        read, never changed (not even its lock file); ``destination`` must be a new or
        empty directory and becomes a store with the same serializer. Check the report's
        :attr:`~RecoveryReport.lost_keys` (and the damage whose keys could not be read)
        before you replace the damaged store with the recovered one.

        Args:
            source: the damaged store's directory.
            destination: where to write the recovered store.
            serializer: the serializer's name, needed only when the log's HEADER record is
                damaged (the recovered store records it).

        Raises:
            FileExistsError: ``destination`` exists and is not an empty directory.
            StoreNotFoundError: there is no store at ``source``.
            StoreCorruptedError: the HEADER is damaged and no ``serializer`` was named.
        """
        from ._check import recover_store  # noqa: PLC0415 - _check builds on this module

        return recover_store(source, destination, serializer=serializer)

    # --- the mapping ------------------------------------------------------------------------
    def __getitem__(self, key: str) -> V:
        data = self._get_bytes(key)
        if data is None:
            raise KeyError(key)
        return self._serializer.loads(data)

    def __setitem__(self, key: str, value: V) -> None:
        kb = _key_bytes(key)
        data = self._dumps(value)
        _check_size(kb, data)
        self._write([(SET, kb, data)])

    def __delitem__(self, key: str) -> None:
        kb = _key_bytes(key)
        until = self._until(_DEFAULT)
        hold = self._hold(until)
        try:
            next(hold)
            if key not in self._index:
                raise KeyError(key)
            pending = self._commit([(DEL, kb, b"")])
        finally:
            hold.close()
        self._finish(pending, until)
        self._maybe_compact(until)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return self._read(lambda: key in self._index)

    def __iter__(self) -> Iterator[str]:
        """Iterate over a snapshot of the keys: changes made meanwhile, by this or another
        process, never break the iteration."""
        return iter(self._read(lambda: list(self._index)))

    def __len__(self) -> int:
        return self._read(lambda: len(self._index))

    def items(self) -> ItemsView[str, V]:
        """The items, as one consistent snapshot (never a mix of two states, and no
        ``KeyError`` when another process deletes a key while you iterate)."""
        return _ItemsSnapshot(self)

    def values(self) -> ValuesView[V]:
        """The values, as one consistent snapshot (see :meth:`items`)."""
        return _ValuesSnapshot(self)

    def to_dict(self) -> dict[str, V]:
        """All keys and values, as one consistent snapshot."""
        loads = self._serializer.loads
        return {key: loads(data) for key, data in self._snapshot()}

    # --- atomic compound operations ---------------------------------------------------------
    # MutableMapping's mixins would read and then write in two steps, each atomic but not
    # the pair; these run as one transaction.
    def _atomically(self, fn: Callable[[Transaction[V]], T], timeout: float | None) -> T:
        with self.transaction(timeout=timeout) as tx:
            return fn(tx)

    @overload
    def pop(self, key: str, /, *, timeout: float | None = ...) -> V: ...

    @overload
    def pop(self, key: str, default: V, /, *, timeout: float | None = ...) -> V: ...

    @overload
    def pop(self, key: str, default: T, /, *, timeout: float | None = ...) -> V | T: ...

    def pop(self, key: str, default: Any = _MISSING, /, *, timeout: float | None = _DEFAULT) -> Any:
        """Remove ``key`` and return its value (or ``default``), atomically.
        ``timeout``: as for :meth:`modify`."""
        if default is _MISSING:
            return self._atomically(lambda tx: tx.pop(key), timeout)
        return self._atomically(lambda tx: tx.pop(key, default), timeout)

    def popitem(self, *, timeout: float | None = _DEFAULT) -> tuple[str, V]:
        """Remove and return some ``(key, value)`` pair, atomically. ``timeout``: as for
        :meth:`modify`."""
        return self._atomically(lambda tx: tx.popitem(), timeout)

    @overload
    def setdefault(self, key: str, default: V, /, *, timeout: float | None = ...) -> V: ...

    @overload
    def setdefault(
        self: SafeFileStore[T | None],
        key: str,
        default: None = None,
        /,
        *,
        timeout: float | None = ...,
    ) -> T | None: ...

    def setdefault(
        self, key: str, default: Any = None, /, *, timeout: float | None = _DEFAULT
    ) -> Any:
        """Return the value of ``key``, first storing ``default`` if it is missing,
        atomically. ``timeout``: as for :meth:`modify`."""
        return self._atomically(lambda tx: tx.setdefault(key, default), timeout)

    def clear(self, *, timeout: float | None = _DEFAULT) -> None:
        """Delete every key, as one transaction. ``timeout``: as for :meth:`modify`."""
        self._atomically(lambda tx: tx.clear(), timeout)

    def update(
        self, other: SupportsKeysAndGetItem[str, V] | Iterable[tuple[str, V]] = (), /, **kwargs: V
    ) -> None:
        """Set several keys as one transaction: all of them or, on any error (an
        unencodable value, a bad key), none. Waits for the write lock as long as the
        store's ``timeout`` says (keyword arguments are keys here: for a timeout of its
        own, write ``with store.transaction(timeout=t) as tx: tx.update(...)``)."""
        self._atomically(lambda tx: tx.update(other, **kwargs), _DEFAULT)

    @overload
    def modify(self, key: str, fn: Callable[[V], V], *, timeout: float | None = ...) -> V: ...

    @overload
    def modify(
        self, key: str, fn: Callable[[V], V], default: V, *, timeout: float | None = ...
    ) -> V: ...

    def modify(
        self,
        key: str,
        fn: Callable[[V], V],
        default: V = _MISSING,
        *,
        timeout: float | None = _DEFAULT,
    ) -> V:
        """Atomically replace the value of ``key`` with ``fn(value)`` and return the new
        value.

        ``fn`` runs with the store's write lock held (keep it short and do not write to
        the store from it), so no other write, in any process, comes between the read and
        the write: ``store.modify("hits", lambda n: n + 1, default=0)`` never loses a count.

        Args:
            key: the key.
            fn: computes the new value from the current one.
            default: used as the current value when ``key`` is missing.
            timeout: seconds to wait for the write lock (``None``: as long as it takes;
                ``0``: try once); by default the store's ``timeout``.

        Raises:
            KeyError: ``key`` is missing and no ``default`` was given.
            StoreTimeoutError: the write lock was not free in time; nothing is written.
            Exception: whatever ``fn`` or the serializer raises; nothing is written.
        """
        kb = _key_bytes(key)
        until = self._until(timeout)
        hold = self._hold(until)
        try:
            next(hold)
            self._refuse_reentry()
            with self._mutex:
                data = self._value(key)
            if data is not None:
                current = self._serializer.loads(data)
            elif default is _MISSING:
                raise KeyError(key)
            else:
                current = default
            new = fn(current)
            encoded = self._dumps(new)
            _check_size(kb, encoded)
            pending = self._commit([(SET, kb, encoded)])
        finally:
            hold.close()
        self._finish(pending, until)
        self._maybe_compact(until)
        return new

    def transaction(self, *, timeout: float | None = _DEFAULT) -> Transaction[V]:
        """A multi-key, all-or-nothing, serializable transaction.

        ``with store.transaction() as tx:`` takes the store's write lock for the block:
        ``tx`` is a ``MutableMapping`` that reads the store's committed values and the
        block's own writes; on a normal exit all writes commit as one record (one
        ``fdatasync`` when durable), on an exception none do. Readers are never blocked;
        they see the state before or after the whole transaction. A process killed while
        it commits leaves the store as it was before (recovered by the next access).

        ``timeout``: seconds that entering the block waits for the write lock (``None``: as
        long as it takes; ``0``: try once); by default the store's ``timeout``.

        Raises:
            LockReentryError: this thread is already inside a transaction or modify().
            StoreTimeoutError: on entering the block, the write lock was not free in time.
        """
        return Transaction(self, self._timeout if timeout is _DEFAULT else check_timeout(timeout))

    def compact(self, *, timeout: float | None = _DEFAULT) -> None:
        """Rewrite the log with only the current values, reclaiming the space of
        overwritten and deleted ones.

        Safe while other processes read and write: writers wait for it (their lock is held
        while the new log is written), readers move over to the new log on their next read.
        A process killed at any point of it leaves the store readable and complete.

        ``timeout``: seconds to wait for the locks (``None``: as long as it takes); by
        default the store's ``timeout``. :class:`StoreTimeoutError` if they are not free in
        time, nothing changed.

        Raises:
            StoreCorruptedError: a record does not check out; nothing is rewritten (a
                compaction never copies damage under a fresh checksum).
        """
        until = self._until(timeout)
        if self._writer is not None and self._writer.mutex._is_owned():  # type: ignore[attr-defined]
            raise LockReentryError("compact() inside modify() or transaction()")
        maintenance = self._maintenance(until)
        try:
            if not next(maintenance):
                raise self._timed_out(until, "nothing was compacted")
            self._compact_locked(force=True, until=until)
        finally:
            maintenance.close()

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The store's directory, as given."""
        return self._path

    @property
    def durable(self) -> bool:
        return self._durable

    @property
    def guarantees(self) -> Guarantees:
        """What this store promises (``safeshm.Guarantees``): files on this machine's disk;
        with ``durable=True`` an acknowledged write survives a power loss (``"reboot"``),
        else a crash of the process but not of the machine (``"host"``)."""
        return STORE_DURABLE if self._durable else STORE_NOT_DURABLE

    @property
    def serializer(self) -> Serializer[V]:
        return self._serializer

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def timeout(self) -> float | None:
        """How long a write waits for the write lock by default, in seconds (``None``: as
        long as it takes); a write's own ``timeout=`` overrides it."""
        return self._timeout

    def statistics(self) -> StoreStatistics:
        """A consistent snapshot of the store's size and this handle's counters."""
        return self._read(
            lambda: StoreStatistics(
                path=self._path,
                keys=len(self._index),
                generation=self._generation,
                log_bytes=self._end,
                live_bytes=self._live,
                durable=self._durable,
                serializer=self._serializer.name,
                compactions=self._compactions,
                torn_tails_discarded=self._torn,
            )
        )

    def close(self) -> None:
        """Close this handle (idempotent). Other handles and processes are unaffected; the
        data stays on disk."""
        if self._pid != _compat.pid:
            # A forked child: another thread of the parent may have held _mutex at the
            # fork, and nobody in the child will release it (issue 10, a hang in close()).
            # The parent's writer is not ours either; closing needs no writer of its own.
            self._mutex = threading.RLock()
            self._pid = _compat.pid
            self._writer = None
        self._refuse_reentry()
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._close_fds()

    def __enter__(self) -> SafeFileStore[V]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(OSError):
                self._close_fds()

    def __reduce__(self) -> tuple[Any, ...]:
        serializer: object = self._serializer
        if type(serializer) in (JSONSerializer, BytesSerializer, PickleSerializer):
            serializer = self._serializer.name
        return (_reopen, (self._path, self._durable, serializer, self._timeout))

    def __repr__(self) -> str:
        try:
            state = ", closed=True" if self._closed else ""
            if self._timeout is not None:
                state = f", timeout={self._timeout!r}{state}"
            return (
                f"safeshm.SafeFileStore({self._path!r}, durable={self._durable}, "
                f"serializer={self._serializer.name!r}{state})"
            )
        except Exception:  # noqa: BLE001 - repr must never raise
            return "<safeshm.SafeFileStore (uninitialised)>"


class _ItemsSnapshot(ItemsView[str, V]):
    def __init__(self, store: SafeFileStore[V]) -> None:
        super().__init__(store)
        self._store = store

    def __iter__(self) -> Iterator[tuple[str, V]]:
        loads = self._store.serializer.loads
        for key, data in self._store._snapshot():
            yield key, loads(data)


class _ValuesSnapshot(ValuesView[V]):
    def __init__(self, store: SafeFileStore[V]) -> None:
        super().__init__(store)
        self._store = store

    def __iter__(self) -> Iterator[V]:
        loads = self._store.serializer.loads
        for _key, data in self._store._snapshot():
            yield loads(data)


def _reopen(
    path: str, durable: bool, serializer: Any, timeout: float | None = None
) -> SafeFileStore[Any]:
    return SafeFileStore(
        path, durable=durable, serializer=serializer, create=False, timeout=timeout
    )


def _operations(ops: dict[str, tuple[bytes, bytes | None]]) -> list[tuple[int, bytes, bytes]]:
    """A transaction's records: SET or DEL for each key it wrote (a function of its own,
    called under the transaction's try: the comment above _log._foreign_files)."""
    return [(SET, kb, value) if value is not None else (DEL, kb, b"") for kb, value in ops.values()]


class Transaction(MutableMapping[str, V], Generic[V]):
    """The view of a store inside ``with store.transaction() as tx:`` (see
    :meth:`SafeFileStore.transaction`). Values written to it are encoded at once (an
    unencodable value raises there, in the block), and committed together on exit."""

    def __init__(self, store: SafeFileStore[V], timeout: float | None) -> None:
        self._store = store
        self._timeout = timeout
        self._ops: dict[str, tuple[bytes, bytes | None]] = {}  # key -> (key bytes, value)
        self._state = "new"
        # The with statement looks __exit__ up before it calls __enter__: built here.
        self._run = self._hold_and_commit()
        self._exit_c = functools.partial(call_one, self._run.send)

    def __enter__(self) -> Transaction[V]:
        if self._state != "new":
            raise RuntimeError("a transaction can be entered only once")
        run = self._run
        try:
            next(run)  # takes the write lock (or raises, holding nothing)
        except BaseException:
            run.close()  # an exception right after next() returned: let go of the lock
            raise
        return self  # nothing that checks for a signal until the with block's cleanup

    if TYPE_CHECKING:

        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None: ...
    else:
        # One C-level call that resumes _hold_and_commit with the exception type: a Python
        # __exit__ would give a signal handler's exception a place to land -- its first
        # instruction -- before anything released the write lock.
        __exit__ = _CLevel(operator.attrgetter("_exit_c"))

    def _hold_and_commit(self) -> Generator[bool, type[BaseException] | None, None]:
        """The transaction's life: hold the write lock from ``__enter__`` until the with
        block ends (sent its exception type, ``None`` on a normal exit), commit on a
        normal exit, release, then sync and maybe compact."""
        store = self._store
        until = deadline(self._timeout)
        hold = store._hold(until)
        try:
            next(hold)
            self._state = "open"
            exc_type = yield False
            self._state = "done"
            ops = None if exc_type is not None else _operations(self._ops)
            pending = store._commit(ops) if ops else None
        finally:
            self._state = "done"
            hold.close()
        if ops:
            store._finish(pending, until)
            store._maybe_compact(until)
        yield False  # __exit__'s result: an exception from the block propagates

    def _check(self) -> None:
        if self._state != "open":
            raise StoreClosedError(
                "this transaction is not open: use it inside its "
                "`with store.transaction() as tx:` block"
            )

    def _lookup(self, key: str) -> bytes | None:
        self._check()
        op = self._ops.get(key)
        if op is not None:
            return op[1]
        return self._store._committed_value(key)

    def __getitem__(self, key: str) -> V:
        if not isinstance(key, str):
            raise TypeError(f"store keys are str, not {type(key).__name__}")
        data = self._lookup(key)
        if data is None:
            raise KeyError(key)
        return self._store.serializer.loads(data)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._lookup(key) is not None

    def __setitem__(self, key: str, value: V) -> None:
        self._check()
        kb = _key_bytes(key)
        data = self._store._dumps(value)
        _check_size(kb, data)
        self._ops.pop(key, None)  # re-inserted last: operations commit in the order made
        self._ops[key] = (kb, data)

    def __delitem__(self, key: str) -> None:
        kb = _key_bytes(key)
        if self._lookup(key) is None:
            raise KeyError(key)
        self._ops.pop(key, None)
        self._ops[key] = (kb, None)

    def _keys(self) -> list[str]:
        self._check()
        keys = dict.fromkeys(self._store._committed_keys())
        for key, (_kb, value) in self._ops.items():
            if value is None:
                keys.pop(key, None)
            else:
                keys[key] = None
        return list(keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __repr__(self) -> str:
        return f"<safeshm.Transaction on {self._store!r}, {self._state}>"
