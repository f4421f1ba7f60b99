"""Per-platform and per-Python-version differences, and nowhere else.

safeshm needs three things from the platform:

* a shared-memory filesystem we can create files in with ``O_TMPFILE`` (or at least
  ``O_EXCL``) and hard-link into place: Linux's ``/dev/shm`` (tmpfs);
* robust, process-shared pthread mutexes (``pthread_mutexattr_setrobust``): glibc and
  musl both provide them;
* optionally ``libatomic`` for lock-free 64-bit compare-and-swap. Without it counters
  fall back to the robust mutex, which is slower but equally correct.

Anything else (macOS, Windows, 32-bit) gets a clear ``ImportError`` at import, never
silently wrong behaviour.

The resource-tracker problem (CPython gh-82300): on Python 3.11 and 3.12,
``multiprocessing.shared_memory.SharedMemory`` registers every segment a process merely
*attaches to* with the resource tracker, which unlinks it when that process exits and
prints a "leaked shared_memory objects" warning; 3.13 added ``track=False``. safeshm
sidesteps the tracker for every segment on every version by opening its segment files
itself (``os.open`` under :data:`SHM_DIR`, which is what ``shm_open`` does on Linux)
instead of going through ``SharedMemory``. Nothing in the standard library is patched.
"""

from __future__ import annotations

import sys

# Checked before anything else is imported: on another platform, even importing the
# modules below may fail in confusing ways.
if not sys.platform.startswith("linux"):  # pragma: no cover - exercised on other OSes only
    raise ImportError(
        f"safeshm supports Linux only (found sys.platform={sys.platform!r}): it needs "
        "/dev/shm and robust process-shared pthread mutexes"
    )
if sys.maxsize <= 2**32:  # pragma: no cover
    raise ImportError("safeshm needs a 64-bit Python: its counters rely on 8-byte atomic words")

import ctypes
import ctypes.util
import errno
import importlib
import os
import time
from typing import Any, Final

SHM_DIR: Final = os.environ.get("SAFESHM_DIR", "/dev/shm")
"""Where segment files live. ``SAFESHM_DIR`` overrides it (tests, sandboxes)."""

FILE_PREFIX: Final = "safeshm."
"""Every segment file is ``SHM_DIR/safeshm.<name>``: ``ls`` and cleanup never touch
files that are not ours."""

TMP_PREFIX: Final = "safeshm.~tmp."
"""Named temporaries of the fallback create path (only without ``O_TMPFILE``)."""

# mmap duplicates the file descriptor it maps unless told not to (``trackfd``, 3.13+).
# Segments keep their own descriptor (it carries the liveness flock), so the duplicate
# would only cost a second descriptor per handle.
MMAP_KWARGS: Final[dict[str, Any]] = {"trackfd": False} if sys.version_info >= (3, 13) else {}

# --- the current process ----------------------------------------------------------------
# glibc stopped caching getpid() (2.25), so os.getpid() is a system call. Hot paths read
# this instead; the at-fork hook keeps it right in children.
pid: int = os.getpid()


def _after_fork_in_child() -> None:
    global pid  # noqa: PLW0603 - the one process-wide fact that fork changes
    pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


PID_MAX_LIMIT: Final = 1 << 22
"""No Linux process or thread id reaches this (``PID_MAX_LIMIT`` on 64-bit kernels)."""


def process_start_time(target_pid: int) -> int | None:
    """Start time of ``target_pid`` in clock ticks since boot, or ``None`` if it is gone.

    Paired with the pid it identifies a process even after its pid is reused.
    """
    try:
        with open(f"/proc/{target_pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:  # pragma: no cover - /proc unreadable: cannot tell
        return 0
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19])  # field 22 overall: starttime


def pid_namespace() -> int:
    """An identifier of this process's pid namespace (0 when it cannot be read)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # pragma: no cover - no /proc
        return 0


def process_alive(target_pid: int, start_time: int, namespace: int) -> bool:
    """Whether the process that was ``(target_pid, start_time)`` in ``namespace`` lives.

    Errs on the side of "alive": a process in another pid namespace, or one we cannot
    inspect, is reported alive, so nothing it owns is ever reused under it.
    """
    if not 0 < target_pid < PID_MAX_LIMIT:  # also a pid read from a damaged segment
        return False
    if namespace != pid_namespace():
        return True
    try:
        os.kill(target_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = process_start_time(target_pid)
    if now is None:
        return False
    # 0 on either side means "unknown": assume it is the same process.
    return start_time == 0 or now in (0, start_time)


# --- libc: robust process-shared mutexes ----------------------------------------------------
# Two handles on the C library: calls through ``_libc_nogil`` release the GIL (they may
# block in the kernel); calls through ``_libc_gil`` keep it (they never block, and skipping
# the GIL hand-off saves ~100 ns per call on the hot path).
_libc_nogil: Final = ctypes.CDLL(None, use_errno=True)
_libc_gil: Final = ctypes.PyDLL(None)

for _name in (
    "pthread_mutexattr_init",
    "pthread_mutexattr_setpshared",
    "pthread_mutexattr_setrobust",
    "pthread_mutexattr_settype",
    "pthread_mutexattr_destroy",
    "pthread_mutex_init",
    "pthread_mutex_consistent",
):
    if not hasattr(_libc_nogil, _name):  # pragma: no cover - ancient or exotic libc
        raise ImportError(
            f"safeshm needs robust process-shared mutexes, but this C library lacks {_name}()"
        )

mutexattr_init: Final[Any] = _libc_gil.pthread_mutexattr_init
mutexattr_setpshared: Final[Any] = _libc_gil.pthread_mutexattr_setpshared
mutexattr_setrobust: Final[Any] = _libc_gil.pthread_mutexattr_setrobust
mutexattr_settype: Final[Any] = _libc_gil.pthread_mutexattr_settype
mutexattr_destroy: Final[Any] = _libc_gil.pthread_mutexattr_destroy
mutex_init: Final[Any] = _libc_gil.pthread_mutex_init
mutex_trylock: Final[Any] = _libc_gil.pthread_mutex_trylock
mutex_unlock: Final[Any] = _libc_gil.pthread_mutex_unlock
mutex_consistent: Final[Any] = _libc_gil.pthread_mutex_consistent

# Blocking waits: pthread_mutex_clocklock (glibc >= 2.30) takes a CLOCK_MONOTONIC deadline,
# immune to wall-clock jumps; musl and older glibc only have timedlock (CLOCK_REALTIME).
mutex_clocklock: Final[Any | None] = getattr(_libc_nogil, "pthread_mutex_clocklock", None)
mutex_timedlock: Final[Any] = _libc_nogil.pthread_mutex_timedlock


def _is_glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):  # pragma: no cover - not glibc
        return False


GLIBC: Final = _is_glibc()

PTHREAD_PROCESS_SHARED: Final = 1
PTHREAD_MUTEX_ROBUST: Final = 1
PTHREAD_MUTEX_ERRORCHECK: Final = 2
CLOCK_MONOTONIC: Final = 1

PTHREAD_MUTEX_SIZE: Final = 64
"""Bytes reserved for a ``pthread_mutex_t`` (40 on x86_64 glibc, 48 on aarch64)."""
PTHREAD_MUTEXATTR_SIZE: Final = 16

EBUSY: Final = errno.EBUSY
EDEADLK: Final = errno.EDEADLK
EOWNERDEAD: Final = errno.EOWNERDEAD
ENOTRECOVERABLE: Final = errno.ENOTRECOVERABLE
EPERM: Final = errno.EPERM
ETIMEDOUT: Final = errno.ETIMEDOUT


class Timespec(ctypes.Structure):
    """``struct timespec`` (``time_t`` and ``long`` are both 64-bit on supported ABIs)."""

    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


# --- spinning ---------------------------------------------------------------------------------
# Waiting a few microseconds in a loop before sleeping in the kernel pays off only when the
# process we wait for can run meanwhile, on another CPU. A process confined to one CPU
# (taskset, cgroup cpusets, a 1-CPU container) must never spin: it would burn the very
# time slice the other side needs. Affinity can change at run time: it is re-read every
# 50 ms at most (a system call on a slow path; a stale answer costs at most that long).
_spin_checked_at = -1.0
_spin_ok = True


def spinning_helps() -> bool:
    """Whether this process can use more than one CPU (re-read every 50 ms at most)."""
    global _spin_checked_at, _spin_ok  # noqa: PLW0603 - a per-process cache
    now = time.monotonic()
    if now - _spin_checked_at > 0.05:
        _spin_checked_at = now
        try:
            _spin_ok = len(os.sched_getaffinity(0)) > 1
        except OSError:  # pragma: no cover
            _spin_ok = (os.cpu_count() or 1) > 1
    return _spin_ok


# --- futexes: sleeping in the kernel on a word of shared memory -------------------------------
# A shared (not FUTEX_PRIVATE) futex on a MAP_SHARED mapping is keyed by the file and the
# offset, so processes that mapped the segment at different addresses wait on the same
# word. Waits go through the GIL-releasing handle; wakes never block and keep the GIL.
_SYS_FUTEX_BY_MACHINE: Final = {
    "x86_64": 202,
    "aarch64": 98,
    "riscv64": 98,
    "ppc64le": 221,
    "s390x": 238,
}
SYS_FUTEX: Final = _SYS_FUTEX_BY_MACHINE.get(os.uname().machine)
FUTEX_WAIT: Final = 0
FUTEX_WAKE: Final = 1
futex_wait_call: Final[Any] = _libc_nogil.syscall
futex_wake_call: Final[Any] = _libc_gil.syscall


# --- libatomic: lock-free 64-bit compare-and-swap -------------------------------------------
def _load_libatomic() -> Any | None:
    if os.environ.get("SAFESHM_DISABLE_ATOMICS"):
        return None
    for candidate in ("libatomic.so.1", ctypes.util.find_library("atomic")):
        if not candidate:
            continue
        try:
            # PyDLL: the call keeps the GIL; a CAS never blocks, so releasing and
            # re-taking the GIL around it would only cost time.
            return ctypes.PyDLL(candidate)
        except OSError:
            continue
    return None


_libatomic: Final = _load_libatomic()

compare_exchange: Any | None = None if _libatomic is None else _libatomic.__atomic_compare_exchange
"""``bool __atomic_compare_exchange(size_t, void *ptr, void *expected, void *desired, int, int)``.

Called without ``argtypes`` and with pre-built ``byref`` arguments only: that is the
cheapest way through ctypes (measured: about half the cost of declared argtypes).
On failure it writes the current value into ``*expected``.
"""
if compare_exchange is not None:
    compare_exchange.restype = ctypes.c_bool

ATOMIC_SEQ_CST: Final = 5


# --- the compiled core ------------------------------------------------------------------------
# ``safeshm._native`` (src/native/*.c) runs every hot path in C on the same layouts and
# protocols as the ctypes code above, so processes of either kind share every structure.
# The ctypes implementation is the fallback: when the extension was not built (no compiler
# at install time), cannot load, or ``SAFESHM_NO_EXTENSIONS`` is set to anything non-empty
# (the convention of aiohttp, yarl, multidict and frozenlist).
def _load_native() -> Any | None:
    if os.environ.get("SAFESHM_NO_EXTENSIONS"):
        return None
    try:
        return importlib.import_module("safeshm._native")
    # Any failure falls back, not only ImportError: an extension built from other sources
    # (a stale in-place build) fails in its init with whatever it hit (AttributeError...).
    except Exception:  # noqa: BLE001
        return None


native: Final[Any | None] = _load_native()
"""The ``safeshm._native`` module, or ``None`` where this process uses ctypes."""


def implementation() -> str:
    """Which implementation this process uses: ``"native"`` (the compiled core) or
    ``"ctypes"`` (the portable fallback).

    The choice is made once, at import: the compiled core when it was built and loads,
    unless the environment variable ``SAFESHM_NO_EXTENSIONS`` is set to a non-empty value.
    Both implementations use the same shared-memory layouts and protocols, so processes
    of either kind can share every structure at the same time.
    """
    return "native" if native is not None else "ctypes"
