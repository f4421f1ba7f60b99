"""SafeFileStore under damage: truncation at every byte, flipped bytes, and processes
SIGKILLed at every file-system call of a script and at random instants."""

from __future__ import annotations

import dataclasses
import errno
import multiprocessing
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from safeshm import SafeFileStore, StoreCorruptedError
from safeshm import _store as store_module

from ._helpers import JOIN_TIMEOUT, PROMPT, processes, run_all
from ._store_helpers import (
    TRACED,
    apply_step,
    big_value_writer,
    compacting_writer,
    group_commit,
    is_whole,
    scripted_child,
    store_modules,
    tagged,
)

# A small history that uses every record type: (log size after the step, state after it).
Steps = list[tuple[str, Any]]
SCRIPT: Steps = [
    ("set", ("a", 1)),
    ("set", ("b", {"nested": ["x", 2.5]})),
    ("txn", [("set", "c", "three"), ("del", "a", None), ("set", "b", 22)]),
    ("modify", "n"),
    ("del", "c"),
    ("set", ("big", "z" * 300)),
    ("modify", "n"),
    ("txn", [("set", "d", [1]), ("set", "e", None)]),
]


def _history(path: Path) -> list[tuple[int, dict[str, Any]]]:
    from ._store_helpers import run_step

    with SafeFileStore(path, durable=False) as store:
        sizes = [(store.statistics().log_bytes, {})]
        state: dict[str, Any] = {}
        for op, arg in SCRIPT:
            run_step(store, op, arg)
            state = apply_step(state, op, arg)
            assert store.to_dict() == state
            sizes.append((store.statistics().log_bytes, state))
    return sizes


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncation_at_every_byte_yields_a_committed_prefix(tmp_path: Path) -> None:
    original = tmp_path / "original"
    history = _history(original)
    log = store_module.log_name(1)
    header_end = history[0][0]
    final = history[-1][0]
    assert (original / log).stat().st_size == final
    for cut in range(final + 1):
        path = _copy(original, tmp_path / f"cut{cut}")
        os.truncate(path / log, cut)
        if cut < header_end:
            with pytest.raises(StoreCorruptedError):
                SafeFileStore(path, durable=False)
            with pytest.raises(StoreCorruptedError):
                store_module.check_store(path)
            shutil.rmtree(path)
            continue
        committed_size, state = max((h for h in history if h[0] <= cut), key=lambda h: h[0])
        report = store_module.check_store(path)
        assert report.torn_tail_bytes == cut - committed_size
        with SafeFileStore(path, durable=False) as store:
            assert store.to_dict() == state, cut
            # The next write discards the torn tail and lands right after the prefix.
            store["after"] = cut
            assert (path / log).stat().st_size > committed_size
            assert store.statistics().torn_tails_discarded == (cut != committed_size)
        with SafeFileStore(path, durable=False) as again:
            assert again.to_dict() == {**state, "after": cut}
        assert store_module.check_store(path).torn_tail_bytes == 0
        shutil.rmtree(path)


@pytest.mark.parametrize("target", ["log", "CURRENT"])
def test_flipped_bytes_are_detected(tmp_path: Path, target: str) -> None:
    original = tmp_path / "original"
    history = _history(original)
    name = store_module.log_name(1) if target == "log" else "CURRENT"
    data = (original / name).read_bytes()
    last_record_start = history[-2][0]
    states = [state for _size, state in history]
    for pos in range(len(data)):
        path = _copy(original, tmp_path / f"flip{pos}")
        damaged = bytearray(data)
        damaged[pos] ^= 0x41
        (path / name).write_bytes(bytes(damaged))
        try:
            with SafeFileStore(path, durable=False) as store:
                got = store.to_dict()
        except StoreCorruptedError:
            got = None
        if target == "CURRENT" or pos < last_record_start:
            assert got is None, f"flip at {pos} went unnoticed"
        else:
            # Damage in the last record may be a torn write as far as anyone can tell:
            # the record is dropped, or the damage is reported. Never garbage.
            assert got is None or got == states[-2], pos
        shutil.rmtree(path)


def test_zero_filled_tail_is_a_torn_write(tmp_path: Path) -> None:
    # After a power loss a file can end in zeros where the last write was lost.
    path = tmp_path / "s"
    history = _history(path)
    with open(path / store_module.log_name(1), "ab") as f:
        f.write(bytes(100))
    with SafeFileStore(path, durable=False) as store:
        assert store.to_dict() == history[-1][1]


def test_garbage_after_records_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "s"
    history = _history(path)
    with open(path / store_module.log_name(1), "ab") as f:
        f.write(b"\x01" * 100)
    with pytest.raises(StoreCorruptedError, match="corrupt at byte"):
        store_module.check_store(path)
    # Readers read what writers acknowledged; the next writer finds the damage and says so.
    with SafeFileStore(path, durable=False) as store:
        assert store.to_dict() == history[-1][1]
        with pytest.raises(StoreCorruptedError, match="corrupt at byte"):
            store["x"] = 1
        assert store.to_dict() == history[-1][1]
    os.unlink(path / "write.lock")  # without the published position: found on opening
    with pytest.raises(StoreCorruptedError, match="corrupt at byte"):
        SafeFileStore(path, durable=False)


def test_damage_seen_by_an_open_reader(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path, durable=False) as writer, SafeFileStore(path, durable=False) as reader:
        writer["a"] = 1
        assert reader["a"] == 1
        writer["b"] = 2
        log = path / store_module.log_name(1)
        data = bytearray(log.read_bytes())
        size = len(data)
        writer["c"] = 3
        data = bytearray(log.read_bytes())
        data[size + 3] ^= 0xFF  # in the header of the record after b
        log.write_bytes(bytes(data) + b"more")
        with pytest.raises(StoreCorruptedError):
            reader["c"]


def test_missing_log_and_current_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _history(path)
    os.unlink(path / store_module.log_name(1))
    with pytest.raises(StoreCorruptedError, match="does not exist"):
        SafeFileStore(path, durable=False)
    (path / "CURRENT").write_bytes(b"")
    with pytest.raises(StoreCorruptedError, match="CURRENT"):
        SafeFileStore(path, durable=False)


# --- SIGKILL at every file-system call of a script ----------------------------------------
CRASH_SCRIPT: Steps = [
    ("set", ("a", 1)),
    ("txn", [("set", "b", 2), ("set", "c", 3), ("del", "a", None)]),
    ("modify", "n"),
    ("compact", None),
    ("set", ("d", "x" * 5000)),
    ("del", "b"),
    ("compact", None),
    ("txn", [("set", "e", 5), ("set", "c", 33)]),
]
BASE = {"base": "before", "n": 41}


def _run_scripted(
    path: Path, kill_at: int, how: str, group: bool
) -> tuple[int, int | None, str | None]:
    """Run CRASH_SCRIPT in a forked child that kills itself at traced call ``kill_at``;
    return (steps acknowledged, traced calls if it finished, error text)."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=scripted_child, args=(str(path), CRASH_SCRIPT, kill_at, how, group, child)
    )
    proc.start()
    child.close()
    acked, calls, error = 0, None, None
    try:
        while parent.poll(JOIN_TIMEOUT):
            try:
                kind, value = parent.recv()
            except EOFError:
                break
            if kind == "acked":
                acked = value + 1
            elif kind == "calls":
                calls = value
            else:
                error = value
    finally:
        proc.join(timeout=JOIN_TIMEOUT)
        if proc.is_alive():  # pragma: no cover
            proc.kill()
            proc.join(timeout=10)
        parent.close()
    return acked, calls, error


def _states() -> list[dict[str, Any]]:
    states = [dict(BASE)]
    for op, arg in CRASH_SCRIPT:
        states.append(apply_step(states[-1], op, arg))
    return states


def _prepare(path: Path) -> None:
    with SafeFileStore(path, durable=False) as store:
        store.update(BASE)


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["alone", "group-commit"])
def test_sigkill_at_every_file_system_call(tmp_path: Path, group: bool) -> None:
    states = _states()
    dry = tmp_path / "dry"
    _prepare(dry)
    acked, calls, error = _run_scripted(dry, kill_at=0, how="before", group=group)
    assert error is None, error
    assert acked == len(CRASH_SCRIPT) and calls is not None and calls > 20
    with SafeFileStore(dry, durable=False) as store:
        assert store.to_dict() == states[-1]

    runs = pending_steps = 0
    for kill_at in range(1, calls + 1):
        for how in ("before", "after", "half"):
            path = tmp_path / f"k{kill_at}{how}"
            _prepare(path)
            # A handle that was open all along (it read the log before the child ran) and
            # one opened afterwards must agree on everything, whatever the crash left.
            with SafeFileStore(path, durable=False) as veteran:
                veteran_before = veteran.to_dict()
                acked, finished, error = _run_scripted(path, kill_at, how, group)
                assert error is None, error
                assert finished is None, f"the child was not killed at call {kill_at}"
                runs += 1
                where = f"killed {how} traced call {kill_at} (of {TRACED}), {acked} acked"
                # Any process sees the acknowledged state or the next one, whole.
                report = store_module.check_store(path)
                before, after = states[acked], states[min(acked + 1, len(states) - 1)]
                assert veteran_before == states[0]
                with SafeFileStore(path, durable=False) as fresh:
                    got = fresh.to_dict()
                assert got in (before, after), where
                assert veteran.to_dict() == got, where
                assert report.keys == len(got), where
                # ... and carries on, through either handle: a write by the veteran is
                # seen by a new process (it never lands in a log compacted away). With
                # group commit, a step the child wrote whole but was killed before it
                # synced and returned may take effect with the next write (as a whole: it
                # comes before that write, so a reader sees both or neither); a lone
                # writer syncs before it publishes, so the next writer discards it.
                veteran["after"] = True
                with SafeFileStore(path, durable=False) as fresh:
                    now = fresh.to_dict()
                    assert now in ({**got, "after": True}, {**after, "after": True}), where
                    if now != {**got, "after": True}:
                        pending_steps += 1
                    fresh.compact()
                veteran["again"] = 1
                assert veteran.to_dict() == {**now, "again": 1}, where
            with SafeFileStore(path, durable=False) as fresh:
                assert fresh.to_dict() == {**now, "again": 1}, where
            names = sorted(os.listdir(path))
            assert [n for n in names if n.endswith(".tmp")] == [], (where, names)
            assert len([n for n in names if n.startswith("data.")]) == 1, (where, names)
            shutil.rmtree(path)
    assert runs == 3 * calls
    # With group commit, kills between a durable write and its fdatasync leave whole,
    # unsynced steps: some must have been seen to take effect later, or the check above
    # tests nothing. A lone writer's never do.
    assert pending_steps > 0 if group else pending_steps == 0


# --- SIGKILL at random instants -----------------------------------------------------------
def _run_and_kill(target: Any, args: tuple[Any, ...], delay: float) -> None:
    """Run ``target`` in a forked child and SIGKILL it after ``delay`` seconds."""
    proc = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    proc.start()
    try:
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(timeout=JOIN_TIMEOUT)
        if proc.is_alive():  # pragma: no cover
            proc.kill()
            proc.join(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("durable", [False, True])
def test_sigkill_mid_write_and_mid_transaction(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "s"
    ctx = multiprocessing.get_context("fork")
    acked = ctx.Value("q", 0, lock=False)
    rng = random.Random(1234)
    # At least 6 rounds, and more (a bounded number) until one write was acknowledged: a
    # loaded machine can spend a whole round starting the writer.
    for round_ in range(40):
        if round_ >= 6 and acked.value > 0:
            break
        _run_and_kill(big_value_writer, (str(path), acked, durable), rng.uniform(0.05, 0.4))
        with SafeFileStore(path, durable=False) as store:
            done = acked.value
            if done == 0 and "big" not in store:
                continue
            big, a, b = store["big"], store.get("a"), store.get("b")
            assert is_whole(big) and big["s"] in (done, done + 1)
            if a is not None:
                assert b is not None, "a transaction was half-applied"
                assert is_whole(a) and is_whole(b) and a["s"] == b["s"]
                assert a["s"] in (done - 1, done, done + 1) if done else a["s"] in (0, 1)
                assert a["s"] <= big["s"]
            acked.value = max(done, big["s"])
    assert acked.value > 0
    assert store_module.check_store(path).keys == 3


@pytest.mark.slow
def test_sigkill_mid_compaction(tmp_path: Path) -> None:
    path = tmp_path / "s"
    ctx = multiprocessing.get_context("fork")
    acked = ctx.Value("q", 0, lock=False)
    rng = random.Random(99)
    generations = set()
    for round_ in range(40):  # 8 rounds, or more until a compaction completed
        if round_ >= 8 and len(generations) > 1:
            break
        _run_and_kill(compacting_writer, (str(path), acked), rng.uniform(0.05, 0.3))
        with SafeFileStore(path, durable=False) as store:
            values = store.to_dict()
            generations.add(store.statistics().generation)
            done = acked.value
            if not values:
                continue
            seqs = [values[f"k{i}"]["s"] for i in range(20) if f"k{i}" in values]
            assert all(is_whole(v) for v in values.values())
            # Keys are written in order k0..k19 each round: a later key never holds a newer
            # round than an earlier one, and nothing is older than the last acked round.
            assert seqs == sorted(seqs, reverse=True)
            assert min(seqs) >= done and max(seqs) <= done + 1
            acked.value = max(seqs)
            store["probe"] = tagged(0, 0)
            del store["probe"]
    assert len(generations) > 1, "no compaction ran"
    with SafeFileStore(path, durable=False) as store:
        store.compact()
    names = sorted(os.listdir(path))
    assert [n for n in names if n.startswith("data.")] != []
    assert [n for n in names if n.endswith(".tmp")] == []


# --- the published position (hints in the mapped lock file) -----------------------------
def test_readers_see_only_acknowledged_writes(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path, durable=False) as writer, SafeFileStore(path, durable=False) as reader:
        writer["a"] = 1
        assert reader.to_dict() == {"a": 1}
        # A complete record appended by a writer that died inside write(), before it
        # published its end (the write was never acknowledged): readers do not see it ...
        with open(path / store_module.log_name(1), "ab") as f:
            f.write(store_module.encode_record(store_module.SET, b"b", b"2"))
        assert reader.to_dict() == {"a": 1}
        with SafeFileStore(path, durable=False) as fresh:
            assert fresh.to_dict() == {"a": 1}
        report = store_module.check_store(path)
        assert report.keys == 1 and report.torn_tail_bytes > 0
        # ... and the next writer discards it: past `position` lies only what a killed
        # writer left (records a writer finished lie before it, see the group commit
        # tests below).
        writer["c"] = 3
        assert reader.to_dict() == {"a": 1, "c": 3}
        assert store_module.check_store(path) == dataclasses.replace(
            report,
            keys=2,
            torn_tail_bytes=0,
            log_bytes=report.log_bytes + 22,
            live_bytes=report.live_bytes + 22,
        )


class _SyncGate:
    """Stands in for ``os`` inside ``safeshm._store``: ``fdatasync`` in the thread
    ``slow`` waits until ``release`` is set (the other threads and processes sync at once)."""

    def __init__(self) -> None:
        self.slow: threading.Thread | None = None
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fdatasync(self, fd: int) -> None:
        if threading.current_thread() is self.slow:
            self.entered.set()
            assert self.release.wait(JOIN_TIMEOUT)
        os.fdatasync(fd)


def _durable_set(path: str, key: str, value: int) -> None:
    with SafeFileStore(path) as store:
        store[key] = value


def test_group_commit_readers_see_a_durable_write_only_once_it_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A durable writer syncs after releasing the write lock: other writers go on (their
    syncs overlap), readers do not see the write until some sync covered it."""
    path = tmp_path / "s"
    gate = _SyncGate()
    for module in store_modules():
        monkeypatch.setattr(module, "os", gate)
    with SafeFileStore(path) as slow, SafeFileStore(path, durable=False) as reader:
        group_commit(slow)  # as after contention: sync outside the lock
        gate.slow = threading.Thread(target=slow.__setitem__, args=("a", 1))
        gate.slow.start()
        try:
            assert gate.entered.wait(JOIN_TIMEOUT)
            # Written, not yet on disk: not acknowledged, so no reader sees it ...
            assert reader.to_dict() == {}
            with SafeFileStore(path, durable=False) as fresh:
                assert fresh.to_dict() == {}
            assert store_module.check_store(path).keys == 0
            # ... while the write lock is free: another process's durable write goes
            # through (it would time out if the lock were held across the sync), and its
            # fdatasync, which covers the earlier bytes too, makes both visible.
            run_all("fork", _durable_set, [(str(path), "b", 2)])
            assert reader.to_dict() == {"a": 1, "b": 2}
            assert gate.slow.is_alive()  # still "syncing": visibility came from the other
        finally:
            gate.release.set()
            gate.slow.join(timeout=JOIN_TIMEOUT)
        assert not gate.slow.is_alive()
        assert slow.to_dict() == reader.to_dict() == {"a": 1, "b": 2}
        slow["c"] = 3
        assert reader.to_dict() == {"a": 1, "b": 2, "c": 3}


@pytest.mark.parametrize("group", [False, True], ids=["alone", "group-commit"])
def test_a_durable_write_is_visible_when_its_own_sync_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: bool
) -> None:
    path = tmp_path / "s"
    gate = _SyncGate()
    for module in store_modules():
        monkeypatch.setattr(module, "os", gate)
    with SafeFileStore(path) as slow, SafeFileStore(path, durable=False) as reader:
        if group:
            group_commit(slow)
        gate.slow = threading.Thread(target=slow.update, args=({"x": 1, "y": 2},))
        gate.slow.start()
        try:
            assert gate.entered.wait(JOIN_TIMEOUT)
            assert reader.to_dict() == {}
        finally:
            gate.release.set()
            gate.slow.join(timeout=JOIN_TIMEOUT)
        assert reader.to_dict() == {"x": 1, "y": 2}  # published by the writer itself


@pytest.mark.parametrize("group", [False, True], ids=["alone", "group-commit"])
def test_a_failed_sync_raises_and_the_store_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: bool
) -> None:
    """fdatasync failing (EIO from a dying disk) fails the write that called it: not
    acknowledged, not visible. A lone writer had not published it, so the next writer
    discards it; with group commit it was, and the next durable write's sync covers it."""
    path = tmp_path / "s"

    class FailingSync:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def fdatasync(self, fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

    with SafeFileStore(path) as store, SafeFileStore(path, durable=False) as reader:
        store["a"] = 1
        if group:
            group_commit(store)
        fds = len(os.listdir("/proc/self/fd"))
        for module in store_modules():
            monkeypatch.setattr(module, "os", FailingSync())
        with pytest.raises(OSError, match="Input/output"):
            store["b"] = 2
        with pytest.raises(OSError, match="Input/output"), store.transaction() as tx:
            tx["c"] = 3
        monkeypatch.undo()
        assert len(os.listdir("/proc/self/fd")) == fds  # the log's duplicate is closed
        assert reader.to_dict() == {"a": 1}  # never acknowledged: not shown
        store["d"] = 4
        failed = {"b": 2, "c": 3} if group else {}
        assert reader.to_dict() == {"a": 1, **failed, "d": 4}
        assert store_module.check_store(path).torn_tail_bytes == 0


def _hold_write_lock(path: str, ready: Any, release: Any) -> None:
    with SafeFileStore(path) as store, store.transaction():
        ready.set()
        release.wait(JOIN_TIMEOUT)


def test_contention_switches_durable_writers_to_group_commit(tmp_path: Path) -> None:
    path = tmp_path / "s"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    with SafeFileStore(path) as store:
        hints = store._writer
        assert hints is not None
        store["a"] = 1
        assert hints.contended.value == 0  # alone: synced with the lock held
        with processes("fork", _hold_write_lock, [(str(path), ready, release)]):
            assert ready.wait(JOIN_TIMEOUT)
            t = threading.Thread(target=store.__setitem__, args=("b", 2))
            t.start()
            deadline = time.monotonic() + PROMPT
            while not hints.contended.value and time.monotonic() < deadline:
                time.sleep(0.001)
            release.set()
            t.join(timeout=JOIN_TIMEOUT)
        # It found the lock taken: the next durable writes sync outside it, counting down.
        assert hints.contended.value == store_module._CONTENDED_WRITES - 1
        store["c"] = 3
        assert hints.contended.value == store_module._CONTENDED_WRITES - 2
        with SafeFileStore(path, durable=False) as reader:
            assert reader.to_dict() == {"a": 1, "b": 2, "c": 3}


def test_untrusted_published_position_falls_back_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path, durable=False) as writer:
        writer["a"] = 1
        hints = writer._writer
        assert hints is not None
        hints.stamp.value ^= 1  # as after a reboot: the page may hold anything
        hints.position.value = store_module._pack(1, 3)  # and claims a short log
        with SafeFileStore(path, durable=False) as reader:
            assert reader.to_dict() == {"a": 1}
        writer["b"] = 2  # the slow path: reads the file, publishes again
        assert hints.stamp.value == writer._stamp != 0
        with SafeFileStore(path, durable=False) as reader:
            assert reader.to_dict() == {"a": 1, "b": 2}
        # A trusted position past the file's end is what a log cut in its middle looks
        # like (or one restored from a backup under the same lock file): never opened as
        # if nothing was missing (issue 10); the message says what to do after a restore.
        high = store_module._pack(1, 10**9)
        hints.publish(hints.stamp.value, high, high)
        with pytest.raises(
            StoreCorruptedError,
            match=r"acknowledged 1000000000 bytes.*"
            r"remove write\.lock",
        ):
            SafeFileStore(path, durable=False)
        with pytest.raises(StoreCorruptedError, match="acknowledged"):
            writer["c"] = 3
    del hints  # the process's mapping of the old lock file goes with its last user
    os.unlink(path / "write.lock")
    with SafeFileStore(path, durable=False) as reader:
        assert reader.to_dict() == {"a": 1, "b": 2}
        reader["c"] = 3
    assert store_module.check_store(path).keys == 3


def test_damaged_lock_file_is_never_trusted(tmp_path: Path) -> None:
    # write.lock holds only hints, but a hint believed wrongly would hide data (a position
    # too low) or discard it: a flipped byte anywhere in it must change nothing visible.
    original = tmp_path / "original"
    history = _history(original)
    state = history[-1][1]
    data = (original / "write.lock").read_bytes()
    assert len(data) == 64
    for pos in range(40):  # busy, stamp, position, check, synced
        for flip in (0x01, 0x80, 0xFF):
            path = _copy(original, tmp_path / f"lock{pos}-{flip}")
            with SafeFileStore(path, durable=False) as store:  # make the hints trusted
                store["t"] = 0
                del store["t"]
                expected = store.to_dict()
                assert expected == state
            damaged = bytearray((path / "write.lock").read_bytes())
            damaged[pos] ^= flip
            (path / "write.lock").write_bytes(bytes(damaged))
            with SafeFileStore(path, durable=False) as store:
                assert store.to_dict() == state, (pos, flip)
                store["new"] = pos
                assert store.to_dict() == {**state, "new": pos}, (pos, flip)
            with SafeFileStore(path, durable=False) as store:
                assert store.to_dict() == {**state, "new": pos}, (pos, flip)
            shutil.rmtree(path)
