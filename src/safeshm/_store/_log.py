"""The log as a handle sees it: its index, catching up with other processes,
classifying what does not check out, appending (and group commit), compaction."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import threading
from collections.abc import Callable, Generator
from typing import (
    Any,
    Final,
    Generic,
    NoReturn,
    cast,
)

from safeshm import _compat
from safeshm._errors import (
    IncompatibleStoreError,
    LockReentryError,
    StoreClosedError,
    StoreCorruptedError,
    StoreNotFoundError,
    StoreTimeoutError,
)
from safeshm._timeout import check_timeout, deadline

from ._files import (
    _open_file,
    _replace_file,
    _unlink_quietly,
    _write_all,
)
from ._format import (
    _CACHE_LIMIT,
    _GEN,
    _HDR_CRC_SPAN,
    _MAGIC,
    _OPEN_RETRIES,
    _POS_MASK,
    _SUB,
    _TMP_SUFFIX,
    CURRENT_FILE,
    DEL,
    FORMAT_VERSION,
    HEADER,
    HEADER_BYTES,
    MAINTENANCE_LOCK_FILE,
    MOVED,
    SET,
    TXN,
    WRITE_LOCK_FILE,
    T,
    V,
    _crc32,
    _current_text,
    _encode_txn,
    _generation_of,
    _is_our_file,
    _pack,
    _parse_current,
    _record_length,
    _stamp_of,
    _torn_tail,
    _unpack_hdr,
    encode_record,
    log_name,
)
from ._serializers import (
    Serializer,
    _RawSerializer,
)
from ._writer import (
    _acquire_mutex,
    _lock_exclusive,
    _poll_exclusive,
    _process_writer,
    _ProcessWriter,
)

_MISSING: Final[Any] = object()


class _StoreDefault:
    """The default of a write's ``timeout=``: the store's own (see ``SafeFileStore``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<the store's timeout>"


_DEFAULT: Final[Any] = _StoreDefault()


_DELETED: Final[Any] = object()


# An index entry: the value's bytes (None when it is larger than _CACHE_LIMIT), its
# offset and length in the log, the size of the record it came in (for the space
# accounting that triggers compaction), and the start and length of the whole record that
# holds it (a value read from the file is checked against that record's checksums on
# every read: the file may have changed since it was indexed).
_Entry = tuple[bytes | None, int, int, int, int, int]


# A durable write waiting for its fdatasync (see SafeFileStore._finish): the process's
# writer, the log's stamp and generation, the record's end, and a descriptor of the log.
_Pending = tuple[_ProcessWriter, int, int, int, int]


class _Log(Generic[V]):
    """The log side of a :class:`SafeFileStore` handle (see the package docstring);
    the mapping API is built on it in ``_api``."""

    # Set by SafeFileStore.__init__ and _reset_log.
    _closed: bool
    _log_fd: int
    _dir_fd: int
    _path: str
    _serializer: Serializer[V]
    _adopt_serializer_name: bool
    _durable: bool
    _timeout: float | None
    # An RLock only so that _refuse_reentry can ask whether this thread holds it: it is
    # never taken twice (a signal handler's use of the handle it interrupted is refused).
    _mutex: threading.RLock
    _pid: int
    _compactions: int
    _torn: int
    _compact_min: int
    _suspect: bool
    _stamp: int
    _torn_tail: bytes | None
    _exclusive: bool
    _ack: int
    _writer: _ProcessWriter | None
    _seen: int
    _generation: int
    _end: int
    _index: dict[str, _Entry]
    _live: int

    def _reset_log(self) -> None:
        self._seen = -1  # a published word this handle checked and has read up to
        self._torn_tail = None
        self._generation = 0
        self._end = 0
        self._index: dict[str, _Entry] = {}
        self._live = 0

    def _load_current(self, *, create: bool) -> None:
        """Open the generation that ``CURRENT`` names (initialising an empty store under the
        maintenance lock) and read it."""
        for _ in range(_OPEN_RETRIES):
            generation = self._read_current()
            if generation is None:
                if not create:
                    raise StoreNotFoundError(
                        errno.ENOENT, "no SafeFileStore at this path", self._path
                    )
                self._initialise()
                continue
            try:
                self._switch_to(generation)
            except FileNotFoundError:
                continue  # a compaction replaced it between our two reads: read CURRENT again
            return
        raise StoreCorruptedError(f"{self._path!r}: {CURRENT_FILE} names a log that does not exist")

    def _read_current(self) -> int | None:
        try:
            fd = _open_file(self._dir_fd, CURRENT_FILE, os.O_RDONLY, self._path)
        except FileNotFoundError:
            return None
        try:
            data = os.read(fd, 256)
        finally:
            os.close(fd)
        return _parse_current(data, repr(self._path))

    def _maintenance(self, until: float = math.inf) -> Generator[bool, None, None]:
        """Hold the maintenance lock (creating the store, compacting it) from the first
        ``next()`` -- which says whether it was taken before ``until`` -- until the
        generator is closed. Used like :meth:`_hold`, for the same reason: a flock on a
        descriptor of its own, which closing drops, all in C."""
        if self._dir_fd < 0:
            raise self._closed_error()
        st = os.fstat(self._dir_fd)
        key = (st.st_dev, st.st_ino)
        held = _maintenance_held()
        if key in held:
            # This thread holds it already: a signal handler that compacts the store whose
            # compaction it interrupted. A flock on a descriptor of its own would wait for
            # ever for this very thread.
            if until == -math.inf:
                yield False  # try once: as if another process were compacting
                return
            raise LockReentryError(
                f"SafeFileStore {self._path!r}: this thread is already compacting this store "
                "(a signal handler that compacts the store whose compaction it interrupted?)"
            )
        fd = _open_file(self._dir_fd, MAINTENANCE_LOCK_FILE, os.O_RDWR, self._path, create=True)
        try:
            held.add(key)  # inside the try: the finally takes it out, whatever lands
            if until == math.inf:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield True
            else:
                yield _poll_exclusive(fd, until)
        finally:
            try:
                os.close(fd)
            finally:
                held.discard(key)

    def _initialise(self) -> None:
        maintenance = self._maintenance()
        try:
            next(maintenance)
            if self._read_current() is not None:
                return  # another process initialised it first
            foreign = _foreign_files(self._dir_fd)
            if foreign:
                shown = ", ".join(sorted(foreign)[:5])
                raise IncompatibleStoreError(
                    f"{self._path!r} is not empty and holds no SafeFileStore "
                    f"(found {shown}); use an empty or new directory"
                )
            self._remove_initialisation_debris()
            self._write_generation(1, [])
            _replace_file(self._dir_fd, CURRENT_FILE, _current_text(1), self._path)
        finally:
            maintenance.close()

    def _remove_initialisation_debris(self) -> None:
        """An initialisation killed before it wrote CURRENT leaves temp files and a log
        holding only its HEADER: debris, removed. A log with records in it means CURRENT
        was lost from a store in use: that is for a person to look at."""
        for name in os.listdir(self._dir_fd):
            if name.endswith(_TMP_SUFFIX):
                _unlink_quietly(self._dir_fd, name)
            elif _generation_of(name) is not None:
                if not self._only_header(name):
                    raise StoreCorruptedError(
                        f"{self._path!r} has no {CURRENT_FILE} but its log {name} holds "
                        f"data; restore {CURRENT_FILE} or move the logs away"
                    )
                _unlink_quietly(self._dir_fd, name)

    def _only_header(self, name: str) -> bool:
        fd = _open_file(self._dir_fd, name, os.O_RDONLY, self._path)
        try:
            data = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        if len(data) < HEADER_BYTES:
            return True
        _magic, rtype, _flags, klen, vlen, _bc, _hc = _unpack_hdr(data, 0)
        return bool(rtype == HEADER and len(data) <= HEADER_BYTES + klen + vlen)

    def _header_record(self) -> bytes:
        meta = {"format": FORMAT_VERSION, "serializer": self._serializer.name}
        return encode_record(HEADER, b"", json.dumps(meta, sort_keys=True).encode())

    def _write_generation(self, generation: int, records: list[bytes]) -> None:
        """Write a complete log file for ``generation`` and publish it under its name
        (the file is never visible half-written)."""
        name = log_name(generation)
        tmp = name + _TMP_SUFFIX
        _unlink_quietly(self._dir_fd, tmp)
        fd = _open_file(self._dir_fd, tmp, os.O_WRONLY | os.O_EXCL, self._path, create=True)
        try:
            _write_all(fd, self._header_record())
            _write_records(fd, records)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(self._dir_fd, tmp)
            raise
        os.close(fd)
        os.replace(tmp, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        os.fsync(self._dir_fd)

    def _switch_to(self, generation: int) -> None:
        """Make ``generation``'s log the one this handle reads (from its start)."""
        fd = _open_file(self._dir_fd, log_name(generation), os.O_RDWR | os.O_APPEND, self._path)
        try:
            stamp = _stamp_of(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        # Stores only, no call, until the handle is on the new log as a whole (and reads it
        # from its start): a signal handler's exception half-way would leave a handle with
        # one log's descriptor and another's stamp or index.
        old = self._log_fd
        self._log_fd = fd
        self._seen = -1
        self._torn_tail = None
        self._generation = generation
        self._end = 0
        self._index = {}
        self._live = 0
        self._stamp = stamp
        if old >= 0:
            os.close(old)
        # What was acknowledged, read before the size: a writer that appends and publishes
        # in between would otherwise look like a cut in the log.
        acknowledged = self._acknowledged_end()
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            self._corrupt(0, "the log is empty (a published log always holds its HEADER)")
        if size < acknowledged:
            self._truncated(size, acknowledged)
        published = self._published(generation)
        if published is not None:
            # What was acknowledged, like every other reader (a writer's _sync_as_writer
            # deals with anything after it).
            size = min(size, published)
        self._catch_up(size)

    # --- reading the log --------------------------------------------------------------------
    def _acknowledged_end(self) -> int:
        """The end of this handle's log up to which every record was whole when written,
        if the published hints are trusted (this boot, this very file); else 0.

        That is the ``position`` word: a writer publishes it only after its ``write``
        returned (and takes a short write back first), and nobody truncates below it. So a
        record before it that does not check out is damage, never a torn write, and a file
        shorter than it was cut. After a reboot, or in a copy of the store, the hints are
        not trusted and the file alone decides: damage to the last record, or a cut at a
        record boundary, then looks like a write that never finished (see
        ``docs/design.md``)."""
        writer = self._writer
        if writer is None or writer.fd < 0:
            return 0
        hints = writer.hints(self._stamp, self._generation)
        return 0 if hints is None else int(hints[0] & _POS_MASK)

    def _truncated(self, size: int, acknowledged: int) -> NoReturn:
        raise StoreCorruptedError(
            f"{self._path!r}: {log_name(self._generation)} is corrupt at byte {size}: the "
            f"file ends there, but its writers acknowledged {acknowledged} bytes (it was "
            f"truncated or replaced; if you restored it from a backup, also remove "
            f"{WRITE_LOCK_FILE}, which holds only hints about the log it replaced)"
        )

    def _published(self, generation: int) -> int | None:
        """The end of ``generation``'s log that readers may see (``synced``), if trusted."""
        writer = self._writer
        if writer is None or writer.fd < 0:
            return None
        hints = writer.hints(self._stamp, generation)
        if hints is None:
            return None
        synced = hints[1]
        end = int(synced & _POS_MASK)
        if end <= self._end and generation == self._generation:
            # Checked, and read up to (or past: a writer reads what is not synced yet):
            # the next reads compare only this word.
            self._seen = synced
        return end

    def _refresh(self) -> None:
        """Apply what other processes appended since we last looked (caller holds _mutex).

        Reads up to the published ``synced`` end (acknowledged writes: no system call when
        nothing changed, and never a write in progress or not yet on disk); without
        trusted hints, up to the end of the file.
        """
        writer = self._writer
        if writer is not None and writer.fd >= 0 and writer.synced.value == self._seen:
            return  # the word this handle checked and read up to: nothing new
        size = self._published(self._generation)
        if size is None:
            # lseek(SEEK_END) is the file size, at a third of fstat's cost; the offset it
            # moves is used by nobody (O_APPEND writes, positioned reads).
            size = os.lseek(self._log_fd, 0, os.SEEK_END)
            if size != self._end:
                self._catch_up(size)
        elif size > self._end:
            self._catch_up(size)

    def _sync_as_writer(self, writer: _ProcessWriter) -> None:
        """With the write lock held: bring the log and this handle to one end, and publish
        it (caller holds _mutex).

        Past a trusted published ``position`` lies only what a writer killed before it
        published its end left (in its ``write``, or, alone, in its sync), and it is
        discarded, complete or not. Without trusted hints (a reboot, a copied store) the
        file decides: every whole record counts, a torn tail is discarded (see
        :meth:`_classify_tail`). A compaction is followed either way.
        """
        for _ in range(_OPEN_RETRIES):
            fd = self._log_fd
            size = os.lseek(fd, 0, os.SEEK_END)
            hints = writer.hints(self._stamp, self._generation)
            published = int(hints[0] & _POS_MASK) if hints is not None else None
            if published is not None and size < published:
                self._truncated(size, published)
            if published is not None and self._end <= published < size:
                if published > self._end:
                    self._catch_up(published)
                    continue  # (a MOVED record may have switched the log)
                rest = os.pread(fd, size - published, published)
                verdict = _torn_tail(memoryview(rest))
                if verdict == "corrupt":  # not what a writer leaves
                    self._corrupt(
                        published, "a record whose checksum does not match, with more data after it"
                    )
                if verdict is None and rest[2] == MOVED:
                    # A compaction killed between its commit point and publishing it: the
                    # new generation is complete and durable, and is the store now.
                    self._catch_up(size)
                    continue
                os.ftruncate(fd, published)
                if self._durable:
                    os.fdatasync(fd)
                self._torn += 1
                continue
            if size == self._end:
                position = _pack(self._generation, size)
                # Records between `synced` and `position` are complete: durable writers'
                # in the middle of their fdatasync (they move `synced` past them), or ones
                # killed there (the next durable writer's sync covers them). Without
                # trusted hints, everything whole in the file is what readers see.
                synced = hints[1] if hints is not None and published == size else position
                writer.publish(self._stamp, position, synced)
                return
            self._catch_up(size)
        raise StoreCorruptedError(f"{self._path!r}: the log keeps changing under its writer")

    def _catch_up(self, size: int) -> None:
        while True:
            if size < self._end:
                raise StoreCorruptedError(
                    f"{self._path!r}: {log_name(self._generation)} shrank below data already "
                    f"read ({size} < {self._end} bytes); was it modified by another program?"
                )
            # Read what is acknowledged before the data: what a writer published after our
            # read could make a write that was still in progress look like damage.
            self._ack = self._acknowledged_end()
            # Shorter than asked when a published position is not trusted (a copied store:
            # the file decides), or when the file was cut (below what was acknowledged: the
            # records there are missing, reported when _apply stops short of them).
            data = os.pread(self._log_fd, size - self._end, self._end)
            if self._torn_tail is not None:
                writer = self._writer
                if data == self._torn_tail and not (
                    writer is not None and writer.owner == threading.get_ident()
                ):
                    return  # still the torn tail a reader may skip; a writer discards it
                self._torn_tail = None
            moved_to = self._apply(data)
            if moved_to is None:
                return
            try:
                self._switch_to(moved_to)
            except FileNotFoundError:
                # Compacted again already: CURRENT leads to the newer generation.
                self._load_current(create=False)
            return

    def _apply(self, data: bytes) -> int | None:  # noqa: PLR0912, PLR0915 - see the comment
        """Apply the complete, valid records at the start of ``data`` (which starts at
        ``self._end``); return the generation a MOVED record points to, if one is read."""
        # The hot loop of every reader and writer that catches up: locals, and the common
        # case (a SET of a small value) written out; bytes slices of small records are
        # cheaper than memoryview slices, large ones are only looked at through the view.
        view = memoryview(data)
        pos = 0
        total = len(data)
        base = self._end
        index = self._index
        live = 0
        while pos < total:
            if total - pos < HEADER_BYTES:
                self._stopped(base + pos)
                break
            magic, rtype, _flags, klen, vlen, body_crc, head_crc = _unpack_hdr(data, pos)
            if magic != _MAGIC or _crc32(data[pos : pos + _HDR_CRC_SPAN]) != head_crc:
                self._stopped(base + pos)
                break
            body = pos + HEADER_BYTES
            vstart = body + klen
            end = vstart + vlen
            if end > total or _crc32(view[body:end]) != body_crc:
                self._stopped(base + pos)
                break
            if rtype == SET and base + pos:
                try:
                    key = data[body:vstart].decode()
                except UnicodeDecodeError:
                    self._corrupt(base + pos, "a key that is not UTF-8")
                old = index.get(key)
                if old is not None:
                    live -= old[3]
                index[key] = (
                    data[vstart:end] if vlen <= _CACHE_LIMIT else None,
                    base + vstart,
                    vlen,
                    end - pos,
                    base + pos,
                    end - pos,
                )
                live += end - pos
                pos = end
                continue
            if (base + pos == 0) != (rtype == HEADER):
                self._corrupt(base + pos, "a HEADER record out of place, or a log without one")
            if rtype == DEL:
                self._drop(index, self._key_at(view, body, klen, base + pos))
            elif rtype == TXN:
                self._apply_txn(view, body + klen, end, base, pos)
            elif rtype == HEADER:
                self._check_header(bytes(view[body + klen : end]))
                self._live += end - pos
            elif rtype == MOVED:
                if vlen != _GEN.size:
                    self._corrupt(base + pos, "a MOVED record of the wrong size")
                # _end stays before the MOVED record: the caller switches logs next, and
                # a signal handler's exception before it did must leave the record to be
                # read again (past it, this handle would stay on the old log for good,
                # writing where nobody reads).
                self._end = base + pos
                self._live += live
                (generation,) = _GEN.unpack_from(view, body + klen)
                return int(generation)
            else:
                self._corrupt(base + pos, f"a record of unknown type {rtype}")
            pos = end
        self._end = base + pos
        self._live += live
        return None

    def _apply_txn(self, view: memoryview, pos: int, end: int, base: int, record: int) -> None:
        index = self._index
        start = pos
        where = (base + record, end - record)  # the TXN record: what a large value is in
        while pos < end:
            if end - pos < _SUB.size:
                self._corrupt(base + start, "a truncated operation inside a TXN record")
            rtype, klen, vlen = _SUB.unpack_from(view, pos)
            body = pos + _SUB.size
            stop = body + klen + vlen
            if stop > end or rtype not in (SET, DEL):
                self._corrupt(base + start, "a malformed operation inside a TXN record")
            key = self._key_at(view, body, klen, base + start)
            if rtype == SET:
                self._put(
                    index,
                    key,
                    view[body + klen : stop],
                    base + body + klen,
                    HEADER_BYTES + klen + vlen,
                    where,
                )
            else:
                self._drop(index, key)
            pos = stop

    def _put(  # noqa: PLR0917 - a hot path
        self,
        index: dict[str, _Entry],
        key: str,
        value: bytes | memoryview,
        offset: int,
        cost: int,
        record: tuple[int, int],
    ) -> None:
        old = index.get(key)
        if old is not None:
            self._live -= old[3]
        size = len(value)
        index[key] = (bytes(value) if size <= _CACHE_LIMIT else None, offset, size, cost, *record)
        self._live += cost

    def _drop(self, index: dict[str, _Entry], key: str) -> None:
        old = index.pop(key, None)
        if old is not None:
            self._live -= old[3]

    def _key_at(self, view: memoryview, pos: int, klen: int, record: int) -> str:
        try:
            return str(view[pos : pos + klen], "utf-8")
        except UnicodeDecodeError:
            self._corrupt(record, "a key that is not UTF-8")

    def _check_header(self, meta_bytes: bytes) -> None:
        try:
            meta = json.loads(meta_bytes)
            version, serializer = meta["format"], meta["serializer"]
        except (ValueError, KeyError, TypeError):
            self._corrupt(0, "an unreadable HEADER record")
        if version != FORMAT_VERSION:
            raise IncompatibleStoreError(
                f"{self._path!r} is a SafeFileStore of format "
                f"{version}, expected format {FORMAT_VERSION}"
            )
        if self._adopt_serializer_name:
            cast(_RawSerializer, self._serializer).name = str(serializer)
        elif serializer != self._serializer.name:
            raise IncompatibleStoreError(
                f"{self._path!r} was written with serializer {serializer!r}, but was opened "
                f"with serializer {self._serializer.name!r}"
            )

    def _corrupt(self, offset: int, what: str) -> NoReturn:
        raise StoreCorruptedError(
            f"{self._path!r}: {log_name(self._generation)} is corrupt at byte {offset}: {what}"
        )

    def _stopped(self, offset: int) -> None:
        """A record at ``offset`` does not check out: a write in progress, a torn tail that a
        killed writer left (the next writer discards it) or corruption. Only with the
        writers excluded can that be decided: a writer (and a reader in :meth:`_settle`)
        decides at once; any other reader stops here and settles it outside ``_mutex``."""
        if offset == 0:
            self._corrupt(0, "the log's HEADER record does not check out")
        if offset < self._ack:
            if os.fstat(self._log_fd).st_size < self._ack:
                self._truncated(os.fstat(self._log_fd).st_size, self._ack)
            self._corrupt(
                offset,
                "a record that does not check out, in the part of the log "
                "that its writers acknowledged (damage, not a torn write)",
            )
        writer = self._writer
        if self._exclusive or (writer is not None and writer.owner == threading.get_ident()):
            self._classify_tail(offset, truncate=not self._exclusive)
        else:
            self._suspect = True

    def _settle(self) -> None:
        """Decide what a suspect record is, with writers excluded (``LOCK_SH``). Lock order
        as for writers: process mutex, file lock, then ``_mutex``."""
        writer = self._get_writer()
        if writer.mutex._is_owned():  # type: ignore[attr-defined]
            # A read inside modify()'s fn or a transaction: this thread holds the write
            # lock, so writers are excluded already (and taking the RLock again, then
            # unlocking the flock, would end that hold).
            self._settle_excluded()
            return
        with writer.mutex:  # a C-level __enter__ and __exit__
            try:  # the flock inside the try: an exception right after it lands here
                fcntl.flock(writer.fd, fcntl.LOCK_SH)
                self._settle_excluded()
            finally:
                fcntl.flock(writer.fd, fcntl.LOCK_UN)

    def _settle_excluded(self) -> None:
        self._refuse_reentry()
        with self._mutex:
            if self._closed:
                raise self._closed_error()
            self._suspect = False
            self._exclusive = True
            try:
                self._refresh()
            finally:
                self._exclusive = False

    def _classify_tail(self, offset: int, *, truncate: bool) -> None:
        """With no writer active: is the data from ``offset`` on a torn tail (truncated
        when ``truncate``), complete now (the caller's next read applies it) or corrupt
        (raises)?"""
        size = os.fstat(self._log_fd).st_size
        rest = os.pread(self._log_fd, max(0, size - offset), offset)
        verdict = _torn_tail(memoryview(rest)) if rest else None
        if verdict == "corrupt":
            self._corrupt(offset, "a record whose checksum does not match, with more data after it")
        if verdict != "torn":
            return
        if truncate:
            os.ftruncate(self._log_fd, offset)
            if self._durable:
                os.fdatasync(self._log_fd)
            self._torn += 1
        else:
            self._torn_tail = rest

    # --- the write path ---------------------------------------------------------------------
    def _get_writer(self) -> _ProcessWriter:
        if self._pid != _compat.pid:
            self._after_fork()
        writer = self._writer
        if writer is None:
            raise self._closed_error()
        return writer

    def _until(self, timeout: object) -> float:
        """The instant a write given ``timeout=`` must have its lock by (``inf``: never
        gives up); :data:`_DEFAULT` is the store's timeout."""
        return deadline(self._timeout if timeout is _DEFAULT else check_timeout(timeout))

    def _timed_out(self, until: float, what: str = "nothing was written") -> StoreTimeoutError:
        return StoreTimeoutError(
            f"SafeFileStore {self._path!r}: could not take the write lock in time (another "
            f"writer holds it: busy, stopped or stuck); {what}"
        )

    # Async-exception safety (issue 10.3; the reasoning is at the top of safeshm._lock): a
    # signal handler's exception (KeyboardInterrupt, a SIGALRM timeout) lands only at a
    # function's first instruction, a loop's backward jump or right after a call returns.
    # Every hold of the write lock is the generator below, used as
    #
    #     hold = self._hold(until)
    #     try:
    #         writer = next(hold)     # an exception after it returned: in the try
    #         ... the write ...
    #     finally:
    #         hold.close()            # one C call: GeneratorExit runs _hold's finally
    #
    # A suspended generator is the one Python frame whose try/finally spans the caller's
    # code: closing it (or its being garbage-collected) runs the release, which is C calls
    # only, with nothing that checks for a signal before them.
    def _hold(
        self,
        until: float = math.inf,
        *,
        catch_up: bool | None = True,
        what: str = "nothing was written",
    ) -> Generator[_ProcessWriter, None, None]:
        """Hold this process's lock for the store, then the file lock, from the first
        ``next()`` until the generator is closed; taken before ``until`` (else
        :class:`StoreTimeoutError`, ``what`` says what it means, nothing taken). With
        ``catch_up``, read the log to its end first (what modify, transactions and deletes
        decide on); ``None``: not even the closed check (finishing a committed write)."""
        writer = self._get_writer()
        mutex = writer.mutex
        if mutex._is_owned():  # type: ignore[attr-defined] # before the try: see _lock
            raise LockReentryError(
                f"this thread already holds {self._path!r}'s write lock (inside modify() or "
                f"transaction()); write through the transaction object instead"
            )
        # 1: the mutex's acquire may have returned, its result lost; 2: the mutex is ours;
        # 3: and the flock may be taken (unlocking one that is not taken is harmless, and
        # no other thread of this process can hold it while we hold the mutex).
        state = 0
        try:
            state = 1
            if not _acquire_mutex(mutex, until):
                state = 0
                raise self._timed_out(until, what)
            state = 3
            if not _lock_exclusive(writer, until):
                raise self._timed_out(until, what)
            writer.owner = threading.get_ident()
            if catch_up is not None:
                self._refuse_reentry()
                with self._mutex:
                    if self._closed:
                        raise self._closed_error()
                    if catch_up:
                        self._sync_as_writer(writer)
            yield writer
        finally:
            if state == 3:
                writer.owner = 0
                writer.busy.value = 0
                try:
                    fcntl.flock(writer.fd, fcntl.LOCK_UN)
                finally:
                    mutex.release()
            elif state:
                try:  # noqa: SIM105 - contextlib.suppress is Python code: a place to land
                    mutex.release()
                except RuntimeError:
                    pass  # the acquire had not completed: not ours

    def _append(self, record: bytes, ops: list[tuple[int, bytes, bytes]]) -> _Pending | None:
        """Append one record (writer lock held), publish the new end, and apply the
        record's operations to the index if it is caught up (else the next read does).

        A durable handle returns what :meth:`_finish` needs to sync the record and make it
        visible, after the caller released the lock."""
        writer = self._writer
        if writer is None:  # pragma: no cover - the caller holds the writer
            raise self._closed_error()
        self._refuse_reentry()
        with self._mutex:
            if self._closed:
                raise self._closed_error()
            fd = self._log_fd
            start = os.lseek(fd, 0, os.SEEK_END)
            # Under group commit a durable writer keeps `synced` as it is, so it must
            # trust it (the checksum over all words); otherwise a writer sets both words
            # to its end and needs only `position`.
            contended = writer.contended.value if self._durable else 0
            hints = writer.hints(self._stamp, self._generation) if contended else None
            if (
                not self._stamp
                or writer.stamp.value != self._stamp
                or (writer.position.value != _pack(self._generation, start))
                or (contended and hints is None)
            ):
                # Not exactly what the last writer published: a torn tail, a compaction,
                # a reboot. Read it all (the slow, always-right path) before appending.
                self._sync_as_writer(writer)
                fd, start = self._log_fd, self._end  # maybe another generation's log now
                hints = writer.hints(self._stamp, self._generation)
            # Everything that can fail for want of a resource comes before the record is
            # written: a call that raises must change nothing (an os.dup() after the write
            # failing with EMFILE left a write that raised, yet took effect).
            sync_fd = os.dup(fd) if contended else -1
            try:
                written = os.write(fd, record)
                if written != len(record):  # interrupted, or the disk filled up: go on
                    _write_all(fd, memoryview(record)[written:])
                if self._durable and not contended:  # alone: sync with the lock held
                    os.fdatasync(fd)
            except BaseException:
                # A short write (ENOSPC, EDQUOT) or a failed sync (EIO): take the record
                # back before anyone was told of it; nothing changed.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                if sync_fd >= 0:
                    os.close(sync_fd)
                raise
            end = start + len(record)
            position = _pack(self._generation, end)
            pending = None
            if contended:
                # Other writers are about: let them write while we sync (group commit).
                # Visible to the next writer at once, to readers once on disk (_finish).
                writer.contended.value = contended - 1
                writer.publish(self._stamp, position, hints[1] if hints is not None else 0)
                pending = (writer, self._stamp, self._generation, end, sync_fd)
            else:
                writer.publish(self._stamp, position, position)  # alone: publish once
            if self._end == start:  # else others' records come first: the next refresh
                # applies them, then ours. _end moves only once the index has all of the
                # record: a signal handler's exception half-way leaves _end before it, so
                # the next refresh applies the record again (each operation is a
                # replacement: applying it twice is applying it once), and nothing -- a
                # compaction above all -- ever uses an index that has only part of it.
                self._apply_own(start, record, ops)
                self._end = end
            return pending

    def _finish(self, pending: _Pending | None, until: float = math.inf) -> None:
        """Make a durable write durable and visible, after the write lock was released:
        ``fdatasync`` (other writers write meanwhile, and their syncs overlap ours: the
        kernel commits them together), then take the lock again to move ``synced`` past
        the record -- unless another writer's sync, or a compaction, already did.

        If the lock cannot be had before ``until``, the write is committed and on disk but
        not yet shown to other processes (the next write shows it): the
        :class:`StoreTimeoutError` says so, since retrying would write it twice."""
        if pending is None:
            return
        writer, stamp, generation, end, fd = pending
        try:
            os.fdatasync(fd)  # covers every byte written to the file before it started
        finally:
            os.close(fd)
        committed = (
            "the write WAS committed and is on disk (do not repeat it); other "
            "processes see it after the next write"
        )
        if writer is not self._writer:  # pragma: no cover - only a forked child swaps it
            return
        hold = self._hold(until, catch_up=None, what=committed)
        try:
            next(hold)
            hints = writer.hints(stamp, generation)
            if hints is not None and hints[1] & _POS_MASK < end <= hints[0] & _POS_MASK:
                writer.publish(stamp, hints[0], _pack(generation, end))
        finally:
            hold.close()

    def _apply_own(self, start: int, record: bytes, ops: list[tuple[int, bytes, bytes]]) -> None:
        """Apply this handle's record, just written at ``start``, to the index (without
        reading it back)."""
        index = self._index
        if len(ops) == 1 and record[2] != TXN:
            rtype, key, value = ops[0]
            if rtype == SET:
                self._put(
                    index,
                    key.decode(),
                    value,
                    start + HEADER_BYTES + len(key),
                    len(record),
                    (start, len(record)),
                )
            else:
                self._drop(index, key.decode())
            return
        pos = start + HEADER_BYTES
        for rtype, key, value in ops:
            pos += _SUB.size
            if rtype == SET:
                self._put(
                    index,
                    key.decode(),
                    value,
                    pos + len(key),
                    HEADER_BYTES + len(key) + len(value),
                    (start, len(record)),
                )
            else:
                self._drop(index, key.decode())
            pos += len(key) + len(value)

    def _commit(self, ops: list[tuple[int, bytes, bytes]]) -> _Pending | None:
        if len(ops) == 1:
            rtype, key, value = ops[0]
            return self._append(encode_record(rtype, key, value), ops)
        if ops:
            return self._append(_encode_txn(ops), ops)
        return None

    def _write(self, ops: list[tuple[int, bytes, bytes]]) -> None:
        # A blind write needs no catch-up under the lock: the records it does not know
        # are parsed after the lock is released, in parallel with the next writer.
        until = self._until(_DEFAULT)
        hold = self._hold(until, catch_up=False)
        try:
            next(hold)
            pending = self._commit(ops)
        finally:
            hold.close()
        self._finish(pending, until)
        self._refuse_reentry()
        with self._mutex, contextlib.suppress(StoreCorruptedError):
            # The write is committed: damage in records before it is reported by the next
            # read, never as a failure of a write that took effect.
            if not self._closed:
                self._refresh()
        self._maybe_compact(until)

    # --- what Transaction uses ----------------------------------------------------------
    def _committed_value(self, key: str) -> bytes | None:
        """The committed bytes of ``key`` (the write lock held: caught up)."""
        self._refuse_reentry()
        with self._mutex:
            return self._value(key)

    def _committed_keys(self) -> list[str]:
        self._refuse_reentry()
        with self._mutex:
            return list(self._index)

    def _verify_tail(self) -> int:
        """Check what lies past the end readers see, with nothing changed: records of
        writes in progress (before the acknowledged ``position``, each must check out) and
        what a killed writer left (a torn tail, not damage). Its length in bytes."""
        self._refuse_reentry()
        with self._mutex:
            end = self._end
            acknowledged = self._acknowledged_end()
            rest = os.pread(self._log_fd, 1 << 30, end)
        # Records written but not yet synced (group commit) lie before the acknowledged
        # `position`: whole when written, so one that does not check out is damage.
        pos = 0
        while end + pos < acknowledged and (length := _record_length(rest, pos)):
            pos += length
        if end + pos < acknowledged:
            self._corrupt(
                end + pos,
                "a record that does not check out, in the part of the "
                "log that its writers acknowledged",
            )
        if rest and _torn_tail(memoryview(rest)) == "corrupt":
            self._corrupt(end, "a record whose checksum does not match, with more data after it")
        return len(rest)

    def _get_bytes(self, key: str) -> bytes | None:
        if not isinstance(key, str):
            raise TypeError(f"store keys are str, not {type(key).__name__}")
        if self._pid != _compat.pid:
            self._after_fork()
        self._refuse_reentry()
        with self._mutex:
            if self._closed:
                raise self._closed_error()
            self._refresh()
            if not self._suspect:
                return self._value(key)
        return self._read(lambda: self._value(key))

    def _read(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` under ``_mutex`` on caught-up state (settling a suspect record)."""
        if self._pid != _compat.pid:
            self._after_fork()
        for _ in range(_OPEN_RETRIES):
            self._refuse_reentry()
            with self._mutex:
                if self._closed:
                    raise self._closed_error()
                self._refresh()
                if not self._suspect:
                    return fn()
            self._settle()
        raise StoreCorruptedError(f"{self._path!r}: the log keeps changing under a reader")

    def _value(self, key: str) -> bytes | None:
        """The committed bytes of ``key`` (caller holds _mutex and is caught up)."""
        entry = self._index.get(key)
        if entry is None:
            return None
        if entry[0] is not None:
            return entry[0]
        return self._read_value(entry)

    def _read_value(self, entry: _Entry) -> bytes:
        """A value that the index does not hold, read from the log and checked against its
        record's checksums (caller holds _mutex): damage, or a log cut short, raises
        instead of being returned as data."""
        _cached, offset, size, _cost, start, length = entry
        record = os.pread(self._log_fd, length, start)
        if len(record) != length:
            self._corrupt(
                start,
                "the log ends inside this record, which was read before (was the file truncated?)",
            )
        magic, _rtype, _flags, klen, vlen, body_crc, head_crc = _unpack_hdr(record, 0)
        if (
            magic != _MAGIC
            or _crc32(record[:_HDR_CRC_SPAN]) != head_crc
            or HEADER_BYTES + klen + vlen != length
            or _crc32(memoryview(record)[HEADER_BYTES:]) != body_crc
        ):
            self._corrupt(
                start,
                "a record whose checksum no longer matches (the file was "
                "damaged after it was read)",
            )
        return record[offset - start : offset - start + size]

    def _snapshot(self) -> list[tuple[str, bytes]]:
        def pairs() -> list[tuple[str, bytes]]:
            out: list[tuple[str, bytes]] = []
            for key, entry in self._index.items():
                cached = entry[0]
                out.append((key, cached if cached is not None else self._read_value(entry)))
            return out

        return self._read(pairs)

    def _dumps(self, value: V) -> bytes:
        data = self._serializer.dumps(value)
        if not isinstance(data, bytes):
            raise TypeError(
                f"serializer {self._serializer.name!r} returned {type(data).__name__}, not bytes"
            )
        return data

    # --- compaction -------------------------------------------------------------------------
    def _maybe_compact(self, until: float = math.inf) -> None:
        end = self._end
        if end < self._compact_min or end <= 2 * self._live:
            return
        maintenance = self._maintenance(-math.inf)  # try once
        try:
            if not next(maintenance):
                return  # another process is compacting
            self._compact_locked(force=False, until=until)
        except StoreTimeoutError:
            pass  # the write that got us here is done; a later one compacts
        finally:
            maintenance.close()

    def _compact_locked(self, *, force: bool, until: float = math.inf) -> None:
        hold = self._hold(until)
        try:
            writer = next(hold)
            self._refuse_reentry()
            with self._mutex:
                if not force and (self._end < self._compact_min or self._end <= 2 * self._live):
                    return
                old_fd, old_generation = self._log_fd, self._generation
                new_generation = old_generation + 1
                records = self._live_records()
                # Debris of compactions that were killed: temp files, and logs that are
                # neither the current one nor the one we are about to publish.
                _remove_files(
                    self._dir_fd,
                    lambda name: (
                        name.endswith(_TMP_SUFFIX) or _generation_in(name, old_generation + 1)
                    ),
                )
                self._write_generation(new_generation, records)
                # The MOVED record is the commit point: from here on, every process that
                # reads the old log follows it to the new one.
                moved = encode_record(MOVED, b"", _GEN.pack(new_generation))
                try:
                    _write_all(old_fd, moved)
                except BaseException:
                    # A short write (ENOSPC): take the fragment back; nothing changed (the
                    # new log is debris that the next compaction removes).
                    os.ftruncate(old_fd, self._end)
                    raise
                os.fdatasync(old_fd)
                moved_end = _pack(old_generation, self._end + len(moved))
                writer.publish(self._stamp, moved_end, moved_end)
                _replace_file(self._dir_fd, CURRENT_FILE, _current_text(new_generation), self._path)
                self._switch_to(new_generation)
                self._sync_as_writer(writer)
                _remove_files(self._dir_fd, lambda name: _generation_in(name, 0, new_generation))
                self._compactions += 1
        finally:
            hold.close()

    def _live_records(self) -> list[bytes]:
        """A SET record for each live key (the loop in a function of its own: see the
        comment above _foreign_files)."""
        records: list[bytes] = []
        for key, entry in self._index.items():
            # Checked like every read: a record that does not verify raises here, before
            # anything is written, and is never copied under a fresh checksum (that would
            # launder the damage).
            cached = entry[0]
            value = cached if cached is not None else self._read_value(entry)
            records.append(encode_record(SET, key.encode(), value))
        return records

    def _close_fds(self) -> None:
        self._writer = None
        for attr in ("_log_fd", "_dir_fd"):
            fd = getattr(self, attr, -1)
            setattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)

    def _refuse_reentry(self) -> None:
        """Called before every acquire of ``_mutex``: a thread that holds it already -- a
        signal handler that uses the handle whose call it interrupted -- gets
        LockReentryError instead of a deadlock (or of changing the index under the
        interrupted call, were the lock re-entrant)."""
        if self._mutex._is_owned():  # type: ignore[attr-defined]
            raise LockReentryError(
                f"SafeFileStore {self._path!r}: this thread is already inside a call on this "
                "handle (a signal handler that uses the store whose call it interrupted?)"
            )

    def _closed_error(self) -> StoreClosedError:
        return StoreClosedError(f"SafeFileStore {self._path!r} is closed")

    def _after_fork(self) -> None:
        """In a forked child: the parent's locks and lock descriptor are not ours."""
        self._mutex = threading.RLock()
        self._pid = _compat.pid
        if not self._closed:
            self._writer = _process_writer(self._dir_fd, self._path)


_maintaining = threading.local()


def _maintenance_held() -> set[tuple[int, int]]:
    """The stores (device, inode of the directory) whose maintenance lock this thread
    holds."""
    held: set[tuple[int, int]] | None = getattr(_maintaining, "held", None)
    if held is None:
        held = _maintaining.held = set()
    return held


# Loops that run inside a `with` or a `try` whose exit releases something are functions of
# their own: on 3.13 an exception from a signal handler landing at a loop's back edge can
# skip the enclosing __exit__ or finally (CPython gh-130279; tests/test_async_bytecode.py).
def _foreign_files(dir_fd: int) -> list[str]:
    return [name for name in os.listdir(dir_fd) if not _is_our_file(name)]


def _generation_in(name: str, low: int, high: float = math.inf) -> bool:
    """Is ``name`` a log whose generation is in ``[low, high)``?"""
    generation = _generation_of(name)
    return generation is not None and low <= generation < high


def _remove_files(dir_fd: int, doomed: Callable[[str], bool]) -> None:
    for name in os.listdir(dir_fd):
        if doomed(name):
            _unlink_quietly(dir_fd, name)


def _write_records(fd: int, records: list[bytes]) -> None:
    """Write ``records`` in chunks of about 1 MiB."""
    chunk: list[bytes] = []
    size = 0
    for record in records:
        chunk.append(record)
        size += len(record)
        if size >= 1 << 20:
            _write_all(fd, b"".join(chunk))
            chunk, size = [], 0
    _write_all(fd, b"".join(chunk))
