"""SafeQueue at-least-once consumption: get_leased()/Lease.ack()/leased(); an item whose
holder dies (or whose lease expires) before the ack is delivered again, at the front."""

from __future__ import annotations

import multiprocessing
import queue
import time
import warnings
from typing import Any

import pytest

from safeshm._errors import HolderDiedWarning
from safeshm._queue import LeaseExpiredError, LeaseTableFullError, SafeQueue

from ._helpers import JOIN_TIMEOUT, kill_and_reap, processes


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
    lease.ack()
    assert q.get_nowait() == "b"
    assert q.reclaim_leases() == 0
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(LeaseExpiredError):
        lease.ack()  # twice: nothing changes


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
    leases = [q.get_leased(timeout=0, lease=0.05)[1] for _ in range(3)]
    time.sleep(0.1)
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
