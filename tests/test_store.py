"""SafeFileStore: mapping semantics, serializers, typed errors, security, persistence."""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

import safeshm
from safeshm import (
    IncompatibleStoreError,
    InsecureDirectoryError,
    LockReentryError,
    SafeFileStore,
    StoreClosedError,
)
from safeshm import _store as store_module


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with SafeFileStore(tmp_path / "s", durable=False) as s:
        yield s


# --- the mapping ---------------------------------------------------------------------------
def test_mapping_basics(store: SafeFileStore[Any]) -> None:
    assert len(store) == 0
    assert list(store) == []
    store["a"] = {"x": [1, 2.5, None, True, "é"]}
    store["b"] = 3
    assert store["a"] == {"x": [1, 2.5, None, True, "é"]}
    assert store.get("b") == 3
    assert store.get("zz") is None
    assert store.get("zz", 7) == 7
    assert "a" in store
    assert "zz" not in store
    assert 1 not in store  # type: ignore[comparison-overlap]  # like dict: False, no error
    assert sorted(store) == ["a", "b"]
    assert len(store) == 2
    assert dict(store.items()) == {"a": {"x": [1, 2.5, None, True, "é"]}, "b": 3}
    assert sorted(map(str, store.values())) == sorted(map(str, [store["a"], 3]))
    assert ("b", 3) in store.items()
    del store["b"]
    assert "b" not in store
    with pytest.raises(KeyError):
        store["b"]
    with pytest.raises(KeyError):
        del store["b"]
    assert store.to_dict() == {"a": {"x": [1, 2.5, None, True, "é"]}}


def test_values_are_copies(store: SafeFileStore[Any]) -> None:
    store["d"] = {"n": 1}
    got = store["d"]
    got["n"] = 2
    assert store["d"] == {"n": 1}


def test_atomic_mixins(store: SafeFileStore[Any]) -> None:
    store.update({"a": 1, "b": 2}, c=3)
    store.update([("d", 4)])
    assert store.to_dict() == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert store.pop("a") == 1
    assert store.pop("a", "gone") == "gone"
    with pytest.raises(KeyError):
        store.pop("a")
    assert store.setdefault("b", 99) == 2
    assert store.setdefault("e", 5) == 5
    key, value = store.popitem()
    assert key not in store and value in (2, 3, 4, 5)
    store.clear()
    assert len(store) == 0
    with pytest.raises(KeyError):
        store.popitem()


def test_update_is_all_or_nothing(store: SafeFileStore[Any]) -> None:
    store["keep"] = 1
    with pytest.raises(TypeError):
        store.update({"a": 1, "b": object()})
    with pytest.raises(ValueError, match="non-empty"):
        store.update({"c": 1, "": 2})
    assert store.to_dict() == {"keep": 1}


def test_iteration_survives_concurrent_changes(store: SafeFileStore[Any]) -> None:
    for i in range(10):
        store[f"k{i}"] = i
    seen = []
    for key in store:  # a snapshot: deleting while iterating is fine
        seen.append(key)
        store.pop(key, None)
    assert len(seen) == 10
    for i in range(5):
        store[f"k{i}"] = i
    items = store.items()
    pairs = []
    for k, v in items:
        store.pop("k4", None)
        pairs.append((k, v))
    assert len(pairs) == 5


def test_modify(store: SafeFileStore[Any]) -> None:
    assert store.modify("n", lambda n: n + 1, default=0) == 1
    assert store.modify("n", lambda n: n * 10) == 10
    assert store["n"] == 10
    with pytest.raises(KeyError):
        store.modify("missing", lambda n: n + 1)
    assert "missing" not in store

    def boom(n: int) -> int:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        store.modify("n", boom)
    with pytest.raises(TypeError):
        store.modify("n", lambda n: object())
    assert store["n"] == 10


def test_transaction_commits_all(store: SafeFileStore[Any]) -> None:
    store["a"] = 1
    store["gone"] = 0
    with store.transaction() as tx:
        assert tx["a"] == 1
        tx["a"] = 2
        assert tx["a"] == 2
        tx["b"] = tx["a"] + 1
        del tx["gone"]
        assert "gone" not in tx
        assert sorted(tx) == ["a", "b"]
        assert len(tx) == 2
        # Readers outside the transaction still see the committed state.
        assert store["a"] == 1 and "b" not in store
    assert store.to_dict() == {"a": 2, "b": 3}


def test_transaction_rolls_back_on_exception(store: SafeFileStore[Any]) -> None:
    store["a"] = 1

    def fail() -> None:
        with store.transaction() as tx:
            tx["a"] = 100
            tx["b"] = 2
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail()
    assert store.to_dict() == {"a": 1}


def test_transaction_bad_input_raises_in_block(store: SafeFileStore[Any]) -> None:
    def bad_value() -> None:
        with store.transaction() as tx:
            tx["a"] = 1
            tx["b"] = {1, 2}  # a set is not JSON

    with pytest.raises(TypeError):
        bad_value()
    assert len(store) == 0
    with store.transaction() as tx, pytest.raises(KeyError):
        del tx["nope"]


def test_transaction_set_delete_set_keeps_order(store: SafeFileStore[Any]) -> None:
    store["k"] = 0
    with store.transaction() as tx:
        tx["k"] = 1
        del tx["k"]
        tx["k"] = 2
        tx["j"] = 3
        del tx["j"]
    assert store.to_dict() == {"k": 2}
    with SafeFileStore(store.path, durable=False) as again:  # and as the log replays it
        assert again.to_dict() == {"k": 2}


def test_transaction_use_outside_block(store: SafeFileStore[Any]) -> None:
    tx = store.transaction()
    with pytest.raises(StoreClosedError):
        tx["a"] = 1
    with tx:
        tx["a"] = 1
    with pytest.raises(StoreClosedError):
        tx["a"]
    with pytest.raises(RuntimeError):
        tx.__enter__()
    assert store["a"] == 1


def test_reentry_is_an_error_not_a_deadlock(store: SafeFileStore[Any]) -> None:
    with pytest.raises(LockReentryError):
        store.modify("n", lambda n: store.__setitem__("x", 1), default=0)
    with store.transaction() as tx:
        tx["a"] = 1
        with pytest.raises(LockReentryError):
            store["b"] = 2
        with pytest.raises(LockReentryError), store.transaction():
            pass
        with pytest.raises(LockReentryError):
            store.compact()
        assert store.get("a") is None  # reads never block
    assert store.to_dict() == {"a": 1}
    # Another handle of the same store in the same thread: also refused, not deadlocked.
    with (
        SafeFileStore(store.path, durable=False) as other,
        store.transaction(),
        pytest.raises(LockReentryError),
    ):
        other["c"] = 3


def test_threads_share_a_handle(store: SafeFileStore[Any]) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(200):
                store.modify("n", lambda n: n + 1, default=0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert store["n"] == 800


# --- keys and values -----------------------------------------------------------------------
@pytest.mark.parametrize("key", [1, None, b"k", ("t",)])
def test_non_str_keys(store: SafeFileStore[Any], key: Any) -> None:
    with pytest.raises(TypeError, match="keys are str"):
        store[key] = 1
    with pytest.raises(TypeError):
        store[key]
    with pytest.raises(TypeError):
        del store[key]
    assert len(store) == 0


@pytest.mark.parametrize("key", ["", "\ud800"])
def test_invalid_str_keys(store: SafeFileStore[Any], key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        store[key] = 1
    with pytest.raises(ValueError, match="key"):
        store.modify(key, lambda n: n, default=0)
    assert len(store) == 0


def test_unicode_and_odd_keys(store: SafeFileStore[Any]) -> None:
    keys = ["ünïcödé", "with space", "new\nline", "/slash/", "\0nul", "😀", "k" * 5000]
    for i, key in enumerate(keys):
        store[key] = i
    with SafeFileStore(store.path, durable=False) as again:
        assert again.to_dict() == {key: i for i, key in enumerate(keys)}


@pytest.mark.parametrize("value", [{1, 2}, object(), math.nan, math.inf, b"bytes"])
def test_unencodable_json_values_change_nothing(store: SafeFileStore[Any], value: Any) -> None:
    store["k"] = "old"
    with pytest.raises((TypeError, ValueError)):
        store["k"] = value
    with pytest.raises((TypeError, ValueError)):
        store["other"] = value
    assert store.to_dict() == {"k": "old"}


def test_json_semantics(store: SafeFileStore[Any]) -> None:
    store["t"] = (1, 2)
    store["d"] = {1: "one"}
    assert store["t"] == [1, 2]
    assert store["d"] == {"1": "one"}


def test_large_values(store: SafeFileStore[Any]) -> None:
    big = "x" * 3_000_000
    store["big"] = big
    store["small"] = 1
    assert store["big"] == big
    with SafeFileStore(store.path, durable=False) as again:
        assert again["big"] == big
        store["big"] = "y"
        assert again["big"] == "y"


def test_bytes_serializer(tmp_path: Path) -> None:
    with SafeFileStore(tmp_path / "b", serializer="bytes", durable=False) as s:
        s["a"] = b"\x00\xff"
        s["b"] = bytearray(b"ba")
        s["c"] = memoryview(b"mv")
        assert s.to_dict() == {"a": b"\x00\xff", "b": b"ba", "c": b"mv"}
        assert type(s["b"]) is bytes
        with pytest.raises(TypeError, match="bytes"):
            s["d"] = "str"  # type: ignore[assignment]
        assert "d" not in s


def test_pickle_serializer_is_opt_in(tmp_path: Path) -> None:
    with SafeFileStore(tmp_path / "p", serializer="pickle", durable=False) as s:
        s["a"] = {1, 2}
        s["b"] = (1, b"x")
        assert s["a"] == {1, 2}
        assert s["b"] == (1, b"x")
    with pytest.raises(IncompatibleStoreError, match="pickle"):
        SafeFileStore(tmp_path / "p")  # a JSON handle never unpickles


class Upper:
    name = "upper"

    def dumps(self, value: str) -> bytes:
        return value.upper().encode()

    def loads(self, data: bytes) -> str:
        return data.decode()


def test_custom_serializer(tmp_path: Path) -> None:
    with SafeFileStore(tmp_path / "c", serializer=Upper(), durable=False) as s:
        s["a"] = "abc"
        assert s["a"] == "ABC"
    with pytest.raises(IncompatibleStoreError, match="upper"):
        SafeFileStore(tmp_path / "c", serializer="bytes")


def test_bad_serializers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown serializer"):
        SafeFileStore(tmp_path / "x", serializer="yaml")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="serializer"):
        SafeFileStore(tmp_path / "x", serializer=object())  # type: ignore[call-overload]

    class NotBytes:
        name = "nb"

        def dumps(self, value: Any) -> Any:
            return "text"

        def loads(self, data: bytes) -> Any:
            return data

    with SafeFileStore(tmp_path / "y", serializer=NotBytes(), durable=False) as s:
        with pytest.raises(TypeError, match="not bytes"):
            s["a"] = 1
        assert len(s) == 0


def test_bad_constructor_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        SafeFileStore(tmp_path / "x", durable="yes")  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        SafeFileStore(b"/tmp/x")  # type: ignore[call-overload]
    with pytest.raises(FileNotFoundError):
        SafeFileStore(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        SafeFileStore(tmp_path / "file")


# --- lifecycle -----------------------------------------------------------------------------
def test_persistence_and_open(tmp_path: Path) -> None:
    path = tmp_path / "p"
    with SafeFileStore.open(path) as s:
        s["a"] = 1
        with s.transaction() as tx:
            tx["b"] = 2
            tx["a"] = 3
    with SafeFileStore.open(str(path), create=False) as s:
        assert s.to_dict() == {"a": 3, "b": 2}


def test_two_handles_see_each_other(tmp_path: Path) -> None:
    with (
        SafeFileStore(tmp_path / "s", durable=False) as a,
        SafeFileStore(tmp_path / "s", durable=False) as b,
    ):
        a["k"] = 1
        assert b["k"] == 1
        del b["k"]
        assert "k" not in a
        b["n"] = 5
        assert a.modify("n", lambda n: n + 1) == 6
        assert b["n"] == 6


def test_close_is_idempotent_and_loud(tmp_path: Path) -> None:
    s = SafeFileStore(tmp_path / "s", durable=False)
    s["a"] = 1
    s.close()
    s.close()
    assert s.closed
    assert "closed=True" in repr(s)
    for use in (
        lambda: s["a"],
        lambda: s.__setitem__("a", 2),
        lambda: len(s),
        lambda: list(s),
        lambda: "a" in s,
        lambda: s.statistics(),
        lambda: s.modify("a", lambda n: n),
        lambda: s.transaction().__enter__(),
        lambda: s.compact(),
        lambda: s.to_dict(),
    ):
        with pytest.raises(StoreClosedError):
            use()
    with SafeFileStore(tmp_path / "s", durable=False) as again:
        assert again["a"] == 1


def test_repr_statistics_and_pickle(store: SafeFileStore[Any]) -> None:
    store["a"] = 1
    assert repr(store) == (
        f"safeshm.SafeFileStore({store.path!r}, durable=False, serializer='json')"
    )
    stats = store.statistics()
    assert stats.keys == 1 and stats.generation == 1 and stats.serializer == "json"
    assert stats.log_bytes >= stats.live_bytes > 0
    clone = pickle.loads(pickle.dumps(store))
    try:
        assert clone["a"] == 1
        assert clone.durable is False
    finally:
        clone.close()
    assert type(store).__module__ == "safeshm"
    # The pickle names the reopening function where it always lived (not the package's
    # private module layout), and carries the store's default timeout.
    assert b"safeshm._store\x94\x8c\x07_reopen" in pickle.dumps(store)
    with SafeFileStore(store.path, durable=False, timeout=2.5) as patient:
        assert repr(patient).endswith("serializer='json', timeout=2.5)")
        again = pickle.loads(pickle.dumps(patient))
        try:
            assert again.timeout == 2.5
        finally:
            again.close()


def test_errors_pickle() -> None:
    for cls in (
        safeshm.StoreCorruptedError,
        IncompatibleStoreError,
        InsecureDirectoryError,
        StoreClosedError,
    ):
        e = pickle.loads(pickle.dumps(cls("msg")))
        assert type(e) is cls and str(e) == "msg"
        assert isinstance(e, safeshm.SafeShmError)


# --- security ------------------------------------------------------------------------------
def _modes(path: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.lstat().st_mode) for p in path.iterdir()}


def test_directory_and_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        with SafeFileStore(tmp_path / "s") as s:
            s["a"] = 1
            s.compact()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    modes = _modes(tmp_path / "s")
    assert modes and all(mode == 0o600 for mode in modes.values()), modes


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777, 0o722])
def test_writable_directory_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "shared"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(InsecureDirectoryError, match="other users"):
        SafeFileStore(path)
    assert list(path.iterdir()) == []


def test_existing_directory_not_writable_by_others_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    with SafeFileStore(path, durable=False) as s:
        s["a"] = 1


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_foreign_owned_directory_refused(tmp_path: Path) -> None:
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, 12345, 12345)
    with pytest.raises(InsecureDirectoryError, match="belongs to uid 12345"):
        SafeFileStore(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_foreign_owned_file_refused(tmp_path: Path) -> None:
    with SafeFileStore(tmp_path / "s", durable=False) as s:
        s["a"] = 1
    os.chown(tmp_path / "s" / "CURRENT", 12345, 12345)
    with pytest.raises(InsecureDirectoryError, match="belongs to uid 12345"):
        SafeFileStore(tmp_path / "s")


@pytest.mark.parametrize("victim", ["CURRENT", "log", "write.lock"])
def test_symlinked_files_refused(tmp_path: Path, victim: str) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path, durable=False) as s:
        s["a"] = 1
    name = store_module.log_name(1) if victim == "log" else victim
    target = tmp_path / "elsewhere"
    os.replace(path / name, target)
    os.symlink(target, path / name)
    with pytest.raises(InsecureDirectoryError, match="symbolic link"):
        SafeFileStore(path)
    assert target.exists()


def test_group_writable_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path, durable=False) as s:
        s["a"] = 1
    (path / store_module.log_name(1)).chmod(0o620)
    with pytest.raises(InsecureDirectoryError, match="other users"):
        SafeFileStore(path)


def test_non_empty_foreign_directory_refused(tmp_path: Path) -> None:
    path = tmp_path / "home"
    path.mkdir(mode=0o700)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(IncompatibleStoreError, match="not empty"):
        SafeFileStore(path)
    assert sorted(p.name for p in path.iterdir()) == [
        "maintenance.lock",
        "notes.txt",
        "write.lock",
    ] or sorted(p.name for p in path.iterdir()) == ["notes.txt", "write.lock"]


def test_format_version_checked(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path, durable=False) as s:
        s["a"] = 1
    line = f"safeshm-store 99 {1:016x}"
    (path / "CURRENT").write_text(f"{line} {store_module._crc32(line.encode()):08x}\n")
    with pytest.raises(IncompatibleStoreError, match="format 99"):
        SafeFileStore(path)


def test_statistics_counts(tmp_path: Path) -> None:
    with SafeFileStore(tmp_path / "s", durable=False) as s:
        for i in range(50):
            s["k"] = i
        before = s.statistics()
        s.compact()
        after = s.statistics()
    assert after.generation == before.generation + 1
    assert after.log_bytes == after.live_bytes < before.log_bytes
    assert after.compactions == 1
    assert json.loads(json.dumps(after.__dict__))["keys"] == 1


def test_lost_current_is_reported_not_reinitialised(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path, durable=False) as s:
        s["a"] = 1
    os.unlink(path / "CURRENT")
    with pytest.raises(safeshm.StoreCorruptedError, match="no CURRENT"):
        SafeFileStore(path)
    assert (path / store_module.log_name(1)).stat().st_size > 0  # the data is untouched


def test_debris_of_a_killed_initialisation_is_cleared(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path, durable=False):
        pass
    os.unlink(path / "CURRENT")  # as if killed after the log, before CURRENT
    (path / "data.0000000000000002.log.tmp").write_bytes(b"junk")
    with SafeFileStore(path, durable=False) as s:
        s["a"] = 1
        assert s.to_dict() == {"a": 1}
    assert not (path / "data.0000000000000002.log.tmp").exists()


def test_a_missing_store_is_a_safeshm_error(tmp_path: Path) -> None:
    """``except SafeShmError`` catches it; ``except FileNotFoundError`` still does too."""
    for call in (
        lambda: SafeFileStore(tmp_path / "none", create=False),
        lambda: SafeFileStore.recover(tmp_path / "none", tmp_path / "dest"),
    ):
        with pytest.raises(safeshm.StoreNotFoundError) as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
        assert isinstance(info.value, safeshm.SafeShmError)
