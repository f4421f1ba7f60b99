"""Handles passed as arguments to ``concurrent.futures.ProcessPoolExecutor`` tasks.

Every structure crosses into the pool's workers the way users hand it over: as an argument
to ``submit``, pickled as a reference and re-attached by name in the worker (see
``test_api`` for the pickle format and ``test_queue`` for a queue alone in a pool). Workers
count, write array slots, put tagged items and take the lock all at once; the parent
checks exact results and that, once the pool is gone, the segments are intact and still
the parent's, and the workers left nothing behind -- also when the parent then exits
without closing anything (Python 3.11/3.12's resource tracker must not unlink them).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import multiprocessing
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import safeshm
from safeshm import _compat

from ._helpers import JOIN_TIMEOUT

METHODS = ["spawn", "forkserver", "fork"]
POOL_WORKERS = 3
TASKS = 12
ADDS = 150
ITEMS = 40  # queue items per task


class Shared:
    """The handles of one test: every structure, each created by the parent."""

    def __init__(self, names: dict[str, str] | None = None) -> None:
        n = names or {}
        self.counter = safeshm.SafeCounter.create(name=n.get("counter"))
        self.sharded = safeshm.SafeCounter.create(name=n.get("sharded"), sharded=True)
        # Slot 0: a read-modify-write total that only the lock makes exact; slot 1 + t:
        # written by task t.
        self.array = safeshm.SafeArray.create("q", TASKS + 1, name=n.get("array"))
        self.queue = safeshm.SafeQueue.create(1 << 20, name=n.get("queue"))
        self.lock = safeshm.SafeLock.create(name=n.get("lock"))

    @property
    def handles(self) -> list[Any]:
        return [self.counter, self.sharded, self.array, self.queue, self.lock]

    def run_pool(self, method: str) -> set[int]:
        """Run every task in a pool; the pids of the workers that ran them."""
        ctx = multiprocessing.get_context(method)
        with ProcessPoolExecutor(POOL_WORKERS, mp_context=ctx) as pool:
            futures = [
                pool.submit(
                    pool_task, self.counter, self.sharded, self.array, self.queue, self.lock, task
                )
                for task in range(TASKS)
            ]
            # Returning leaves the block first, which shuts the pool down (joins workers).
            return {f.result(timeout=JOIN_TIMEOUT) for f in futures}

    def check(self) -> None:
        """Exact results of run_pool()."""
        assert self.counter.value == TASKS * ADDS
        assert self.sharded.value == TASKS * ADDS
        assert self.array.to_list() == [TASKS * ADDS] + [t + 1 for t in range(TASKS)]
        items = self.queue.get_many(TASKS * ITEMS + 1, block=False)
        assert self.queue.empty()
        # None lost, none twice; each task's items in the order it put them.
        assert sorted(items) == [(t, i) for t in range(TASKS) for i in range(ITEMS)]
        for t in range(TASKS):
            assert [i for tt, i in items if tt == t] == list(range(ITEMS))
        # Every worker released the lock: it is free, and no holder died with it.
        stats = self.lock.statistics()
        assert not stats.locked
        assert stats.recoveries == 0
        assert self.lock.acquire(timeout=JOIN_TIMEOUT)
        self.lock.release()


def pool_task(  # noqa: PLR0917 - submit() passes the handles positionally, as users do
    counter: safeshm.SafeCounter,
    sharded: safeshm.ShardedCounter,
    array: safeshm.SafeArray[int],
    queue: safeshm.SafeQueue[tuple[int, int]],
    lock: safeshm.SafeLock,
    task: int,
) -> int:
    """One task in a pool worker; the handles arrive pickled and re-attach by name."""
    assert array.name and queue.name  # re-attached, usable handles
    for i in range(ADDS):
        counter.add(1)
        sharded.add(1)
        with lock:  # a non-atomic read-modify-write, made exact by the lock alone
            array[0] = array[0] + 1
        if i < ITEMS:
            queue.put((task, i), timeout=JOIN_TIMEOUT)
    array[1 + task] = task + 1
    return os.getpid()


def path(name: str) -> str:
    return os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name)


def ours() -> set[str]:
    return {f for f in os.listdir(_compat.SHM_DIR) if f.startswith(_compat.FILE_PREFIX)}


def in_use(path: str) -> bool:
    """Whether any process holds the segment open (every handle holds a shared flock)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.parametrize("method", METHODS)
def test_pool_workers_share_every_structure(method: str) -> None:
    before = ours()
    shared = Shared()
    paths = [path(h.name) for h in shared.handles]
    try:
        pids = shared.run_pool(method)
        assert os.getpid() not in pids
        shared.check()
        # The pool is gone: the segments are still there, the parent's handles work, and
        # nobody else made anything (no new segments, no half-built temporaries).
        assert ours() == before | {os.path.basename(p) for p in paths}
        for h in shared.handles:
            again = type(h).attach(h.name)
            again.close()
    finally:
        for h in shared.handles:
            h.close()
    try:
        # No pool worker still holds a segment open. The parent's handles are dropped
        # first: a closed SafeLock keeps its mapping for as long as the handle object
        # lives (so that a thread holding the lock can still release it), and a live
        # mapping keeps the segment's flock, so it would still count as in use.
        del shared, h, again
        gc.collect()
        assert [p for p in paths if in_use(p)] == []
    finally:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    assert ours() == before


_SCENARIO = textwrap.dedent("""
    import sys
    from tests.test_integration_pools import Shared

    shared = Shared(dict(zip(["counter", "sharded", "array", "queue", "lock"],
                             sys.argv[2:], strict=True)))
    shared.run_pool(sys.argv[1])
    shared.check()
    # Exits holding every handle, unclosed: the segments must outlive this process.
""")


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_segments_outlive_a_parent_that_exits_without_closing(method: str, unique: Any) -> None:
    """With spawn and forkserver, pool workers share the parent's resource tracker, which
    on Python 3.11/3.12 unlinks at the parent's exit every shared-memory segment that any
    of them registered, even by merely attaching (CPython gh-82300). safeshm never
    registers its segments: they survive, intact and unused, and nothing is reported."""
    before = ours()
    names = [unique() for _ in range(5)]
    # Spawned workers import this module by name, so the child runs from the repository
    # root; SAFESHM_DIR reaches it through the inherited environment.
    proc = subprocess.run(
        [sys.executable, "-c", _SCENARIO, method, *names],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT * 2,
        check=False,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        # Not a word from the resource tracker (which would warn of "leaked" segments).
        assert proc.stderr == ""
        assert ours() == before | {_compat.FILE_PREFIX + n for n in names}
        assert [n for n in names if in_use(path(n))] == []
        counter = safeshm.SafeCounter.attach(names[0])
        sharded = safeshm.ShardedCounter.attach(names[1])
        array = safeshm.SafeArray.attach(names[2])
        try:
            assert counter.value == sharded.value == TASKS * ADDS
            assert array[0] == TASKS * ADDS
        finally:
            for h in (counter, sharded, array):
                h.close()
    finally:
        for n in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path(n))
    assert ours() == before
