"""Verification and recovery: ``safeshm store check``, ``dump`` and ``recover``."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import struct
from typing import (
    Final,
)

from safeshm._errors import (
    InsecureDirectoryError,
    StoreCorruptedError,
    StoreNotFoundError,
)

from ._api import (
    SafeFileStore,
)
from ._files import (
    _open_file,
    open_directory,
)
from ._format import (
    _GEN,
    _HDR_CRC_SPAN,
    _MAGIC,
    _POS_BITS,
    _POS_MASK,
    _TYPE_NAMES,
    CURRENT_FILE,
    HEADER,
    HEADER_BYTES,
    MOVED,
    SET,
    WRITE_LOCK_FILE,
    StrPath,
    _check_word,
    _crc32,
    _generation_of,
    _keys_of,
    _next_record,
    _ops_of,
    _parse_current,
    _record_length,
    _stamp_of,
    _torn_tail,
    _unpack_hdr,
    log_name,
)
from ._serializers import (
    _RawSerializer,
)


@dataclasses.dataclass(frozen=True)
class StoreReport:
    """What ``safeshm store check`` found (see :func:`check_store`)."""

    path: str
    generation: int
    serializer: str
    keys: int
    log_bytes: int
    live_bytes: int
    torn_tail_bytes: int
    """Bytes past the last acknowledged write: writes in progress (or syncing), or what a
    writer killed before it acknowledged left. The next write discards a half-written
    record; whole ones take effect when the next durable write syncs. Not an error."""


def _open_raw(path: StrPath) -> SafeFileStore[bytes]:
    return SafeFileStore(path, durable=False, serializer=_RawSerializer(), create=False)


def check_store(path: StrPath) -> StoreReport:
    """Verify every checksum of the store at ``path`` without changing anything.

    Raises:
        StoreCorruptedError: a checksum or the structure does not match.
        IncompatibleStoreError: the store has another format version.
        StoreNotFoundError: there is no store at ``path``.
    """
    report, _ = dump_store(path, want_values=False)
    return report


def dump_store(
    path: StrPath, *, want_values: bool = True
) -> tuple[StoreReport, list[tuple[str, bytes]]]:
    """The store's report and its ``(key, raw value bytes)`` pairs, verified."""
    with _open_raw(path) as store:
        pairs = store._snapshot() if want_values else []
        stats = store.statistics()
        # What lies past the acknowledged end (a write in progress, or one whose writer
        # was killed) is no data, but it must be what a killed writer leaves, not damage.
        tail = store._verify_tail()
        report = StoreReport(
            path=stats.path,
            generation=stats.generation,
            serializer=store.serializer.name,
            keys=stats.keys,
            log_bytes=stats.log_bytes,
            live_bytes=stats.live_bytes,
            torn_tail_bytes=tail,
        )
    return report, pairs


# --- recovery (safeshm store recover; the damage that store check names) ------------------
@dataclasses.dataclass(frozen=True)
class DamagedRecord:
    """A stretch of a store's log that does not check out (see
    :meth:`SafeFileStore.recover`)."""

    log: str
    """The log file it is in."""
    offset: int
    """Where it starts in that file, in bytes."""
    length: int
    """How many bytes were skipped: the record, as far as its own header tells (or up to
    the next record that checks out, when the header is damaged too)."""
    kind: str
    """``"SET"``, ``"DEL"``, ``"TXN"``, ... as its header says, or ``"unknown"`` when the
    header itself is damaged."""
    keys: tuple[str, ...]
    """The keys it wrote, as far as they can be read. Read from bytes that no checksum
    vouches for any more: a best guess, and empty when they cannot be read."""
    lost: tuple[str, ...]
    """Those of :attr:`keys` whose recovered value is older than this write (no later
    record that checks out wrote them): these keys lost this write. The other keys were
    written again later, so their recovered value is current."""


@dataclasses.dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`SafeFileStore.recover` (``safeshm store recover``) found and copied."""

    source: str
    destination: str | None
    """Where the records that check out were copied (``None``: only looked, as
    ``safeshm store check`` does)."""
    serializer: str
    keys: int
    """Keys in the recovered store."""
    records: int
    """Records that checked out and were replayed."""
    damaged: tuple[DamagedRecord, ...]
    """Every stretch that did not check out, in log order."""
    torn_tail_bytes: int
    """Bytes at the very end that look like a write that never finished (past the
    acknowledged end, when that is known): not counted as damage."""

    @property
    def lost_keys(self) -> tuple[str, ...]:
        """Every key whose recovered value misses a write (see :attr:`DamagedRecord.lost`),
        sorted. Damage whose keys could not be read adds none: see :attr:`damaged`."""
        return tuple(sorted({key for record in self.damaged for key in record.lost}))


def _trusted_position(dir_fd: int, log_fd: int, generation: int) -> int:
    """The acknowledged end of ``generation``'s log that the lock file publishes, if it
    is trusted (see ``_ProcessWriter``); 0 if not. Read, never mapped or written: recovery
    changes nothing in the store it reads."""
    try:
        fd = _open_file(dir_fd, WRITE_LOCK_FILE, os.O_RDONLY, "")
    except (OSError, InsecureDirectoryError):
        return 0
    try:
        words = os.pread(fd, 40, 0)
    finally:
        os.close(fd)
    if len(words) < 40:
        return 0
    stamp, position, check, synced = struct.unpack_from("<QQQQ", words, 8)
    if (
        not stamp
        or stamp != _stamp_of(os.fstat(log_fd))
        or check != _check_word(stamp, position, synced)
        or position >> _POS_BITS != generation
    ):
        return 0
    return int(position & _POS_MASK)


def _first_generation(dir_fd: int, where: str) -> int:
    """Where a scan starts: the generation ``CURRENT`` names or, if it is damaged or lost,
    the oldest log (the chain of MOVED records leads on from there)."""
    try:
        fd = _open_file(dir_fd, CURRENT_FILE, os.O_RDONLY, where)
    except FileNotFoundError:
        fd = -1
    if fd >= 0:
        try:
            data = os.read(fd, 256)
        finally:
            os.close(fd)
        with contextlib.suppress(StoreCorruptedError):
            return _parse_current(data, repr(where))
    found = [g for g in map(_generation_of, os.listdir(dir_fd)) if g is not None]
    if not found:
        raise StoreNotFoundError(errno.ENOENT, "no SafeFileStore at this path", where)
    return min(found)


class _Scan:
    """Replays the records of a store's logs that check out, and notes the others."""

    def __init__(self, serializer: str | None) -> None:
        self.serializer = serializer
        self.values: dict[str, bytes] = {}
        self.written: dict[str, int] = {}  # key -> the sequence number of its last write
        self.damaged: list[tuple[int, str, int, int, str, tuple[str, ...]]] = []
        self.records = self.torn = self.seq = 0

    def log(self, name: str, data: bytes, acknowledged: int) -> int | None:
        """Scan one log; the generation its MOVED record leads to, if any."""
        pos = 0
        while pos < len(data):
            self.seq += 1
            length = _record_length(data, pos)
            if length:
                following = self._apply(data, pos, length)
                if following is not None:
                    return following
                pos += length
                continue
            good = _next_record(data, pos + 1)
            if (
                good == len(data)
                and pos >= acknowledged
                and _torn_tail(memoryview(data)[pos:]) == "torn"
            ):
                self.torn += len(data) - pos  # what a killed writer leaves: no damage
                return None
            kind, end = "unknown", good
            keys: tuple[str, ...] = ()
            if len(data) - pos >= HEADER_BYTES:
                magic, rtype, _flags, klen, vlen, _bc, head_crc = _unpack_hdr(data, pos)
                stop = pos + HEADER_BYTES + klen + vlen
                if (
                    magic == _MAGIC
                    and _crc32(data[pos : pos + _HDR_CRC_SPAN]) == head_crc
                    and stop <= good
                ):
                    kind, end = _TYPE_NAMES.get(rtype, f"type {rtype}"), stop
                    keys = _keys_of(
                        _ops_of(rtype, memoryview(data)[pos + HEADER_BYTES : stop], klen)
                    )
            self.damaged.append((self.seq, name, pos, end - pos, kind, keys))
            pos = end
        return None

    def _apply(self, data: bytes, pos: int, length: int) -> int | None:
        _magic, rtype, _flags, klen, _vlen, _bc, _hc = _unpack_hdr(data, pos)
        body = memoryview(data)[pos + HEADER_BYTES : pos + length]
        self.records += 1
        if rtype == HEADER and pos == 0 and self.serializer is None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.serializer = str(json.loads(bytes(body[klen:]))["serializer"])
        elif rtype == MOVED and len(body) - klen == _GEN.size:
            return int(_GEN.unpack_from(body, klen)[0])
        for op, key, value in _ops_of(rtype, body, klen):
            with contextlib.suppress(UnicodeDecodeError):
                text = key.decode()
                self.written[text] = self.seq
                if op == SET:
                    self.values[text] = value
                else:
                    self.values.pop(text, None)
        return None

    def report(self, where: str) -> RecoveryReport:
        if self.serializer is None:
            raise StoreCorruptedError(
                f"{where!r}: the log's HEADER record is damaged, so the serializer is "
                f"unknown; name it (serializer='json', 'bytes', 'pickle' or your "
                f"serializer's name)"
            )
        return RecoveryReport(
            source=where,
            destination=None,
            serializer=self.serializer,
            keys=len(self.values),
            records=self.records,
            torn_tail_bytes=self.torn,
            damaged=tuple(
                DamagedRecord(
                    log=name,
                    offset=pos,
                    length=length,
                    kind=kind,
                    keys=keys,
                    lost=tuple(k for k in keys if self.written.get(k, 0) < seq),
                )
                for seq, name, pos, length, kind, keys in self.damaged
            ),
        )


def _scan(path: StrPath, serializer: str | None = None) -> tuple[RecoveryReport, dict[str, bytes]]:
    """Replay every record of the store at ``path`` that checks out, skipping damage;
    change nothing there. The report (no destination) and the recovered values."""
    dir_fd, where = open_directory(path, create=False)
    scan = _Scan(serializer)
    try:
        _scan_logs(scan, dir_fd, where)  # the loop in a function of its own: _log.py's header
    finally:
        os.close(dir_fd)
    return scan.report(where), scan.values


def _scan_logs(scan: _Scan, dir_fd: int, where: str) -> None:
    """Feed ``scan`` each log of the chain, from the first generation on."""
    generation: int | None = _first_generation(dir_fd, where)
    while generation is not None:
        name = log_name(generation)
        fd = _open_file(dir_fd, name, os.O_RDONLY, where)
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size else b""
            acknowledged = _trusted_position(dir_fd, fd, generation)
        finally:
            os.close(fd)
        generation = scan.log(name, data, acknowledged)
        if generation is not None and log_name(generation) not in os.listdir(dir_fd):
            generation = None  # a compaction's MOVED whose log is gone: nothing more


def scan_store(path: StrPath) -> RecoveryReport:
    """What :meth:`SafeFileStore.recover` would recover from ``path``, without writing
    anything anywhere (``safeshm store check`` names damage with it)."""
    return _scan(path)[0]


# A recovered store is written in transactions of about this many bytes (one record each).
_RECOVER_BATCH: Final = 64 << 20


def recover_store(
    source: StrPath, destination: StrPath, *, serializer: str | None = None
) -> RecoveryReport:
    """See :meth:`SafeFileStore.recover`."""
    if serializer is not None and not isinstance(serializer, str):
        raise TypeError("serializer must be the name a store records, as a str")
    dest = os.fspath(destination)
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise FileExistsError(
            errno.EEXIST, "the destination of a recovery must be a new or empty directory", dest
        )
    if os.path.realpath(dest) == os.path.realpath(os.fspath(source)):
        raise ValueError("recovery never writes into the store it reads: give another directory")
    report, values = _scan(source, serializer)
    raw = _RawSerializer()
    raw.name = report.serializer  # the recovered store records the original's serializer
    with SafeFileStore(dest, durable=True, serializer=raw) as store:
        _write_in_batches(store, values)
    return dataclasses.replace(report, destination=dest)


def _write_in_batches(store: SafeFileStore[bytes], values: dict[str, bytes]) -> None:
    """A function of its own: on 3.13 a signal handler's exception at a loop's back edge
    can skip the enclosing with's exit (tests/test_async_bytecode.py)."""
    batch: dict[str, bytes] = {}
    size = 0
    for key, value in values.items():
        batch[key] = value
        size += len(key) + len(value) + 16
        if size >= _RECOVER_BATCH:
            store.update(batch)
            batch, size = {}, 0
    store.update(batch)
