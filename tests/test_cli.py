"""``python -m safeshm``: ls, inspect, rm, demo, and error handling."""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

import safeshm
from safeshm import _cli, _compat
from safeshm._cli import main

from ._helpers import JOIN_TIMEOUT


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "safeshm", *args],
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT * 2,
        check=False,
    )


def test_demo_runs_and_checks(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "safeshm", "demo", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT * 2,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo passed" in proc.stdout
    # 4 totals, 3 store checks, the semaphore gate, and the queue after each start method.
    assert proc.stdout.count("[ok]") == 10
    assert "FAIL" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the store's directory is gone too


def test_console_script_entry_point() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "safeshm"]
    assert ep.value == "safeshm._cli:main"


def test_ls_lists_our_segments(capsys: pytest.CaptureFixture[str], cleanup: Any, name: str) -> None:
    c = cleanup(safeshm.SafeCounter.create(42, name=name))
    s = cleanup(safeshm.ShardedCounter.create(7))
    lock = cleanup(safeshm.SafeLock.create())
    arr = cleanup(safeshm.SafeArray.create("d", 3))
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "SafeCounter" in lines[name] and "value=42" in lines[name]
    assert "ShardedCounter" in lines[s.name] and "value=7" in lines[s.name]
    assert "SafeLock" in lines[lock.name] and "locked=False" in lines[lock.name]
    assert "SafeArray" in lines[arr.name] and "typecode=d length=3" in lines[arr.name]
    assert f"{os.getpid()} (alive)" in lines[name]
    assert c.value == 42  # listing disturbed nothing


def test_ls_json(capsys: pytest.CaptureFixture[str], cleanup: Any, name: str) -> None:
    cleanup(safeshm.SafeCounter.create(5, name=name))
    assert main(["ls", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    e = entries[name]
    assert e["kind"] == "SafeCounter (layout 1)"
    assert e["stats"]["value"] == 5
    assert e["in_use"] is True
    assert e["creator_pid"] == os.getpid()


def test_ls_leaves_foreign_files_alone(capsys: pytest.CaptureFixture[str]) -> None:
    foreign = os.path.join(_compat.SHM_DIR, "not-ours-" + str(os.getpid()))
    with open(foreign, "wb") as f:
        f.write(b"x" * 100)
    try:
        assert main(["ls"]) == 0
        assert os.path.basename(foreign) not in capsys.readouterr().out
        assert main(["rm", "--yes", "--stale"]) == 0
        assert os.path.exists(foreign)
    finally:
        os.unlink(foreign)


def test_inspect(capsys: pytest.CaptureFixture[str], cleanup: Any, name: str) -> None:
    cleanup(safeshm.SafeCounter.create(9, name=name))
    assert main(["inspect", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == name
    assert info["statistics"]["value"] == 9
    assert info["statistics"]["implementation"]
    assert main(["inspect", name]) == 0
    assert "value: 9" in capsys.readouterr().out


def test_inspect_shows_the_primitives_state(cleanup: Any, unique: Any) -> None:
    """Holders, waiters, permits, parties: what `safeshm inspect` says of each primitive."""
    sem = cleanup(safeshm.SafeSemaphore.create(3, name=unique()))
    assert sem.acquire()
    barrier = cleanup(safeshm.SafeBarrier.create(4, name=unique()))
    rw = cleanup(safeshm.SafeRWLock.create(name=unique()))
    assert rw.acquire_read()
    rlock = cleanup(safeshm.SafeRLock.create(name=unique()))
    assert rlock.acquire() and rlock.acquire()
    event = cleanup(safeshm.SafeEvent.create(name=unique()))
    event.set()
    try:
        expect = {
            sem.name: {"value": 2, "initial_value": 3, "holders": {str(os.getpid()): 1}},
            barrier.name: {"parties": 4, "n_waiting": 0, "broken": False},
            rw.name: {"readers": 1, "readers_by_pid": {str(os.getpid()): 1}},
            rlock.name: {"locked": True, "owner_pid": os.getpid(), "depth": 2},
            event.name: {"is_set": True, "waiters": 0},
        }
        for name, fields in expect.items():
            # From another process, as it is used (closing a handle in the thread that
            # holds a lock releases it, as SafeLock's close() does).
            proc = run_cli("inspect", name, "--json")
            assert proc.returncode == 0, proc.stderr
            stats = json.loads(proc.stdout)["statistics"]
            assert {k: stats[k] for k in fields} == fields, (name, stats)
    finally:
        sem.release()
        rw.release_read()
        rlock.release()
        rlock.release()


def test_inspect_missing(capsys: pytest.CaptureFixture[str], name: str) -> None:
    assert main(["inspect", name]) == 1
    assert "no segment" in capsys.readouterr().err


def test_rm(capsys: pytest.CaptureFixture[str], name: str) -> None:
    c = safeshm.SafeCounter.create(name=name)
    c.close()
    assert main(["rm", "--yes", name]) == 0
    assert not os.path.exists(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name))
    assert main(["rm", "--yes", name]) == 1


def test_rm_asks_for_confirmation(monkeypatch: pytest.MonkeyPatch, cleanup: Any, name: str) -> None:
    cleanup(safeshm.SafeCounter.create(name=name))
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["rm", name]) == 0
    assert os.path.exists(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name))


def test_rm_refuses_non_safeshm_file(capsys: pytest.CaptureFixture[str], name: str) -> None:
    path = os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name)
    with open(path, "wb") as f:
        f.write(b"\0" * 256)
    try:
        assert main(["rm", "--yes", name]) == 1
        assert os.path.exists(path)
        assert "not a safeshm segment" in capsys.readouterr().err
    finally:
        os.unlink(path)


def test_rm_stale_removes_only_unused(cleanup: Any, unique: Any) -> None:
    used = cleanup(safeshm.SafeCounter.create(name=unique()))
    stale = safeshm.SafeCounter.create(name=unique())
    stale.close()  # nobody has it open any more
    assert main(["rm", "--yes", "--stale"]) == 0
    assert os.path.exists(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + used.name))
    assert not os.path.exists(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + stale.name))
    assert used.add(1) == 1


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["inspect"],
        ["demo", "--workers", "0"],
        ["demo", "--workers", "x"],
        ["inspect", "bad/name"],
        ["rm", "--yes", "../etc"],
    ],
)
def test_bad_arguments_exit_nonzero_without_traceback(argv: list[str]) -> None:
    proc = run_cli(*argv)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip()


# -- rm: never removes a segment in use (issue 10.11) -------------------------------------------
def _path(name: str) -> str:
    return os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name)


@pytest.mark.parametrize("argv", [["rm", "--stale"], ["rm", "{name}"]])
def test_rm_does_not_remove_a_segment_attached_during_the_question(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    c = safeshm.SafeCounter.create(5, name=name)
    c.close()  # unused: rm decides to remove it, and asks
    attached: list[Any] = []

    def answer(prompt: str) -> str:
        # A service attaches while the operator reads the question.
        attached.append(safeshm.SafeCounter.attach(name))
        return "y"

    monkeypatch.setattr("builtins.input", answer)
    try:
        assert main([a.format(name=name) for a in argv]) == 1
        assert attached, "rm did not ask"
        assert "now in use by 1 open handle" in capsys.readouterr().err
        assert os.path.exists(_path(name))
        # The service and a later open() share one counter.
        with safeshm.SafeCounter.open(name) as later:
            attached[0].add(1)
            assert later.value == 6
    finally:
        for h in attached:
            h.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_path(name))


def _waiting_flocks(path: str) -> int:
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and dev in line.split())


def test_rm_and_a_concurrent_attach_never_split_a_segment(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    c = safeshm.SafeCounter.create(5, name=name)
    c.close()
    outcome: list[BaseException | Any] = []

    def attach() -> None:
        try:
            outcome.append(safeshm.SafeCounter.attach(name))
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            outcome.append(e)

    thread = threading.Thread(target=attach)

    def hook(hook_name: str) -> None:
        # rm holds the exclusive flock: an attach that opened the file now waits for its
        # shared flock (seen in /proc/locks), and must not end up on the removed file.
        assert hook_name == name
        thread.start()
        deadline = time.monotonic() + JOIN_TIMEOUT
        while not _waiting_flocks(_path(name)):
            assert time.monotonic() < deadline, "the attach never reached its flock"
            time.sleep(0.001)

    monkeypatch.setattr(_cli, "_before_unlink_hook", hook)
    assert main(["rm", "--yes", name]) == 0
    thread.join(JOIN_TIMEOUT)
    assert len(outcome) == 1
    assert isinstance(outcome[0], safeshm.SegmentNotFoundError), outcome
    assert not os.path.exists(_path(name))


def test_rm_of_a_segment_in_use_says_so_and_by_whom(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cleanup: Any, name: str
) -> None:
    c = cleanup(safeshm.SafeCounter.create(name=name))
    # --yes does not remove a segment in use.
    assert main(["rm", "--yes", name]) == 1
    err = capsys.readouterr().err
    assert f"in use by 1 open handle (pid {os.getpid()})" in err and "--force" in err
    assert os.path.exists(_path(name))
    # Asked, the question says it is in use, by whom, and what removing it does.
    questions: list[str] = []
    monkeypatch.setattr("builtins.input", lambda q: questions.append(q) or "n")
    assert main(["rm", name]) == 0
    assert "in use by 1 open handle" in questions[0] and str(os.getpid()) in questions[0]
    assert "new segment" in questions[0]
    assert os.path.exists(_path(name))
    # A second handle, from a child process, is counted too.
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(name, ready, done))
    p.start()
    try:
        assert ready.wait(JOIN_TIMEOUT)
        assert main(["rm", "--yes", name]) == 1
        err = capsys.readouterr().err
        assert "in use by 2 open handles" in err
        assert f"pids {min(os.getpid(), p.pid)}, {max(os.getpid(), p.pid)}" in err
    finally:
        done.set()
        p.join(JOIN_TIMEOUT)
    # Confirmed (or --force), it goes: the holders keep their copy.
    monkeypatch.setattr("builtins.input", lambda q: "y")
    assert main(["rm", name]) == 0
    assert not os.path.exists(_path(name))
    assert c.add(1) == 1


def test_rm_force_removes_a_segment_in_use(cleanup: Any, name: str) -> None:
    c = cleanup(safeshm.SafeCounter.create(name=name))
    assert main(["rm", "--force", name]) == 0
    assert not os.path.exists(_path(name))
    assert c.add(2) == 2


def _hold(name: str, ready: Any, done: Any) -> None:
    h = safeshm.SafeCounter.attach(name)
    ready.set()
    done.wait(JOIN_TIMEOUT)
    h.close()


# -- ls / inspect ----------------------------------------------------------------------------
def _die_holding(name: str) -> None:
    lock = safeshm.SafeLock.attach(name)
    lock.acquire()
    os._exit(0)  # without releasing: the kernel marks the holder dead


def test_ls_says_a_locks_holder_died_and_leaves_the_news_to_the_next_acquirer(
    capsys: pytest.CaptureFixture[str], cleanup: Any, name: str
) -> None:
    lock = cleanup(safeshm.SafeLock.create(name=name))
    p = multiprocessing.get_context("fork").Process(target=_die_holding, args=(name,))
    p.start()
    p.join(JOIN_TIMEOUT)
    assert p.exitcode == 0
    assert main(["ls"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(name))
    assert "holder died" in line and "holder_pid" not in line
    assert main(["inspect", "--json", name]) == 0
    assert json.loads(capsys.readouterr().out)["statistics"]["holder_died"] is True
    # Looking did not recover the lock on the quiet: the next acquirer is told.
    with pytest.warns(safeshm.HolderDiedWarning):
        assert lock.acquire(timeout=JOIN_TIMEOUT)
    lock.release()
    assert lock.statistics().holder_died is False


def test_inspect_shows_name_and_creator_once(
    capsys: pytest.CaptureFixture[str], cleanup: Any, name: str
) -> None:
    cleanup(safeshm.SafeQueue.create(4096, name=name))
    assert main(["inspect", name]) == 0
    keys = [line.split(":")[0].strip() for line in capsys.readouterr().out.splitlines()]
    assert keys.count("name") == 1 and keys.count("creator_pid") == 1, keys
    assert main(["inspect", "--json", name]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "name" not in info["statistics"] and "creator_pid" not in info["statistics"]


def test_ls_reports_a_damaged_segment_and_goes_on(
    capsys: pytest.CaptureFixture[str], cleanup: Any, unique: Any
) -> None:
    bad = cleanup(safeshm.ShardedCounter.create(name=unique()))
    good = cleanup(safeshm.SafeCounter.create(3, name=unique()))
    with open(_path(bad.name), "r+b") as f:  # the high-water mark of used slots
        f.seek(136)
        f.write((10**9).to_bytes(8, "little"))
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    lines = {x.split()[0]: x for x in out.splitlines()[1:]}
    assert "DAMAGED" in lines[bad.name] and "high-water" in lines[bad.name]
    assert "value=3" in lines[good.name]
    assert main(["ls", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries[bad.name]["damaged"] is True and entries[good.name]["damaged"] is False
    assert main(["inspect", bad.name]) == 0
    assert "DAMAGED" in capsys.readouterr().out


# -- the command line itself (issue 11) ------------------------------------------------------
def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    # The subprocess inherits this environment, so it uses this process's implementation.
    impl = safeshm.implementation()
    assert proc.stdout.strip() == f"safeshm {safeshm.__version__} ({impl} implementation)"


def test_one_version_source() -> None:
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    pyproject = tomllib.loads(text)
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "safeshm.__version__"}


def test_demo_help_lists_every_structure_it_uses() -> None:
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for cls in (
        "SafeCounter",
        "ShardedCounter",
        "SafeLock",
        "SafeArray",
        "SafeQueue",
        "SafeFileStore",
        "SafeEvent",
        "SafeSemaphore",
    ):
        assert cls in text


def test_a_bug_shows_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: Any) -> int:
        raise ValueError("a bug in safeshm")

    monkeypatch.setattr(_cli, "cmd_ls", broken)
    with pytest.raises(ValueError, match="a bug in safeshm"):
        main(["ls"])
    monkeypatch.setattr(_cli, "cmd_ls", lambda args: os.close(-1))  # EBADF: our bug
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["ls"])


def test_problems_of_the_environment_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def denied(args: Any) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", "/some/file")

    monkeypatch.setattr(_cli, "cmd_ls", denied)
    assert main(["ls"]) == 1
    assert capsys.readouterr().err.strip() == (
        "safeshm: [Errno 13] Permission denied: '/some/file'"
    )


def test_ls_reports_a_damaged_header(
    capsys: pytest.CaptureFixture[str], cleanup: Any, name: str
) -> None:
    cleanup(safeshm.SafeCounter.create(3, name=name))
    with open(_path(name), "r+b") as f:  # the kind, without fixing the header's checksum
        f.seek(10)
        f.write(b"\x05\x00")
    assert main(["ls"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(name))
    assert "damaged" in line and "checksum" in line and "SafeQueue" not in line
    assert main(["inspect", "--json", name]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["damaged"] is True and info["statistics"] is None
    assert "checksum" in info["problem"]
    with pytest.raises(safeshm.SegmentCorruptedError):
        safeshm.SafeCounter.attach(name)


def test_rm_without_a_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rm"]) == 2
    assert "--stale" in capsys.readouterr().err
