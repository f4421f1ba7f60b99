"""Segments: the shared-memory files every structure lives in, and their lifecycle.

A segment is the file ``SHM_DIR/safeshm.<name>`` mapped ``MAP_SHARED``. It starts with
a 128-byte header::

    offset  size  field
    0       8     magic b"SAFESHM\\0" -- written last: it doubles as the ready flag
    8       2     header layout version
    10      2     kind (SafeCounter, SafeLock, ...)
    12      2     kind layout version
    14      2     kind flags
    16      8     total size in bytes
    24      8     creator pid
    32      8     creator start time (clock ticks since boot; with the pid, it names the
                  creating process even after its pid is reused)
    40      8     creation time (ns since the epoch)
    48      4     CRC-32 of bytes 8-48 and 64-128 (header layout 2): damage to what the
                  header says (a kind, a size, a parameter, a flag) is found at attach
    52      12    reserved (zero)
    64      64    kind parameters (e.g. the shard count of a ShardedCounter)

Creation is race-free and never exposes a half-built segment: the file is built as an
anonymous ``O_TMPFILE`` inode (or, where that is unavailable, under a temporary name),
fully initialised, and only then hard-linked to its final name. ``link()`` fails if the
name is taken, so exactly one of many concurrent creators wins and every attacher sees
a complete segment. A creator killed half-way leaves nothing behind (``O_TMPFILE``) or a
``safeshm.~tmp.*`` file that ``safeshm ls`` reports.

Every open handle holds a shared ``flock`` on its file descriptor for as long as it is
open; the kernel drops it when the process dies, so "is anyone still using this
segment?" has an exact answer that no crash can corrupt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import mmap
import os
import re
import stat
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from typing import Any, ClassVar, Final, NamedTuple, Self

from . import _compat
from ._errors import (
    IncompatibleSegmentError,
    InsecureDirectoryError,
    InvalidNameError,
    SegmentClosedError,
    SegmentCorruptedError,
    SegmentExistsError,
    SegmentNotFoundError,
    SegmentPermissionError,
)

MAGIC: Final = b"SAFESHM\x00"
HEADER_LAYOUT: Final = 2  # 2: the header carries a CRC-32 (1: none)
HEADER_SIZE: Final = 128
PARAMS_OFFSET: Final = 64
PARAMS_SIZE: Final = 64
CACHE_LINE: Final = 64

# magic, header layout, kind, kind layout, flags, total size, creator pid, creator start, ns
_HEADER: Final = struct.Struct("=8sHHHHQQQQ")
_CRC_OFFSET: Final = 48
_CRC: Final = struct.Struct("=I")


def _header_crc(raw: bytes | bytearray | mmap.mmap) -> int:
    """CRC-32 of what a header says: all of it but the magic (the ready flag, written
    last), the CRC itself and the reserved bytes."""
    return zlib.crc32(raw[PARAMS_OFFSET:HEADER_SIZE], zlib.crc32(raw[8:_CRC_OFFSET]))


MAX_SEGMENT_SIZE: Final = 1 << 62
"""The largest segment safeshm makes: far beyond any memory, yet every offset and byte
counter into it (int64 words in the segments) stays exact."""

NAME_MAX: Final = 64
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")


class Kind(enum.IntEnum):
    """What a segment holds. The numbers are part of the on-disk format: never reuse one."""

    COUNTER = 1
    SHARDED_COUNTER = 2
    LOCK = 3
    ARRAY = 4
    QUEUE = 5
    EVENT = 6
    SEMAPHORE = 7
    BARRIER = 8
    CONDITION = 9
    RLOCK = 10
    RWLOCK = 11
    METRICS = 12
    RATE_LIMITS = 13

    @property
    def type_name(self) -> str:
        return _KIND_NAMES[self]


_KIND_NAMES: Final = {
    Kind.COUNTER: "SafeCounter",
    Kind.SHARDED_COUNTER: "ShardedCounter",
    Kind.LOCK: "SafeLock",
    Kind.ARRAY: "SafeArray",
    Kind.QUEUE: "SafeQueue",
    Kind.EVENT: "SafeEvent",
    Kind.SEMAPHORE: "SafeSemaphore",
    Kind.BARRIER: "SafeBarrier",
    Kind.CONDITION: "SafeCondition",
    Kind.RLOCK: "SafeRLock",
    Kind.RWLOCK: "SafeRWLock",
    Kind.METRICS: "MetricsRegistry",
    Kind.RATE_LIMITS: "RateLimitTable",
}


def describe_kind(kind: int, layout: int) -> str:
    try:
        return f"a {Kind(kind).type_name} (layout {layout})"
    except ValueError:
        return f"a safeshm segment of unknown kind {kind} (layout {layout})"


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid segment name, else raise a clear error.

    Names are 1 to 64 characters of ASCII letters, digits, ``_``, ``-`` and ``.``, not
    starting with ``.`` or ``-``: short, portable, and safe as a file name.
    """
    if not isinstance(name, str):
        raise TypeError(f"segment name must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidNameError("segment name must not be empty")
    if len(name) > NAME_MAX:
        raise InvalidNameError(
            f"segment name {name[:20]!r}... is {len(name)} characters long; the limit is {NAME_MAX}"
        )
    if not _NAME_RE.match(name):
        raise InvalidNameError(
            f"segment name {name!r} is not valid: use ASCII letters, digits, '_', '-' "
            "and '.', not starting with '.' or '-'"
        )
    return name


def random_name() -> str:
    return "ss-" + os.urandom(6).hex()


def segment_path(name: str) -> str:
    return os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name)


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """A segment header as read from its file (see :func:`read_header`)."""

    kind: int
    layout: int
    flags: int
    total_size: int
    creator_pid: int
    creator_start: int
    created_ns: int
    params: bytes
    intact: bool = True
    """Whether the header's CRC matches: if not, none of the above can be trusted."""

    @classmethod
    def parse(cls, raw: bytes) -> Header | None:
        """Parse the first ``HEADER_SIZE`` bytes of a file; ``None`` if it is not ours."""
        if len(raw) < HEADER_SIZE:
            return None
        magic, hlayout, kind, layout, flags, size, cpid, cstart, cns = _HEADER.unpack_from(raw)
        if magic != MAGIC or hlayout != HEADER_LAYOUT:
            return None
        intact = _CRC.unpack_from(raw, _CRC_OFFSET)[0] == _header_crc(raw)
        return cls(
            kind,
            layout,
            flags,
            size,
            cpid,
            cstart,
            cns,
            bytes(raw[PARAMS_OFFSET : PARAMS_OFFSET + PARAMS_SIZE]),
            intact,
        )


def read_header(path: str) -> tuple[Header | None, os.stat_result]:
    """Read a segment file's header without mapping it, locking it or waiting."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        return Header.parse(os.pread(fd, HEADER_SIZE, 0)), st
    finally:
        os.close(fd)


# Whether O_TMPFILE + linkat(/proc/self/fd/N) works here; learnt on first create.
_use_tmpfile: bool = hasattr(os, "O_TMPFILE")


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class Segment:
    """One open mapping of a segment file. Internal: structures wrap it."""

    __slots__ = (
        "__weakref__",
        "_close_lock",
        "_finalizer",
        "closed",
        "created_here",
        "creator_pid",
        "dev_ino",
        "fd",
        "header",
        "mm",
        "name",
    )

    name: str
    fd: int
    mm: mmap.mmap
    header: Header
    created_here: bool
    creator_pid: int
    dev_ino: tuple[int, int]
    closed: bool

    def _setup(self, name: str, fd: int, header: Header, created: bool) -> None:
        st = os.fstat(fd)
        self.name = name
        self.fd = fd
        self.header = header
        self.created_here = created
        self.creator_pid = _compat.pid
        self.dev_ino = (st.st_dev, st.st_ino)
        self.closed = False
        self._close_lock = threading.Lock()
        self.mm = mmap.mmap(
            fd,
            header.total_size,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            **_compat.MMAP_KWARGS,
        )
        # Safety net only: if the handle is dropped without close(), release the file
        # descriptor (and with it the flock). The mapping itself goes away with the last
        # object that references it. Never unlinks.
        self._finalizer = weakref.finalize(self, _close_fd, fd)

    # -- create ------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        name: str | None,
        *,
        kind: Kind,
        layout: int,
        payload_size: int,
        init: Callable[[mmap.mmap], None],
        params: bytes = b"",
        flags: int = 0,
    ) -> Segment:
        """Create and publish a new segment; ``SegmentExistsError`` if ``name`` is taken.

        ``init`` fills the payload (offsets from the start of the mapping, payload at
        ``HEADER_SIZE``). The segment becomes visible under its name only after ``init``
        returned and the magic was written.
        """
        global _use_tmpfile  # noqa: PLW0603 - a per-process capability probe
        name = random_name() if name is None else validate_name(name)
        if len(params) > PARAMS_SIZE:  # pragma: no cover - programming error in a structure
            raise ValueError("kind parameters too large")
        if payload_size > MAX_SEGMENT_SIZE - HEADER_SIZE:
            raise OverflowError(
                f"a {payload_size}-byte segment is beyond safeshm's limit of "
                f"{MAX_SEGMENT_SIZE} bytes; nothing was created"
            )
        spec = _Spec(
            name,
            kind,
            layout,
            HEADER_SIZE + payload_size,
            init,
            params.ljust(PARAMS_SIZE, b"\0"),
            flags,
        )
        dir_fd = _open_shm_dir()
        try:
            if _use_tmpfile:
                try:
                    return cls._create_tmpfile(spec, dir_fd)
                except _TmpfileUnsupported:
                    _use_tmpfile = False
            return cls._create_named_tmp(spec, dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def _create_tmpfile(cls, spec: _Spec, dir_fd: int) -> Segment:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise _TmpfileUnsupported from e
            raise
        seg = cls._build(spec, fd)
        try:
            os.link(
                f"/proc/self/fd/{fd}",
                _compat.FILE_PREFIX + spec.name,
                src_dir_fd=dir_fd,
                dst_dir_fd=dir_fd,
                follow_symlinks=True,
            )
        except FileExistsError:
            seg.close()
            raise _exists(spec.name) from None
        except OSError as e:
            seg.close()
            if e.errno in (errno.ENOENT, errno.EXDEV, errno.EPERM, errno.EACCES):
                # No /proc, or a kernel that refuses to link O_TMPFILE inodes.
                raise _TmpfileUnsupported from e
            raise
        return seg

    @classmethod
    def _create_named_tmp(cls, spec: _Spec, dir_fd: int) -> Segment:
        tmp = f"{_compat.TMP_PREFIX}{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(
            tmp,
            os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            seg = cls._build(spec, fd)
        except BaseException:
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        try:
            os.link(
                tmp,
                _compat.FILE_PREFIX + spec.name,
                src_dir_fd=dir_fd,
                dst_dir_fd=dir_fd,
                follow_symlinks=False,
            )
        except FileExistsError:
            seg.close()
            raise _exists(spec.name) from None
        except BaseException:
            seg.close()
            raise
        finally:
            os.unlink(tmp, dir_fd=dir_fd)
        return seg

    @classmethod
    def _build(cls, spec: _Spec, fd: int) -> Segment:
        """Size, lock, map and initialise an unpublished segment file. Closes ``fd`` on error."""
        try:
            try:
                # Reserve the memory now: on a full tmpfs (docker's default /dev/shm is
                # 64 MiB) this fails here with ENOSPC, instead of a SIGBUS on first touch.
                os.posix_fallocate(fd, 0, spec.total)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise OSError(
                        errno.ENOSPC,
                        f"not enough space in {_compat.SHM_DIR} for "
                        f"a {spec.total}-byte segment {spec.name!r}",
                    ) from None
                raise
            fcntl.flock(fd, fcntl.LOCK_SH)
            header = Header(
                spec.kind,
                spec.layout,
                spec.flags,
                spec.total,
                _compat.pid,
                _compat.process_start_time(_compat.pid) or 0,
                time.time_ns(),
                spec.params,
            )
            seg = cls.__new__(cls)
            seg._setup(spec.name, fd, header, created=True)
        except BaseException:
            os.close(fd)
            raise
        try:
            mm = seg.mm
            _HEADER.pack_into(
                mm,
                0,
                b"\0" * 8,
                HEADER_LAYOUT,
                header.kind,
                header.layout,
                header.flags,
                header.total_size,
                header.creator_pid,
                header.creator_start,
                header.created_ns,
            )
            mm[PARAMS_OFFSET : PARAMS_OFFSET + PARAMS_SIZE] = header.params
            _CRC.pack_into(mm, _CRC_OFFSET, _header_crc(mm))
            spec.init(mm)
            mm[0:8] = MAGIC  # published last: the ready flag
        except BaseException:
            seg.close()
            raise
        return seg

    # -- attach ------------------------------------------------------------------------
    @classmethod
    def attach(cls, name: str, *, kind: Kind, layout: int) -> Segment:
        """Map an existing segment after checking that it is a ``kind`` of ``layout``."""
        validate_name(name)
        path = segment_path(name)
        dir_fd = _open_shm_dir()
        try:
            fd = os.open(
                _compat.FILE_PREFIX + name, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd
            )
        except FileNotFoundError:
            raise SegmentNotFoundError(
                errno.ENOENT, f"no safeshm segment named {name!r}", path
            ) from None
        except OSError as e:
            raise _open_error(name, e, dir_fd) from None
        finally:
            os.close(dir_fd)
        try:
            header = _validate(name, fd, kind, layout)
            fcntl.flock(fd, fcntl.LOCK_SH)
            # The name may have been unlinked (e.g. by `safeshm rm --stale`) between our
            # open() and flock(): attaching to an orphaned inode would silently split users
            # across two segments. Check the name still refers to our file.
            st = os.fstat(fd)
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                raise SegmentNotFoundError(
                    errno.ENOENT, f"no safeshm segment named {name!r}", path
                ) from None
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise SegmentNotFoundError(
                    errno.ENOENT, f"safeshm segment {name!r} was removed while attaching", path
                )
            seg = cls.__new__(cls)
            seg._setup(name, fd, header, created=False)
        except BaseException:
            os.close(fd)
            raise
        return seg

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and release the file. Idempotent. Callers drop their views first."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        # BufferError: another thread is mid-operation and still holds a view of the
        # mapping. The mapping is released when that last view goes away; the memory it
        # touches stays valid until then, so nothing can fault.
        with contextlib.suppress(BufferError):
            self.mm.close()
        # Drop the "in use" flock explicitly: a mapping that outlives close() (a view still
        # exported, a SafeLock's unlocker) keeps the open file -- and with it the lock --
        # alive, and `safeshm ls` / `rm --stale` would count this handle as a user.
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._finalizer()  # closes the fd exactly once

    def unlink(self) -> None:
        """Remove the segment's name, so that nobody new can attach; mappings stay valid."""
        path = segment_path(self.name)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            raise SegmentNotFoundError(
                errno.ENOENT, f"safeshm segment {self.name!r} was already unlinked", path
            ) from None
        if (st.st_dev, st.st_ino) != self.dev_ino:
            raise SegmentNotFoundError(
                errno.ENOENT,
                f"safeshm segment {self.name!r} was already unlinked (the name now belongs "
                "to a newer segment, which is left alone)",
                path,
            )
        os.unlink(path)


class _Closed:
    """Stands in for every view of a closed handle's mapping; any use raises."""

    __slots__ = ("_message",)

    def __init__(self, message: str) -> None:
        self._message = message

    def _raise(self, *args: object, **kwargs: object) -> Any:
        raise SegmentClosedError(self._message)

    __getitem__ = __setitem__ = __call__ = __iter__ = __len__ = __enter__ = __exit__ = _raise

    def __getattr__(self, attr: str) -> Any:
        raise SegmentClosedError(self._message)


class _Spec(NamedTuple):
    """Everything needed to build a new segment file."""

    name: str
    kind: Kind
    layout: int
    total: int
    init: Callable[[mmap.mmap], None]
    params: bytes
    flags: int


def _exists(name: str) -> SegmentExistsError:
    return SegmentExistsError(
        errno.EEXIST, f"a safeshm segment named {name!r} already exists", segment_path(name)
    )


class _TmpfileUnsupported(Exception):
    """O_TMPFILE publishing does not work here; use a named temporary instead."""


def _open_shm_dir() -> int:
    """Open the segment directory and check that no other user can swap our files in it."""
    try:
        fd = os.open(_compat.SHM_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentNotFoundError(
            errno.ENOENT,
            f"shared-memory directory {_compat.SHM_DIR} does not exist (set SAFESHM_DIR to a "
            "tmpfs directory)",
            _compat.SHM_DIR,
        ) from None
    except PermissionError:
        raise SegmentPermissionError(
            f"segment directory {_compat.SHM_DIR} cannot be opened by you (uid "
            f"{os.geteuid()}); set SAFESHM_DIR to a directory of your own"
        ) from None
    try:
        check_directory(os.fstat(fd), _compat.SHM_DIR)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_directory(st: os.stat_result, path: str) -> None:
    """Refuse a segment directory in which another user could replace or remove our files.

    Like ``/dev/shm`` (root's, mode 1777) it may be shared, but then only with the sticky
    bit, which stops users from renaming or unlinking each other's files. Without it,
    another user could swap two of our segments (their names, not their contents: each
    file still passes the per-file owner check) and we would use the wrong one.

    Raises:
        InsecureDirectoryError: the directory belongs to another user (not root), or
            users other than its owner can write into it and it is not sticky.
    """
    uid = os.geteuid()
    if st.st_uid not in (0, uid):
        raise InsecureDirectoryError(
            f"segment directory {path} belongs to uid {st.st_uid}, not to you (uid {uid}) "
            "or root: its owner could replace our segments. Point SAFESHM_DIR at a "
            "directory of your own (mkdir -m 700 DIR on a tmpfs such as /dev/shm)"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        mode = f"{stat.S_IMODE(st.st_mode):04o}"
        raise InsecureDirectoryError(
            f"segment directory {path} can be written by other users and is not sticky "
            f"(mode {mode}): they could rename or remove our segments. Make it private "
            f"(chmod go-w {path}) if it is yours alone, or point SAFESHM_DIR at a private "
            "subdirectory (mkdir -m 700 /dev/shm/NAME)"
        )


def _open_error(name: str, e: OSError, dir_fd: int) -> Exception:
    """The typed error for an ``open()`` of segment ``name`` that failed with ``e``."""
    path = segment_path(name)
    if e.errno == errno.ELOOP:
        return IncompatibleSegmentError(
            f"segment {name!r} is a symbolic link, not a safeshm segment; refusing to follow it"
        )
    if e.errno == errno.EISDIR:
        return IncompatibleSegmentError(
            f"segment {name!r} is a directory ({path}), not a safeshm segment"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        try:
            st = os.stat(_compat.FILE_PREFIX + name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            owner = ""
        else:
            owner = f" (it belongs to uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        return SegmentPermissionError(
            f"segment {name!r} cannot be opened by you (uid {os.geteuid()}){owner}; safeshm "
            "segments are private to the user who created them"
        )
    return e


def _validate(name: str, fd: int, kind: Kind, layout: int) -> Header:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise IncompatibleSegmentError(f"segment {name!r} is not a regular file")
    if st.st_uid != os.geteuid():
        raise SegmentPermissionError(
            f"segment {name!r} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}); "
            "safeshm segments are private to their creator"
        )
    if st.st_mode & 0o022:
        raise SegmentPermissionError(
            f"segment {name!r} is writable by other users (mode {st.st_mode & 0o777:o}); "
            "refusing to trust its contents"
        )
    raw = os.pread(fd, HEADER_SIZE, 0)
    header = Header.parse(raw)
    if header is None:
        if len(raw) >= 10 and raw[:8] == MAGIC:
            found = struct.unpack_from("=H", raw, 8)[0]
            if found == HEADER_LAYOUT:  # ours, but cut short: not another version
                raise SegmentCorruptedError(
                    f"segment {name!r} is damaged: its file has {st.st_size} bytes, less "
                    f"than the {HEADER_SIZE}-byte header"
                )
            raise IncompatibleSegmentError(
                f"segment {name!r} has a safeshm header of layout {found}, but this "
                f"safeshm reads layout {HEADER_LAYOUT}"
            )
        raise IncompatibleSegmentError(
            f"segment {name!r} is not a safeshm segment (no safeshm header in its "
            f"{st.st_size} bytes), expected {describe_kind(kind, layout)}"
        )
    if not header.intact:
        raise SegmentCorruptedError(
            f"segment {name!r} is damaged: its header's checksum does not match, so what it "
            "says (kind, size, parameters) cannot be trusted"
        )
    if header.kind != kind or header.layout != layout:
        raise IncompatibleSegmentError(
            f"segment {name!r} is {describe_kind(header.kind, header.layout)}, "
            f"expected {describe_kind(kind, layout)}"
        )
    if header.total_size != st.st_size:
        raise SegmentCorruptedError(
            f"segment {name!r} is damaged: its header says {header.total_size} bytes, the "
            f"file has {st.st_size}"
        )
    return header


class SharedStructure:
    """Lifecycle shared by every public structure: create/attach/open, close, unlink,
    context management, pickling by reference, and a never-raising ``repr``.

    A subclass declares its ``_KIND`` and ``_LAYOUT``, binds its hot-path views of the
    mapping in ``_bind`` and lists them in ``_MAPPED``: ``close()`` replaces exactly those
    attributes with a stand-in that raises :class:`SegmentClosedError` on any use, so a
    later call fails clearly instead of touching unmapped memory -- at no cost on the hot
    path. (A ``__getattr__`` hook would do the same but would stop CPython from
    specialising every attribute load on the class: ~30 ns per call, measured.)
    """

    _KIND: ClassVar[Kind]
    _LAYOUT: ClassVar[int]
    _MAPPED: ClassVar[tuple[str, ...]] = ()
    _seg: Segment
    _unlink_on_exit: bool

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            f"use {type(self).__name__}.create(), .attach() or .open() to get a "
            f"{type(self).__name__}"
        )

    @classmethod
    def _from_segment(cls, seg: Segment) -> Self:
        self = cls.__new__(cls)
        self._seg = seg
        # True only for a handle that create() made; open() clears it (see __exit__).
        self._unlink_on_exit = seg.created_here
        try:
            self._bind(seg.mm)
        except BaseException:
            seg.close()
            raise
        return self

    def _bind(self, mm: mmap.mmap) -> None:
        raise NotImplementedError

    def statistics(self) -> Any:
        """A snapshot of the structure's state: a frozen dataclass of each structure's own
        (``CounterStatistics``, ``QueueStatistics``...), also shown by ``safeshm inspect``."""
        raise NotImplementedError

    @classmethod
    def _attach_segment(cls, name: str) -> Segment:
        return Segment.attach(name, kind=cls._KIND, layout=cls._LAYOUT)

    @classmethod
    def _open_segment(
        cls, name: str, create: Callable[[], Self], check: Callable[[Segment], None] | None = None
    ) -> Self:
        """Create-or-attach without check-then-act: try the ``O_EXCL``-equivalent create
        first; if the name is taken, attach (the winner published a complete segment)."""
        validate_name(name)
        deadline = time.monotonic() + 5.0
        while True:
            try:
                made = create()
            except FileExistsError:
                pass
            else:
                made._unlink_on_exit = False
                return made
            try:
                seg = cls._attach_segment(name)
            except FileNotFoundError:
                # Unlinked between our create and attach attempts: try again.
                if time.monotonic() > deadline:  # pragma: no cover - pathological churn
                    raise
                continue
            try:
                if check is not None:
                    check(seg)
            except BaseException:
                seg.close()
                raise
            return cls._from_segment(seg)

    # -- public lifecycle ----------------------------------------------------------------
    @property
    def name(self) -> str:
        """The name other processes attach by."""
        return self._seg.name

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called on this handle."""
        return self._seg.closed

    def close(self) -> None:
        """Detach this handle from the segment. Idempotent.

        The segment itself lives on for other handles and processes (see :meth:`unlink`).
        Any later use of this handle raises :class:`~safeshm.SegmentClosedError`.
        """
        seg = self._seg
        if seg.closed:
            return
        self._before_close()
        # Swap every view of the mapping for a stand-in that raises SegmentClosedError on
        # any use. The hot paths need no "is it closed?" check: a call that started before
        # close() keeps its own references (and with them the mapping), a later one fails
        # cleanly on its first touch of the segment.
        # A compiled core (safeshm._native, bound as ``_core``) is told first: a call of it
        # blocked in another thread raises SegmentClosedError at its next check.
        core = self.__dict__.get("_core")
        if core is not None and not isinstance(core, _Closed):
            core.close()
        del core  # else this reference keeps its buffer export (and the mapping) past seg.close()
        poison = _Closed(f"{type(self).__name__} {seg.name!r} is closed on this handle")
        for attr in type(self)._MAPPED:
            self.__dict__[attr] = poison
        seg.close()

    def _before_close(self) -> None:
        """Hook for subclasses (e.g. to release a lock the closing thread holds)."""

    def unlink(self) -> None:
        """Destroy the segment for everyone: its name is removed at once, and its memory
        is freed when the last process closes its handle.

        Raises:
            SegmentNotFoundError: the segment was already unlinked (a ``FileNotFoundError``).
        """
        self._seg.unlink()

    def __enter__(self) -> Self:
        if self._seg.closed:
            self._raise_closed()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close; and unlink too if this handle came from ``create()`` (in this process).

        A handle from ``open()`` or ``attach()`` only closes, even when that ``open()``
        happened to create the segment: whether it did depends on a race between the
        processes opening it, and ``with X.open(name):`` in many workers must never
        remove what the others still use.
        """
        unlink = self._unlink_on_exit and self._seg.creator_pid == _compat.pid
        self.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                self._seg.unlink()

    def __reduce__(self) -> tuple[Any, ...]:
        if self._seg.closed:
            self._raise_closed()
        return (type(self).attach, (self._seg.name,))

    @classmethod
    def attach(cls, name: str) -> Self:  # overridden with docs by each structure
        return cls._from_segment(cls._attach_segment(name))

    def _raise_closed(self) -> None:
        raise SegmentClosedError(
            f"{type(self).__name__} {self._seg.name!r} is closed on this handle"
        )

    def _repr_fields(self) -> str:
        return ""

    def __repr__(self) -> str:
        cls = f"safeshm.{type(self).__name__}"
        seg = self.__dict__.get("_seg")
        if seg is None:
            return f"<{cls} (uninitialised)>"
        if seg.closed:
            return f"{cls}(name={seg.name!r}, closed=True)"
        try:
            extra = self._repr_fields()
        except Exception:  # noqa: BLE001 - repr must never raise
            extra = ""
        return f"{cls}(name={seg.name!r}{', ' + extra if extra else ''})"
