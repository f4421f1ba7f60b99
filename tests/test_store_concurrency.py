"""SafeFileStore across processes and threads: a state machine with a handle in another
process, serializable histories, exact read-modify-writes, transactions that keep a total,
compaction under load, fork."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from safeshm import SafeFileStore

from ._helpers import JOIN_TIMEOUT, processes, run_all
from ._store_helpers import (
    StoreServer,
    acked_reader,
    acked_writer,
    history_writer,
    is_whole,
    modify_worker,
    torn_reader,
    total_reader,
    transfer_worker,
)

KEYS = st.sampled_from(["a", "b", "c", "dé", "e/f"])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _drain(out: Any, expected: int) -> list[tuple[Any, ...]]:
    results = [out.get(timeout=JOIN_TIMEOUT) for _ in range(expected)]
    errors = [r[1] for r in results if r[0] == "error"]
    assert not errors, errors[0]
    return results


# --- a state machine against a dict, with a second handle in another process -----------------
@pytest.fixture(scope="module")
def server() -> Any:
    s = StoreServer()
    try:
        yield s
    finally:
        s.stop()


def test_state_machine_with_a_remote_handle(
    tmp_path_factory: pytest.TempPathFactory, server: StoreServer
) -> None:
    counter = iter(range(10**6))

    class StoreMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.path = str(tmp_path_factory.mktemp("sm") / f"s{next(counter)}")
            self.local = SafeFileStore(self.path, durable=False)
            self.local._compact_min = 2048  # compaction happens during runs, not only on demand
            server.call("open", self.path, {"durable": False})
            self.model: dict[str, Any] = {}

        def teardown(self) -> None:
            if hasattr(self, "local"):
                self.local.close()
                server.call("close")

        def _via(self, remote: bool, op: str, *args: Any) -> Any:
            if remote:
                return server.call(op, *args)
            return getattr(self.local, op)(*args)

        @rule(key=KEYS, value=VALUES, remote=st.booleans())
        def set(self, key: str, value: Any, remote: bool) -> None:
            self._via(remote, "__setitem__", key, value)
            self.model[key] = value

        @rule(key=KEYS, remote=st.booleans())
        def delete(self, key: str, remote: bool) -> None:
            if key in self.model:
                self._via(remote, "__delitem__", key)
                del self.model[key]
            else:
                with pytest.raises(KeyError):
                    self._via(remote, "__delitem__", key)

        @rule(key=KEYS, remote=st.booleans())
        def pop(self, key: str, remote: bool) -> None:
            assert self._via(remote, "pop", key, "absent") == self.model.pop(key, "absent")

        @rule(key=KEYS, remote=st.booleans())
        def count(self, key: str, remote: bool) -> None:
            if not isinstance(self.model.get(key, 0), int) or isinstance(self.model.get(key), bool):
                return
            new = self.model.get(key, 0) + 1
            if remote:
                assert server.call("incr", key) == new
            else:
                assert self.local.modify(key, lambda n: n + 1, default=0) == new
            self.model[key] = new

        @rule(
            ops=st.lists(st.tuples(st.sampled_from(["set", "del"]), KEYS, VALUES), max_size=4),
            remote=st.booleans(),
        )
        def transaction(self, ops: list[tuple[str, str, Any]], remote: bool) -> None:
            if remote:
                server.call("txn", ops)
            else:
                with self.local.transaction() as tx:
                    for op, key, value in ops:
                        if op == "set":
                            tx[key] = value
                        elif key in tx:
                            del tx[key]
            for op, key, value in ops:
                if op == "set":
                    self.model[key] = value
                else:
                    self.model.pop(key, None)

        @rule(remote=st.booleans())
        def compact(self, remote: bool) -> None:
            self._via(remote, "compact")

        @precondition(lambda self: hasattr(self, "local"))
        @rule()
        def reopen(self) -> None:
            self.local.close()
            self.local = SafeFileStore(self.path, durable=False)

        @invariant()
        def agrees(self) -> None:
            if hasattr(self, "local"):
                assert self.local.to_dict() == self.model
                assert len(self.local) == len(self.model)

        @invariant()
        def remote_agrees(self) -> None:
            if hasattr(self, "local"):
                assert server.call("to_dict") == self.model

    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# --- multi-process histories -----------------------------------------------------------------
OPS = st.lists(
    st.tuples(
        st.sampled_from(["set", "set", "set", "del"]), st.sampled_from([f"k{i}" for i in range(6)])
    ),
    min_size=1,
    max_size=60,
)


@pytest.mark.slow
@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(histories=st.lists(OPS, min_size=2, max_size=3))
def test_concurrent_writers_are_serializable(
    tmp_path: Path, histories: list[list[tuple[str, str]]]
) -> None:
    path = str(tmp_path / f"h{os.getpid()}-{id(histories)}")
    SafeFileStore(path, durable=False).close()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(histories))
    out = ctx.Queue()
    stop = ctx.Event()
    with (
        processes("spawn", torn_reader, [(path, stop, out)]),
        processes(
            "spawn",
            history_writer,
            [(path, w, ops, barrier, out) for w, ops in enumerate(histories)],
        ),
    ):
        results = _drain(out, len(histories))
        stop.set()
        reader = _drain(out, 1)[0]
    assert reader[2] == [], f"a reader saw torn values: {reader[2]}"
    last = {r[1]: r[2] for r in results}
    with SafeFileStore(path, durable=False) as store:
        final = store.to_dict()
    for key in {k for ops in histories for _op, k in ops}:
        # Serializable: the final state of each key is the last operation on it of some
        # writer -- what some serial order of the writers' operations would leave.
        candidates = [last[w][key] for w in last if key in last[w]]
        if key in final:
            value = final[key]
            assert is_whole(value)
            assert ("set", value["s"]) == last[value["w"]].get(key), (key, value, candidates)
        else:
            assert ("del",) in [(op,) for op, _seq in candidates], (key, candidates)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "durable"), [("fork", False), ("spawn", False), ("fork", True)])
def test_modify_is_exact_across_processes(tmp_path: Path, method: str, durable: bool) -> None:
    path = str(tmp_path / "m")
    ctx = multiprocessing.get_context(method)
    procs, n = 4, 150
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    with processes(method, modify_worker, [(path, n, barrier, out, durable)] * procs):
        _drain(out, procs)
    with SafeFileStore(path, durable=False) as store:
        assert store["count"] == procs * n
        own = {k: v for k, v in store.items() if k.startswith("own-")}
        assert len(own) == procs and set(own.values()) == {n}


@pytest.mark.slow
def test_transactions_keep_the_total(tmp_path: Path) -> None:
    path = str(tmp_path / "bank")
    accounts = 6
    with SafeFileStore(path, durable=False) as store:
        store.update({f"acct{i}": 100 for i in range(accounts)})
    ctx = multiprocessing.get_context("spawn")
    # One durable writer (its commits sync outside the lock, interleaved with the others')
    # and two that are not: their records become visible as soon as they are written, so
    # a commit split into several records would show the reader its halves.
    workers, n = 3, 80
    barrier = ctx.Barrier(workers + 1)  # the writers and the reader start together
    out = ctx.Queue()
    stop = ctx.Event()
    with (
        processes("spawn", total_reader, [(path, accounts, barrier, stop, out)]),
        processes(
            "spawn",
            transfer_worker,
            [(path, accounts, n, seed, barrier, out, seed == 0) for seed in range(workers)],
        ),
    ):
        _drain(out, workers)
        stop.set()
        reader = _drain(out, 1)[0]
    assert reader[1] > 0 and reader[2] == [], f"inconsistent totals seen: {reader[2]}"
    with SafeFileStore(path, durable=False) as store:
        assert sum(store[f"acct{i}"] for i in range(accounts)) == accounts * 100
        assert store["transfers"] == workers * n


@pytest.mark.slow
def test_a_returned_durable_write_is_seen_by_every_later_read(tmp_path: Path) -> None:
    """Linearizable: once a durable set returned (its fdatasync done outside the write
    lock), a read that starts afterwards in another process sees it or a later value."""
    path = str(tmp_path / "l")
    SafeFileStore(path, durable=False).close()
    ctx = multiprocessing.get_context("fork")
    acked = ctx.RawValue("q", 0)
    barrier = ctx.Barrier(3)
    stop = ctx.Event()
    out = ctx.Queue()
    with processes("fork", acked_reader, [(path, acked, barrier, stop, out)] * 2):
        run_all("fork", acked_writer, [(path, 300, acked, barrier)])
        stop.set()
        readers = _drain(out, 2)
    for _kind, reads, stale in readers:
        assert reads > 0 and stale == [], f"a read missed an acknowledged write: {stale}"
    with SafeFileStore(path, durable=False) as store:
        assert store["seq"] == 300


def _compactor(path: str, barrier: Any, stop: Any, out: Any) -> None:
    try:
        with SafeFileStore(path, durable=False) as store:
            done = 0
            barrier.wait(timeout=JOIN_TIMEOUT)
            while not stop.is_set() or not done:
                store.compact()
                done += 1
        out.put(("compactions", done))
    except Exception:  # noqa: BLE001
        import traceback

        out.put(("error", traceback.format_exc()))


@pytest.mark.slow
def test_compaction_under_load_loses_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    accounts = 4
    with SafeFileStore(path, durable=False) as store:
        store.update({f"acct{i}": 100 for i in range(accounts)})
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)  # the two writers, the reader and the compactor start together
    out = ctx.Queue()
    stop = ctx.Event()
    with (
        processes("fork", _compactor, [(path, barrier, stop, out)]),
        processes("fork", total_reader, [(path, accounts, barrier, stop, out)]),
        processes("fork", modify_worker, [(path, 400, barrier, out)]),
        processes("fork", transfer_worker, [(path, accounts, 400, 7, barrier, out, True)]),
    ):  # durable: group commit
        _drain(out, 2)
        stop.set()
        results = _drain(out, 2)
    compactions = next(r for r in results if r[0] == "compactions")[1]
    reader = next(r for r in results if r[0] == "reader")
    assert compactions > 0
    assert reader[1] > 0 and reader[2] == []
    with SafeFileStore(path, durable=False) as store:
        assert store["count"] == 400
        assert sum(store[f"acct{i}"] for i in range(accounts)) == accounts * 100
        assert store.statistics().generation > 1


def test_automatic_compaction_bounds_the_log(tmp_path: Path) -> None:
    with (
        SafeFileStore(tmp_path / "a", durable=False) as store,
        SafeFileStore(tmp_path / "a", durable=False) as reader,
    ):
        store._compact_min = 16 * 1024
        for i in range(3000):
            store[f"k{i % 10}"] = "v" * 50 + str(i)
        stats = store.statistics()
        assert stats.compactions > 0
        assert stats.log_bytes <= 2 * stats.live_bytes + store._compact_min
        assert reader.to_dict() == store.to_dict()
        assert reader["k9"].endswith("2999")
        names = os.listdir(tmp_path / "a")
        assert len([n for n in names if n.startswith("data.")]) == 1


# --- fork --------------------------------------------------------------------------------------
def test_fork_child_uses_its_own_lock(tmp_path: Path) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():  # pragma: no cover
        pytest.skip("no fork")
    store = SafeFileStore(tmp_path / "f", durable=False)
    try:
        store["n"] = 0
        ctx = multiprocessing.get_context("fork")
        errors = ctx.Queue()

        def child() -> None:
            try:
                for _ in range(200):
                    store.modify("n", lambda n: n + 1)
            except Exception as e:  # noqa: BLE001
                errors.put(repr(e))

        # Hold the write lock in a thread while forking: the child must not inherit it.
        ready, release = threading.Event(), threading.Event()

        def holder() -> None:
            with store.transaction() as tx:
                ready.set()
                release.wait(timeout=JOIN_TIMEOUT)
                tx["held"] = True

        t = threading.Thread(target=holder)
        t.start()
        assert ready.wait(timeout=JOIN_TIMEOUT)
        proc = ctx.Process(target=child, daemon=True)
        proc.start()
        release.set()
        t.join(timeout=JOIN_TIMEOUT)
        for _ in range(200):
            store.modify("n", lambda n: n + 1)
        proc.join(timeout=JOIN_TIMEOUT)
        assert proc.exitcode == 0
        assert errors.empty()
        assert store["n"] == 400
        assert store["held"] is True
    finally:
        store.close()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_handle_passes_to_a_pool_as_a_reference(tmp_path: Path, method: str) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from ._store_helpers import pool_increment

    with SafeFileStore(tmp_path / "p", durable=False) as store:
        ctx = multiprocessing.get_context(method)
        with ProcessPoolExecutor(2, mp_context=ctx) as pool:
            results = list(pool.map(pool_increment, [store] * 20, timeout=JOIN_TIMEOUT))
        assert sorted(results) == list(range(1, 21))
        assert store["hits"] == 20


def test_idle_handle_follows_several_compactions(tmp_path: Path) -> None:
    path = tmp_path / "g"
    with SafeFileStore(path, durable=False) as idle, SafeFileStore(path, durable=False) as w:
        w["a"] = 1
        assert idle["a"] == 1
        for generation in (2, 3, 4):
            w["a"] = generation
            w.compact()  # each compaction unlinks the log before it
        assert w.statistics().generation == 4
        assert idle["a"] == 4  # its log's successor is gone: CURRENT leads on
        assert idle.statistics().generation == 4
        idle["b"] = 2  # and it writes where everyone reads
        with SafeFileStore(path, durable=False) as fresh:
            assert fresh.to_dict() == {"a": 4, "b": 2}
