"""SafeFileStore regressions from the adversarial campaign (issue 10): a full disk, a fork
with a busy thread, a stopped writer, damage that looked like a torn write, a log cut in its
middle, large values read unchecked, a write that raised yet took effect, the operator's
recovery and the hint for a shared temporary directory."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import safeshm
from safeshm import (
    InsecureDirectoryError,
    SafeFileStore,
    StoreCorruptedError,
    StoreTimeoutError,
)
from safeshm import _store as store_module

from ._helpers import JOIN_TIMEOUT, PROMPT
from ._store_helpers import group_commit, store_modules

LOG = store_module.log_name(1)


def _flip(path: Path, offset: int, mask: int = 0x41) -> None:
    """Flip bits of one byte in place (the same inode: the published hints stay trusted)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


# --- 1. a full disk: a typed error, never SIGBUS ----------------------------------------------
@contextlib.contextmanager
def _small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB ext4 file system on a loop device (root only; tmpfs never raises SIGBUS the
    way a real file system does, so the test needs one)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount an ext4 image on a loop device (CI runs as root)")
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    image, mount = tmp_path / "disk.img", tmp_path / "mnt"
    image.write_bytes(b"")
    os.truncate(image, 4 << 20)
    mount.mkdir()
    made = subprocess.run(
        [mkfs, "-q", "-F", "-m", "0", str(image)], capture_output=True, text=True, check=False
    )
    if made.returncode:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    mount_cmd, umount_cmd = shutil.which("mount"), shutil.which("umount")
    if mount_cmd is None or umount_cmd is None:
        pytest.skip("mount/umount are not installed")
    mounted = subprocess.run(
        [mount_cmd, "-o", "loop", str(image), str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a loop device here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run([umount_cmd, str(mount)], check=False).returncode:
            subprocess.run([umount_cmd, "-l", str(mount)], check=False)


def _fill(mount: Path) -> None:
    """Fill the file system to the last block (root may use the reserved ones too)."""
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\xff" * chunk)
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
    probe = os.open(mount / "probe", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="No space left") as full:
            os.posix_fallocate(probe, 0, 64)
        assert full.value.errno == errno.ENOSPC, "the file system is not full"
    finally:
        os.close(probe)
        os.unlink(mount / "probe")


_VICTIM = """
import errno, sys
from safeshm import SafeFileStore
try:
    with SafeFileStore(sys.argv[1]) as store:
        print("opened", store.get("a"))
        store["b"] = 2  # the first store to the lock file's page
except OSError as e:
    print("OSError", errno.errorcode.get(e.errno), type(e).__name__)
"""


def _victim(path: Path) -> str:
    """Open the store in a child process; fail if the child died by a signal."""
    src = os.path.dirname(os.path.dirname(safeshm.__file__))
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [sys.executable, "-c", _VICTIM, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=JOIN_TIMEOUT,
        check=False,
    )
    assert done.returncode >= 0, (
        f"the store's process died by signal {-done.returncode} ({done.stderr.strip()[-300:]})"
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_full_disk_is_an_error_not_a_crash(tmp_path: Path) -> None:
    with _small_ext4(tmp_path) as mount:
        fresh, lockless, sparse = mount / "fresh", mount / "lockless", mount / "sparse"
        fresh.mkdir(mode=0o700)  # a store about to be made, its directory already there
        for path in (lockless, sparse):
            with SafeFileStore(path) as store:
                store["a"] = 1
        # A store whose lock file is gone (a new one is made), and one whose lock file was
        # extended and never written (as every new one was before this fix).
        os.unlink(lockless / "write.lock")
        os.unlink(sparse / "write.lock")
        fd = os.open(sparse / "write.lock", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 64)
        os.close(fd)
        before = {path: _digest(path) for path in (lockless, sparse)}
        _fill(mount)
        for path in (fresh, lockless, sparse):
            assert _victim(path).endswith("OSError ENOSPC OSError"), path
        for path in (lockless, sparse):  # the data is untouched (an empty lock file
            after = _digest(path)  # may have been made: it holds no data)
            assert {n: h for n, h in after.items() if n != "write.lock"} == {
                n: h for n, h in before[path].items() if n != "write.lock"
            }
        os.unlink(mount / "filler")
        for path in (lockless, sparse):
            assert _victim(path) == "opened 1"
        assert _victim(fresh) == "opened None"


# --- 5. close() in a forked child ------------------------------------------------------------
def test_close_in_a_forked_child_never_deadlocks(tmp_path: Path) -> None:
    store = SafeFileStore(tmp_path / "s", durable=False)
    store["k"] = 1
    stop = threading.Event()
    reads = [0]

    def reader() -> None:  # holds the handle's in-process lock most of the time
        while not stop.is_set():
            store.get("k")
            reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    hung = None
    try:
        for fork in range(100):
            with warnings.catch_warnings():  # "multi-threaded, fork() may deadlock": yes
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    store.close()
                    code = 0 if store.closed else 2
                finally:
                    os._exit(code)
            deadline = time.monotonic() + PROMPT
            while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    hung = fork
                    break
                time.sleep(0.001)
            if hung is not None:
                break
            assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        stop.set()
        thread.join(timeout=JOIN_TIMEOUT)
        store.close()
    assert hung is None, f"close() in forked child {hung} did not return"
    assert reads[0] > 0


# --- 6. timeouts on writes -------------------------------------------------------------------
def _stop_inside_a_transaction(path: str, ready: Any) -> None:
    with SafeFileStore(path) as store, store.transaction() as tx:
        tx["stopped"] = "committed after SIGCONT"
        ready.set()
        os.kill(os.getpid(), signal.SIGSTOP)


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.001)
    raise AssertionError("the writer did not stop")


def _times_out(call: Any, timeout: float) -> None:
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError):
        call()
    elapsed = time.monotonic() - start
    assert timeout <= elapsed < timeout + PROMPT


def test_writes_time_out_while_a_writer_is_stopped(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path) as store:
        store["a"] = 1
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_stop_inside_a_transaction, args=(str(path), ready), daemon=True)
    proc.start()
    try:
        assert ready.wait(JOIN_TIMEOUT)
        _wait_stopped(proc.pid)
        with SafeFileStore(path, timeout=0.2) as impatient, SafeFileStore(path) as patient:
            assert impatient.timeout == 0.2 and patient.timeout is None
            _times_out(lambda: impatient.__setitem__("b", 2), 0.2)
            _times_out(lambda: impatient.__delitem__("a"), 0.2)
            _times_out(lambda: impatient.update(b=2), 0.2)
            _times_out(impatient.clear, 0.2)
            _times_out(impatient.popitem, 0.2)
            _times_out(lambda: impatient.setdefault("c", 3), 0.2)
            _times_out(lambda: patient.modify("a", lambda n: n + 1, timeout=0.1), 0.1)
            _times_out(lambda: patient.pop("a", None, timeout=0.1), 0.1)
            _times_out(lambda: patient.compact(timeout=0.1), 0.1)
            _times_out(lambda: patient.transaction(timeout=0).__enter__(), 0)
            _times_out(lambda: impatient.modify("a", lambda n: n + 1, timeout=0), 0)
            # Reads never wait for writers.
            assert impatient.to_dict() == patient.to_dict() == {"a": 1}
            # Bad timeouts: the one validator's errors, before anything happens.
            with pytest.raises(ValueError, match="non-negative"):
                patient.modify("a", lambda n: n + 1, timeout=-1)
            with pytest.raises(TypeError, match="timeout"):
                patient.transaction(timeout="1")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="non-negative"):
                SafeFileStore(path, timeout=float("nan"))
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.join(JOIN_TIMEOUT)
        if proc.is_alive():  # pragma: no cover
            proc.kill()
            proc.join(10)
    assert proc.exitcode == 0
    with SafeFileStore(path) as store:  # nothing that timed out was written
        assert store.to_dict() == {"a": 1, "stopped": "committed after SIGCONT"}
        store.modify("a", lambda n: n + 1, timeout=0)  # free again: try-once succeeds
        assert store["a"] == 2


def test_the_in_process_lock_times_out_too(tmp_path: Path) -> None:
    with SafeFileStore(tmp_path / "s", timeout=0.1) as store:
        inside, leave = threading.Event(), threading.Event()

        def holder() -> None:
            with store.transaction(timeout=None) as tx:
                tx["held"] = True
                inside.set()
                leave.wait(JOIN_TIMEOUT)

        t = threading.Thread(target=holder)
        t.start()
        try:
            assert inside.wait(JOIN_TIMEOUT)
            _times_out(lambda: store.__setitem__("x", 1), 0.1)
        finally:
            leave.set()
            t.join(JOIN_TIMEOUT)
        assert store.to_dict() == {"held": True}


# --- 7, 8. damage inside what was acknowledged --------------------------------------------------
@pytest.mark.parametrize("damage", ["flip-body", "flip-header", "zeros"])
def test_damage_in_the_last_acknowledged_record_is_corruption(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path) as store:
        store["a"] = 1
        before = store.statistics().log_bytes
        store["b"] = "x" * 100
    log = path / LOG
    size = log.stat().st_size
    if damage == "flip-body":
        _flip(log, size - 5)
    elif damage == "flip-header":
        _flip(log, before + 6)
    else:
        with open(log, "r+b") as f:
            f.seek(before)
            f.write(bytes(size - before))
    with pytest.raises(StoreCorruptedError, match=f"at byte {before}"):
        SafeFileStore(path)
    with pytest.raises(StoreCorruptedError):
        store_module.check_store(path)
    assert log.stat().st_size == size  # nothing truncated it away


def test_an_open_writer_does_not_truncate_a_damaged_acknowledged_record(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path) as writer, SafeFileStore(path, durable=False) as other:
        writer["a"] = 1
        start = writer.statistics().log_bytes
        other["b"] = "y" * 50  # the last record, acknowledged
        log = path / LOG
        size = log.stat().st_size
        _flip(log, size - 3)
        damaged = log.read_bytes()
        # A blind write appends after it (the write itself is fine and is not failed for
        # damage before it); a write that reads first reports it. Nobody truncates it.
        writer["c"] = 3
        with pytest.raises(StoreCorruptedError, match=f"at byte {start}:"):
            writer.modify("n", lambda n: n + 1, default=0)
        with pytest.raises(StoreCorruptedError):
            writer.to_dict()
        with pytest.raises(StoreCorruptedError):
            SafeFileStore(path)
        assert log.read_bytes().startswith(damaged)


@pytest.mark.parametrize("cut", ["boundary", "mid-record"])
def test_a_log_cut_in_its_middle_is_corruption(tmp_path: Path, cut: str) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path) as store:
        for i in range(10):
            store[f"k{i}"] = i
            if i == 4:
                boundary = store.statistics().log_bytes
        del store["k0"]
    os.truncate(path / LOG, boundary if cut == "boundary" else boundary - 3)
    with pytest.raises(StoreCorruptedError, match="acknowledged"):
        SafeFileStore(path)
    with pytest.raises(StoreCorruptedError):
        store_module.check_store(path)


def test_a_reader_notices_its_log_cut_under_it(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with (
        SafeFileStore(path, serializer="bytes") as store,
        SafeFileStore(path, serializer="bytes") as reader,
    ):
        store["big"] = b"v" * 10_000
        store["small"] = b"s"
        assert reader["small"] == b"s"
        start = store.statistics().log_bytes - 10_000 - 30
        os.truncate(path / LOG, start + 5_000)  # inside the large value
        with pytest.raises(StoreCorruptedError):
            reader["big"]


# --- 9. large values are verified on every read ------------------------------------------------
@pytest.mark.parametrize("in_txn", [False, True])
def test_damage_in_a_large_value_is_never_returned(tmp_path: Path, in_txn: bool) -> None:
    path = tmp_path / "s"
    big = bytes(range(256)) * 40  # over the 4 KiB that the index keeps in memory
    with (
        SafeFileStore(path, serializer="bytes") as store,
        SafeFileStore(path, serializer="bytes") as reader,
    ):
        if in_txn:
            with store.transaction() as tx:
                tx["big"], tx["other"] = big, b"o"
        else:
            store["big"] = big
            store["other"] = b"o"
        store["last"] = b"l"
        assert reader["big"] == big and store["big"] == big
        files = _digest(path)
        _flip(path / LOG, store.statistics().log_bytes - 200 - 4000)
        damaged = _digest(path)
        for handle in (store, reader):
            with pytest.raises(StoreCorruptedError):
                handle["big"]
            with pytest.raises(StoreCorruptedError):
                handle.to_dict()
            with pytest.raises(StoreCorruptedError):
                list(handle.values())
            assert handle["last"] == b"l"
        with pytest.raises(StoreCorruptedError):
            store.compact()  # never launders the damage under a fresh checksum
        assert _digest(path) == damaged != files
        assert store.statistics().generation == 1


# --- 10. a write that raised took effect -------------------------------------------------------
def test_a_write_that_runs_out_of_descriptors_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path) as store, SafeFileStore(path, durable=False) as reader:
        store["a"] = 1
        group_commit(store)  # the path that duplicates the log's descriptor
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers: list[int] = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
            with contextlib.suppress(OSError):
                while True:
                    fillers.append(os.dup(0))
            with pytest.raises(OSError, match="Too many open files") as raised:
                store["b"] = 2
            assert raised.value.errno == errno.EMFILE
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert "b" not in store
        store["c"] = 3
        assert reader.to_dict() == store.to_dict() == {"a": 1, "c": 3}
    with SafeFileStore(path) as again:
        assert again.to_dict() == {"a": 1, "c": 3}


# --- the hint for an insecure directory --------------------------------------------------------
def test_the_hint_for_a_shared_sticky_directory_is_a_subdirectory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    with pytest.raises(InsecureDirectoryError) as refused:
        SafeFileStore(shared)
    message = str(refused.value)
    assert "chmod" not in message, message
    assert "subdirectory" in message and "mkdir -m 700" in message
    os.chmod(shared, 0o777)  # not shared by design: making it private is the fix
    with pytest.raises(InsecureDirectoryError, match="chmod 700"):
        SafeFileStore(shared)


def test_a_write_that_times_out_after_it_committed_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: the record is written and synced, then the lock is needed once more
    to show it to other processes. If that times out, the error must say the write was
    committed (repeating it would write it twice), and it does take effect."""
    path = tmp_path / "s"
    entered, release = threading.Event(), threading.Event()
    slow: list[threading.Thread] = []

    class SyncGate:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def fdatasync(self, fd: int) -> None:
            if threading.current_thread() in slow:
                entered.set()
                release.wait(JOIN_TIMEOUT)
            os.fdatasync(fd)

    with SafeFileStore(path, timeout=0.3) as store, SafeFileStore(path) as other:
        store["a"] = 1
        group_commit(store)
        errors: list[BaseException] = []

        def write() -> None:
            try:
                store["x"] = 1
            except BaseException as e:  # noqa: BLE001 - checked below
                errors.append(e)

        for module in store_modules():
            monkeypatch.setattr(module, "os", SyncGate())
        t = threading.Thread(target=write)
        slow.append(t)
        t.start()
        try:
            assert entered.wait(JOIN_TIMEOUT)  # written, lock released, syncing
            with other.transaction() as tx:  # another writer holds the lock meanwhile
                tx["y"] = 2
                release.set()
                t.join(JOIN_TIMEOUT)
        finally:
            release.set()
            t.join(JOIN_TIMEOUT)
        monkeypatch.undo()
        assert len(errors) == 1 and isinstance(errors[0], StoreTimeoutError)
        assert "WAS committed" in str(errors[0]) and "do not repeat" in str(errors[0])
        assert store["x"] == 1
    with SafeFileStore(path) as fresh:
        assert fresh.to_dict() == {"a": 1, "x": 1, "y": 2}


def test_compact_reentered_by_the_compacting_thread_is_refused(tmp_path: Path) -> None:
    """What a signal handler that compacts the store whose compaction it interrupted meets:
    LockReentryError (a second flock of the maintenance lock, on a descriptor of its own,
    would wait for ever for this very thread); a write's own compaction skips instead."""
    with safeshm.SafeFileStore(tmp_path / "s", durable=False) as store:
        held = store._maintenance()
        assert next(held)  # as compact() holds it when the signal comes
        try:
            with pytest.raises(safeshm.LockReentryError):
                store.compact()
            with pytest.raises(safeshm.LockReentryError):
                store.compact(timeout=0.1)
            store["k"] = 1
        finally:
            held.close()
        store.compact()  # free again
        assert store["k"] == 1
        # Another thread still waits for it, as before (it is not this thread's).
        held = store._maintenance()
        next(held)
        try:
            with pytest.raises(safeshm.StoreTimeoutError):
                _compact_in_thread(store, 0.2)
        finally:
            held.close()


def _compact_in_thread(store: Any, timeout: float) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            store.compact(timeout=timeout)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    if errors:
        raise errors[0]
