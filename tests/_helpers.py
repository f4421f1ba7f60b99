"""Process helpers and worker functions for the tests.

Worker functions live here, at module level, so that spawn- and forkserver-started
children can import them. Every wait has a timeout; every process is reaped.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import safeshm
from safeshm import _compat

JOIN_TIMEOUT = 60.0
# "Promptly": far above what scheduling noise on a loaded 2-CPU CI machine adds, far below
# the JOIN_TIMEOUT a missed wake-up or a lost lock would run into.
PROMPT = 5.0
START_METHODS = ("fork", "spawn")

# Every structure, for conformance tests of the lifecycle they all share.
STRUCTURES = [
    safeshm.SafeCounter,
    safeshm.ShardedCounter,
    safeshm.SafeLock,
    safeshm.SafeArray,
    safeshm.SafeQueue,
    safeshm.SafeEvent,
    safeshm.SafeSemaphore,
    safeshm.SafeBoundedSemaphore,
    safeshm.SafeBarrier,
    safeshm.SafeRLock,
    safeshm.SafeCondition,
    safeshm.SafeRWLock,
]


def create(cls: Any, name: str | None = None) -> Any:
    """``cls.create`` with whatever arguments the structure requires."""
    if cls is safeshm.SafeArray:
        return cls.create("q", 4, name=name)
    if cls is safeshm.SafeQueue:
        return cls.create(4096, name=name)
    if cls is safeshm.SafeBarrier:
        return cls.create(2, name=name)
    return cls.create(name=name)


def open_(cls: Any, name: str) -> Any:
    """``cls.open`` with whatever arguments the structure requires."""
    if cls is safeshm.SafeArray:
        return cls.open(name, "q", 4)
    if cls is safeshm.SafeQueue:
        return cls.open(name, 4096)
    if cls is safeshm.SafeBarrier:
        return cls.open(name, 2)
    return cls.open(name)


@contextlib.contextmanager
def processes(
    method: str, target: Callable[..., Any], args_list: Sequence[tuple[Any, ...]]
) -> Iterator[list[Any]]:
    """Start one process per args tuple; on exit reap them all, killing stragglers."""
    ctx = multiprocessing.get_context(method)
    procs = [ctx.Process(target=target, args=args, daemon=True) for args in args_list]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            if p.pid is None:
                continue
            p.join(timeout=JOIN_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


def run_all(
    method: str,
    target: Callable[..., Any],
    args_list: Sequence[tuple[Any, ...]],
    timeout: float = JOIN_TIMEOUT,
) -> None:
    """Run processes to completion; fail if any fails or does not finish in time."""
    with processes(method, target, args_list) as procs:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [p.pid for p in procs if p.is_alive()]
        if stuck:
            raise AssertionError(f"processes {stuck} did not finish within {timeout} s (deadlock?)")
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise AssertionError(f"worker processes failed with exit codes {bad}")


def kill_and_reap(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=10)
    if proc.is_alive():  # pragma: no cover
        raise AssertionError(f"process {proc.pid} survived SIGKILL")


# -- a handle in another process, driven over a pipe ----------------------------------------
def _serve(conn: multiprocessing.connection.Connection) -> None:
    handles: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        op, payload = msg
        try:
            if op == "attach":
                cls_name, seg_name = payload
                handles[seg_name] = getattr(safeshm, cls_name).attach(seg_name)
                result: Any = None
            elif op == "close":
                h = handles.pop(payload)
                h.close()
                result = None
            elif op == "call":
                seg_name, method, args = payload
                attr = getattr(handles[seg_name], method)
                result = attr(*args) if callable(attr) else attr
            else:  # pragma: no cover
                raise ValueError(op)
            conn.send(("ok", result))
        except BaseException as e:  # noqa: BLE001 - ship every failure to the test
            conn.send(("err", e))
    for h in handles.values():
        h.close()


class Remote:
    """A server process holding safeshm handles; calls are made synchronously."""

    def __init__(
        self,
        method: str = "fork",
        serve: Callable[[multiprocessing.connection.Connection], None] | None = None,
    ) -> None:
        ctx = multiprocessing.get_context(method)
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve or _serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def _request(self, op: str, payload: Any) -> Any:
        self._conn.send((op, payload))
        if not self._conn.poll(JOIN_TIMEOUT):
            raise AssertionError("remote process did not answer in time (deadlock?)")
        status, result = self._conn.recv()
        if status == "err":
            raise result
        return result

    def attach(self, cls_name: str, seg_name: str) -> None:
        self._request("attach", (cls_name, seg_name))

    def detach(self, seg_name: str) -> None:
        self._request("close", seg_name)

    def call(self, seg_name: str, method: str, *args: Any) -> Any:
        return self._request("call", (seg_name, method, args))

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self.proc.join(timeout=10)
        if self.proc.is_alive():  # pragma: no cover
            self.proc.kill()
            self.proc.join(timeout=10)
        self._conn.close()


# -- workers ----------------------------------------------------------------------------------
def counter_ops_worker(
    counter: Any, barrier: Any, ops: Sequence[tuple[str, int]], out: Any, slot: int
) -> None:
    """Apply ``ops`` to an exact SafeCounter; record the net effect this worker made."""
    barrier.wait(timeout=JOIN_TIMEOUT)
    net = 0
    for op, arg in ops:
        if op == "add":
            counter.add(arg)
            net += arg
        elif op == "cas_add":
            # A compare-and-set loop: the classic lock-free read-modify-write.
            while True:
                cur = counter.value
                if counter.compare_and_set(cur, cur + arg):
                    break
            net += arg
        elif op == "exchange_add":
            # exchange() used as a read-modify-write would race; instead add via a
            # CAS on the exchanged value, which must still be exact.
            old = counter.exchange(0)
            counter.add(old + arg)
            net += arg
        else:  # pragma: no cover
            raise ValueError(op)
    out[slot] = net


def threaded_adds_worker(counter: Any, barrier: Any, threads: int, adds: int, delta: int) -> None:
    """``threads`` threads in this process each add ``delta`` ``adds`` times."""
    barrier.wait(timeout=JOIN_TIMEOUT)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(adds):
                counter.add(delta)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=JOIN_TIMEOUT)
    if errors or any(t.is_alive() for t in ts):
        traceback.print_exception(errors[0]) if errors else None
        sys.exit(3)


def adds_then_report_worker(counter: Any, progress: Any, ready: Any) -> None:
    """Add 1 forever, publishing after each add how many adds have returned. ``ready`` is
    set after the first add: a loaded machine may run the killer before any more."""
    counter.add(1)
    done = progress.value = 1
    ready.set()
    while True:
        counter.add(1)
        done += 1
        progress.value = done


def hold_lock_worker(lock_name: str, holding: Any, release: Any) -> None:
    """Attach by name, take the lock, say so, and wait (for a SIGKILL, or a release)."""
    lock = safeshm.SafeLock.attach(lock_name)
    lock.acquire()
    holding.set()
    release.wait(timeout=JOIN_TIMEOUT)
    lock.release()
    lock.close()


def locked_rmw_worker(lock: Any, counter: Any, barrier: Any, rounds: int) -> None:
    """Non-atomic read-modify-writes made safe only by the lock."""
    barrier.wait(timeout=JOIN_TIMEOUT)
    for _ in range(rounds):
        with lock:
            v = counter.value
            counter.set(v + 1)


def open_and_add_worker(cls_name: str, seg_name: str, barrier: Any, out: Any, slot: int) -> None:
    """Race to open() one name; add 1; report the segment's inode."""
    barrier.wait(timeout=JOIN_TIMEOUT)
    handle = getattr(safeshm, cls_name).open(seg_name)
    handle.add(1)
    out[slot] = os.stat(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + seg_name)).st_ino
    handle.close()


def attach_add_exit_worker(seg_name: str, adds: int) -> None:
    c = safeshm.ShardedCounter.attach(seg_name)
    for _ in range(adds):
        c.add(1)
    # exits without close(): the slot's owner is now a dead process


def exchange_drain_worker(counter: Any, stop: Any, out: Any) -> None:
    """Repeatedly exchange(0) until told to stop; report the sum drained."""
    total = 0
    while not stop.is_set():
        total += counter.exchange(0)
    total += counter.exchange(0)
    out.value = total


# -- SafeArray workers ----------------------------------------------------------------------
def array_adds_worker(arr: Any, barrier: Any, ops: Sequence[tuple[int, int]]) -> None:
    """Apply (index, delta) adds after the barrier."""
    barrier.wait(timeout=JOIN_TIMEOUT)
    for index, delta in ops:
        arr.add(index, delta)


def uniform_writer_worker(
    arr: Any, use_locked: bool, reads: Any, min_rounds: int, min_reads: int
) -> None:
    """Set the whole array to one value per round: via locked() + element stores (slow,
    so a torn read would have a wide window) or via fill(). Go on until ``min_rounds``
    rounds are done and the reader has taken ``min_reads`` more snapshots meanwhile (the lock is
    not fair: a loaded machine can starve the reader for hundreds of rounds)."""
    deadline = time.monotonic() + JOIN_TIMEOUT / 2
    target = reads.value + min_reads  # snapshots taken while this writer runs
    r = 0
    while r < min_rounds or (reads.value < target and time.monotonic() < deadline):
        if use_locked:
            with arr.locked() as view:
                for k in range(len(view)):
                    view[k] = r
        else:
            arr.fill(r)
        r += 1


def snapshot_reader_worker(arr: Any, stop: Any, torn: Any, reads: Any) -> None:
    """Take snapshots in every way there is until told to stop; count torn ones and
    publish the number of rounds as it goes."""
    n = 0
    while not stop.is_set():
        for snap in (arr.to_list(), list(arr), arr[:], arr[::2]):
            if len(set(snap)) > 1:
                torn.value += 1
        n += 1
        reads.value = n


def die_inside_locked_worker(name: str, ready: Any) -> None:
    """Half-update the array inside locked(), then wait to be killed."""
    arr = safeshm.SafeArray.attach(name)
    with arr.locked() as view:
        for k in range(len(view) // 2):
            view[k] = -1
        ready.set()
        time.sleep(JOIN_TIMEOUT)


def hold_stripe_then_die_worker(name: str, ready: Any) -> None:
    """Hold one element's stripe (as an element write does) and wait to be killed."""
    arr = safeshm.SafeArray.attach(name)
    arr._stripes[0].acquire()
    ready.set()
    time.sleep(JOIN_TIMEOUT)


def numpy_write_worker(name: str, value: float) -> None:
    import numpy as np

    arr = safeshm.SafeArray.attach(name)
    with arr.locked() as view:
        a = np.asarray(view)
        a[:] = value
        del a
    arr.close()


# -- SafeQueue workers ----------------------------------------------------------------------
def queue_producer_worker(q: Any, barrier: Any, producer: int, count: int, batch: int) -> None:
    """Put (producer, seq) for seq in range(count), singly or in batches."""
    barrier.wait(timeout=JOIN_TIMEOUT)
    seq = 0
    while seq < count:
        if batch > 1:
            items = [(producer, s) for s in range(seq, min(count, seq + batch))]
            q.put_many(items, timeout=JOIN_TIMEOUT)
            seq += len(items)
        else:
            q.put((producer, seq), timeout=JOIN_TIMEOUT)
            seq += 1


def queue_consumer_worker(q: Any, barrier: Any, out: Any, batch: int) -> None:
    """Take items until the queue is shut down and drained; send them back in order."""
    barrier.wait(timeout=JOIN_TIMEOUT)
    got: list[Any] = []
    try:
        while True:
            if batch > 1:
                got.extend(q.get_many(batch, timeout=JOIN_TIMEOUT))
            else:
                got.append(q.get(timeout=JOIN_TIMEOUT))
    except safeshm.QueueShutDown:
        pass
    out.send(got)
    out.close()


def patterned(seq: int, size: int) -> bytes:
    """An item whose every byte depends on seq: a torn or partial item cannot pass check."""
    head = seq.to_bytes(8, "little")
    return head + bytes([(seq + k) % 251 for k in range(size)]) + head


def check_patterned(item: bytes) -> int:
    seq = int.from_bytes(item[:8], "little")
    size = len(item) - 16
    assert item[-8:] == item[:8], "torn item (head and tail differ)"
    assert item == patterned(seq, size), "torn item (body)"
    return seq


def patterned_producer_worker(name: str, progress: Any, ready: Any) -> None:
    """Put patterned items of varying sizes forever (until killed)."""
    q = safeshm.SafeQueue.attach(name)
    ready.set()
    seq = 0
    while True:
        q.put(patterned(seq, 1000 + (seq * 7919) % 20000), timeout=JOIN_TIMEOUT)
        seq += 1
        progress.value = seq


def blocked_getter_worker(name: str, ready: Any) -> None:
    """Block in get() on an empty queue (to be killed while asleep)."""
    q = safeshm.SafeQueue.attach(name)
    ready.set()
    q.get(timeout=JOIN_TIMEOUT)


def hold_queue_lock_worker(name: str, ready: Any) -> None:
    q = safeshm.SafeQueue.attach(name)
    q._mutex.acquire()
    ready.set()
    time.sleep(JOIN_TIMEOUT)


def timed_get_worker(name: str, ready: Any, out: Any) -> None:
    q = safeshm.SafeQueue.attach(name)
    ready.set()
    item = q.get(timeout=JOIN_TIMEOUT)
    out.value = time.monotonic()
    assert item == "wake up"


def timed_put_worker(name: str, ready: Any, out: Any) -> None:
    q = safeshm.SafeQueue.attach(name)
    ready.set()
    q.put("second", timeout=JOIN_TIMEOUT)
    out.value = time.monotonic()
