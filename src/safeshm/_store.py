"""SafeFileStore[V]: a durable, crash-safe, process-safe key-value store in a directory.

The design is an append-only log with a checksum per record (the Bitcask design), and
an in-memory index in every handle:

* ``CURRENT`` names the live log generation; ``data.<generation>.log`` is the log. Each
  log starts with a ``HEADER`` record (format, serializer) and then holds ``SET``,
  ``DEL`` and ``TXN`` records; a log that has been compacted away ends with a ``MOVED``
  record naming its successor.
* A record is a 20-byte header (magic, type, key length, value length, CRC-32 of the
  body, CRC-32 of the header) and a body. A write is one ``write()`` of one record, so a
  transaction, which is one ``TXN`` record, is all-or-nothing.
* Writers serialise on ``fcntl.flock`` of ``write.lock`` (released by the kernel when a
  writer dies, so a SIGKILL never leaves it held) and, inside a process, on a
  per-store ``threading.Lock``. Before appending, a writer reads what others appended
  and truncates a torn tail (a record that a killed writer left half-written: it can
  only be the last one). With ``durable=True`` it calls ``fdatasync`` before it returns
  -- after releasing the lock when other writers are about (group commit: the next
  writer's write, and its sync, overlap ours) -- so an acknowledged write survives power
  loss; readers read only up to what a finished sync covered, so nobody reads a value
  that could still vanish.
* Readers take no file lock: a word in the mapped ``write.lock`` tells them how far the
  log is acknowledged, and they parse only the new records. A record that does not
  check out stops them there; only with the writers excluded (``LOCK_SH``) do they
  decide between a torn tail (ignored: the next writer discards it) and corruption
  (``StoreCorruptedError``).
* Compaction writes the live records to a new generation (temp file, fsync, rename,
  fsync of the directory), appends ``MOVED`` to the old log, then replaces
  ``CURRENT``. Every step leaves a state from which any process reaches the same data:
  the chain of ``MOVED`` records decides, ``CURRENT`` is a shortcut for opening.

See ``docs/design.md`` ("SafeFileStore") for the reasoning behind each choice.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import pickle
import stat
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, ItemsView, Iterable, Iterator, MutableMapping, ValuesView
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Generic,
    Literal,
    NoReturn,
    Protocol,
    TypeVar,
    cast,
    overload,
)

import filelock

from . import _compat
from ._errors import (
    IncompatibleStoreError,
    InsecureDirectoryError,
    LockReentryError,
    StoreClosedError,
    StoreCorruptedError,
    StoreTimeoutError,
)
from ._timeout import check_timeout, deadline

if TYPE_CHECKING:
    from _typeshed import SupportsKeysAndGetItem

V = TypeVar("V")
T = TypeVar("T")
StrPath = str | os.PathLike[str]

# --- on-disk format -------------------------------------------------------------------------
FORMAT_VERSION: Final = 1
_MAGIC: Final = b"\xa7S"
# magic, type, flags, key length, value length, CRC-32 of the body, CRC-32 of the first 16
# header bytes. Little-endian, no padding: 20 bytes.
_HDR: Final = struct.Struct("<2sBBIIII")
HEADER_BYTES: Final = _HDR.size
_HDR_CRC_SPAN: Final = 16
_SUB: Final = struct.Struct("<BII")  # one operation inside a TXN body: type, klen, vlen
_GEN: Final = struct.Struct("<Q")
HEADER: Final = 1
SET: Final = 2
DEL: Final = 3
TXN: Final = 4
MOVED: Final = 5
_TYPE_NAMES: Final = {HEADER: "HEADER", SET: "SET", DEL: "DEL", TXN: "TXN", MOVED: "MOVED"}
# One record is written with one write(); keep it far below what a write() may split.
MAX_RECORD: Final = 1 << 30

CURRENT_FILE: Final = "CURRENT"
WRITE_LOCK_FILE: Final = "write.lock"
MAINTENANCE_LOCK_FILE: Final = "maintenance.lock"
_LOG_PREFIX: Final = "data."
_LOG_SUFFIX: Final = ".log"
_TMP_SUFFIX: Final = ".tmp"

# Values up to this size stay in the index, so a get costs no read system call.
_CACHE_LIMIT: Final = 4096
# Compact when the log is larger than this and more than twice the live data.
COMPACT_MIN_BYTES: Final = 4 << 20
_OPEN_RETRIES: Final = 100
_LOCK_FILE_BYTES: Final = 64
# A published position: the generation in the high 24 bits, the log's end in the low 40
# (one aligned 64-bit word, so a reader never sees one half old and the other new).
_POS_BITS: Final = 40
_POS_MASK: Final = (1 << _POS_BITS) - 1


_MIX: Final = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads every bit of a word
_WORD: Final = (1 << 64) - 1


def _check_word(stamp: int, position: int, synced: int) -> int:
    # Multiplying by an odd constant is a bijection of 64-bit words: a change in any bit of
    # position or synced (rotated, so the two do not cancel) changes the result.
    return (((position ^ (synced << 32) ^ (synced >> 32)) * _MIX) ^ stamp) & _WORD


def _pack(generation: int, end: int) -> int:
    """``position`` for ``(generation, end)``; 0 (never trusted) if it does not fit."""
    if end > _POS_MASK or not 0 < generation < 1 << 24:
        return 0
    return generation << _POS_BITS | end


def _read_boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()
    except OSError:
        return b""  # unknown: published positions are never trusted


_BOOT_ID: Final = _read_boot_id()


def _stamp_of(st: os.stat_result) -> int:
    """What a published position is valid for: this boot of the machine and this very log
    file. A reboot (the mapped page may hold anything), a copy of the store (another
    inode) or another generation (another file) all change it. 0: never trusted."""
    if not _BOOT_ID:
        return 0
    data = b"%s:%d:%d" % (_BOOT_ID, st.st_dev, st.st_ino)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1
_O_FLAGS: Final = os.O_CLOEXEC | os.O_NOFOLLOW

_crc32: Final = zlib.crc32
_pack_hdr: Final = _HDR.pack
_unpack_hdr: Final = _HDR.unpack_from


def log_name(generation: int) -> str:
    return f"{_LOG_PREFIX}{generation:016x}{_LOG_SUFFIX}"


def _generation_of(filename: str) -> int | None:
    if not (filename.startswith(_LOG_PREFIX) and filename.endswith(_LOG_SUFFIX)):
        return None
    digits = filename[len(_LOG_PREFIX):-len(_LOG_SUFFIX)]
    if len(digits) != 16:
        return None
    try:
        return int(digits, 16)
    except ValueError:
        return None


def _is_our_file(filename: str) -> bool:
    return (filename in (CURRENT_FILE, WRITE_LOCK_FILE, MAINTENANCE_LOCK_FILE)
            or _generation_of(filename) is not None
            or (filename.startswith((_LOG_PREFIX, CURRENT_FILE + "."))
                and filename.endswith(_TMP_SUFFIX)))


def encode_record(rtype: int, key: bytes, value: bytes) -> bytes:
    """One record: header and body, ready for a single ``write()``."""
    body = key + value
    head = _pack_hdr(_MAGIC, rtype, 0, len(key), len(value), _crc32(body), 0)
    return head[:_HDR_CRC_SPAN] + _crc32(head[:_HDR_CRC_SPAN]).to_bytes(4, "little") + body


def _encode_txn(ops: list[tuple[int, bytes, bytes]]) -> bytes:
    parts: list[bytes] = []
    for rtype, key, value in ops:
        parts += (_SUB.pack(rtype, len(key), len(value)), key, value)
    return encode_record(TXN, b"", b"".join(parts))


def _current_text(generation: int) -> bytes:
    line = f"safeshm-store {FORMAT_VERSION} {generation:016x}"
    return f"{line} {_crc32(line.encode()):08x}\n".encode()


def _parse_current(data: bytes, where: str) -> int:
    try:
        magic, version, gen_hex, crc_hex = data.decode("ascii").split()
        line = f"{magic} {version} {gen_hex}"
        if magic != "safeshm-store" or int(crc_hex, 16) != _crc32(line.encode()):
            raise ValueError(line)
        if int(version) != FORMAT_VERSION:
            raise IncompatibleStoreError(
                f"{where} is a SafeFileStore of format {version}, expected format "
                f"{FORMAT_VERSION}")
        return int(gen_hex, 16)
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, IncompatibleStoreError):
            raise
        raise StoreCorruptedError(f"{where}: {CURRENT_FILE} is damaged "
                                  f"(checksum or format does not match)") from None


# --- serializers ----------------------------------------------------------------------------
class Serializer(Protocol[V]):
    """How a :class:`SafeFileStore` turns values into bytes and back.

    ``name`` is recorded in the store, so opening a store with another serializer than the
    one that wrote it fails with :class:`IncompatibleStoreError` instead of misreading data.
    ``dumps`` must raise (``TypeError``/``ValueError``) for a value it cannot encode; the
    store then changes nothing.
    """

    @property
    def name(self) -> str: ...

    def dumps(self, value: V, /) -> bytes: ...

    def loads(self, data: bytes, /) -> V: ...


class JSONSerializer:
    """JSON (UTF-8, compact). The default: safe to read back from any source.

    JSON's own rules apply: tuples come back as lists, non-string dict keys as strings;
    ``NaN`` and infinities are refused (they are not JSON).
    """

    name = "json"

    def dumps(self, value: Any, /) -> bytes:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode()

    def loads(self, data: bytes, /) -> Any:
        return json.loads(data)


class BytesSerializer:
    """Raw bytes: values are stored as given (``bytes``, ``bytearray`` or ``memoryview``)
    and read back as ``bytes``."""

    name = "bytes"

    def dumps(self, value: object, /) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, bytearray | memoryview):
            return bytes(value)
        raise TypeError(f"a bytes store takes bytes-like values, not {type(value).__name__}")

    def loads(self, data: bytes, /) -> bytes:
        return data


class PickleSerializer:
    """pickle: any picklable value. Opt-in only: unpickling runs code named by the data, so
    use it only for a store that no one else can write (safeshm refuses directories that
    other users can write into, but a pickle store is as trustworthy as its owner)."""

    name = "pickle"

    def dumps(self, value: Any, /) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes, /) -> Any:
        return pickle.loads(data)  # noqa: S301 - opt-in, documented above


_BUILTIN_SERIALIZERS: Final[dict[str, Callable[[], Serializer[Any]]]] = {
    "json": JSONSerializer, "bytes": BytesSerializer, "pickle": PickleSerializer,
}
SerializerName = Literal["json", "bytes", "pickle"]


def _resolve_serializer(serializer: object) -> Serializer[Any]:
    if isinstance(serializer, str):
        factory = _BUILTIN_SERIALIZERS.get(serializer)
        if factory is None:
            raise ValueError(f"unknown serializer {serializer!r}: expected 'json', 'bytes', "
                             f"'pickle' or an object with name, dumps and loads")
        return factory()
    name = getattr(serializer, "name", None)
    if (not isinstance(name, str) or not name or not callable(getattr(serializer, "dumps", None))
            or not callable(getattr(serializer, "loads", None))):
        raise TypeError("a serializer needs a non-empty str 'name' and 'dumps'/'loads' methods")
    return serializer  # type: ignore[return-value]  # checked structurally just above


# --- files and directories ------------------------------------------------------------------
def _check_owner(st: os.stat_result, what: str, *, directory: bool) -> None:
    kind = "directory" if directory else "file"
    if directory and not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, f"{what} is not a directory")
    if not directory and not stat.S_ISREG(st.st_mode):
        raise InsecureDirectoryError(f"{what} is not a regular file; refusing to use it")
    if st.st_uid != os.geteuid():
        raise InsecureDirectoryError(
            f"store {kind} {what} belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.geteuid()}); refusing to use it")
    if st.st_mode & 0o022:
        hint = f" (fix: chmod 700 {what})" if directory else ""
        if directory and st.st_mode & stat.S_ISVTX:
            # A shared directory by design (/tmp, mode 1777): making it private would break
            # every other program that uses it.
            hint = (f" (it is a shared directory, like /tmp: keep the store in a private "
                    f"subdirectory of it instead, e.g. mkdir -m 700 {what}/mystore)")
        raise InsecureDirectoryError(
            f"store {kind} {what} can be written by other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it{hint}")


def open_directory(path: StrPath, *, create: bool) -> tuple[int, str]:
    """Open (and with ``create``, make, mode 0700) the store directory; check who owns it."""
    text: object = os.fspath(path)
    if not isinstance(text, str) or not text:
        raise TypeError("the store path must be a non-empty str or os.PathLike[str]")
    if create:
        parent = os.path.dirname(os.path.abspath(text))
        os.makedirs(parent, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(text, 0o700)
    try:
        fd = os.open(text, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no SafeFileStore at this path", text) from None
    try:
        _check_owner(os.fstat(fd), repr(text), directory=True)
    except BaseException:
        os.close(fd)
        raise
    return fd, text


def _open_file(dir_fd: int, name: str, flags: int, where: str, *, create: bool = False) -> int:
    """Open one of the store's files below ``dir_fd``: never through a symlink, always
    0600, and only if it is ours."""
    flags |= _O_FLAGS | (os.O_CREAT if create else 0)
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InsecureDirectoryError(f"{where}/{name} is a symbolic link; a store "
                                         f"never follows links for its own files") from None
        raise
    try:
        _check_owner(os.fstat(fd), f"{where}/{name}", directory=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _replace_file(dir_fd: int, name: str, data: bytes, where: str) -> None:
    """Atomically give ``name`` the contents ``data`` (temp file, fsync, rename, fsync dir)."""
    tmp = f"{name}.{os.getpid()}.{threading.get_ident()}{_TMP_SUFFIX}"
    fd = _open_file(dir_fd, tmp, os.O_WRONLY | os.O_TRUNC, where, create=True)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_quietly(dir_fd, tmp)
        raise
    os.fsync(dir_fd)


def _unlink_quietly(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _key_bytes(key: object) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"store keys are str, not {type(key).__name__}")
    if not key:
        raise ValueError("store keys must be non-empty")
    try:
        return key.encode()
    except UnicodeEncodeError:
        raise ValueError(f"store key {key!r} is not encodable as UTF-8") from None


def _check_size(key: bytes, value: bytes) -> None:
    if HEADER_BYTES + len(key) + len(value) > MAX_RECORD:
        raise ValueError(f"a record of {len(key) + len(value)} bytes is larger than a store "
                         f"takes ({MAX_RECORD} bytes)")


# --- the per-process writer lock ------------------------------------------------------------
class _ProcessWriter:
    """What the handles of one store in one process share: a ``threading.Lock`` that
    orders this process's writers, and the descriptor that carries the ``flock``.

    ``flock`` locks belong to an open file description, which a forked child shares: a
    child must never use its parent's descriptor (it would "hold" the parent's lock), so
    the registry is emptied and the inherited descriptors closed in every child.

    The lock file is mapped shared and holds these words (see ``docs/design.md``), all
    written with the flock held:

    * ``busy``: set by the holder of the flock, cleared before it unlocks; only a hint for
      waiters (see :func:`_lock_exclusive`). A holder that dies with it set costs the next
      writer one short spin, nothing more.
    * ``contended``: set to :data:`_CONTENDED_WRITES` by a writer that found the flock
      taken, counted down by each durable write. While it is not zero, durable writers
      sync after releasing the lock (group commit, below); at zero -- a lone writer -- a
      durable writer syncs with the lock held and publishes both ends at once, saving a
      second round trip through the lock. Only a hint: either way is correct.
    * ``position``: the generation and end of the log after the last complete write
      (:func:`_pack`), published by the writer once its ``write`` returned (a lone durable
      writer: once its sync did). A writer that finds the file exactly that long knows
      there is no torn tail and appends at once; past it lies only what a writer killed
      before it published left.
    * ``synced``: the generation and end of what readers may see: complete and, for a
      durable writer, on disk. Under contention a durable writer publishes ``position``
      and releases the lock before its ``fdatasync`` (so the next writer's write overlaps
      it, and the kernel can commit both at once: group commit), then takes the lock again
      to move ``synced`` past its record. Readers read up to ``synced`` without a system
      call.
    * ``stamp``: which log file, in which boot of the machine, the positions are about
      (:func:`_stamp_of`). After a reboot the mapped page may hold anything, and a copied
      store carries its original's words: then nobody trusts them until a writer has read
      the log and published them again.
    * ``check``: a checksum of ``stamp``, ``position`` and ``synced``, written last. A
      damaged lock file, or a reader that looks while a writer publishes, sees a mismatch:
      the hints are not trusted, and the file decides.

    All are hints checked against the file: the flock decides who writes, and the log's
    checksums decide what is data.
    """

    __slots__ = ("__weakref__", "busy", "check", "contended", "fd", "map", "mutex", "owner",
                 "position", "stamp", "synced")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mutex = threading.Lock()
        self.owner = 0
        # Reserve the page's block before mapping it: a page of a sparse file gets its
        # block on the first store to it, and on a full file system that store kills the
        # process with SIGBUS instead of raising. posix_fallocate extends the file (to the
        # same size whoever does it first) and raises ENOSPC here, with nothing mapped.
        # Always, not only when the file is short: one extended by ftruncate (an older
        # safeshm, or another program) may be the right size and still sparse.
        os.posix_fallocate(fd, 0, _LOCK_FILE_BYTES)
        self.map = mmap.mmap(fd, _LOCK_FILE_BYTES, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, **_compat.MMAP_KWARGS)
        self.busy = ctypes.c_uint32.from_buffer(self.map)
        self.contended = ctypes.c_uint32.from_buffer(self.map, 4)
        self.stamp = ctypes.c_uint64.from_buffer(self.map, 8)
        self.position = ctypes.c_uint64.from_buffer(self.map, 16)
        self.check = ctypes.c_uint64.from_buffer(self.map, 24)
        self.synced = ctypes.c_uint64.from_buffer(self.map, 32)

    def publish(self, stamp: int, position: int, synced: int) -> None:
        """Publish ``position`` and ``synced`` for the log ``stamp`` (write lock held).
        ``check`` is written last: a reader between the stores sees a mismatch and looks
        again, or does not trust the words -- it reads the file instead, which is never
        wrong."""
        self.position.value = position
        self.synced.value = synced
        self.stamp.value = stamp
        self.check.value = _check_word(stamp, position, synced)

    def hints(self, stamp: int, generation: int) -> tuple[int, int] | None:
        """``(position, synced)`` as words, if they are trusted for ``generation``'s log
        ``stamp``: intact, about that log, and ``synced <= position``."""
        for _attempt in (1, 2, 3):  # a publish in progress: its stores take nanoseconds
            position, synced = self.position.value, self.synced.value
            if self.stamp.value != stamp or not stamp:
                return None
            if self.check.value == (((position ^ (synced << 32) ^ (synced >> 32)) * _MIX)
                                    ^ stamp) & _WORD:  # _check_word, inlined: a hot path
                break
        else:
            return None
        if (position >> _POS_BITS != generation or synced >> _POS_BITS != generation
                or synced > position or not position):
            return None
        return position, synced

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            del self.busy, self.contended, self.stamp, self.position, self.check, self.synced
            with contextlib.suppress(OSError, BufferError):
                self.map.close()
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()


_writers: weakref.WeakValueDictionary[tuple[int, int], _ProcessWriter] = (
    weakref.WeakValueDictionary())
_writers_lock = threading.Lock()


def _writers_after_fork_in_child() -> None:
    global _writers_lock  # noqa: PLW0603 - another thread may have held it at fork time
    _writers_lock = threading.Lock()
    for writer in list(_writers.values()):
        writer.close()
    _writers.clear()


os.register_at_fork(after_in_child=_writers_after_fork_in_child)


# Checks of the busy hint before sleeping in the kernel (~60 ns each: ~150 us in all).
# Another process holds the write lock for a few microseconds per write; sleeping costs a
# wake-up each time and, since flock is not fair, lets the holder take the lock again and
# again while the sleeper is still waking, so two writers would run slower than one.
# Retrying flock(LOCK_NB) in a loop is no better: each try contends with the holder's own
# flock calls for the file's lock list. So a waiter on another CPU (never with one CPU)
# watches the hint in shared memory and tries the flock when it reads "free".
_SPINS: Final = 2500
# Durable writes that sync outside the lock after the last time a writer found it taken.
_CONTENDED_WRITES: Final = 64


# Polling flock(LOCK_NB) for a write with a timeout (flock itself has none): the first
# retry after 100 us, doubling up to 5 ms, so a short wait costs little and a long one
# little CPU.
_POLL_FIRST: Final = 1e-4
_POLL_MAX: Final = 5e-3


def _lock_exclusive(writer: _ProcessWriter, until: float = math.inf) -> bool:
    """Take the store's flock for ``writer`` (whose process mutex the caller holds) before
    the ``time.monotonic()`` instant ``until`` (``inf``: wait as long as it takes);
    ``False`` if it could not."""
    fd = writer.fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        writer.contended.value = _CONTENDED_WRITES  # durable writers: sync after letting go
        if not _take_after_spinning(writer):
            if until == math.inf:
                fcntl.flock(fd, fcntl.LOCK_EX)
            elif not _poll_exclusive(fd, until):
                return False
    writer.busy.value = 1
    return True


def _poll_exclusive(fd: int, until: float) -> bool:
    delay = _POLL_FIRST
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            left = until - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, _POLL_MAX)
        else:
            return True


def _acquire_mutex(mutex: threading.Lock, until: float) -> bool:
    if until == math.inf:
        return mutex.acquire()
    return mutex.acquire(timeout=max(0.0, until - time.monotonic()))


def _take_after_spinning(writer: _ProcessWriter) -> bool:
    if not _compat.spinning_helps():
        return False
    busy, fd = writer.busy, writer.fd
    for _ in range(_SPINS):
        if busy.value:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        return True
    return False


def _unlock_exclusive(writer: _ProcessWriter) -> None:
    writer.busy.value = 0
    fcntl.flock(writer.fd, fcntl.LOCK_UN)


def _process_writer(dir_fd: int, where: str) -> _ProcessWriter:
    st = os.fstat(dir_fd)
    ident = (st.st_dev, st.st_ino)
    with _writers_lock:
        writer = _writers.get(ident)
        if writer is None or writer.fd < 0:
            fd = _open_file(dir_fd, WRITE_LOCK_FILE, os.O_RDWR, where, create=True)
            writer = _ProcessWriter(fd)
            _writers[ident] = writer
        return writer


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


class SafeFileStore(MutableMapping[str, V], Generic[V]):
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
        create: with ``False``, a missing store raises ``FileNotFoundError`` instead.
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
        FileNotFoundError: ``create=False`` and there is no store.

    Example:
        >>> with SafeFileStore(path) as store:                       # doctest: +SKIP
        ...     store["job:42"] = {"batch": 17}
        ...     store.modify("processed", lambda n: n + 1, default=0)
        ...     with store.transaction() as tx:
        ...         tx["job:42"] = {"batch": 18}
        ...         tx["processed"] = tx["processed"] + 1
    """

    @overload
    def __init__(self: SafeFileStore[Any], path: StrPath, *, durable: bool = ...,
                 serializer: Literal["json"] = ..., create: bool = ...,
                 timeout: float | None = ...) -> None: ...

    @overload
    def __init__(self: SafeFileStore[bytes], path: StrPath, *, durable: bool = ...,
                 serializer: Literal["bytes"], create: bool = ...,
                 timeout: float | None = ...) -> None: ...

    @overload
    def __init__(self: SafeFileStore[Any], path: StrPath, *, durable: bool = ...,
                 serializer: Literal["pickle"], create: bool = ...,
                 timeout: float | None = ...) -> None: ...

    @overload
    def __init__(self, path: StrPath, *, durable: bool = ..., serializer: Serializer[V],
                 create: bool = ...,
                 timeout: float | None = ...) -> None: ...

    def __init__(self, path: StrPath, *, durable: bool = True,
                 serializer: SerializerName | Serializer[Any] = "json",
                 create: bool = True, timeout: float | None = None) -> None:
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
        self._mutex = threading.Lock()
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
                raise FileNotFoundError(errno.ENOENT, "no SafeFileStore at this path",
                                        self._path)
            self._writer: _ProcessWriter | None = _process_writer(self._dir_fd, self._path)
            self._reset_log()
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
    def open(cls, path: StrPath, *, durable: bool = ..., serializer: Literal["json"] = ...,
             create: bool = ...,
                 timeout: float | None = ...) -> SafeFileStore[Any]: ...

    @overload
    @classmethod
    def open(cls, path: StrPath, *, durable: bool = ..., serializer: Literal["bytes"],
             create: bool = ...,
                 timeout: float | None = ...) -> SafeFileStore[bytes]: ...

    @overload
    @classmethod
    def open(cls, path: StrPath, *, durable: bool = ..., serializer: Literal["pickle"],
             create: bool = ...,
                 timeout: float | None = ...) -> SafeFileStore[Any]: ...

    @overload
    @classmethod
    def open(cls, path: StrPath, *, durable: bool = ..., serializer: Serializer[T],
             create: bool = ...,
                 timeout: float | None = ...) -> SafeFileStore[T]: ...

    @classmethod
    def open(cls, path: StrPath, *, durable: bool = True,
             serializer: SerializerName | Serializer[Any] = "json",
             create: bool = True, timeout: float | None = None) -> SafeFileStore[Any]:
        """Open the store at ``path``, creating it if needed: the same as the constructor
        (named like the shared-memory structures' ``open``)."""
        return cls(path, durable=durable, serializer=serializer, create=create,
                   timeout=timeout)

    @staticmethod
    def recover(source: StrPath, destination: StrPath, *, serializer: str | None = None
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
            FileNotFoundError: there is no store at ``source``.
            StoreCorruptedError: the HEADER is damaged and no ``serializer`` was named.
        """
        return recover_store(source, destination, serializer=serializer)

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
                    raise FileNotFoundError(errno.ENOENT, "no SafeFileStore at this path",
                                            self._path)
                self._initialise()
                continue
            try:
                self._switch_to(generation)
            except FileNotFoundError:
                continue  # a compaction replaced it between our two reads: read CURRENT again
            return
        raise StoreCorruptedError(f"{self._path!r}: {CURRENT_FILE} names a log that does not "
                                  f"exist")

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

    def _maintenance_lock(self) -> filelock.BaseFileLock:
        return filelock.FileLock(os.path.join(self._path, MAINTENANCE_LOCK_FILE), mode=0o600)

    def _initialise(self) -> None:
        with self._maintenance_lock():
            if self._read_current() is not None:
                return  # another process initialised it first
            foreign = [n for n in os.listdir(self._dir_fd) if not _is_our_file(n)]
            if foreign:
                shown = ", ".join(sorted(foreign)[:5])
                raise IncompatibleStoreError(
                    f"{self._path!r} is not empty and holds no SafeFileStore "
                    f"(found {shown}); use an empty or new directory")
            # An initialisation killed before it wrote CURRENT leaves temp files and a log
            # holding only its HEADER: debris, removed. A log with records in it means
            # CURRENT was lost from a store in use: that is for a person to look at.
            for name in os.listdir(self._dir_fd):
                if name.endswith(_TMP_SUFFIX):
                    _unlink_quietly(self._dir_fd, name)
                elif _generation_of(name) is not None:
                    if not self._only_header(name):
                        raise StoreCorruptedError(
                            f"{self._path!r} has no {CURRENT_FILE} but its log {name} holds "
                            f"data; restore {CURRENT_FILE} or move the logs away")
                    _unlink_quietly(self._dir_fd, name)
            self._write_generation(1, [])
            _replace_file(self._dir_fd, CURRENT_FILE, _current_text(1), self._path)

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
            chunk: list[bytes] = []
            size = 0
            for record in records:
                chunk.append(record)
                size += len(record)
                if size >= 1 << 20:
                    _write_all(fd, b"".join(chunk))
                    chunk, size = [], 0
            _write_all(fd, b"".join(chunk))
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
        fd = _open_file(self._dir_fd, log_name(generation), os.O_RDWR | os.O_APPEND,
                        self._path)
        old, self._log_fd = self._log_fd, fd
        if old >= 0:
            os.close(old)
        self._reset_log()
        self._generation = generation
        st = os.fstat(fd)
        self._stamp = _stamp_of(st)
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
            f"{WRITE_LOCK_FILE}, which holds only hints about the log it replaced)")

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
                    self._corrupt(published, "a record whose checksum does not match, with "
                                             "more data after it")
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
                    f"read ({size} < {self._end} bytes); was it modified by another program?")
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
                        writer is not None and writer.owner == threading.get_ident()):
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
            if magic != _MAGIC or _crc32(data[pos:pos + _HDR_CRC_SPAN]) != head_crc:
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
                index[key] = (data[vstart:end] if vlen <= _CACHE_LIMIT else None,
                              base + vstart, vlen, end - pos, base + pos, end - pos)
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
                self._check_header(bytes(view[body + klen:end]))
                self._live += end - pos
            elif rtype == MOVED:
                if vlen != _GEN.size:
                    self._corrupt(base + pos, "a MOVED record of the wrong size")
                self._end = base + end
                self._live += live
                (generation,) = _GEN.unpack_from(view, body + klen)
                return int(generation)
            else:
                self._corrupt(base + pos, f"a record of unknown type {rtype}")
            pos = end
        self._end = base + pos
        self._live += live
        return None

    def _apply_txn(self, view: memoryview, pos: int, end: int, base: int, record: int
                   ) -> None:
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
                self._put(index, key, view[body + klen:stop], base + body + klen,
                          HEADER_BYTES + klen + vlen, where)
            else:
                self._drop(index, key)
            pos = stop

    def _put(self, index: dict[str, _Entry], key: str,  # noqa: PLR0917 - a hot path
             value: bytes | memoryview, offset: int, cost: int, record: tuple[int, int]
             ) -> None:
        old = index.get(key)
        if old is not None:
            self._live -= old[3]
        size = len(value)
        index[key] = (bytes(value) if size <= _CACHE_LIMIT else None, offset, size, cost,
                      *record)
        self._live += cost

    def _drop(self, index: dict[str, _Entry], key: str) -> None:
        old = index.pop(key, None)
        if old is not None:
            self._live -= old[3]

    def _key_at(self, view: memoryview, pos: int, klen: int, record: int) -> str:
        try:
            return str(view[pos:pos + klen], "utf-8")
        except UnicodeDecodeError:
            self._corrupt(record, "a key that is not UTF-8")

    def _check_header(self, meta_bytes: bytes) -> None:
        try:
            meta = json.loads(meta_bytes)
            version, serializer = meta["format"], meta["serializer"]
        except (ValueError, KeyError, TypeError):
            self._corrupt(0, "an unreadable HEADER record")
        if version != FORMAT_VERSION:
            raise IncompatibleStoreError(f"{self._path!r} is a SafeFileStore of format "
                                         f"{version}, expected format {FORMAT_VERSION}")
        if self._adopt_serializer_name:
            cast(_RawSerializer, self._serializer).name = str(serializer)
        elif serializer != self._serializer.name:
            raise IncompatibleStoreError(
                f"{self._path!r} was written with serializer {serializer!r}, but was opened "
                f"with serializer {self._serializer.name!r}")

    def _corrupt(self, offset: int, what: str) -> NoReturn:
        raise StoreCorruptedError(f"{self._path!r}: {log_name(self._generation)} is corrupt "
                                  f"at byte {offset}: {what}")

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
            self._corrupt(offset, "a record that does not check out, in the part of the log "
                                  "that its writers acknowledged (damage, not a torn write)")
        writer = self._writer
        if self._exclusive or (writer is not None and writer.owner == threading.get_ident()):
            self._classify_tail(offset, truncate=not self._exclusive)
        else:
            self._suspect = True

    def _settle(self) -> None:
        """Decide what a suspect record is, with writers excluded (``LOCK_SH``). Lock order
        as for writers: process mutex, file lock, then ``_mutex``."""
        writer = self._get_writer()
        with writer.mutex:
            fcntl.flock(writer.fd, fcntl.LOCK_SH)
            try:
                with self._mutex:
                    if self._closed:
                        raise self._closed_error()
                    self._suspect = False
                    self._exclusive = True
                    try:
                        self._refresh()
                    finally:
                        self._exclusive = False
            finally:
                fcntl.flock(writer.fd, fcntl.LOCK_UN)

    def _classify_tail(self, offset: int, *, truncate: bool) -> None:
        """With no writer active: is the data from ``offset`` on a torn tail (truncated
        when ``truncate``), complete now (the caller's next read applies it) or corrupt
        (raises)?"""
        size = os.fstat(self._log_fd).st_size
        rest = os.pread(self._log_fd, max(0, size - offset), offset)
        verdict = _torn_tail(memoryview(rest)) if rest else None
        if verdict == "corrupt":
            self._corrupt(offset, "a record whose checksum does not match, with more data "
                                  "after it")
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
            f"writer holds it: busy, stopped or stuck); {what}")

    def _acquire_writer(self, *, catch_up: bool = True, until: float = math.inf
                        ) -> _ProcessWriter:
        """Take this process's lock for the store, then the file lock, before ``until``
        (else :class:`StoreTimeoutError`, nothing taken); with ``catch_up``, read the log
        to its end (what modify, transactions and deletes decide on)."""
        writer = self._get_writer()
        me = threading.get_ident()
        if writer.owner == me:
            raise LockReentryError(
                f"this thread already holds {self._path!r}'s write lock (inside modify() or "
                f"transaction()); write through the transaction object instead")
        if not _acquire_mutex(writer.mutex, until):
            raise self._timed_out(until)
        try:
            taken = _lock_exclusive(writer, until)
        except BaseException:
            writer.mutex.release()
            raise
        if not taken:
            writer.mutex.release()
            raise self._timed_out(until)
        writer.owner = me
        try:
            with self._mutex:
                if self._closed:
                    raise self._closed_error()
                if catch_up:
                    self._sync_as_writer(writer)
        except BaseException:
            self._release_writer(writer)
            raise
        return writer

    def _release_writer(self, writer: _ProcessWriter) -> None:
        writer.owner = 0
        try:
            _unlock_exclusive(writer)
        finally:
            writer.mutex.release()

    def _append(self, record: bytes, ops: list[tuple[int, bytes, bytes]]) -> _Pending | None:
        """Append one record (writer lock held), publish the new end, and apply the
        record's operations to the index if it is caught up (else the next read does).

        A durable handle returns what :meth:`_finish` needs to sync the record and make it
        visible, after the caller released the lock."""
        writer = self._writer
        if writer is None:  # pragma: no cover - the caller holds the writer
            raise self._closed_error()
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
            if not self._stamp or writer.stamp.value != self._stamp or (
                    writer.position.value != _pack(self._generation, start)) or (
                    contended and hints is None):
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
                self._end = end     # applies them, then ours
                self._apply_own(start, record, ops)
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
        committed = ("the write WAS committed and is on disk (do not repeat it); other "
                     "processes see it after the next write")
        if not _acquire_mutex(writer.mutex, until):
            raise self._timed_out(until, committed)
        try:
            if writer.fd < 0:  # pragma: no cover - only a forked child closes it
                return
            if not _lock_exclusive(writer, until):
                raise self._timed_out(until, committed)
            try:
                hints = writer.hints(stamp, generation)
                if hints is not None and hints[1] & _POS_MASK < end <= hints[0] & _POS_MASK:
                    writer.publish(stamp, hints[0], _pack(generation, end))
            finally:
                _unlock_exclusive(writer)
        finally:
            writer.mutex.release()

    def _apply_own(self, start: int, record: bytes, ops: list[tuple[int, bytes, bytes]]
                   ) -> None:
        """Apply this handle's record, just written at ``start``, to the index (without
        reading it back)."""
        index = self._index
        if len(ops) == 1 and record[2] != TXN:
            rtype, key, value = ops[0]
            if rtype == SET:
                self._put(index, key.decode(), value, start + HEADER_BYTES + len(key),
                          len(record), (start, len(record)))
            else:
                self._drop(index, key.decode())
            return
        pos = start + HEADER_BYTES
        for rtype, key, value in ops:
            pos += _SUB.size
            if rtype == SET:
                self._put(index, key.decode(), value, pos + len(key),
                          HEADER_BYTES + len(key) + len(value), (start, len(record)))
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
        writer = self._acquire_writer(catch_up=False, until=until)
        try:
            pending = self._commit(ops)
        finally:
            self._release_writer(writer)
        self._finish(pending, until)
        with self._mutex, contextlib.suppress(StoreCorruptedError):
            # The write is committed: damage in records before it is reported by the next
            # read, never as a failure of a write that took effect.
            if not self._closed:
                self._refresh()
        self._maybe_compact(until)

    # --- what Transaction and dump_store use ------------------------------------------------
    def _begin_write(self, timeout: float | None) -> _ProcessWriter:
        """Take the write lock (within ``timeout``) and catch up: a transaction begins."""
        return self._acquire_writer(until=deadline(timeout))

    def _end_write(self, writer: _ProcessWriter, ops: list[tuple[int, bytes, bytes]] | None,
                   timeout: float | None) -> None:
        """Commit ``ops`` as one record (``None``: nothing, the transaction was abandoned),
        release the lock, then sync (a durable write) and maybe compact."""
        pending = None
        try:
            if ops is not None:
                pending = self._commit(ops)
        finally:
            self._release_writer(writer)
        if ops is not None:
            until = deadline(timeout)
            self._finish(pending, until)
            self._maybe_compact(until)

    def _committed_value(self, key: str) -> bytes | None:
        """The committed bytes of ``key`` (the write lock held: caught up)."""
        with self._mutex:
            return self._value(key)

    def _committed_keys(self) -> list[str]:
        with self._mutex:
            return list(self._index)

    def _verify_tail(self) -> int:
        """Check what lies past the end readers see, with nothing changed: records of
        writes in progress (before the acknowledged ``position``, each must check out) and
        what a killed writer left (a torn tail, not damage). Its length in bytes."""
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
            self._corrupt(end + pos, "a record that does not check out, in the part of the "
                                     "log that its writers acknowledged")
        if rest and _torn_tail(memoryview(rest)) == "corrupt":
            self._corrupt(end, "a record whose checksum does not match, with more data "
                               "after it")
        return len(rest)

    # --- the mapping ------------------------------------------------------------------------
    def __getitem__(self, key: str) -> V:
        data = self._get_bytes(key)
        if data is None:
            raise KeyError(key)
        return self._serializer.loads(data)

    def _get_bytes(self, key: str) -> bytes | None:
        if not isinstance(key, str):
            raise TypeError(f"store keys are str, not {type(key).__name__}")
        if self._pid != _compat.pid:
            self._after_fork()
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
            self._corrupt(start, "the log ends inside this record, which was read before "
                                 "(was the file truncated?)")
        magic, _rtype, _flags, klen, vlen, body_crc, head_crc = _unpack_hdr(record, 0)
        if (magic != _MAGIC or _crc32(record[:_HDR_CRC_SPAN]) != head_crc
                or HEADER_BYTES + klen + vlen != length
                or _crc32(memoryview(record)[HEADER_BYTES:]) != body_crc):
            self._corrupt(start, "a record whose checksum no longer matches (the file was "
                                 "damaged after it was read)")
        return record[offset - start:offset - start + size]

    def __setitem__(self, key: str, value: V) -> None:
        kb = _key_bytes(key)
        data = self._dumps(value)
        _check_size(kb, data)
        self._write([(SET, kb, data)])

    def __delitem__(self, key: str) -> None:
        kb = _key_bytes(key)
        until = self._until(_DEFAULT)
        writer = self._acquire_writer(until=until)
        try:
            if key not in self._index:
                raise KeyError(key)
            pending = self._commit([(DEL, kb, b"")])
        finally:
            self._release_writer(writer)
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

    def _snapshot(self) -> list[tuple[str, bytes]]:
        def pairs() -> list[tuple[str, bytes]]:
            out: list[tuple[str, bytes]] = []
            for key, entry in self._index.items():
                cached = entry[0]
                out.append((key, cached if cached is not None else self._read_value(entry)))
            return out
        return self._read(pairs)

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

    def _dumps(self, value: V) -> bytes:
        data = self._serializer.dumps(value)
        if not isinstance(data, bytes):
            raise TypeError(f"serializer {self._serializer.name!r} returned "
                            f"{type(data).__name__}, not bytes")
        return data

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

    def pop(self, key: str, default: Any = _MISSING, /, *, timeout: float | None = _DEFAULT
            ) -> Any:
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
    def setdefault(self: SafeFileStore[T | None], key: str, default: None = None, /, *,
                   timeout: float | None = ...) -> T | None: ...

    def setdefault(self, key: str, default: Any = None, /, *,
                   timeout: float | None = _DEFAULT) -> Any:
        """Return the value of ``key``, first storing ``default`` if it is missing,
        atomically. ``timeout``: as for :meth:`modify`."""
        return self._atomically(lambda tx: tx.setdefault(key, default), timeout)

    def clear(self, *, timeout: float | None = _DEFAULT) -> None:
        """Delete every key, as one transaction. ``timeout``: as for :meth:`modify`."""
        self._atomically(lambda tx: tx.clear(), timeout)

    def update(self, other: SupportsKeysAndGetItem[str, V] | Iterable[tuple[str, V]] = (),
               /, **kwargs: V) -> None:
        """Set several keys as one transaction: all of them or, on any error (an
        unencodable value, a bad key), none. Waits for the write lock as long as the
        store's ``timeout`` says (keyword arguments are keys here: for a timeout of its
        own, write ``with store.transaction(timeout=t) as tx: tx.update(...)``)."""
        self._atomically(lambda tx: tx.update(other, **kwargs), _DEFAULT)

    @overload
    def modify(self, key: str, fn: Callable[[V], V], *, timeout: float | None = ...) -> V: ...

    @overload
    def modify(self, key: str, fn: Callable[[V], V], default: V, *,
               timeout: float | None = ...) -> V: ...

    def modify(self, key: str, fn: Callable[[V], V], default: V = _MISSING, *,
               timeout: float | None = _DEFAULT) -> V:
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
        writer = self._acquire_writer(until=until)
        try:
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
            self._release_writer(writer)
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
        return Transaction(self, self._timeout if timeout is _DEFAULT
                           else check_timeout(timeout))

    # --- compaction -------------------------------------------------------------------------
    def _maybe_compact(self, until: float = math.inf) -> None:
        end = self._end
        if end < self._compact_min or end <= 2 * self._live:
            return
        lock = self._maintenance_lock()
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            return  # another process is compacting
        try:
            self._compact_locked(force=False, until=until)
        except StoreTimeoutError:
            pass  # the write that got us here is done; a later one compacts
        finally:
            lock.release()

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
        if self._writer is not None and self._writer.owner == threading.get_ident():
            raise LockReentryError("compact() inside modify() or transaction()")
        lock = self._maintenance_lock()
        try:
            lock.acquire(timeout=-1 if until == math.inf
                         else max(0.0, until - time.monotonic()))
        except filelock.Timeout:
            raise self._timed_out(until, "nothing was compacted") from None
        try:
            self._compact_locked(force=True, until=until)
        finally:
            lock.release()

    def _compact_locked(self, *, force: bool, until: float = math.inf) -> None:
        writer = self._acquire_writer(until=until)
        try:
            with self._mutex:
                if not force and (self._end < self._compact_min or self._end <= 2 * self._live):
                    return
                old_fd, old_generation = self._log_fd, self._generation
                new_generation = old_generation + 1
                records: list[bytes] = []
                for key, entry in self._index.items():
                    # Checked like every read: a record that does not verify raises here,
                    # before anything is written, and is never copied under a fresh
                    # checksum (that would launder the damage).
                    cached = entry[0]
                    value = cached if cached is not None else self._read_value(entry)
                    records.append(encode_record(SET, key.encode(), value))
                # Debris of compactions that were killed: temp files, and logs that are
                # neither the current one nor the one we are about to publish.
                for name in os.listdir(self._dir_fd):
                    generation = _generation_of(name)
                    stale = generation is not None and generation > old_generation
                    if stale or name.endswith(_TMP_SUFFIX):
                        _unlink_quietly(self._dir_fd, name)
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
                _replace_file(self._dir_fd, CURRENT_FILE, _current_text(new_generation),
                              self._path)
                self._switch_to(new_generation)
                self._sync_as_writer(writer)
                for name in os.listdir(self._dir_fd):
                    generation = _generation_of(name)
                    if generation is not None and generation < new_generation:
                        _unlink_quietly(self._dir_fd, name)
                self._compactions += 1
        finally:
            self._release_writer(writer)

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The store's directory, as given."""
        return self._path

    @property
    def durable(self) -> bool:
        return self._durable

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
        return self._read(lambda: StoreStatistics(
            path=self._path, keys=len(self._index), generation=self._generation,
            log_bytes=self._end, live_bytes=self._live, durable=self._durable,
            serializer=self._serializer.name, compactions=self._compactions,
            torn_tails_discarded=self._torn))

    def close(self) -> None:
        """Close this handle (idempotent). Other handles and processes are unaffected; the
        data stays on disk."""
        if self._pid != _compat.pid:
            # A forked child: another thread of the parent may have held _mutex at the
            # fork, and nobody in the child will release it (issue 10, a hang in close()).
            # The parent's writer is not ours either; closing needs no writer of its own.
            self._mutex = threading.Lock()
            self._pid = _compat.pid
            self._writer = None
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._close_fds()

    def _close_fds(self) -> None:
        self._writer = None
        for attr in ("_log_fd", "_dir_fd"):
            fd = getattr(self, attr, -1)
            setattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)

    def _closed_error(self) -> StoreClosedError:
        return StoreClosedError(f"SafeFileStore {self._path!r} is closed")

    def _after_fork(self) -> None:
        """In a forked child: the parent's locks and lock descriptor are not ours."""
        self._mutex = threading.Lock()
        self._pid = _compat.pid
        if not self._closed:
            self._writer = _process_writer(self._dir_fd, self._path)

    def __enter__(self) -> SafeFileStore[V]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
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
            return (f"safeshm.SafeFileStore({self._path!r}, durable={self._durable}, "
                    f"serializer={self._serializer.name!r}{state})")
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


def _reopen(path: str, durable: bool, serializer: Any, timeout: float | None = None
            ) -> SafeFileStore[Any]:
    return SafeFileStore(path, durable=durable, serializer=serializer, create=False,
                         timeout=timeout)


class Transaction(MutableMapping[str, V], Generic[V]):
    """The view of a store inside ``with store.transaction() as tx:`` (see
    :meth:`SafeFileStore.transaction`). Values written to it are encoded at once (an
    unencodable value raises there, in the block), and committed together on exit."""

    def __init__(self, store: SafeFileStore[V], timeout: float | None) -> None:
        self._store = store
        self._timeout = timeout
        self._writer: _ProcessWriter | None = None
        self._ops: dict[str, tuple[bytes, bytes | None]] = {}  # key -> (key bytes, value)
        self._state = "new"

    def __enter__(self) -> Transaction[V]:
        if self._state != "new":
            raise RuntimeError("a transaction can be entered only once")
        self._writer = self._store._begin_write(self._timeout)
        self._state = "open"
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        ops = None if exc_type is not None else [
            (SET, kb, value) if value is not None else (DEL, kb, b"")
            for kb, value in self._ops.values()]
        self._state = "done"
        self._store._end_write(writer, ops, self._timeout)

    def _check(self) -> None:
        if self._state != "open":
            raise StoreClosedError("this transaction is not open: use it inside its "
                                   "`with store.transaction() as tx:` block")

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


# --- verification (safeshm store check / dump) ----------------------------------------------
def _torn_tail(rest: memoryview) -> str | None:
    """Classify data that starts with a record that did not check out, read while no
    writer is active: ``None`` if it is a whole valid record after all, ``"torn"`` if it is
    what a killed writer leaves (a prefix of one record, or zeros), ``"corrupt"`` if not."""
    view = rest
    if len(rest) < HEADER_BYTES:
        return "torn"
    magic, _rtype, _flags, klen, vlen, body_crc, head_crc = _unpack_hdr(view, 0)
    if magic != _MAGIC or _crc32(view[:_HDR_CRC_SPAN]) != head_crc:
        return "torn" if not rest.tobytes().strip(b"\0") else "corrupt"
    end = HEADER_BYTES + klen + vlen
    if end > len(rest):
        return "torn"
    if _crc32(view[HEADER_BYTES:end]) == body_crc:
        return None
    return "torn" if end == len(rest) else "corrupt"


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


class _RawSerializer:
    """Reads a store of any serializer as raw bytes: what the CLI's check and dump use.
    It takes the name the store records (see ``SafeFileStore._check_header``)."""

    name = "*"

    def dumps(self, value: bytes, /) -> bytes:
        return value

    def loads(self, data: bytes, /) -> bytes:
        return data


def _open_raw(path: StrPath) -> SafeFileStore[bytes]:
    return SafeFileStore(path, durable=False, serializer=_RawSerializer(), create=False)


def check_store(path: StrPath) -> StoreReport:
    """Verify every checksum of the store at ``path`` without changing anything.

    Raises:
        StoreCorruptedError: a checksum or the structure does not match.
        IncompatibleStoreError: the store has another format version.
        FileNotFoundError: there is no store at ``path``.
    """
    report, _ = dump_store(path, want_values=False)
    return report


def dump_store(path: StrPath, *, want_values: bool = True
               ) -> tuple[StoreReport, list[tuple[str, bytes]]]:
    """The store's report and its ``(key, raw value bytes)`` pairs, verified."""
    with _open_raw(path) as store:
        pairs = store._snapshot() if want_values else []
        stats = store.statistics()
        # What lies past the acknowledged end (a write in progress, or one whose writer
        # was killed) is no data, but it must be what a killed writer leaves, not damage.
        tail = store._verify_tail()
        report = StoreReport(path=stats.path, generation=stats.generation,
                             serializer=store.serializer.name, keys=stats.keys,
                             log_bytes=stats.log_bytes, live_bytes=stats.live_bytes,
                             torn_tail_bytes=tail)
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


def _record_length(data: bytes, pos: int) -> int:
    """The length of the record at ``pos`` if it checks out completely, else 0."""
    if len(data) - pos < HEADER_BYTES:
        return 0
    magic, _rtype, _flags, klen, vlen, body_crc, head_crc = _unpack_hdr(data, pos)
    end = pos + HEADER_BYTES + klen + vlen
    if (magic != _MAGIC or _crc32(data[pos:pos + _HDR_CRC_SPAN]) != head_crc
            or end > len(data)
            or _crc32(memoryview(data)[pos + HEADER_BYTES:end]) != body_crc):
        return 0
    return int(end - pos)


def _next_record(data: bytes, pos: int) -> int:
    """The offset of the next record from ``pos`` on that checks out (``len(data)``: none)."""
    while True:
        pos = data.find(_MAGIC, pos)
        if pos < 0:
            return len(data)
        if _record_length(data, pos):
            return pos
        pos += 1


def _ops_of(rtype: int, body: memoryview, klen: int) -> list[tuple[int, bytes, bytes]]:
    """The operations of a record's body (``SET``/``DEL``: one; ``TXN``: each). For a
    damaged record, as many as can be parsed."""
    if rtype in (SET, DEL):
        return [(rtype, bytes(body[:klen]), bytes(body[klen:]))]
    ops: list[tuple[int, bytes, bytes]] = []
    if rtype == TXN:
        pos = klen
        while len(body) - pos >= _SUB.size:
            sub, sklen, svlen = _SUB.unpack_from(body, pos)
            start, stop = pos + _SUB.size, pos + _SUB.size + sklen + svlen
            if sub not in (SET, DEL) or stop > len(body):
                break
            ops.append((sub, bytes(body[start:start + sklen]), bytes(body[start + sklen:stop])))
            pos = stop
    return ops


def _keys_of(ops: list[tuple[int, bytes, bytes]]) -> tuple[str, ...]:
    keys: list[str] = []
    for _rtype, key, _value in ops:
        with contextlib.suppress(UnicodeDecodeError):
            if key and key.decode() not in keys:
                keys.append(key.decode())
    return tuple(keys)


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
    if (not stamp or stamp != _stamp_of(os.fstat(log_fd))
            or check != _check_word(stamp, position, synced)
            or position >> _POS_BITS != generation):
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
        raise FileNotFoundError(errno.ENOENT, "no SafeFileStore at this path", where)
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
            if (good == len(data) and pos >= acknowledged
                    and _torn_tail(memoryview(data)[pos:]) == "torn"):
                self.torn += len(data) - pos  # what a killed writer leaves: no damage
                return None
            kind, end = "unknown", good
            keys: tuple[str, ...] = ()
            if len(data) - pos >= HEADER_BYTES:
                magic, rtype, _flags, klen, vlen, _bc, head_crc = _unpack_hdr(data, pos)
                stop = pos + HEADER_BYTES + klen + vlen
                if (magic == _MAGIC and _crc32(data[pos:pos + _HDR_CRC_SPAN]) == head_crc
                        and stop <= good):
                    kind, end = _TYPE_NAMES.get(rtype, f"type {rtype}"), stop
                    keys = _keys_of(_ops_of(rtype, memoryview(data)[pos + HEADER_BYTES:stop],
                                            klen))
            self.damaged.append((self.seq, name, pos, end - pos, kind, keys))
            pos = end
        return None

    def _apply(self, data: bytes, pos: int, length: int) -> int | None:
        _magic, rtype, _flags, klen, _vlen, _bc, _hc = _unpack_hdr(data, pos)
        body = memoryview(data)[pos + HEADER_BYTES:pos + length]
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
                f"serializer's name)")
        return RecoveryReport(
            source=where, destination=None, serializer=self.serializer,
            keys=len(self.values), records=self.records, torn_tail_bytes=self.torn,
            damaged=tuple(
                DamagedRecord(log=name, offset=pos, length=length, kind=kind, keys=keys,
                              lost=tuple(k for k in keys if self.written.get(k, 0) < seq))
                for seq, name, pos, length, kind, keys in self.damaged))


def _scan(path: StrPath, serializer: str | None = None
          ) -> tuple[RecoveryReport, dict[str, bytes]]:
    """Replay every record of the store at ``path`` that checks out, skipping damage;
    change nothing there. The report (no destination) and the recovered values."""
    dir_fd, where = open_directory(path, create=False)
    scan = _Scan(serializer)
    try:
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
    finally:
        os.close(dir_fd)
    return scan.report(where), scan.values


def scan_store(path: StrPath) -> RecoveryReport:
    """What :meth:`SafeFileStore.recover` would recover from ``path``, without writing
    anything anywhere (``safeshm store check`` names damage with it)."""
    return _scan(path)[0]


# A recovered store is written in transactions of about this many bytes (one record each).
_RECOVER_BATCH: Final = 64 << 20


def recover_store(source: StrPath, destination: StrPath, *, serializer: str | None = None
                  ) -> RecoveryReport:
    """See :meth:`SafeFileStore.recover`."""
    if serializer is not None and not isinstance(serializer, str):
        raise TypeError("serializer must be the name a store records, as a str")
    dest = os.fspath(destination)
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise FileExistsError(errno.EEXIST, "the destination of a recovery must be a new or "
                                            "empty directory", dest)
    if os.path.realpath(dest) == os.path.realpath(os.fspath(source)):
        raise ValueError("recovery never writes into the store it reads: give another "
                         "directory")
    report, values = _scan(source, serializer)
    raw = _RawSerializer()
    raw.name = report.serializer  # the recovered store records the original's serializer
    with SafeFileStore(dest, durable=True, serializer=raw) as store:
        batch: dict[str, bytes] = {}
        size = 0
        for key, value in values.items():
            batch[key] = value
            size += len(key) + len(value) + 16
            if size >= _RECOVER_BATCH:
                store.update(batch)
                batch, size = {}, 0
        store.update(batch)
    return dataclasses.replace(report, destination=dest)
