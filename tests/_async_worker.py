"""Run safeshm operations under a 0.3 ms SIGALRM whose handler raises, and check after every
interrupt that no internal robust mutex was left held (issue 10.3).

Run as a script in a subprocess by tests/test_async_exceptions.py, so that a hang or a
crash fails that test instead of killing pytest: ``python _async_worker.py KIND N``.
Exit status 0: N interrupts landed and every mutex was free after each; 3: a mutex was
left held (the message names the operation and the mutex).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import safeshm
from safeshm import _lock

CHECK_WAIT = 5.0  # bounded: a free mutex is taken at once, a leaked one never


class Alarm(Exception):
    """What the signal handler raises: a stand-in for KeyboardInterrupt or a timeout."""


class _Timer:
    """Whether an alarm may still raise. main() clears it as the first statement of the
    ``finally`` that disarms the timer: no check for signals runs between an exception's
    unwinding and that store, so no alarm can escape the loop that catches it -- not from an
    ``except`` clause, where the interval timer used to fire again under load (seen in CI
    as an Alarm raised at module level)."""

    armed = False


def _raise(signum: int, frame: Any) -> None:
    if _Timer.armed:
        raise Alarm


class Reentrant:
    """A handler that first uses the structure itself -- possibly while the code it
    interrupted holds the structure's mutex -- then raises. A re-entry must fail with
    LockReentryError and leave the outer hold in place."""

    def __init__(self, mutexes: list[Any]) -> None:
        self.mutexes = mutexes
        self.op: Callable[[], Any] | None = None
        self.refused = 0
        self.problems: list[str] = []

    def __call__(self, signum: int, frame: Any) -> None:
        if not _Timer.armed:
            return
        op = self.op
        if op is not None:
            held = [m.held_here() for m in self.mutexes]
            try:
                op()
            except safeshm.LockReentryError:
                self.refused += 1
                if [m.held_here() for m in self.mutexes] != held:
                    self.problems.append("a refused re-entry changed what this thread holds")
        raise Alarm


def _mutexes(handle: Any) -> list[Any]:
    if isinstance(handle, safeshm.SafeArray):
        return list(handle._stripes)
    if isinstance(handle, safeshm.SafeFileStore):
        return []  # checked by _StoreChecker: its locks are a threading lock and a flock
    return [handle._mutex]


# The other process of a store check: on each line from stdin, a write and a compaction
# that must get their locks within CHECK_WAIT (StoreTimeoutError: a leaked flock) and a
# read of the whole store, which must be one of the states the worker's writes move between.
STORE_PEER = """
import sys, safeshm
store = safeshm.SafeFileStore(sys.argv[1])
for line in sys.stdin:
    try:
        store.modify("probe", lambda v: v + 1, default=0, timeout=float(sys.argv[2]))
        store.compact(timeout=float(sys.argv[2]))  # the maintenance lock, too
    except safeshm.StoreTimeoutError as e:
        print("LEAK", e, flush=True)
        continue
    d = store.to_dict()
    problems = []
    if d.get("x", 0) + d.get("y", 0) != 0:
        problems.append(f"a transaction was torn: x={d.get('x')} y={d.get('y')}")
    s = d.get("s")
    if s is not None and (set(s) != {"v", "pad"} or s["pad"] != "x" * 100):
        problems.append(f"s={s!r}")
    big = d.get("big")
    if big is not None and (len(big) != 5000 or len(set(big)) != 1):
        problems.append(f"big is torn: {big[:20]!r}...")
    if d.get("d", 1) != 1:
        problems.append(f"d={d.get('d')!r}")
    if not isinstance(d.get("n", 0), int):
        problems.append(f"n={d.get('n')!r}")
    print("BAD " + "; ".join(problems) if problems else "OK", d.get("n", 0), sorted(d),
          "generation", store._generation, flush=True)
"""


class _StoreChecker:
    """After an interrupt: another thread of this process, then another process, must
    each be able to write (within CHECK_WAIT) and see a consistent store; modify's count
    moved by at least the calls that returned and at most the calls begun (an interrupted
    write took effect whole, or not at all; a handler's own call may be interrupted by the
    next alarm)."""

    def __init__(self, store: Any, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.store = store
        self.pool = pool
        self.peer = subprocess.Popen(
            [sys.executable, "-c", STORE_PEER, store.path, str(CHECK_WAIT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.n = 0

    def _thread_write(self) -> str | None:
        try:
            self.store.modify("probe_t", lambda v: v + 1, default=0, timeout=CHECK_WAIT)
        except safeshm.StoreTimeoutError:
            return f"the write lock is still held in this process {CHECK_WAIT} s after"
        return None

    def __call__(self, done: int, started: int) -> str | None:
        """``done``, ``started``: modify() calls that returned, and that began, since the
        last check."""
        problem = self.pool.submit(self._thread_write).result(timeout=CHECK_WAIT + 5)
        if problem:
            return problem
        assert self.peer.stdin is not None and self.peer.stdout is not None
        self.peer.stdin.write("check\n")
        self.peer.stdin.flush()
        answer = self.peer.stdout.readline().split()
        if not answer:
            return "the checking process died"
        if answer[0] != "OK":
            return "another process: " + " ".join(answer)
        n = int(answer[1])
        if not self.n + done <= n <= self.n + started:
            return (
                f"modify's count is {n}, expected {self.n + done} to {self.n + started} "
                f"(another process sees keys {answer[2:]}; this one sees "
                f"{sorted(self.store.to_dict())} in log generation "
                f"{self.store._generation}; files: {sorted(os.listdir(self.store.path))})"
            )
        self.n = n
        return None

    def close(self) -> None:
        assert self.peer.stdin is not None
        self.peer.stdin.close()
        self.peer.wait(timeout=CHECK_WAIT + 5)


def _free_everywhere(mutexes: list[Any]) -> str | None:
    """From another thread: take and release every mutex (bounded wait)."""
    for m in mutexes:
        if m.acquire(CHECK_WAIT) == _lock.TIMED_OUT:
            return f"{m._what} is still held {CHECK_WAIT} s after the interrupt"
        m.release()
    return None


def _ops(kind: str, handle: Any) -> list[tuple[str, Callable[[], Any]]]:
    if kind == "queue":
        q = handle

        def get() -> None:
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0)

        def get_many() -> None:
            with contextlib.suppress(queue.Empty):
                q.get_many(3, timeout=0)

        def put() -> None:
            with contextlib.suppress(queue.Full):
                q.put(b"x" * 20, timeout=0)

        def put_many() -> None:
            with contextlib.suppress(queue.Full):
                q.put_many([b"y"] * 3, timeout=0)

        return [("put", put), ("get", get), ("put_many", put_many), ("get_many", get_many)]
    if kind == "array":
        a = handle

        def locked() -> None:
            with a.locked() as view:
                view[0] = 1

        def setitem() -> None:
            a[1] = 5

        def setslice() -> None:
            a[0:2] = [3, 4]

        return [
            ("add", lambda: a.add(2, 1)),
            ("set", setitem),
            ("compare_and_set", lambda: a.compare_and_set(3, 0, 0)),
            ("to_list", a.to_list),
            ("fill", lambda: a.fill(0)),
            ("locked", locked),
            ("slice", setslice),
            ("getslice", lambda: a[0:3]),
        ]
    if kind == "sharded":
        c = handle
        return [("add", c.add), ("exchange", lambda: c.exchange(0))]
    if kind == "lock":
        lock = handle

        def with_lock() -> None:
            with lock:
                pass

        def acquire_release() -> None:
            if lock.acquire():
                try:
                    pass
                finally:
                    lock.release()

        def acquire_timeout() -> None:
            if lock.acquire(timeout=1.0):
                try:
                    pass
                finally:
                    lock.release()

        def acquired() -> None:
            with lock.acquired(timeout=1.0):
                pass

        return [
            ("with", with_lock),
            ("acquire", acquire_release),
            ("acquire(timeout)", acquire_timeout),
            ("acquired", acquired),
        ]
    if kind == "tick":
        leader = handle

        def lead() -> None:
            with leader.lead() as leading:
                leader.led += leading

        def lead_tick() -> None:
            with leader.lead(leader.current_tick()):
                pass

        return [("lead", lead), ("lead_tick", lead_tick)]
    if kind == "store":
        st = handle
        counter = iter(range(1 << 62))

        def set_() -> None:
            i = next(counter)
            st["s"] = {"v": i, "pad": "x" * 100}
            st["big"] = "abcdef"[i % 6] * 5000  # over the cache limit: read from the log

        def modify() -> None:
            st.started += 1
            st.modify("n", lambda v: v + 1, default=0)
            st.modified += 1

        def transaction() -> None:
            with st.transaction() as tx:
                tx["x"] = tx.get("x", 0) + 1
                tx["y"] = tx.get("y", 0) - 1

        def delete() -> None:
            st["d"] = 1
            del st["d"]

        def grouped() -> None:
            # As if another writer had just found the lock taken: durable writes sync
            # after releasing it, then take it again to publish (group commit, _finish).
            st._writer.contended.value = 64
            st["g"] = next(counter)

        return [
            ("set", set_),
            ("modify", modify),
            ("transaction", transaction),
            ("delete", delete),
            ("grouped", grouped),
            ("compact", st.compact),
        ]
    raise SystemExit(f"unknown kind {kind!r}")


class _Leader(safeshm.TickLeader):
    led = 0


class _Store(safeshm.SafeFileStore[Any]):
    started = 0  # modify() calls begun
    modified = 0  # and returned


@contextlib.contextmanager
def _handle(kind: str, pool: concurrent.futures.ThreadPoolExecutor) -> Iterator[Any]:
    if kind == "queue":
        h: Any = safeshm.SafeQueue.create(1 << 16, raw=True)
    elif kind == "array":
        h = safeshm.SafeArray.create("q", 8, stripes=4)
    elif kind == "sharded":
        h = safeshm.ShardedCounter.create(slots=1)
        # Another, live thread owns the only slot: this thread's adds take the lock.
        pool.submit(h.add, 1).result(timeout=CHECK_WAIT)
    elif kind == "store":
        where = tempfile.mkdtemp(prefix="safeshm-async-")
        h = _Store(where + "/store")
        try:
            yield h
        finally:
            h.close()
            shutil.rmtree(where, ignore_errors=True)
        return
    elif kind == "tick":
        h = _Leader.create(0.001)  # a new tick every millisecond: many leads lead
    else:
        h = safeshm.SafeLock.create()
    try:
        yield h
    finally:
        h.close()
        h.unlink()


def main(kind: str, wanted: int, budget_s: float, reentrant: bool) -> int:
    warnings.simplefilter("ignore", safeshm.SafeShmWarning)
    # SIGALRM goes to the main thread only: one delivered to the pool's thread is run by the
    # main thread's next check for signals, which may come after the timer was disarmed --
    # even after main() returned (seen once, under load, as an Alarm at module level).
    pool = concurrent.futures.ThreadPoolExecutor(
        1, initializer=signal.pthread_sigmask, initargs=(signal.SIG_BLOCK, {signal.SIGALRM})
    )
    with _handle(kind, pool) as h:
        mutexes = _mutexes(h)
        ops = _ops(kind, h)
        checker = _StoreChecker(h, pool) if kind == "store" else None
        handler = Reentrant(mutexes)
        signal.signal(signal.SIGALRM, handler if reentrant else _raise)
        counts = dict.fromkeys([name for name, _ in ops], 0)
        interrupts = 0
        stop_at = time.monotonic() + budget_s
        while interrupts < wanted and time.monotonic() < stop_at:
            for name, op in ops:
                hit = False
                handler.op = op
                try:
                    try:
                        _Timer.armed = True
                        signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
                        while True:  # until the alarm lands, somewhere in an operation
                            op()
                    finally:
                        _Timer.armed = False  # first: from here on the handler does nothing
                        signal.setitimer(signal.ITIMER_REAL, 0, 0)
                except Alarm as e:
                    hit = True
                    # Kept alive through the check, as a program that logs or stores it
                    # would: whatever its traceback's frames hold stays held meanwhile (a
                    # contextmanager's __enter__ that took a lock, say).
                    kept = e  # noqa: F841
                handler.op = None
                if handler.problems:
                    print(f"RE-ENTRY in {kind} {name}: {handler.problems[0]}", flush=True)
                    return 5
                if not hit:
                    continue
                interrupts += 1
                counts[name] += 1
                if checker is not None:
                    problem = checker(h.modified, h.started)
                    h.modified = h.started = 0
                else:
                    problem = pool.submit(_free_everywhere, mutexes).result(
                        timeout=CHECK_WAIT * len(mutexes) + 5
                    )
                if problem:
                    print(
                        f"LEAK after {interrupts} interrupts, in {kind} {name}: {problem}",
                        flush=True,
                    )
                    # Let the other thread's check see nothing more; exit without cleanup
                    # (the parent test removes the segment).
                    for m in mutexes:
                        with contextlib.suppress(Exception):
                            m.release()
                    return 3
        if checker is not None:
            checker.close()
    pool.shutdown()
    print(
        f"OK {kind}: {interrupts} interrupts {counts}; re-entries refused: {handler.refused}",
        flush=True,
    )
    return 0 if interrupts >= min(wanted, 20) else 4


if __name__ == "__main__":
    sys.exit(
        main(
            sys.argv[1],
            int(sys.argv[2]),
            float(sys.argv[3]),
            len(sys.argv) > 4 and sys.argv[4] == "reentrant",
        )
    )
