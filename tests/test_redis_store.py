"""RedisStore against real redis-servers, and the store contract over both backends.

The contract tests run over ``SafeFileStore`` (a directory in ``tmp_path``) and
``RedisStore`` (a fresh name on the session's server) through one fixture, so the two
cannot drift; the differences (durability checks, conflicts, unknown outcomes, what a
foreign writer can do to a Redis hash) are tested on Redis alone, as differences.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from safeshm import (
    BackendUnavailableError,
    HandleClosedError,
    IncompatibleKeyError,
    IncompatibleStoreError,
    OutcomeUnknownError,
    SafeFileStore,
    SafeShmError,
    StoreCorruptedError,
)
from safeshm._protocols import SharedStore
from tests._helpers import run_all
from tests._redis_proxy import reply_dropping_proxy
from tests._redis_server import RedisServer, started

redis = pytest.importorskip("redis")

from safeshm import DurabilityError, SerializerMismatchError, TransactionConflictError  # noqa: E402
from safeshm.redis import RedisStore  # noqa: E402
from safeshm.redis._core import Connection  # noqa: E402 - after the skip

JOIN = 60.0


class Backend:
    """Opens handles on one store of one backend; closes (and removes) them at the end."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind = kind
        self.where = where
        self.handles: list[Any] = []

    def open(self, **options: Any) -> Any:
        if self.kind == "file":
            store: Any = SafeFileStore(self.where, **options)
        else:
            store = RedisStore.open(self.where, **options)
        self.handles.append(store)
        return store

    def close(self) -> None:
        for h in self.handles:
            h.close()
        if self.kind == "redis":
            conn = Connection("RedisStore", self.where)
            conn.delete_all()
            conn.close()


@pytest.fixture(params=["file", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "file":
        b = Backend("file", str(tmp_path / "store"))
    else:
        url = request.getfixturevalue("redis_url")("store")
        b = Backend("redis", url)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def rstore(redis_url: Callable[[str], str]) -> Iterator[RedisStore[Any]]:
    store = RedisStore.open(redis_url("rs"))
    try:
        yield store
    finally:
        store.unlink()
        store.close()


def raw(store: RedisStore[Any]) -> Any:
    """A plain redis-py client on the store's server, and the hash's key."""
    return store._conn.client, store._data


# --- the contract, over both backends -------------------------------------------------------
def test_satisfies_the_protocol(backend: Backend) -> None:
    assert isinstance(backend.open(), SharedStore)


def test_mapping_behaviour(backend: Backend) -> None:
    s = backend.open()
    assert len(s) == 0 and list(s) == [] and s.to_dict() == {}
    s["a"] = {"x": [1, 2]}
    s["b"] = 2
    s["b"] = 3
    assert s["a"] == {"x": [1, 2]} and s["b"] == 3
    assert "a" in s and "zz" not in s and 1 not in s and "" not in s
    assert len(s) == 2 and sorted(s) == ["a", "b"] and sorted(s.keys()) == ["a", "b"]
    assert sorted(s.items()) == [("a", {"x": [1, 2]}), ("b", 3)]
    assert sorted(map(str, s.values())) == ["3", "{'x': [1, 2]}"]
    assert s.to_dict() == {"a": {"x": [1, 2]}, "b": 3} == dict(s)
    assert s.get("zz") is None and s.get("zz", 7) == 7 and s.get("b", 7) == 3
    with pytest.raises(KeyError):
        s["zz"]
    del s["a"]
    with pytest.raises(KeyError):
        del s["a"]
    assert s.to_dict() == {"b": 3}
    # Another handle sees it all.
    assert backend.open().to_dict() == {"b": 3}


def test_compound_operations(backend: Backend) -> None:
    s = backend.open()
    s.update({"a": 1, "b": 2}, c=3)
    s.update([("d", 4)])
    assert s.to_dict() == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert s.pop("a") == 1 and s.pop("a", None) is None
    with pytest.raises(KeyError):
        s.pop("a")
    assert s.setdefault("e", [5]) == [5] and s.setdefault("e", [6]) == [5]
    key, value = s.popitem()
    assert key in {"b", "c", "d", "e"} and key not in s and value in (2, 3, 4, [5])
    s.clear()
    assert len(s) == 0
    with pytest.raises(KeyError):
        s.popitem()
    s.clear()  # idempotent


def test_update_is_all_or_nothing(backend: Backend) -> None:
    s = backend.open()
    s["a"] = 1
    with pytest.raises(TypeError):
        s.update({"a": 2, "b": object()})
    with pytest.raises(ValueError, match="non-empty"):
        s.update({"a": 2, "": 3})
    assert s.to_dict() == {"a": 1}


def test_json_serializer(backend: Backend) -> None:
    s = backend.open()
    s["t"] = (1, "é", None, True, 2.5)
    s["d"] = {"1": {"nested": []}}
    assert s["t"] == [1, "é", None, True, 2.5]  # JSON: a tuple comes back a list
    assert s["d"] == {"1": {"nested": []}}
    with pytest.raises(ValueError, match="JSON"):
        s["nan"] = math.nan  # not JSON
    with pytest.raises(TypeError):
        s["o"] = object()
    assert sorted(s) == ["d", "t"]


def test_bytes_serializer(backend: Backend) -> None:
    s = backend.open(serializer="bytes")
    s["a"] = b"\x00\xff"
    s["b"] = bytearray(b"ba")
    s["c"] = memoryview(b"mv")
    assert (s["a"], s["b"], s["c"]) == (b"\x00\xff", b"ba", b"mv")
    with pytest.raises(TypeError):
        s["d"] = "text"
    assert len(s) == 3


def test_pickle_serializer(backend: Backend) -> None:
    s = backend.open(serializer="pickle")
    s["a"] = {1, 2, (3, "x")}
    s["b"] = Path("/tmp")
    assert s["a"] == {1, 2, (3, "x")} and s["b"] == Path("/tmp")


class Upper:
    """A custom serializer: str values stored upper-cased."""

    name = "upper"

    def dumps(self, value: str, /) -> bytes:
        return value.upper().encode()

    def loads(self, data: bytes, /) -> str:
        return data.decode()


def test_custom_serializer(backend: Backend) -> None:
    s = backend.open(serializer=Upper())
    s["a"] = "hi"
    assert s["a"] == "HI"


def test_another_serializer_is_refused_at_open(backend: Backend) -> None:
    s = backend.open()
    s["a"] = 1
    with pytest.raises(IncompatibleStoreError, match="serializer"):
        backend.open(serializer="pickle")
    assert s.to_dict() == {"a": 1}


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (1, TypeError),
        (b"k", TypeError),
        (None, TypeError),
        ("", ValueError),
        ("\ud800", ValueError),
    ],
)
def test_bad_keys(backend: Backend, key: Any, error: type[Exception]) -> None:
    s = backend.open()
    s["a"] = 1
    ops: list[Callable[[], object]] = [
        lambda: s.__setitem__(key, 1),
        lambda: s.__delitem__(key),
        lambda: s.modify(key, lambda v: v, 0),
        lambda: s.pop(key) if error is TypeError else s.__delitem__(key),
        lambda: s.setdefault(key, 1),
        lambda: s.update({key: 1}),
    ]
    for op in ops:
        with pytest.raises(error):
            op()
    with pytest.raises(error), s.transaction() as tx:
        tx[key] = 1
    # Looking up: a non-str is a TypeError; a str that no key can be is just missing.
    if error is TypeError:
        for op in (lambda: s[key], lambda: s.pop(key, None), lambda: s.get(key)):
            with pytest.raises(TypeError):
                op()
        assert key not in s
    else:
        with pytest.raises(KeyError):
            s[key]
        with pytest.raises(KeyError):
            s.pop(key)
        assert key not in s and s.get(key) is None and s.pop(key, 5) == 5
        with s.transaction() as tx:
            assert key not in tx and tx.get(key) is None
    assert s.to_dict() == {"a": 1}


def test_modify(backend: Backend) -> None:
    s = backend.open()
    assert s.modify("n", lambda n: n + 1, default=0) == 1
    assert s.modify("n", lambda n: n + 1, default=100) == 2
    assert s.modify("l", lambda v: [*v, 1], []) == [1]
    with pytest.raises(KeyError):
        s.modify("missing", lambda n: n + 1)
    with pytest.raises(ZeroDivisionError):
        s.modify("n", lambda n: n / 0)
    with pytest.raises(TypeError):
        s.modify("n", lambda n: object())
    assert s.to_dict() == {"n": 2, "l": [1]}


def test_modify_with_a_default_that_fn_changes_in_place(backend: Backend) -> None:
    s = backend.open()
    default: list[int] = []

    def append(v: list[int]) -> list[int]:
        v.append(1)
        return v

    assert s.modify("l", append, default) == [1]
    assert s.modify("l", append, default) == [1, 1]


def test_transaction_commits_together(backend: Backend) -> None:
    s = backend.open()
    s.update({"a": 10, "b": 0, "gone": 1})
    with s.transaction() as tx:
        tx["b"] = tx["b"] + 5
        tx["a"] = tx["a"] - 5
        del tx["gone"]
        tx["new"] = "x"
        assert tx["b"] == 5 and "gone" not in tx and "new" in tx
        assert sorted(tx) == ["a", "b", "new"] and len(tx) == 3
        with pytest.raises(KeyError):
            del tx["gone"]
        # Nothing is visible outside before the block ends.
        assert backend.open().to_dict() == {"a": 10, "b": 0, "gone": 1}
    assert s.to_dict() == {"a": 5, "b": 5, "new": "x"}


def test_transaction_is_all_or_nothing_when_the_body_raises(backend: Backend) -> None:
    s = backend.open()
    s.update({"a": 1, "b": 2})

    def fails() -> None:
        with s.transaction() as tx:
            tx["a"] = 100
            del tx["b"]
            tx["c"] = 3
            raise RuntimeError("boom")

    def unencodable() -> None:
        with s.transaction() as tx:
            tx["a"] = 100
            tx["c"] = object()  # raises in the block

    with pytest.raises(RuntimeError, match="boom"):
        fails()
    with pytest.raises(TypeError):
        unencodable()
    assert s.to_dict() == {"a": 1, "b": 2}


def test_transaction_outside_its_block(backend: Backend) -> None:
    s = backend.open()
    tx = s.transaction()
    with tx:
        tx["a"] = 1
    with pytest.raises(HandleClosedError):
        tx["a"]
    with pytest.raises(HandleClosedError):
        tx["b"] = 2
    with pytest.raises(RuntimeError), tx:
        pass
    assert s.to_dict() == {"a": 1}


def test_use_after_close(backend: Backend) -> None:
    s = backend.open()
    s["a"] = 1
    s.close()
    s.close()  # idempotent
    assert s.closed
    for op in (lambda: s["a"], lambda: s.__setitem__("a", 2), lambda: len(s)):
        with pytest.raises(HandleClosedError):
            op()
    with pytest.raises(HandleClosedError), s.transaction():
        pass
    assert "closed" in repr(s).lower()
    assert backend.open()["a"] == 1


def test_pickles_as_a_reference(backend: Backend) -> None:
    s = backend.open(serializer="bytes")
    s["a"] = b"1"
    other = pickle.loads(pickle.dumps(s))
    backend.handles.append(other)
    assert other["a"] == b"1" and other.serializer.name == "bytes"
    other["b"] = b"2"
    assert s["b"] == b"2"


def _modify_worker(blob: bytes, barrier: Any, rounds: int) -> None:
    store = pickle.loads(blob)  # reopened by reference
    try:
        barrier.wait(timeout=JOIN)
        for _ in range(rounds):
            store.modify("n", lambda n: n + 1, default=0)
            store.modify("log", lambda v: [*v, os.getpid()], default=[])
    finally:
        store.close()


def test_multi_process_modify_is_exact(backend: Backend) -> None:
    s = backend.open(durable=False) if backend.kind == "file" else backend.open()
    procs, rounds = 3, 30
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs)
    blob = pickle.dumps(s)
    run_all("fork", _modify_worker, [(blob, barrier, rounds)] * procs)
    assert s["n"] == procs * rounds
    log = s["log"]
    assert len(log) == procs * rounds and len(set(log)) == procs


def test_guarantees_differ_as_documented(backend: Backend) -> None:
    g = backend.open().guarantees
    n = backend.open(durable=False).guarantees
    if backend.kind == "file":
        assert (g.backend, g.survives, n.survives, g.outcome_unknown) == (
            "shm",
            "reboot",
            "host",
            False,
        )
    else:
        assert (g.backend, g.scope, g.survives, n.survives, g.outcome_unknown) == (
            "redis",
            "network",
            "server-crash",
            "server-memory",
            True,
        )


# --- Redis only: durability -----------------------------------------------------------------
def _kind_key_exists(url: str) -> bool:
    conn = Connection("RedisStore", url)
    try:
        return bool(conn.call(lambda c: c.exists(conn.kind_key), idempotent=True))
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("extra", "found"),
    [
        (("--appendfsync", "everysec"), "appendfsync='everysec'"),
        (("--appendonly", "no"), "appendonly='no'"),
        (("--rename-command", "CONFIG", ""), "CONFIG GET is not available"),
    ],
)
def test_durable_is_refused_where_the_server_does_not_fsync(
    extra: tuple[str, ...], found: str
) -> None:
    # RedisServer passes --appendfsync always first; a later option overrides it.
    with started(extra=extra) as server:
        url = f"{server.url}#d"
        with pytest.raises(DurabilityError) as err:
            RedisStore.open(url)
        assert found in str(err.value) and "durable=False" in str(err.value)
        assert isinstance(err.value, SafeShmError)
        assert not _kind_key_exists(url)  # a refused open leaves nothing behind
        with RedisStore.open(url, durable=False) as store:
            store["a"] = 1
            assert store["a"] == 1 and not store.durable


def test_durable_is_accepted_with_appendfsync_always(redis_url: Callable[[str], str]) -> None:
    with RedisStore.open(redis_url("d")) as store:
        assert store.durable and store._mode == "always"
        store["a"] = 1
        store.unlink()


def test_acknowledged_writes_survive_kill_9(fresh_redis: RedisServer) -> None:
    url = f"{fresh_redis.url}#k9"
    store = RedisStore.open(url)
    for i in range(50):
        store[f"k{i}"] = i
    store.modify("n", lambda n: n + 1, default=0)
    with store.transaction() as tx:
        tx["t1"] = 1
        tx["t2"] = 2
    fresh_redis.kill()
    with pytest.raises(BackendUnavailableError):
        store["x"] = 1
    fresh_redis.start()
    # The same handle reconnects.
    assert store.to_dict() == {**{f"k{i}": i for i in range(50)}, "n": 1, "t1": 1, "t2": 2}
    assert store.modify("n", lambda n: n + 1) == 2  # the scripts are loaded again
    store.close()


def test_in_flight_calls_raise_typed_errors_and_the_handle_recovers(
    fresh_redis: RedisServer,
) -> None:
    store = RedisStore.open(f"{fresh_redis.url}#inflight")
    store["n"] = 1
    store.modify("n", lambda n: n + 1)  # its script is loaded
    errors: list[BaseException | None] = []

    def pause_then(n: int) -> int:
        fresh_redis.pause()  # the commit that follows waits on a stopped server
        return n + 1

    def modify() -> None:
        try:
            store.modify("n", pause_then)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    t = threading.Thread(target=modify)
    t.start()
    time.sleep(0.3)
    fresh_redis.kill()  # SIGKILL works on a stopped process
    t.join(timeout=JOIN)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], OutcomeUnknownError), errors
    fresh_redis.start()
    assert store["n"] in (2, 3)  # its outcome is unknown: applied once or not at all
    store["n"] = 10
    assert store.modify("n", lambda n: n + 1) == 11
    # An idempotent write in flight: a typed error too (retried once, then refused).
    fresh_redis.pause()
    setter = threading.Thread(target=lambda: errors.append(_catch(store.__setitem__, "m", 1)))
    setter.start()
    time.sleep(0.3)
    fresh_redis.kill()
    setter.join(timeout=JOIN)
    assert isinstance(errors[-1], BackendUnavailableError | OutcomeUnknownError), errors
    fresh_redis.start()
    assert store.get("m") in (None, 1)
    store.close()


def _catch(fn: Callable[..., Any], *args: Any) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - returned for the assertion
        return exc
    return None


def test_a_dropped_reply_is_never_applied_twice(redis_server: RedisServer) -> None:
    with reply_dropping_proxy(redis_server.port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0#dropped-{os.getpid()}"
        store = RedisStore.open(url)
        store["n"] = 0
        store.modify("n", lambda n: n + 1)  # the CAS script is loaded: next is EVALSHA

        def drop(n: int) -> int:
            proxy.drop_next_reply()  # the commit's reply
            return n + 1

        with pytest.raises(OutcomeUnknownError):
            store.modify("n", drop)
        assert store["n"] == 2  # applied once, not retried
        store.update(a=0, b=0)
        with store.transaction() as tx:  # the commit script is loaded
            tx["a"] = 1

        def both() -> None:
            with store.transaction() as tx:
                tx["a"] = tx["a"] + 1
                tx["b"] = tx["b"] + 1
                proxy.drop_next_reply()  # the commit's reply

        with pytest.raises(OutcomeUnknownError):
            both()
        assert (store["a"], store["b"]) == (2, 1)  # whole
        # An absolute write is retried once, transparently.
        proxy.drop_next_reply()
        store["c"] = 5
        assert store["c"] == 5 and proxy.dropped == 3
        # A retried delete that finds the key gone does not raise KeyError.
        proxy.drop_next_reply()
        del store["c"]
        assert "c" not in store
        store.unlink()
        store.close()


# --- Redis only: what others can do to the keys ---------------------------------------------
def test_a_key_of_another_type_is_refused(rstore: RedisStore[Any]) -> None:
    rstore["a"] = 1
    client, data = raw(rstore)
    client.delete(data)
    client.set(data, "not a hash")
    for op in (
        lambda: rstore["a"],
        lambda: rstore.__setitem__("a", 2),
        lambda: len(rstore),
        lambda: list(rstore),
        lambda: rstore.to_dict(),
        lambda: rstore.modify("a", lambda v: v, 0),
        lambda: rstore.pop("a"),
        lambda: rstore.update(a=1),
    ):
        with pytest.raises(IncompatibleKeyError):
            op()
    with pytest.raises(IncompatibleKeyError), rstore.transaction() as tx:
        tx["a"] = tx.get("a", 0)
    assert client.get(data) == b"not a hash"  # nothing changed


def test_a_name_of_another_kind_is_refused(redis_server: RedisServer) -> None:
    url = f"{redis_server.url}#kind-{os.getpid()}"
    conn = Connection("RedisCounter", url)
    conn.claim_kind("counter")
    with pytest.raises(IncompatibleKeyError) as err:
        RedisStore.open(url)
    assert not isinstance(err.value, SerializerMismatchError)
    conn.call(lambda c: c.delete(conn.kind_key), idempotent=True)
    conn.call(lambda c: c.set(conn.kind_key, "x"), idempotent=True)
    with pytest.raises(IncompatibleKeyError, match="holds a Redis string"):
        RedisStore.open(url)
    conn.delete_all()
    conn.close()


def test_a_serializer_mismatch_is_both_errors(rstore: RedisStore[Any]) -> None:
    with pytest.raises(SerializerMismatchError) as err:
        RedisStore.open(rstore.url, serializer="bytes")
    assert isinstance(err.value, IncompatibleStoreError | IncompatibleKeyError)
    assert "'json'" in str(err.value) and "'bytes'" in str(err.value)


def test_undecodable_values_are_reported_never_returned(rstore: RedisStore[Any]) -> None:
    rstore["ok"] = 1
    client, data = raw(rstore)
    client.hset(data, "bad", b"\x80\x03 not json")
    with pytest.raises(StoreCorruptedError, match="'bad'"):
        rstore["bad"]
    with pytest.raises(StoreCorruptedError):
        rstore.to_dict()
    with pytest.raises(StoreCorruptedError):
        rstore.modify("bad", lambda v: v)
    with pytest.raises(StoreCorruptedError), rstore.transaction() as tx:
        tx["bad"]
    assert client.hget(data, "bad") == b"\x80\x03 not json"  # nothing changed
    # pop() takes it off in one script, then puts back what does not decode.
    with pytest.raises(StoreCorruptedError):
        rstore.pop("bad")
    assert client.hget(data, "bad") == b"\x80\x03 not json"
    del rstore["ok"]
    with pytest.raises(StoreCorruptedError):
        rstore.popitem()
    assert client.hgetall(data) == {b"bad": b"\x80\x03 not json"}
    rstore["ok"] = 1
    client.hdel(data, "bad")
    client.hset(data, b"\xff", b"1")  # a field that is not UTF-8
    with pytest.raises(StoreCorruptedError):
        list(rstore)
    with pytest.raises(StoreCorruptedError):
        rstore.to_dict()
    del rstore["ok"]
    with pytest.raises(StoreCorruptedError):
        rstore.popitem()
    assert client.hgetall(data) == {b"\xff": b"1"}


def test_bad_input_sends_nothing(fresh_redis: RedisServer) -> None:
    store = RedisStore.open(f"{fresh_redis.url}#bad")
    fresh_redis.kill()  # anything sent now would fail with BackendUnavailableError
    with pytest.raises(TypeError):
        store[1] = 1  # type: ignore[index]
    with pytest.raises(ValueError, match="non-empty"):
        store[""] = 1
    with pytest.raises(TypeError):
        store["a"] = object()
    with pytest.raises(ValueError, match="JSON"):
        store["a"] = math.inf
    with pytest.raises(TypeError):
        store.update({"a": 1, "b": object()})
    with pytest.raises(TypeError):
        store.setdefault("a", object())
    with pytest.raises(TypeError):
        RedisStore.open(f"{fresh_redis.url}#bad", durable="yes")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="serializer"):
        RedisStore.open(f"{fresh_redis.url}#bad", serializer="yaml")  # type: ignore[call-overload]
    store.close()


# --- Redis only: optimistic concurrency (a difference from SafeFileStore) -------------------
def test_modify_runs_fn_again_after_a_conflict(rstore: RedisStore[Any]) -> None:
    other = RedisStore.open(rstore.url)
    rstore["n"] = 0
    calls: list[int] = []

    def add(n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            other["n"] = 100  # another writer commits between our read and our write
        return n + 1

    assert rstore.modify("n", add) == 101
    assert calls == [0, 100] and rstore["n"] == 101
    other.close()


def test_modify_detects_conflicts_on_large_values(rstore: RedisStore[Any]) -> None:
    other = RedisStore.open(rstore.url)
    rstore["big"] = "a" * 1000  # compared by SHA-1, not sent back
    calls = 0

    def grow(v: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            other["big"] = "b" * 1000
        return v + "!"

    assert rstore.modify("big", grow) == "b" * 1000 + "!"
    assert calls == 2
    other.close()


def in_transaction(store: RedisStore[Any], body: Callable[[Any], Any]) -> None:
    with store.transaction() as tx:
        body(tx)


def test_a_transaction_conflict_writes_nothing(rstore: RedisStore[Any]) -> None:
    other = RedisStore.open(rstore.url)
    rstore.update(a=1, b=1)

    def changed_what_it_read(tx: Any) -> None:
        tx["b"] = tx["a"] + 1
        tx["c"] = 1
        other["a"] = 50

    def created_what_it_found_missing(tx: Any) -> None:
        assert "new" not in tx
        tx["x"] = 1
        other["new"] = 1

    def changed_the_key_set_it_listed(tx: Any) -> None:
        tx["count"] = len(tx)
        other["another"] = 1

    for body in (
        changed_what_it_read,
        created_what_it_found_missing,
        changed_the_key_set_it_listed,
    ):
        with pytest.raises(TransactionConflictError):
            in_transaction(rstore, body)
    assert rstore.to_dict() == {"a": 50, "b": 1, "new": 1, "another": 1}

    def unrelated_writes(tx: Any) -> None:
        tx["z"] = tx["b"]
        other["unrelated"] = 1

    in_transaction(rstore, unrelated_writes)  # blind writes and other keys: no conflict
    assert rstore["z"] == 1
    other.close()


def test_reads_inside_a_transaction_are_consistent(rstore: RedisStore[Any]) -> None:
    """A read that would show a state other than the one earlier reads saw raises at once
    (the block never computes on a mix of two states)."""
    other = RedisStore.open(rstore.url)
    rstore.update(a=50, b=50)  # an invariant: a + b == 100
    seen: list[int] = []

    def mixed(tx: Any) -> None:
        a = tx["a"]
        other.update(a=0, b=100)
        seen.append(a + tx["b"])  # raises at tx["b"], before computing 150

    def goes_on(tx: Any) -> None:
        tx["a"]
        other["a"] = 1
        with pytest.raises(TransactionConflictError):
            tx["b"]
        tx["b"]  # the transaction has failed: nothing more

    def swallows(tx: Any) -> None:
        tx["a"]
        other["a"] = 2
        tx["x"] = 1
        with pytest.raises(TransactionConflictError):
            tx["b"]

    with pytest.raises(TransactionConflictError):
        in_transaction(rstore, mixed)
    assert seen == []
    with pytest.raises(HandleClosedError):
        in_transaction(rstore, goes_on)
    # A block that catches the conflict and ends normally is told at its end.
    with pytest.raises(TransactionConflictError):
        in_transaction(rstore, swallows)
    assert "x" not in rstore
    other.close()


def test_the_retry_loop_of_the_docstring_converges(rstore: RedisStore[Any]) -> None:
    other = RedisStore.open(rstore.url)
    rstore.update(a=10, b=0)
    tries = 0
    while True:
        try:
            with rstore.transaction() as tx:
                tries += 1
                tx["b"] = tx["b"] + tx.pop("a")
                if tries == 1:
                    other["a"] = 20
            break
        except TransactionConflictError:
            continue
    assert tries == 2 and rstore.to_dict() == {"b": 20}
    other.close()


def test_repr_redacts_the_password(redis_url: Callable[[str], str]) -> None:
    url = redis_url("r")
    store = RedisStore.open(url, durable=False)
    assert repr(store).startswith("safeshm.redis.RedisStore(") and "durable=False" in repr(store)
    store.close()
    assert "closed=True" in repr(store)
    with_password = url.replace("redis://", "redis://:secret@")
    from safeshm.redis._core import _redact

    assert "secret" not in _redact(with_password)
