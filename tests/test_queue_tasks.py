"""SafeQueue task tracking: task_done()/join() as queue.Queue, and a consumer that dies
with unfinished tasks does not leave join() waiting (its count is reaped, with a warning)."""

from __future__ import annotations

import collections
import multiprocessing
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import safeshm
from safeshm import _queue
from safeshm._errors import HolderDiedWarning, IncompatibleSegmentError, SegmentClosedError
from safeshm._queue import SafeQueue
from safeshm._segment import Kind, Segment
from safeshm._sync import ProcessTableFullError

from ._helpers import JOIN_TIMEOUT, PROMPT, Remote, kill_and_reap, processes
from ._impls import env_for, other

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture
def make(cleanup: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> SafeQueue[Any]:
        return cleanup(SafeQueue.create(*args, **kwargs))  # type: ignore[no-any-return]

    return factory


# -- workers ----------------------------------------------------------------------------------
def _get_and_hold(name: str, n: int, ready: Any) -> None:
    """Get ``n`` items, mark none done, and wait to be killed."""
    q = SafeQueue.attach(name)
    for _ in range(n):
        q.get(timeout=JOIN_TIMEOUT)
    ready.set()
    time.sleep(60)


def _consume(name: str, done_counts: Any, slot: int) -> None:
    """get + task_done until a None arrives (marked done too)."""
    q = SafeQueue.attach(name)
    n = 0
    while True:
        item = q.get(timeout=JOIN_TIMEOUT)
        if item is None:
            q.task_done()
            break
        n += 1
        q.task_done()
    done_counts[slot] = n
    q.close()


def _produce(name: str, tag: int, n: int) -> None:
    q = SafeQueue.attach(name)
    for i in range(n):
        q.put((tag, i), timeout=JOIN_TIMEOUT)
    q.close()


# -- semantics --------------------------------------------------------------------------------
def test_task_done_and_join_as_queue_queue(make: Any) -> None:
    q = make(4096)
    ref: queue.Queue[int] = queue.Queue()
    for i in range(3):
        q.put(i)
        ref.put(i)
    assert q.unfinished_tasks == ref.unfinished_tasks == 3
    assert q.join(timeout=0) is False
    for _ in range(3):
        assert q.get() == ref.get()
        q.task_done()
        ref.task_done()
        assert q.unfinished_tasks == ref.unfinished_tasks
    assert q.join(timeout=0) is True
    assert q.join() is True
    s = q.statistics()
    assert (s.unfinished_tasks, s.consumers, s.processes) == (0, 1, _queue.DEFAULT_PROCESSES)


def test_task_done_too_many_raises_and_changes_nothing(make: Any) -> None:
    q = make(4096)
    with pytest.raises(ValueError, match=r"^task_done\(\) called too many times$"):
        q.task_done()
    q.put("a")
    q.get()
    q.task_done()
    before = bytes(q._state)
    with pytest.raises(ValueError, match="too many"):
        q.task_done()
    assert bytes(q._state) == before and q.unfinished_tasks == 0


def test_task_done_without_get_counts_as_queue_queue_does(make: Any) -> None:
    """queue.Queue allows put(); task_done() (no get): the item stays queued, the task is
    done, and a later task_done for it is one too many."""
    q = make(4096)
    q.put("a")
    q.task_done()
    assert q.unfinished_tasks == 0 and q.qsize() == 1
    assert q.join(timeout=0)
    assert q.get() == "a"
    with pytest.raises(ValueError, match="too many"):
        q.task_done()
    assert q.unfinished_tasks == 0


def test_get_many_counts_every_item(make: Any) -> None:
    q = make(4096)
    q.put_many(range(5))
    assert q.get_many(3) == [0, 1, 2]
    assert q.unfinished_tasks == 5
    for _ in range(3):
        q.task_done()
    assert q.unfinished_tasks == 2


def test_shutdown_immediate_finishes_the_discarded_tasks(make: Any) -> None:
    q = make(4096)
    q.put_many(["a", "b", "c"])
    q.get()
    q.shutdown(immediate=True)
    assert q.unfinished_tasks == 1  # the one got, as queue.Queue (3.13)
    q.task_done()
    assert q.join(timeout=0)


def test_join_timeout(make: Any) -> None:
    q = make(4096)
    q.put(1)
    t0 = time.monotonic()
    assert q.join(timeout=0.2) is False
    assert 0.18 <= time.monotonic() - t0 < PROMPT
    with pytest.raises(ValueError, match="non-negative"):
        q.join(timeout=-1)
    with pytest.raises(TypeError):
        q.join(timeout="1")


def test_join_wakes_when_another_thread_finishes(make: Any) -> None:
    q = make(4096)
    q.put_many(range(4))

    def work() -> None:
        for _ in range(4):
            q.get(timeout=JOIN_TIMEOUT)
            time.sleep(0.01)
            q.task_done()

    t = threading.Thread(target=work)
    t.start()
    assert q.join(timeout=JOIN_TIMEOUT)
    t.join(JOIN_TIMEOUT)
    assert q.unfinished_tasks == 0


def test_close_while_join_waits_raises_promptly(cleanup: Any) -> None:
    q = cleanup(SafeQueue.create(4096))
    q.put(1)
    caught: list[BaseException] = []

    def joiner() -> None:
        try:
            q.join(timeout=JOIN_TIMEOUT)
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            caught.append(e)

    t = threading.Thread(target=joiner)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    q.close()
    t.join(JOIN_TIMEOUT)
    assert not t.is_alive()
    assert time.monotonic() - t0 < PROMPT
    assert len(caught) == 1 and isinstance(caught[0], SegmentClosedError)


def test_old_layout_is_refused_with_the_usual_message(cleanup: Any) -> None:
    seg = Segment.create(
        None,
        kind=Kind.QUEUE,
        layout=2,
        payload_size=_queue._RING_OFFSET - 128 + 64,
        init=lambda mm: None,
        params=struct.pack("=QQI", 64, 0, 0),
    )
    try:
        with pytest.raises(IncompatibleSegmentError, match=r"layout 2\b.*expected.*layout 3"):
            SafeQueue.attach(seg.name)
    finally:
        seg.unlink()
        seg.close()


@pytest.mark.parametrize("bad", [0, -1, 1 << 17, True, 1.5])
def test_bad_processes(bad: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        SafeQueue.create(64, processes=bad)


def test_repair_recomputes_held(make: Any) -> None:
    q = make(4096)
    q.put_many([1, 2])
    q.get()
    q._state[_queue._HELD] = 7  # as if a holder died between its two stores
    q._repair()
    assert q._state[_queue._HELD] == 1 and q.unfinished_tasks == 2


# -- dead consumers ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_consumer_killed_between_get_and_task_done_does_not_hang_join(
    method: str, make: Any
) -> None:
    q = make(4096)
    q.put_many(["a", "b", "c"])
    ctx = multiprocessing.get_context(method)
    ready = ctx.Event()
    with processes(method, _get_and_hold, [(q.name, 2, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        assert q.unfinished_tasks == 3
        kill_and_reap(p)
    assert q.get(timeout=1) == "c"
    q.task_done()
    t0 = time.monotonic()
    with pytest.warns(HolderDiedWarning, match=r"died with 2 unfinished task"):
        assert q.join(timeout=JOIN_TIMEOUT)
    assert time.monotonic() - t0 < PROMPT
    assert q.unfinished_tasks == 0 and q.statistics().consumers == 1


def test_join_waiting_notices_a_death_within_a_slice(make: Any) -> None:
    q = make(4096)
    q.put("a")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    result: list[bool] = []
    with processes("fork", _get_and_hold, [(q.name, 1, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)

        def joiner() -> None:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                result.append(q.join(timeout=JOIN_TIMEOUT))
            result.append(any(issubclass(x.category, HolderDiedWarning) for x in w))

        t = threading.Thread(target=joiner)
        t.start()
        time.sleep(0.3)
        assert t.is_alive()  # waiting for the held task
        t0 = time.monotonic()
        kill_and_reap(p)
        t.join(JOIN_TIMEOUT)
        assert time.monotonic() - t0 < PROMPT
    assert result == [True, True]


def test_join_notices_a_dead_consumer_its_parent_has_not_reaped(make: Any) -> None:
    """The parent waits in join() and so never reaps its SIGKILLed consumer child: the
    child is a zombie, which must count as dead (or join() waits for ever)."""
    import signal

    q = make(4096)
    q.put("a")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with processes("fork", _get_and_hold, [(q.name, 1, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        os.kill(p.pid, signal.SIGKILL)  # not reaped: a zombie until processes() joins it
        t0 = time.monotonic()
        with pytest.warns(HolderDiedWarning, match=r"died with 1 unfinished task"):
            assert q.join(timeout=PROMPT + 5)
        assert time.monotonic() - t0 < PROMPT
    assert q.unfinished_tasks == 0


def test_forked_child_gets_its_own_record(make: Any) -> None:
    """The parent's record (and the compiled core's cached index of it) is not the
    child's: a child that dies holding a task takes only its own count with it."""
    q = make(4096)
    q.put_many(["mine", "child's"])
    assert q.get() == "mine"  # the parent claims its record here
    ready = multiprocessing.get_context("fork").Event()
    with processes("fork", _get_and_hold, [(q.name, 1, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        assert q.statistics().consumers == 2
        kill_and_reap(p)
    with pytest.warns(HolderDiedWarning):
        assert q.join(timeout=0.3) is False  # the parent's task is still unfinished
    assert q.unfinished_tasks == 1
    q.task_done()
    assert q.join(timeout=0)


def test_process_table_full(make: Any) -> None:
    q = make(4096, processes=1)
    q.put_many([1, 2, 3])
    ready = multiprocessing.get_context("fork").Event()
    with processes("fork", _get_and_hold, [(q.name, 1, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        before = bytes(q._state)
        with pytest.raises(ProcessTableFullError):
            q.get(timeout=1)
        assert bytes(q._state) == before  # nothing taken
        kill_and_reap(p)
    with pytest.warns(HolderDiedWarning):
        assert q.get(timeout=1) == 2  # the dead child's record is reaped and reused
    assert q.unfinished_tasks == 2


# -- many processes ---------------------------------------------------------------------------
@pytest.mark.slow
def test_join_returns_exactly_when_all_are_done(make: Any) -> None:
    q = make(1 << 14)
    n_prod, n_cons, per = 3, 3, 300
    ctx = multiprocessing.get_context("fork")
    done_counts = ctx.Array("i", n_cons)
    with (
        processes("fork", _produce, [(q.name, t, per) for t in range(n_prod)]) as prods,
        processes("fork", _consume, [(q.name, done_counts, k) for k in range(n_cons)]) as cons,
    ):
        for p in prods:
            p.join(JOIN_TIMEOUT)
        for _ in range(n_cons):
            q.put(None)
        assert q.join(timeout=JOIN_TIMEOUT)
        # join returned: every item was got and marked done
        assert q.unfinished_tasks == 0 and q.qsize() == 0
        for p in cons:
            p.join(JOIN_TIMEOUT)
            assert p.exitcode == 0
    assert sum(done_counts) == n_prod * per


def _mixed_consumer_code(name: str, kill_after: int) -> str:
    return (
        "import sys, time, safeshm\n"
        "from safeshm._queue import SafeQueue\n"
        f"q = SafeQueue.attach({name!r})\n"
        "print(safeshm.implementation(), flush=True)\n"
        f"for i in range({kill_after}):\n"
        "    q.get(timeout=10); q.task_done()\n"
        "q.get(timeout=10)\n"  # one more, never marked done
        "print('holding', flush=True)\n"
        "time.sleep(60)\n"
    )


def test_mixed_implementations_share_task_tracking(make: Any) -> None:
    """This process one implementation, a subprocess the other, on one queue: the
    subprocess's gets count, its task_done calls count, and its death is reaped."""
    q = make(4096)
    q.put_many(range(6))
    proc = subprocess.Popen(
        [sys.executable, "-c", _mixed_consumer_code(q.name, 3)],
        env={**env_for(other()), "PYTHONPATH": SRC},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == other()
        assert proc.stdout.readline().strip() == "holding"
        assert q.unfinished_tasks == 3  # 2 queued + 1 held by the subprocess
        assert q.get() == 4
        q.task_done()
        assert q.join(timeout=0.2) is False
    finally:
        proc.kill()
        proc.wait(JOIN_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()
    assert q.get() == 5
    q.task_done()
    with pytest.warns(HolderDiedWarning, match="died with 1 unfinished"):
        assert q.join(timeout=JOIN_TIMEOUT)


# -- a model-based state machine ----------------------------------------------------------------
class TasksMachine(RuleBasedStateMachine):
    """A SafeQueue with a handle in a server process, against queue.Queue's counters: the
    items, the unfinished count, and per-process held counts (so that a remote handle's
    task_done and the local one's are told apart)."""

    remote: Remote | None = None

    def __init__(self) -> None:
        super().__init__()
        self.q: SafeQueue[int] | None = None
        self.model: collections.deque[int] = collections.deque()
        self.unfinished = 0
        self.n = 0

    @initialize()
    def create(self) -> None:
        self.q = SafeQueue.create(1024)
        assert self.remote is not None
        self.remote.attach("SafeQueue", self.q.name)

    @precondition(lambda self: len(self.model) < 20)  # a few bytes each: always fits
    @rule(k=st.integers(1, 3))
    def put(self, k: int) -> None:
        assert self.q is not None
        items = list(range(self.n, self.n + k))
        self.n += k
        self.q.put_many(items, block=False)
        self.model.extend(items)
        self.unfinished += k

    @precondition(lambda self: self.model)
    @rule(remote=st.booleans())
    def get(self, remote: bool) -> None:
        assert self.q is not None and self.remote is not None
        got = self.remote.call(self.q.name, "get_nowait") if remote else self.q.get_nowait()
        assert got == self.model.popleft()

    @rule(remote=st.booleans())
    def task_done(self, remote: bool) -> None:
        assert self.q is not None and self.remote is not None
        q = self.q

        def call() -> None:
            if remote:
                assert self.remote is not None
                self.remote.call(q.name, "task_done")
            else:
                q.task_done()

        if self.unfinished == 0:
            with pytest.raises(ValueError, match="too many"):
                call()
            return
        call()
        self.unfinished -= 1

    @rule()
    def join_now(self) -> None:
        assert self.q is not None
        assert self.q.join(timeout=0) == (self.unfinished == 0)

    @invariant()
    def counts_agree(self) -> None:
        if self.q is None:
            return
        assert self.q.unfinished_tasks == self.unfinished
        assert self.q.qsize() == len(self.model)

    def teardown(self) -> None:
        if self.q is not None:
            assert self.remote is not None
            self.remote.detach(self.q.name)
            self.q.close()
            self.q.unlink()


def test_state_machine(remote: Remote) -> None:
    from hypothesis import settings

    TasksMachine.remote = remote
    try:
        TasksMachine.TestCase.settings = settings(stateful_step_count=30, max_examples=40)
        TasksMachine.TestCase().runTest()
    finally:
        TasksMachine.remote = None


def test_public_type_is_the_same() -> None:
    assert safeshm.SafeQueue is SafeQueue
    assert signal.SIGKILL  # (the kill tests above use it through kill_and_reap)


def test_task_done_for_another_process_never_lands_on_a_dead_consumer(make: Any) -> None:
    """A task_done() from a process that got nothing marks a live consumer's item done: it
    landed on the first record with a count, a dead consumer's not yet reaped, and join()
    then waited for the live consumer's item, already done (found by a review)."""
    q = make(4096)
    q.put_many(["a", "b"])
    ctx = multiprocessing.get_context("fork")
    got_a, got_b = ctx.Event(), ctx.Event()
    with processes("fork", _get_and_hold, [(q.name, 1, got_a)]) as (dead,):
        assert got_a.wait(JOIN_TIMEOUT)  # the dead one takes the first record
        with processes("fork", _get_and_hold, [(q.name, 1, got_b)]) as (live,):
            assert got_b.wait(JOIN_TIMEOUT)
            kill_and_reap(dead)
            with pytest.warns(HolderDiedWarning, match="1 unfinished task"):
                q.task_done()  # the live consumer handed its item over: done
            assert q.unfinished_tasks == 0
            assert q.join(timeout=PROMPT)
            kill_and_reap(live)
