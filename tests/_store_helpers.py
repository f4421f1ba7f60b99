"""Worker functions and fault injection for the SafeFileStore tests.

They live at module level so that spawn-started children can import them. Every wait has
a timeout.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import sys
import traceback
import zlib
from collections.abc import Sequence
from typing import Any

from safeshm import SafeFileStore

from ._helpers import JOIN_TIMEOUT, Remote


# --- values that show whether they are whole -------------------------------------------------
def tagged(writer: int, seq: int, size: int = 0) -> dict[str, Any]:
    """A JSON value that says who wrote it and carries a checksum of its own padding."""
    pad = f"{writer}:{seq}:" * (size // 8 + 1) if size else ""
    return {"w": writer, "s": seq, "pad": pad, "crc": zlib.crc32(pad.encode())}


def is_whole(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"w", "s", "pad", "crc"}
        and zlib.crc32(value["pad"].encode()) == value["crc"]
    )


# --- a process that holds a store handle ---------------------------------------------------
def serve(conn: multiprocessing.connection.Connection) -> None:
    """Answer ``(method, args)`` requests on one store handle until told to stop."""
    store: SafeFileStore[Any] | None = None
    while True:
        if not conn.poll(JOIN_TIMEOUT * 5):
            return
        request = conn.recv()
        if request is None:
            break
        op, args = request
        try:
            if op == "open":
                if store is not None:
                    store.close()
                path, kwargs = args
                store = SafeFileStore(path, **kwargs)
                result: Any = None
            elif op == "close":
                if store is not None:
                    store.close()
                store = None
                result = None
            elif op == "txn":
                assert store is not None
                result = apply_txn(store, args[0])
            elif op == "incr":
                assert store is not None
                result = store.modify(args[0], lambda n: n + 1, default=0)
            else:
                assert store is not None
                result = getattr(store, op)(*args)
            conn.send(("ok", result))
        except Exception as e:  # noqa: BLE001 - sent back to the test, which re-raises it
            conn.send(("err", e))
    if store is not None:
        store.close()


def apply_txn(store: SafeFileStore[Any], ops: Sequence[tuple[str, str, Any]]) -> None:
    """Run ``ops`` (``("set", k, v)`` / ``("del", k, None)``) as one transaction."""
    with store.transaction() as tx:
        for op, key, value in ops:
            if op == "set":
                tx[key] = value
            elif key in tx:
                del tx[key]


class StoreServer(Remote):
    """A spawned process holding a store handle (see :func:`serve`); calls are
    synchronous."""

    def __init__(self) -> None:
        super().__init__("spawn", serve)

    def call(self, op: str, *args: Any) -> Any:  # type: ignore[override]
        return self._request(op, args)


def _report_failure(out: Any) -> None:
    out.put(("error", traceback.format_exc()))


# --- multi-process workers -----------------------------------------------------------------
def history_writer(
    path: str, writer: int, ops: Sequence[tuple[str, str]], barrier: Any, out: Any
) -> None:
    """Apply ``ops`` (``("set", key)`` / ``("del", key)``) with tagged values; report the
    last operation this writer made on each key, for the serializability check."""
    try:
        with SafeFileStore(path, durable=False) as store:
            barrier.wait(timeout=JOIN_TIMEOUT)
            last: dict[str, tuple[str, int]] = {}
            for seq, (op, key) in enumerate(ops):
                if op == "set":
                    store[key] = tagged(writer, seq, 24)
                else:
                    store.pop(key, None)
                last[key] = (op, seq)
            out.put(("done", writer, last))
    except Exception:  # noqa: BLE001
        _report_failure(out)


def torn_reader(path: str, stop: Any, out: Any) -> None:
    """Read every value until ``stop`` is set; report any value that is not whole."""
    try:
        with SafeFileStore(path, durable=False) as store:
            reads = 0
            bad: list[Any] = []
            while not stop.is_set():
                for value in store.values():
                    reads += 1
                    if not is_whole(value):
                        bad.append(value)
            out.put(("reader", reads, bad[:5]))
    except Exception:  # noqa: BLE001
        _report_failure(out)


def modify_worker(path: str, n: int, barrier: Any, out: Any, durable: bool = False) -> None:
    try:
        with SafeFileStore(path, durable=durable) as store:
            barrier.wait(timeout=JOIN_TIMEOUT)
            for _ in range(n):
                store.modify("count", lambda c: c + 1, default=0)
                store.modify(f"own-{os.getpid()}", lambda c: c + 1, default=0)
        out.put(("done",))
    except Exception:  # noqa: BLE001
        _report_failure(out)


def transfer_worker(  # noqa: PLR0917
    path: str,
    accounts: int,
    n: int,
    seed: int,
    barrier: Any,
    out: Any,
    durable: bool = False,
) -> None:
    """Move random amounts between accounts in transactions; the total never changes."""
    rng = random.Random(seed)
    try:
        with SafeFileStore(path, durable=durable) as store:
            barrier.wait(timeout=JOIN_TIMEOUT)
            for _ in range(n):
                a, b = rng.sample(range(accounts), 2)
                amount = rng.randint(1, 10)
                with store.transaction() as tx:
                    tx[f"acct{a}"] = tx[f"acct{a}"] - amount
                    tx[f"acct{b}"] = tx[f"acct{b}"] + amount
                    tx["transfers"] = tx.get("transfers", 0) + 1
        out.put(("done",))
    except Exception:  # noqa: BLE001
        _report_failure(out)


def acked_writer(path: str, n: int, acked: Any, barrier: Any) -> None:
    """Durably set "seq" to 1..n, recording each value once the set has returned."""
    with SafeFileStore(path, durable=True) as store:
        barrier.wait(timeout=JOIN_TIMEOUT)
        for i in range(1, n + 1):
            store["seq"] = i
            acked.value = i


def acked_reader(path: str, acked: Any, barrier: Any, stop: Any, out: Any) -> None:
    """Until ``stop``: a value acknowledged before a read began is seen by the read."""
    try:
        with SafeFileStore(path, durable=False) as store:
            reads, stale = 0, []
            barrier.wait(timeout=JOIN_TIMEOUT)
            while True:
                done = stop.is_set()
                before = acked.value
                seen = store.get("seq", 0)
                reads += 1
                if seen < before:
                    stale.append((seen, before))
                if done:
                    break
            out.put(("reader", reads, stale[:5]))
    except Exception:  # noqa: BLE001
        _report_failure(out)


def total_reader(path: str, accounts: int, barrier: Any, stop: Any, out: Any) -> None:
    """Check the total of all accounts in every snapshot from when the writers start (the
    barrier) until ``stop`` is set."""
    try:
        with SafeFileStore(path, durable=False) as store:
            reads = 0
            wrong: list[int] = []
            barrier.wait(timeout=JOIN_TIMEOUT)
            while not stop.is_set() or not reads:
                snapshot = store.to_dict()
                total = sum(snapshot[f"acct{i}"] for i in range(accounts))
                reads += 1
                if total != accounts * 100:
                    wrong.append(total)
            out.put(("reader", reads, wrong[:5]))
    except Exception:  # noqa: BLE001
        _report_failure(out)


def big_value_writer(path: str, acked: Any, durable: bool) -> None:
    """Overwrite one key with ever larger, self-checking values and two keys in a
    transaction, recording each acknowledged sequence number, until killed."""
    with SafeFileStore(path, durable=durable) as store:
        seq = acked.value
        while True:
            seq += 1
            store["big"] = tagged(0, seq, 200_000 + (seq % 7) * 50_000)
            with store.transaction() as tx:
                tx["a"] = tagged(1, seq, 30_000)
                tx["b"] = tagged(2, seq, 30_000)
            acked.value = seq


def compacting_writer(path: str, acked: Any) -> None:
    """Write and compact in a loop, recording acknowledged sequence numbers, until killed."""
    with SafeFileStore(path, durable=False) as store:
        seq = acked.value
        while True:
            seq += 1
            for i in range(20):
                store[f"k{i}"] = tagged(i, seq, 2000)
            store.compact()
            acked.value = seq


# --- fault injection: kill the process at its k-th file-system call -----------------------
def store_modules() -> list[Any]:
    """The modules of the store that call ``os`` (a fault injector stands in for it in
    each of them)."""
    return [
        module
        for name, module in sorted(sys.modules.items())
        if (name == "safeshm._store" or name.startswith("safeshm._store."))
        and getattr(module, "os", None) is not None
    ]


def set_store_os(replacement: Any) -> None:
    for module in store_modules():
        module.os = replacement


TRACED = ("write", "fsync", "fdatasync", "replace", "unlink", "ftruncate")


class KillingOS:
    """Stands in for the ``os`` module inside ``safeshm._store``: passes every call
    through, and SIGKILLs the process at traced call number ``kill_at`` -- before it, or
    after it, or (for a write) half-way through it."""

    def __init__(self, kill_at: int, how: str) -> None:
        self.calls = 0
        self.kill_at = kill_at
        self.how = how

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in TRACED:
            return real

        def traced(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls != self.kill_at:
                return real(*args, **kwargs)
            if self.how == "half" and name == "write" and len(args[1]) > 1:
                os.write(args[0], bytes(args[1][: len(args[1]) // 2]))
            elif self.how == "after":
                with contextlib.suppress(OSError):  # e.g. unlinking a file that is not there
                    real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            raise AssertionError("unreachable")  # pragma: no cover

        return traced


def group_commit(store: SafeFileStore[Any]) -> None:
    """Make the store's durable writers sync outside the write lock (group commit), as
    they do after a writer found the lock taken; a lone writer syncs holding it."""
    writer = store._writer
    assert writer is not None
    writer.contended.value = 1 << 30


def scripted_child(  # noqa: PLR0917
    path: str,
    script: list[tuple[str, Any]],
    kill_at: int,
    how: str,
    group: bool,
    conn: Any,
) -> None:
    """Open ``path`` and run ``script`` with the fault injector armed (durable writes
    synced outside the lock when ``group``); report over ``conn`` each step as it is
    acknowledged, and finally the number of traced calls."""
    tracer = KillingOS(kill_at, how)
    try:
        with SafeFileStore(path, durable=True) as store:
            if group:
                group_commit(store)
            set_store_os(tracer)  # the stand-in passes calls through
            for step, (op, arg) in enumerate(script):
                run_step(store, op, arg)
                conn.send(("acked", step))
            set_store_os(os)
        conn.send(("calls", tracer.calls))
    except BaseException:  # noqa: BLE001 - report, do not hang the parent
        set_store_os(os)
        conn.send(("error", traceback.format_exc()))
    finally:
        sys.stdout.flush()


def run_step(store: SafeFileStore[Any], op: str, arg: Any) -> None:
    if op == "set":
        store[arg[0]] = arg[1]
    elif op == "del":
        del store[arg]
    elif op == "txn":
        apply_txn(store, arg)
    elif op == "modify":
        store.modify(arg, lambda n: n + 1, default=0)
    elif op == "compact":
        store.compact()
    else:  # pragma: no cover
        raise ValueError(op)


def apply_step(state: dict[str, Any], op: str, arg: Any) -> dict[str, Any]:
    """The model: ``state`` after the script step ``(op, arg)``."""
    state = dict(state)
    if op == "set":
        state[arg[0]] = arg[1]
    elif op == "del":
        del state[arg]
    elif op == "txn":
        for kind, key, value in arg:
            if kind == "set":
                state[key] = value
            else:
                state.pop(key, None)
    elif op == "modify":
        state[arg] = state.get(arg, 0) + 1
    return state


def pool_increment(store: SafeFileStore[Any]) -> int:
    """A pool task that receives a store handle as its argument."""
    return int(store.modify("hits", lambda n: n + 1, default=0))
