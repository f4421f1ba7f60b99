"""The writer protocol: the per-process lock, the ``flock`` of ``write.lock``, and the
hint words mapped from it (group commit, published positions)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import math
import mmap
import os
import threading
import time
import weakref
from typing import (
    Final,
)

from safeshm import _compat

from ._files import (
    _open_file,
)
from ._format import (
    _LOCK_FILE_BYTES,
    _MIX,
    _POS_BITS,
    _WORD,
    WRITE_LOCK_FILE,
    _check_word,
)


# --- the per-process writer lock ------------------------------------------------------------
class _ProcessWriter:
    """What the handles of one store in one process share: a ``threading.Lock`` that
    orders this process's writers, and the descriptor that carries the ``flock``.

    ``flock`` locks belong to an open file description, which a forked child shares: a
    child must never use its parent's descriptor (it would "hold" the parent's lock), so
    the registry is emptied and the inherited descriptors closed in every child.

    The lock file is mapped shared and holds these words (see ``docs/design.md``), all
    written with the flock held except ``contended``:

    * ``busy``: set by the holder of the flock, cleared before it unlocks; only a hint for
      waiters (see :func:`_lock_exclusive`). A holder that dies with it set costs the next
      writer one short spin, nothing more.
    * ``contended``: set to :data:`_CONTENDED_WRITES` by a writer that found the flock
      taken -- before it has the flock, so a plain store that can race the holder's
      countdown (a lost update only moves the moment a durable writer switches modes) --
      and counted down by each durable write. While it is not zero, durable writers
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

    __slots__ = (
        "__weakref__",
        "busy",
        "check",
        "contended",
        "fd",
        "map",
        "mutex",
        "owner",
        "position",
        "stamp",
        "synced",
    )

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # An RLock, used as a plain lock (a re-entry is refused before acquiring): unlike
        # threading.Lock it records its owner in C as it is acquired, so an acquire whose
        # result a signal handler's exception threw away can still be undone (release()
        # raises RuntimeError, touching nothing, if this thread does not hold it) and a
        # re-entry is recognised however far the interrupted acquire got (_is_owned()).
        self.mutex = threading.RLock()
        self.owner = 0
        # Reserve the page's block before mapping it: a page of a sparse file gets its
        # block on the first store to it, and on a full file system that store kills the
        # process with SIGBUS instead of raising. posix_fallocate extends the file (to the
        # same size whoever does it first) and raises ENOSPC here, with nothing mapped.
        # Always, not only when the file is short: one extended by ftruncate (an older
        # safeshm, or another program) may be the right size and still sparse.
        os.posix_fallocate(fd, 0, _LOCK_FILE_BYTES)
        self.map = mmap.mmap(
            fd,
            _LOCK_FILE_BYTES,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            **_compat.MMAP_KWARGS,
        )
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
        check = _check_word(stamp, position, synced)
        # Stores only from here on (no call, so no signal handler between them): an
        # exception cannot leave the words half-published.
        self.position.value = position
        self.synced.value = synced
        self.stamp.value = stamp
        self.check.value = check

    def hints(self, stamp: int, generation: int) -> tuple[int, int] | None:
        """``(position, synced)`` as words, if they are trusted for ``generation``'s log
        ``stamp``: intact, about that log, and ``synced <= position``."""
        for _attempt in (1, 2, 3):  # a publish in progress: its stores take nanoseconds
            position, synced = self.position.value, self.synced.value
            if self.stamp.value != stamp or not stamp:
                return None
            if (
                self.check.value
                == (((position ^ (synced << 32) ^ (synced >> 32)) * _MIX) ^ stamp) & _WORD
            ):  # _check_word, inlined: a hot path
                break
        else:
            return None
        if (
            position >> _POS_BITS != generation
            or synced >> _POS_BITS != generation
            or synced > position
            or not position
        ):
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
    weakref.WeakValueDictionary()
)


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


def _acquire_mutex(mutex: threading.RLock, until: float) -> bool:
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
