"""Opening the store's directory and files safely: never through a symlink, only if
ours, never writable by others; atomic replacement of a small file."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading

from safeshm._errors import (
    InsecureDirectoryError,
    StoreNotFoundError,
)

from ._format import (
    _O_FLAGS,
    _TMP_SUFFIX,
    StrPath,
)


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
            f"(uid {os.geteuid()}); refusing to use it"
        )
    if st.st_mode & 0o022:
        hint = f" (fix: chmod 700 {what})" if directory else ""
        if directory and st.st_mode & stat.S_ISVTX:
            # A shared directory by design (/tmp, mode 1777): making it private would break
            # every other program that uses it.
            hint = (
                f" (it is a shared directory, like /tmp: keep the store in a private "
                f"subdirectory of it instead, e.g. mkdir -m 700 {what}/mystore)"
            )
        raise InsecureDirectoryError(
            f"store {kind} {what} can be written by other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it{hint}"
        )


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
        raise StoreNotFoundError(errno.ENOENT, "no SafeFileStore at this path", text) from None
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
            raise InsecureDirectoryError(
                f"{where}/{name} is a symbolic link; a store never follows links for its own files"
            ) from None
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
