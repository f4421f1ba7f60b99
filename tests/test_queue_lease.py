"""SafeQueue at-least-once consumption: get_leased()/Lease.ack()/leased(); an item whose
holder dies (or whose lease expires) before the ack is delivered again, at the front."""

from __future__ import annotations

import collections
import multiprocessing
import queue
import time
import warnings
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from safeshm import (
    IncompatibleSegmentError,
    Lease,
    LeaseExpiredError,
    LeaseTableFullError,
    SafeQueue,
)
from safeshm._errors import HolderDiedWarning

from ._helpers import JOIN_TIMEOUT, PROMPT, Remote, kill_and_reap, processes


@pytest.fixture
def make(cleanup: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> SafeQueue[Any]:
        kwargs.setdefault("leases", 8)
        kwargs.setdefault("lease_size", 256)
        return cleanup(SafeQueue.create(*args, **kwargs))  # type: ignore[no-any-return]

    return factory


def _lease_and_hold(name: str, n: int, ready: Any) -> None:
    q = SafeQueue.attach(name)
    for _ in range(n):
        q.get_leased(timeout=JOIN_TIMEOUT)
    ready.set()
    time.sleep(60)


def _lease_and_ack(name: str, acked: Any, ready: Any) -> None:
    """Lease and ack items forever, recording each acked item (killed from outside)."""
    q = SafeQueue.attach(name)
    ready.set()
    while True:
        item, lease = q.get_leased(timeout=JOIN_TIMEOUT, lease=30)
        with acked.get_lock():
            acked[item] += 1
            lease.ack()
        q.task_done()


def test_ack_and_no_redelivery(make: Any) -> None:
    q = make(4096)
    q.put_many(["a", "b"])
    item, lease = q.get_leased(timeout=1)
    assert item == "a"
    assert (q.statistics().leased, q.statistics().leases) == (1, 8)
    lease.ack()
    assert q.statistics().leased == 0
    assert q.get_nowait() == "b"
    assert q.reclaim_leases() == 0
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(LeaseExpiredError, match=r"already ended by ack\(\) on this handle"):
        lease.ack()  # twice: nothing changes
    with pytest.raises(LeaseExpiredError, match=r"already ended by ack\(\)"):
        lease.release()
    assert q.qsize() == 0


def test_a_released_lease_cannot_be_acked(make: Any) -> None:
    q = make(4096)
    q.put("a")
    _, lease = q.get_leased(timeout=1)
    lease.release()
    with pytest.raises(LeaseExpiredError, match=r"already ended by release\(\)"):
        lease.ack()
    assert q.get_nowait() == "a"  # delivered again once, and only once


def test_lease_size_defaults_to_the_largest_item_up_to_64_kib(cleanup: Any) -> None:
    small = cleanup(SafeQueue.create(4096, leases=2))
    assert small._lease_size == 4088
    small.put(b"x" * 4000)
    assert small.get_leased(timeout=1)[0] == b"x" * 4000
    big = cleanup(SafeQueue.create(1 << 20, leases=2))
    assert big._lease_size == 1 << 16
    with pytest.raises(ValueError, match="lease_size needs leases="):
        SafeQueue.create(4096, lease_size=64)
    with pytest.raises(ValueError, match="lease_size must be 1 to the capacity"):
        SafeQueue.create(4096, leases=2, lease_size=8192)


def test_open_checks_and_creates_lease_slots(unique: Any, cleanup: Any) -> None:
    name = unique()
    q = cleanup(SafeQueue.open(name, 4096, leases=4, lease_size=100))
    assert (q._nleases, q._lease_size) == (4, 104)
    again = cleanup(SafeQueue.open(name, 4096, leases=4))  # lease_size=None: any
    assert again._nleases == 4
    cleanup(SafeQueue.open(name, 4096))  # leases=None: any
    with pytest.raises(IncompatibleSegmentError, match="4 lease slots, expected 2"):
        SafeQueue.open(name, 4096, leases=2, lease_size=100)
    with pytest.raises(IncompatibleSegmentError, match="lease_size 104, expected 200"):
        SafeQueue.open(name, 4096, leases=4, lease_size=200)
    with pytest.raises(ValueError, match="lease_size needs leases="):
        SafeQueue.open(name, 4096, lease_size=200)


def test_expired_lease_is_delivered_again_at_the_front(make: Any) -> None:
    q = make(4096)
    q.put_many(["a", "b"])
    item, lease = q.get_leased(timeout=1, lease=0.1)
    assert item == "a"
    time.sleep(0.2)
    assert q.reclaim_leases() == 1
    assert q.qsize() == 2
    assert q.get_nowait() == "a"  # a plain get (either implementation) sees it first
    before = bytes(q._state)
    with pytest.raises(LeaseExpiredError):
        lease.ack()  # late: nothing changes
    assert bytes(q._state) == before
    assert q.get_nowait() == "b"


def test_leased_context_acks_or_releases(make: Any) -> None:
    q = make(4096)
    q.put_many([1, 2])
    with q.leased(timeout=1) as item:
        assert item == 1

    def fail() -> None:
        with q.leased(timeout=1) as item:
            assert item == 2
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail()
    assert q.get_nowait() == 2  # released at once, at the front
    assert q.empty()


@pytest.mark.parametrize("forever", [float("inf"), 1e300, 2**70, 1e10, 9.2233e9])
def test_a_lease_beyond_any_clock_never_expires(make: Any, forever: float) -> None:
    # As every timeout= here: inf (or beyond threading.TIMEOUT_MAX) is "forever". It raised
    # OverflowError("cannot convert float infinity to integer").
    q = make(4096)
    q.put("x")
    item, lease = q.get_leased(timeout=0, lease=forever)
    assert item == "x"
    assert q.reclaim_leases() == 0
    lease.ack()
    assert q.empty()


def test_bad_input_changes_nothing(make: Any, cleanup: Any) -> None:
    q = make(4096, lease_size=16)
    q.put("x" * 100)
    before = bytes(q._state)
    for bad in (-1.0, 0, float("nan")):
        with pytest.raises(ValueError, match=r"lease|NaN|non-negative"):
            q.get_leased(timeout=0, lease=bad)
    with pytest.raises(ValueError, match="lease_size"):
        q.get_leased(timeout=0)
    assert bytes(q._state) == before
    plain = cleanup(SafeQueue.create(4096))
    with pytest.raises(ValueError, match="without leases"):
        plain.get_leased(timeout=0)


def test_lease_table_full(make: Any) -> None:
    q = make(4096, leases=1)
    q.put_many([1, 2])
    _, lease = q.get_leased(timeout=0)
    with pytest.raises(LeaseTableFullError):
        q.get_leased(timeout=0)
    assert q.qsize() == 1
    lease.ack()
    assert q.get_leased(timeout=0)[0] == 2


def test_killed_holder_item_delivered_again_exactly_once_at_the_front(make: Any) -> None:
    q = make(4096)
    q.put_many(["a", "b", "c"])
    ready = multiprocessing.get_context("fork").Event()
    with processes("fork", _lease_and_hold, [(q.name, 1, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        assert q.qsize() == 2
        kill_and_reap(p)
    with pytest.warns(HolderDiedWarning, match="delivered again"):
        item, lease = q.get_leased(timeout=1)
    assert item == "a"
    lease.ack()
    assert q.reclaim_leases() == 0
    assert [q.get_nowait(), q.get_nowait()] == ["b", "c"]
    assert q.empty()


def test_join_counts_a_redelivered_item_as_unfinished(make: Any) -> None:
    q = make(4096)
    q.put("a")
    ready = multiprocessing.get_context("fork").Event()
    with processes("fork", _lease_and_hold, [(q.name, 1, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        kill_and_reap(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HolderDiedWarning)
        assert q.join(timeout=0.3) is False  # the item is back in the queue, unfinished
    assert q.unfinished_tasks == 1 and q.qsize() == 1
    _, lease = q.get_leased(timeout=1)
    lease.ack()
    q.task_done()
    assert q.join(timeout=1)


@pytest.mark.slow
def test_many_kills_every_item_acked(make: Any) -> None:
    n = 200
    q = make(1 << 14, leases=16)
    ctx = multiprocessing.get_context("fork")
    acked = ctx.Array("i", n)
    q.put_many(range(n))
    deadline = time.monotonic() + 40
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HolderDiedWarning)
        while q.qsize() or q.reclaim_leases() or q.unfinished_tasks:
            assert time.monotonic() < deadline
            ready = ctx.Event()
            with processes("fork", _lease_and_ack, [(q.name, acked, ready)]) as (p,):
                assert ready.wait(JOIN_TIMEOUT)
                time.sleep(0.05)
                # under the array's lock: never between an ack and its record
                with acked.get_lock():
                    kill_and_reap(p)
            q.join(timeout=0.01)
    assert all(c == 1 for c in acked), [i for i, c in enumerate(acked) if c != 1]


def test_several_redelivered_keep_their_order(make: Any) -> None:
    q = make(4096)
    q.put_many(["a", "b", "c", "d"])
    # Leases long enough that none runs out while the next is taken (a loaded machine).
    leases = [q.get_leased(timeout=0, lease=0.5)[1] for _ in range(3)]
    time.sleep(0.6)
    assert q.reclaim_leases() == 3
    assert q.get_many(10) == ["a", "b", "c", "d"]
    for lease in leases:
        with pytest.raises(LeaseExpiredError):
            lease.ack()


def test_mixed_implementations_redelivery(make: Any) -> None:
    """A subprocess of the other implementation leases an item and is killed: this
    process gets it again first; then a plain get there sees a released item first."""
    import os
    import subprocess
    import sys

    from ._impls import env_for, other

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    q = make(4096)
    q.put_many(["a", "b", "c"])
    code = (
        "import sys, time\n"
        "from safeshm._queue import SafeQueue\n"
        f"q = SafeQueue.attach({q.name!r})\n"
        "if sys.argv[1] == 'lease':\n"
        "    print(q.get_leased(timeout=10)[0], flush=True)\n"
        "    time.sleep(60)\n"
        "else:\n"
        "    print(q.get(timeout=10), flush=True)\n"
    )
    env = {**env_for(other()), "PYTHONPATH": src}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "lease"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "a"
    finally:
        proc.kill()
        proc.wait(JOIN_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()
    with pytest.warns(HolderDiedWarning):
        item, lease = q.get_leased(timeout=1)
    assert item == "a"
    lease.release()  # back at the front, for a plain get of the other implementation
    out = subprocess.run(
        [sys.executable, "-c", code, "get"],
        env=env,
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT,
        check=True,
    )
    assert out.stdout.strip() == "a"
    assert [q.get_nowait(), q.get_nowait()] == ["b", "c"]


# -- a model-based state machine ----------------------------------------------------------------
class LeaseMachine(RuleBasedStateMachine):
    """Leases against a deque: acked items never come back, released and expired ones come
    back at the front (oldest first), a late ack changes nothing; plain puts and gets also
    from a handle in a server process (the other side of the ring protocol)."""

    remote: Remote | None = None

    def __init__(self) -> None:
        super().__init__()
        self.q: SafeQueue[int] | None = None
        self.model: collections.deque[int] = collections.deque()
        self.out: dict[int, tuple[int, Lease]] = {}  # lease id -> (item, handle)
        self.expired: list[int] = []  # lease ids whose lease ran out (not yet put back)
        self.ended: list[Lease] = []
        self.n = 0

    @initialize()
    def create(self) -> None:
        self.q = SafeQueue.create(4096, leases=8, lease_size=64)
        assert self.remote is not None
        self.remote.attach("SafeQueue", self.q.name)

    def _put_back_expired(self) -> None:
        for lid in sorted(self.expired, reverse=True):
            item, handle = self.out.pop(lid)
            self.model.appendleft(item)
            self.ended.append(handle)
        self.expired.clear()

    @precondition(lambda self: len(self.model) < 20)
    @rule(remote=st.booleans())
    def put(self, remote: bool) -> None:
        assert self.q is not None and self.remote is not None
        if remote:
            self.remote.call(self.q.name, "put_nowait", self.n)
        else:
            self.q.put_nowait(self.n)
        self.model.append(self.n)
        self.n += 1

    @rule(remote=st.booleans())
    def get(self, remote: bool) -> None:
        assert self.q is not None and self.remote is not None
        if not self.model:
            with pytest.raises(queue.Empty):
                self.q.get_nowait()
            return
        got = self.remote.call(self.q.name, "get_nowait") if remote else self.q.get_nowait()
        assert got == self.model.popleft()

    @precondition(lambda self: len(self.out) < 8)
    @rule(short=st.booleans())
    def get_leased(self, short: bool) -> None:
        assert self.q is not None
        self._put_back_expired()
        if not self.model:
            with pytest.raises(queue.Empty):
                self.q.get_leased(timeout=0)
            return
        item, handle = self.q.get_leased(timeout=0, lease=0.001 if short else 60)
        assert item == self.model.popleft()
        self.out[handle._id] = (item, handle)
        if short:
            time.sleep(0.002)
            self.expired.append(handle._id)

    @precondition(lambda self: len(self.out) > len(self.expired))
    @rule(data=st.data(), release=st.booleans())
    def end(self, data: st.DataObject, release: bool) -> None:
        live = sorted(set(self.out) - set(self.expired))
        lid = data.draw(st.sampled_from(live))
        item, handle = self.out.pop(lid)
        if release:
            handle.release()  # puts back the expired ones too: oldest lease in front
            self.out[lid] = (item, handle)
            self.expired.append(lid)
            self._put_back_expired()
        else:
            handle.ack()
            self.ended.append(handle)

    @precondition(lambda self: self.ended)
    @rule(data=st.data())
    def late_ack(self, data: st.DataObject) -> None:
        assert self.q is not None
        handle = data.draw(st.sampled_from(self.ended))
        before = bytes(self.q._state)
        with pytest.raises(LeaseExpiredError):
            handle.ack()
        assert bytes(self.q._state) == before

    @rule()
    def reclaim(self) -> None:
        assert self.q is not None
        assert self.q.reclaim_leases() == len(self.expired)
        self._put_back_expired()

    @invariant()
    def agree(self) -> None:
        if self.q is not None:
            assert self.q.qsize() == len(self.model)

    def teardown(self) -> None:
        if self.q is not None:
            assert self.remote is not None
            self.remote.detach(self.q.name)
            self.q.close()
            self.q.unlink()


def test_state_machine(remote: Remote) -> None:
    LeaseMachine.remote = remote
    try:
        LeaseMachine.TestCase.settings = settings(stateful_step_count=30, max_examples=40)
        LeaseMachine.TestCase().runTest()
    finally:
        LeaseMachine.remote = None


def test_a_dead_holders_redelivered_item_is_one_task_not_two(make: Any) -> None:
    """The item goes back in the queue (a task as any queued item): the dead holder's count
    of it must go, or unfinished_tasks counted it twice and an extra task_done() passed
    (found by a review)."""
    q = make(4096)
    q.put("job")
    ready = multiprocessing.get_context("fork").Event()
    with processes("fork", _lease_and_hold, [(q.name, 1, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        kill_and_reap(p)
    with pytest.warns(HolderDiedWarning, match="delivered again") as caught:
        assert q.reclaim_leases() == 1
    assert caught[0].filename == __file__  # the user's call, not a line inside safeshm
    assert q.unfinished_tasks == 1
    item, lease = q.get_leased(timeout=1)
    assert item == "job"
    lease.ack()
    q.task_done()
    assert q.unfinished_tasks == 0
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "died with 1 unfinished task" for a delivered item
        assert q.join(timeout=PROMPT)
