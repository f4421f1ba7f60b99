"""The segment layer, through every structure: lifecycle, naming, errors, safety."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

import safeshm
from safeshm import _compat, _segment

from ._helpers import JOIN_TIMEOUT, STRUCTURES, create, open_, open_and_add_worker, run_all

SHM = _compat.SHM_DIR


def path_of(name: str) -> str:
    return os.path.join(SHM, _compat.FILE_PREFIX + name)


# -- create / attach / open ----------------------------------------------------------------------
@pytest.mark.parametrize("cls", STRUCTURES)
def test_create_with_random_name(cls: Any, cleanup: Any) -> None:
    a = cleanup(create(cls))
    b = cleanup(create(cls))
    assert a.name != b.name
    assert os.path.exists(path_of(a.name))


@pytest.mark.parametrize("cls", STRUCTURES)
def test_create_existing_name_raises(cls: Any, name: str, cleanup: Any) -> None:
    cleanup(create(cls, name))
    with pytest.raises(FileExistsError, match=repr(name)):
        create(cls, name)


@pytest.mark.parametrize("cls", STRUCTURES)
def test_attach_missing_raises(cls: Any, name: str) -> None:
    with pytest.raises(FileNotFoundError, match=repr(name)):
        cls.attach(name)


@pytest.mark.parametrize("cls", STRUCTURES)
def test_segment_is_private(cls: Any, cleanup: Any) -> None:
    h = cleanup(create(cls))
    st = os.stat(path_of(h.name))
    assert st.st_mode & 0o777 == 0o600
    assert st.st_uid == os.geteuid()


@pytest.mark.parametrize("cls", STRUCTURES)
def test_open_creates_then_attaches(cls: Any, name: str, cleanup: Any) -> None:
    a = cleanup(open_(cls, name))
    b = open_(cls, name)
    try:
        assert a.name == b.name == name
        assert os.stat(path_of(name)).st_nlink == 1
    finally:
        b.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("cls_name", ["SafeCounter", "ShardedCounter"])
def test_open_race_ends_on_one_segment(method: str, cls_name: str, name: str) -> None:
    """Many processes call open() at once: one segment, every add counted."""
    n = 8
    ctx = multiprocessing.get_context(method)
    barrier = ctx.Barrier(n)
    inodes = ctx.Array("q", n)
    try:
        run_all(
            method, open_and_add_worker, [(cls_name, name, barrier, inodes, i) for i in range(n)]
        )
        assert len(set(inodes[:])) == 1
        c = getattr(safeshm, cls_name).attach(name)
        try:
            assert c.value == n
        finally:
            c.close()
    finally:
        if os.path.exists(path_of(name)):
            os.unlink(path_of(name))


def test_attach_wrong_kind(name: str, cleanup: Any) -> None:
    cleanup(safeshm.SafeLock.create(name=name))
    with pytest.raises(safeshm.IncompatibleSegmentError) as info:
        safeshm.SafeCounter.attach(name)
    msg = str(info.value)
    assert repr(name) in msg and "SafeLock" in msg and "expected a SafeCounter" in msg
    assert isinstance(info.value, ValueError)


def test_open_wrong_kind(name: str, cleanup: Any) -> None:
    cleanup(safeshm.SafeCounter.create(name=name))
    with pytest.raises(safeshm.IncompatibleSegmentError, match="is a SafeCounter"):
        safeshm.SafeLock.open(name)


def test_sharded_and_exact_are_different_kinds(name: str, cleanup: Any) -> None:
    cleanup(safeshm.SafeCounter.create(name=name, sharded=True))
    with pytest.raises(safeshm.IncompatibleSegmentError, match="ShardedCounter"):
        safeshm.SafeCounter.attach(name)


def _write_file(name: str, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path_of(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


@pytest.mark.parametrize("data", [b"", b"\x00" * 4096, os.urandom(4096), b"SAFESHM"])
@pytest.mark.parametrize("cls", STRUCTURES)
def test_attach_garbage_segment(cls: Any, data: bytes, name: str) -> None:
    _write_file(name, data)
    try:
        with pytest.raises(safeshm.IncompatibleSegmentError, match="not a safeshm segment"):
            cls.attach(name)
        with pytest.raises(safeshm.IncompatibleSegmentError):
            open_(cls, name)
        assert pathlib.Path(path_of(name)).read_bytes() == data  # untouched
    finally:
        os.unlink(path_of(name))


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (12, 99, "SafeCounter with layout 99|layout 99"),  # a kind layout from the future
        (8, 7, "layout 7"),  # a header layout from the future
        (10, 500, "unknown kind 500"),  # a kind that does not exist
    ],
)
def test_attach_foreign_versions(name: str, offset: int, value: int, message: str) -> None:
    c = safeshm.SafeCounter.create(name=name)
    raw = bytearray(pathlib.Path(path_of(name)).read_bytes())
    c.close()
    c.unlink()
    struct.pack_into("=H", raw, offset, value)
    # Written by that other version: its header's checksum matches what it says.
    struct.pack_into("=I", raw, 48, _segment._header_crc(raw))
    _write_file(name, bytes(raw))
    try:
        with pytest.raises(safeshm.IncompatibleSegmentError, match=message):
            safeshm.SafeCounter.attach(name)
    finally:
        os.unlink(path_of(name))


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (10, 5),  # the kind: a SafeQueue now?
        (14, 2),  # the counter's flags: lock-free atomics <-> the mutex, a silent loss of atomicity
        (24, 1),  # the creator pid
        (64, 1),  # a kind parameter
    ],
)
def test_a_damaged_header_is_found_by_its_checksum(name: str, offset: int, value: int) -> None:
    c = safeshm.SafeCounter.create(name=name)
    try:
        with open(path_of(name), "r+b") as f:
            f.seek(offset)
            f.write(struct.pack("=H", value))
        with pytest.raises(safeshm.SegmentCorruptedError, match=f"{name!r} is damaged.*checksum"):
            safeshm.SafeCounter.attach(name)
    finally:
        c.close()
        c.unlink()


def test_attach_truncated_segment(name: str, cleanup: Any) -> None:
    c = cleanup(safeshm.SafeCounter.create(name=name))
    raw = pathlib.Path(path_of(name)).read_bytes()
    c.close()
    c.unlink()
    _write_file(name, raw[:-8])
    try:
        with pytest.raises(safeshm.IncompatibleSegmentError, match="damaged"):
            safeshm.SafeCounter.attach(name)
    finally:
        os.unlink(path_of(name))


def test_attach_refuses_symlink(name: str, tmp_path: Any) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, path_of(name))
    try:
        with pytest.raises(safeshm.IncompatibleSegmentError, match="symbolic link"):
            safeshm.SafeCounter.attach(name)
        with pytest.raises(safeshm.IncompatibleSegmentError):
            safeshm.SafeCounter.open(name)
        assert target.read_bytes() == b"precious"
    finally:
        os.unlink(path_of(name))


def test_attach_refuses_world_writable(name: str, cleanup: Any) -> None:
    c = cleanup(safeshm.SafeCounter.create(name=name))
    os.chmod(path_of(name), 0o666)
    with pytest.raises(safeshm.SegmentPermissionError, match="writable by other users"):
        safeshm.SafeCounter.attach(name)
    os.chmod(path_of(name), 0o600)
    assert c.value == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_attach_refuses_other_users_segment(name: str, cleanup: Any) -> None:
    c = cleanup(safeshm.SafeCounter.create(name=name))
    os.chown(path_of(name), 65534, 65534)
    try:
        with pytest.raises(safeshm.SegmentPermissionError, match="uid 65534"):
            safeshm.SafeCounter.attach(name)
    finally:
        os.chown(path_of(name), 0, 0)
    assert c.value == 0


# -- names ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad", ["", "a/b", "/abs", ".hidden", "-dash", "sp ace", "x" * 65, "é", "a\x00b", "..", "tab\t"]
)
@pytest.mark.parametrize("cls", STRUCTURES)
def test_bad_names(cls: Any, bad: str) -> None:
    before = set(os.listdir(SHM))
    with pytest.raises(safeshm.InvalidNameError):
        create(cls, bad)
    with pytest.raises(safeshm.InvalidNameError):
        cls.attach(bad)
    with pytest.raises(safeshm.InvalidNameError):
        open_(cls, bad)
    assert set(os.listdir(SHM)) == before


@pytest.mark.parametrize("bad", [1, b"bytes", None, 1.5])
def test_name_must_be_str(bad: Any) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        safeshm.SafeCounter.attach(bad)


@pytest.mark.parametrize("good", ["a", "A9", "jobs.v2", "x" * 64, "_under", "with-dash", "0start"])
def test_good_names(good: str, cleanup: Any) -> None:
    c = cleanup(safeshm.SafeCounter.create(name=good))
    assert c.name == good


# -- close / unlink / context ----------------------------------------------------------------
@pytest.mark.parametrize("cls", STRUCTURES)
def test_close_is_idempotent_and_later_use_raises(cls: Any, cleanup: Any) -> None:
    h = cleanup(create(cls))
    h.close()
    h.close()
    assert h.closed
    ops: list[Callable[[], Any]] = {
        safeshm.SafeCounter: [
            lambda: h.value,
            lambda: h.add(1),
            lambda: h.set(1),
            lambda: h.exchange(1),
            lambda: h.compare_and_set(0, 1),
            lambda: h.statistics(),
        ],
        safeshm.ShardedCounter: [
            lambda: h.value,
            lambda: h.add(1),
            lambda: h.set(1),
            lambda: h.exchange(1),
            lambda: h.statistics(),
        ],
        safeshm.SafeLock: [
            lambda: h.acquire(),
            lambda: h.release(),
            lambda: h.locked(),
            lambda: h.statistics(),
            lambda: h.__enter__(),
        ],
        safeshm.SafeArray: [
            lambda: h[0],
            lambda: h.__setitem__(0, 1),
            lambda: h.add(0, 1),
            lambda: h.compare_and_set(0, 0, 1),
            lambda: h.to_list(),
            lambda: h[0:2],
            lambda: h.fill(1),
            lambda: len(h),
            lambda: list(h),
            lambda: h.locked().__enter__(),
            lambda: h.statistics(),
        ],
        safeshm.SafeQueue: [
            lambda: h.put(1),
            lambda: h.get(timeout=0),
            lambda: h.qsize(),
            lambda: h.empty(),
            lambda: h.put_many([1]),
            lambda: h.get_many(1, timeout=0),
            lambda: h.shutdown(),
            lambda: h.statistics(),
            lambda: h.full(),
        ],
        safeshm.SafeEvent: [
            lambda: h.set(),
            lambda: h.clear(),
            lambda: h.is_set(),
            lambda: h.wait(0),
            lambda: h.statistics(),
        ],
        safeshm.SafeSemaphore: [
            lambda: h.acquire(),
            lambda: h.acquire(False),
            lambda: h.release(),
            lambda: h.value,
            lambda: h.__enter__(),
            lambda: h.statistics(),
        ],
        safeshm.SafeBoundedSemaphore: [
            lambda: h.acquire(),
            lambda: h.release(),
            lambda: h.value,
            lambda: h.__enter__(),
            lambda: h.statistics(),
        ],
        safeshm.SafeBarrier: [
            lambda: h.wait(0),
            lambda: h.reset(),
            lambda: h.abort(),
            lambda: h.n_waiting,
            lambda: h.broken,
            lambda: h.parties,
            lambda: h.statistics(),
        ],
        safeshm.SafeRLock: [
            lambda: h.acquire(),
            lambda: h.release(),
            lambda: h.locked(),
            lambda: h.__enter__(),
            lambda: h.statistics(),
        ],
        safeshm.SafeCondition: [
            lambda: h.acquire(),
            lambda: h.release(),
            lambda: h.wait(0),
            lambda: h.notify(),
            lambda: h.notify_all(),
            lambda: h.__enter__(),
            lambda: h.statistics(),
        ],
        safeshm.SafeRWLock: [
            lambda: h.acquire_read(),
            lambda: h.release_read(),
            lambda: h.acquire_write(),
            lambda: h.release_write(),
            lambda: h.read().__enter__(),
            lambda: h.write().__enter__(),
            lambda: h.statistics(),
        ],
    }[cls]
    for op in ops:
        with pytest.raises(safeshm.SegmentClosedError, match="closed"):
            op()
    with pytest.raises(safeshm.SegmentClosedError):
        pickle_it(h)


def pickle_it(h: Any) -> bytes:
    import pickle

    return pickle.dumps(h)


# Structures whose `with` block is their lifecycle (SafeLock's acquires instead).
WITH_LIFECYCLE = [safeshm.SafeCounter, safeshm.ShardedCounter, safeshm.SafeArray, safeshm.SafeQueue]


def bump(h: Any, n: int = 1) -> None:
    if isinstance(h, safeshm.SafeArray):
        h.add(0, n)
    elif isinstance(h, safeshm.SafeQueue):
        h.put_many(range(n))
    else:
        h.add(n)


def read(h: Any) -> int:
    if isinstance(h, safeshm.SafeArray):
        return h[0]  # type: ignore[no-any-return]
    if isinstance(h, safeshm.SafeQueue):
        return h.qsize()
    return h.value  # type: ignore[no-any-return]


@pytest.mark.parametrize("cls", WITH_LIFECYCLE)
def test_with_closes_and_unlinks_when_created(cls: Any) -> None:
    with create(cls) as c:
        bump(c)
        name = c.name
        assert os.path.exists(path_of(name))
    assert c.closed
    assert not os.path.exists(path_of(name))


@pytest.mark.parametrize("cls", WITH_LIFECYCLE)
def test_with_on_attached_handle_does_not_unlink(cls: Any, cleanup: Any) -> None:
    owner = cleanup(create(cls))
    with cls.attach(owner.name) as other:
        bump(other, 2)
    assert other.closed
    assert read(owner) == 2


@pytest.mark.parametrize("cls", WITH_LIFECYCLE)
def test_with_on_opened_handle_never_unlinks(cls: Any, name: str, cleanup: Any) -> None:
    """``with X.open(name):`` only closes, even in the process whose open() created the
    segment: which process that is depends on a race, and the winner's exit must not split
    the others across two segments (one old, unlinked; one new)."""
    with open_(cls, name) as first:  # this open() creates the segment
        bump(first)
    assert os.path.exists(path_of(name))
    with open_(cls, name) as second:
        bump(second)
    survivor = cleanup(cls.attach(name))
    assert read(survivor) == 2


@pytest.mark.parametrize("cls", STRUCTURES)
def test_create_takes_name_by_keyword_only(cls: Any, name: str) -> None:
    args: tuple[Any, ...] = {
        safeshm.SafeArray: ("q", 4),
        safeshm.SafeQueue: (4096,),
        safeshm.SafeCounter: (0,),
        safeshm.ShardedCounter: (0,),
    }.get(cls, ())
    with pytest.raises(TypeError):
        cls.create(*args, name)
    assert not os.path.exists(path_of(name))


@pytest.mark.parametrize("cls", STRUCTURES)
def test_unlink(cls: Any) -> None:
    h = create(cls)
    h.unlink()
    assert not os.path.exists(path_of(h.name))
    with pytest.raises(FileNotFoundError):
        cls.attach(h.name)
    with pytest.raises(FileNotFoundError):
        h.unlink()
    h.close()


def test_unlinked_segment_stays_usable_by_open_handles() -> None:
    c = safeshm.SafeCounter.create()
    d = safeshm.SafeCounter.attach(c.name)
    c.unlink()
    d.add(5)
    assert c.value == 5
    c.close()
    d.close()


def test_unlink_never_removes_a_newer_segment_of_the_same_name(name: str, cleanup: Any) -> None:
    old = safeshm.SafeCounter.create(name=name)
    old.unlink()
    new = cleanup(safeshm.SafeCounter.create(7, name=name))
    with pytest.raises(FileNotFoundError, match="newer segment"):
        old.unlink()
    old.close()
    assert new.value == 7
    assert os.path.exists(path_of(name))


def test_unlink_after_close(cleanup: Any) -> None:
    c = safeshm.SafeCounter.create()
    c.close()
    c.unlink()
    assert not os.path.exists(path_of(c.name))


def test_no_descriptor_leak() -> None:
    import gc

    # Handles of earlier tests that sit in reference cycles (a lock's ctypes unlockers)
    # close their descriptors when the cyclic GC runs: let it run now, not mid-loop.
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        c = safeshm.SafeCounter.create()
        d = safeshm.SafeCounter.attach(c.name)
        d.close()
        c.close()
        c.unlink()
    assert len(os.listdir("/proc/self/fd")) == before


def test_dropped_handle_releases_its_descriptor(cleanup: Any) -> None:
    import gc

    c = cleanup(safeshm.SafeCounter.create())

    def fds_on_segment() -> int:
        st = os.stat(path_of(c.name))
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                other = os.stat(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            n += (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
        return n

    before = fds_on_segment()
    d = safeshm.SafeCounter.attach(c.name)
    assert fds_on_segment() > before
    del d
    gc.collect()
    assert fds_on_segment() == before


# -- creation paths ---------------------------------------------------------------------------
def test_named_temporary_fallback(monkeypatch: pytest.MonkeyPatch, name: str, cleanup: Any) -> None:
    """Without O_TMPFILE, creation goes through a named temporary and leaves nothing else."""
    monkeypatch.setattr(_segment, "_use_tmpfile", False)
    c = cleanup(safeshm.SafeCounter.create(3, name=name))
    assert c.add(1) == 4
    with pytest.raises(FileExistsError):
        safeshm.SafeCounter.create(name=name)
    assert not [f for f in os.listdir(SHM) if f.startswith(_compat.TMP_PREFIX)]
    d = safeshm.SafeCounter.attach(name)
    assert d.value == 4
    d.close()


def test_failed_init_leaves_nothing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def boom(mm: Any) -> None:
        raise RuntimeError("init failed")

    for use_tmpfile in (True, False):
        monkeypatch.setattr(_segment, "_use_tmpfile", use_tmpfile)
        before = set(os.listdir(SHM))
        with pytest.raises(RuntimeError, match="init failed"):
            _segment.Segment.create(
                name, kind=_segment.Kind.COUNTER, layout=1, payload_size=64, init=boom
            )
        assert set(os.listdir(SHM)) == before


def test_segment_published_only_when_complete(name: str) -> None:
    """While init runs, the name does not exist yet: nobody can attach to a half-built one."""
    seen: list[bool] = []

    def init(mm: Any) -> None:
        seen.append(os.path.exists(path_of(name)))

    seg = _segment.Segment.create(
        name, kind=_segment.Kind.COUNTER, layout=1, payload_size=64, init=init
    )
    try:
        assert seen == [False]
        assert os.path.exists(path_of(name))
    finally:
        seg.close()
        seg.unlink()


# -- the resource tracker and independent processes ---------------------------------------------
_ATTACH_SCRIPT = textwrap.dedent("""
    import sys, safeshm
    c = safeshm.SafeCounter.attach(sys.argv[1])
    c.add(5)
    s = safeshm.ShardedCounter.attach(sys.argv[2])
    s.add(5)
    l = safeshm.SafeLock.attach(sys.argv[3])
    with l:
        pass
    c.close(); s.close(); l.close()
""")


def test_independent_interpreter_attach_does_not_destroy(cleanup: Any) -> None:
    """Guarantee 2: an unrelated process attaches, works and exits; everything survives,
    and nothing (no resource-tracker warning) is printed."""
    c = cleanup(safeshm.SafeCounter.create(1))
    s = cleanup(safeshm.ShardedCounter.create(1))
    lock = cleanup(safeshm.SafeLock.create())
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _ATTACH_SCRIPT, c.name, s.name, lock.name],
            capture_output=True,
            text=True,
            timeout=JOIN_TIMEOUT,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        assert proc.stdout == ""
    import time

    time.sleep(0.5)  # the 3.11/3.12 tracker would have unlinked by now
    for h in (c, s, lock):
        assert os.path.exists(path_of(h.name))
    assert c.value == 11
    assert s.value == 11
    d = safeshm.SafeCounter.attach(c.name)
    assert d.value == 11
    d.close()


def _spawn_child_attach(name: str) -> None:
    c = safeshm.SafeCounter.attach(name)
    c.add(1)
    c.close()


def test_spawned_children_that_attach_do_not_destroy(cleanup: Any) -> None:
    c = cleanup(safeshm.SafeCounter.create())
    ctx = multiprocessing.get_context("spawn")
    for _ in range(2):
        p = ctx.Process(target=_spawn_child_attach, args=(c.name,))
        p.start()
        p.join(timeout=JOIN_TIMEOUT)
        assert p.exitcode == 0
    assert os.path.exists(path_of(c.name))
    assert c.value == 2


# -- fork ----------------------------------------------------------------------------------------
def test_forked_child_exiting_with_block_does_not_unlink() -> None:
    """A handle inherited over fork is not the creator in the child: its with-exit only closes."""
    with safeshm.SafeCounter.create() as c:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 0
            try:
                with c:
                    c.add(1)
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.path.exists(path_of(c.name))
        assert c.value == 1


def test_default_directory_is_dev_shm() -> None:
    """Outside the test session's private directory, segments live in /dev/shm itself."""
    code = textwrap.dedent("""
        import os, safeshm
        c = safeshm.SafeCounter.create(3)
        try:
            path = "/dev/shm/safeshm." + c.name
            st = os.stat(path)
            assert st.st_mode & 0o777 == 0o600, oct(st.st_mode)
            assert safeshm.SafeCounter.attach(c.name).value == 3
        finally:
            c.close()
            c.unlink()
        assert not os.path.exists(path)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "SAFESHM_DIR"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"


@pytest.mark.parametrize("cls", STRUCTURES)
def test_name_errors_are_safeshm_errors(cls: Any, name: str, cleanup: Any) -> None:
    """``except SafeShmError`` catches a taken or a missing name too; code that catches the
    builtins (FileExistsError, FileNotFoundError) keeps working."""
    with pytest.raises(safeshm.SegmentNotFoundError, match=repr(name)) as missing:
        cls.attach(name)
    assert isinstance(missing.value, FileNotFoundError)
    cleanup(create(cls, name))
    with pytest.raises(safeshm.SegmentExistsError, match=repr(name)) as taken:
        create(cls, name)
    assert isinstance(taken.value, FileExistsError)
    assert isinstance(taken.value, safeshm.SafeShmError)


# -- the segment directory (issue 10.12) -------------------------------------------------------
@pytest.fixture
def shm_dir(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A private directory on /dev/shm's tmpfs used as SAFESHM_DIR for one test."""
    path = os.path.join(SHM, f"dir-{os.getpid()}-{os.urandom(3).hex()}")
    os.mkdir(path, 0o700)
    monkeypatch.setattr(_compat, "SHM_DIR", path)
    yield path
    os.chmod(path, 0o700)
    for f in os.listdir(path):
        os.unlink(os.path.join(path, f))
    os.rmdir(path)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722, 0o702], ids=lambda m: f"{m:04o}")
@pytest.mark.parametrize("cls", STRUCTURES)
def test_segment_directory_writable_by_others_is_refused(
    cls: Any, mode: int, shm_dir: str, name: str
) -> None:
    os.chmod(shm_dir, mode)
    with pytest.raises(safeshm.InsecureDirectoryError, match=f"{shm_dir}.*not sticky"):
        create(cls, name)
    with pytest.raises(safeshm.InsecureDirectoryError):
        open_(cls, name)
    assert os.listdir(shm_dir) == []  # nothing was created
    os.chmod(shm_dir, 0o700)
    h = create(cls, name)
    try:
        os.chmod(shm_dir, mode)
        with pytest.raises(safeshm.InsecureDirectoryError, match="not sticky"):
            cls.attach(name)
        os.chmod(shm_dir, mode | 0o1000)  # sticky, as /dev/shm (1777) is: fine
        cls.attach(name).close()
    finally:
        h.close()
        h.unlink()


def test_insecure_directory_hint_never_advises_chmod_on_a_shared_directory(
    shm_dir: str, name: str
) -> None:
    os.chmod(shm_dir, 0o777)
    with pytest.raises(safeshm.InsecureDirectoryError) as e:
        safeshm.SafeCounter.create(name=name)
    assert "private subdirectory" in str(e.value)
    assert "chmod 700" not in str(e.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_segment_directory_of_another_user_is_refused(shm_dir: str, name: str) -> None:
    os.chown(shm_dir, 65534, 65534)
    try:
        with pytest.raises(safeshm.InsecureDirectoryError, match="belongs to uid 65534"):
            safeshm.SafeCounter.create(name=name)
    finally:
        os.chown(shm_dir, 0, 0)


def test_ls_refuses_an_insecure_directory(shm_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    from safeshm._cli import main

    os.chmod(shm_dir, 0o777)
    assert main(["ls"]) == 2
    assert "not sticky" in capsys.readouterr().err
    assert main(["rm", "--yes", "--stale"]) == 2


# -- typed errors for what is found at a name (issue 10.13) -------------------------------------
@pytest.mark.parametrize("cls", STRUCTURES)
def test_directory_at_a_segments_name(cls: Any, name: str) -> None:
    os.mkdir(path_of(name), 0o700)
    try:
        with pytest.raises(safeshm.IncompatibleSegmentError, match="is a directory"):
            cls.attach(name)
        with pytest.raises(safeshm.IncompatibleSegmentError, match="is a directory"):
            open_(cls, name)
        with pytest.raises(FileExistsError):
            create(cls, name)
    finally:
        os.rmdir(path_of(name))


def _attach_as_another_user(name: str, conn: Any) -> None:
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        safeshm.SafeCounter.attach(name)
    except safeshm.SegmentPermissionError as e:
        conn.send(f"typed: {e}")
    except BaseException as e:  # noqa: BLE001 - reported to the test, which fails
        conn.send(f"untyped: {type(e).__name__}: {e}")
    else:
        conn.send("attached")


def _as_another_user(name: str) -> str:
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_attach_as_another_user, args=(name, sender))
    try:
        p.start()
        assert receiver.poll(JOIN_TIMEOUT)
        got: str = receiver.recv()
        return got
    finally:
        p.join(JOIN_TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_another_users_segment_is_a_segment_permission_error(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # A directory as /dev/shm is: shared and sticky (the session's own directory is 0700,
    # which the other user cannot enter: the second case below). The segment is root's,
    # mode 0600: the other user (a forked child that became uid 65534) cannot open it.
    shared = f"/dev/shm/safeshm-test-shared-{os.getpid()}"
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    monkeypatch.setattr(_compat, "SHM_DIR", shared)
    c = safeshm.SafeCounter.create(name=name)
    try:
        got = _as_another_user(name)
        assert got.startswith("typed:"), got
        assert "uid 0" in got and "0600" in got
        os.chmod(shared, 0o700)
        got = _as_another_user(name)
        assert got.startswith("typed:"), got
        assert "segment directory" in got
    finally:
        os.chmod(shared, 0o1777)
        c.close()
        c.unlink()
        os.rmdir(shared)


@pytest.mark.parametrize("size", [10, 100, 127])
def test_a_segment_cut_inside_its_header_is_damaged_not_another_layout(
    size: int, name: str
) -> None:
    c = safeshm.SafeCounter.create(name=name)
    try:
        os.truncate(path_of(name), size)
        with pytest.raises(safeshm.SegmentCorruptedError, match="less than the 128-byte"):
            safeshm.SafeCounter.attach(name)
    finally:
        c.close()
        c.unlink()


def test_a_closed_views_stand_in_refuses_with_as_closed() -> None:
    """``with view:`` on a closed handle's view (a structure whose mutex block is used as a
    context manager) raises SegmentClosedError, not a TypeError about a missing
    ``__exit__`` (found by review: a closed rate-limit table said TypeError)."""
    from safeshm._segment import _Closed

    with pytest.raises(safeshm.SegmentClosedError, match="gone"), _Closed("gone"):
        pass
