"""safeshm.ratelimit: the ``shm://`` storage of ``limits`` and its RateLimitTable.

The storage must behave as ``limits``' own ``MemoryStorage`` does (the same scenarios run
against both, and a differential test drives both with one fake clock), hold limits
exactly across processes, stay consistent when a process is SIGKILLed in the middle of an
operation, and refuse -- never corrupt, never grow -- when its fixed capacity is full.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("limits")

from limits import RateLimitItemPerMinute, RateLimitItemPerSecond, parse
from limits.storage import MemoryStorage, storage_from_string
from limits.storage.base import TimestampedSlidingWindow
from limits.strategies import STRATEGIES

import safeshm
from safeshm.ratelimit import (
    AsyncSharedMemoryStorage,
    RateLimitTable,
    RateLimitTableFullError,
    SharedMemoryStorage,
    _table,
)

STRATEGY_NAMES = sorted(STRATEGIES)
JOIN_TIMEOUT = 30.0


@contextlib.contextmanager
def shm_storage(name: str, query: str = "") -> Iterator[SharedMemoryStorage]:
    storage = storage_from_string(f"shm://{name}{query}")
    assert isinstance(storage, SharedMemoryStorage)
    try:
        yield storage
        storage.table.check_consistency()
    finally:
        storage.close()
        with contextlib.suppress(FileNotFoundError):
            _unlink(name)


def _unlink(name: str) -> None:
    t = RateLimitTable.attach(name)
    t.close()
    t.unlink()


@pytest.fixture(params=["memory", "shm"])
def storage(request: pytest.FixtureRequest, name: str) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStorage()
    else:
        with shm_storage(name) as s:
            yield s


# -- the URI, registration, options -----------------------------------------------------------
def test_scheme_registered_and_options(name: str) -> None:
    with shm_storage(name, "?keys=100&key_bytes=60&entries=500") as s:
        assert s.table.capacity == (100, 64, 500)
        assert s.check()
        # A second storage on the same name shares the table; consistent options are fine,
        # conflicting ones are refused.
        again = storage_from_string(f"shm://{name}", entries=500)
        assert isinstance(again, SharedMemoryStorage)
        s.incr("k", 60)
        assert again.get("k") == 1
        again.close()
        with pytest.raises(safeshm.IncompatibleSegmentError, match="keys=100, not 7"):
            storage_from_string(f"shm://{name}?keys=7")
    for bad in ("shm://", f"shm://{name}?shards=3", f"shm://{name}?keys=many"):
        with pytest.raises(ValueError, match=r"shm://|option|not an int"):
            storage_from_string(bad)
    aio = storage_from_string(f"async+shm://{name}?keys=3")
    assert isinstance(aio, AsyncSharedMemoryStorage)
    aio.close()
    _unlink(name)


@pytest.mark.parametrize(
    "uri",
    [
        "shm://NAME/anything",
        "shm://NAME/",
        "shm:///NAME",
        "shm://NAME#fragment",
        "shm://NAME?keys=",
        "shm://NAME?keys=1&keys=2",
        "shm://NAME?lock_timeout=1&lock_timeout=2",
        "shm://NAME?keys=4&",
        "shm://NAME?&keys=4",
        "shm://NAME?keys",
        "shm://%20",
        "shm:// ",
        "shm://NAME?lock_timeout=-1",
        "shm://NAME?lock_timeout=soon",
        "shm://user@NAME",
        "shm://NAME:80",
        "shm://NAME?keys=1_000",
        "shm://NAME?keys=%2B16",
        "shm://NAME?keys=%2016",
        "shm://NAME?keys=0x10",
        "shm://NAME?keys=-5",
        "shm://NAME?lock_timeout=1e400",
        "shm://NAME?lock_timeout=inf",
        "shm://NAME?lock_timeout=nan",
    ],
)
def test_bad_uris_refused_and_nothing_created(name: str, uri: str) -> None:
    with pytest.raises(ValueError, match=r"shm://|option|lock_timeout|name") as info:
        storage_from_string(uri.replace("NAME", name))
    assert isinstance(info.value, ValueError)
    with pytest.raises(safeshm.SegmentNotFoundError):
        RateLimitTable.attach(name)


@pytest.mark.parametrize(
    "options",
    [
        {"lock_timout": 1},  # a typo in flask-limiter's storage_options
        {"bogus": 1},
        {"keys": True},
        {"keys": 16.7},
        {"keys": "1_000"},
        {"entries": " 16"},
        {"lock_timeout": math.inf},
        {"lock_timeout": 1e400},
        {"lock_timeout": -1},
        {"lock_timeout": math.nan},
        {"lock_timeout": True},
    ],
)
def test_bad_keyword_options_refused_and_nothing_created(
    name: str, options: dict[str, Any]
) -> None:
    with pytest.raises((ValueError, TypeError), match=r"shm://|option|lock_timeout"):
        storage_from_string(f"shm://{name}", **options)
    with pytest.raises(safeshm.SegmentNotFoundError):
        RateLimitTable.attach(name)


def test_good_keyword_options(name: str) -> None:
    s = storage_from_string(f"shm://{name}", keys="16", entries=32, lock_timeout=0)
    assert isinstance(s, SharedMemoryStorage)
    assert s.table.capacity[0] == 16 and s.table.capacity[2] == 32
    assert s.table.lock_timeout == 0  # 0: try the lock once
    s.close()
    s = storage_from_string(f"shm://{name}?lock_timeout=none")
    assert isinstance(s, SharedMemoryStorage)
    assert s.table.lock_timeout is None
    s.close()
    _unlink(name)


def test_import_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['limits'] = None\n"
        "import safeshm.ratelimit\n"
        "with safeshm.ratelimit.RateLimitTable.create() as t:\n    assert t.incr('k', 9) == 1\n"
        "try:\n    from safeshm.ratelimit import SharedMemoryStorage\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert "safeshm[limits]" in out.stdout


def test_long_keys_are_stored_by_digest(name: str) -> None:
    """Keys beyond key_bytes are accepted as memory:// and redis:// accept them: stored
    by a digest that no literal key can equal, each long key still its own."""
    with shm_storage(name, "?key_bytes=16") as s:
        long1, long2 = "k" * 17, "k" * 16 + "j"
        assert s.incr("k" * 16, 60) == 1
        assert s.incr(long1, 60) == 1
        assert s.incr(long1, 60, 2) == 3
        assert s.incr(long2, 60) == 1
        assert s.get(long1) == 3 and s.get(long2) == 1 and s.get("k" * 16) == 1
        assert s.acquire_entry("é" * 9, 10, 60)  # 18 bytes
        assert s.get_moving_window("é" * 9, 10, 60)[1] == 1
        # the sliding window's real keys ("KEY/<window number>") are what must fit
        assert s.acquire_sliding_window_entry("x" * 10, 5, 60)
        assert s.acquire_sliding_window_entry("y" * 40, 1, 60)
        assert not s.acquire_sliding_window_entry("y" * 40, 1, 60)
        assert s.get_sliding_window("x" * 10, 60)[2] == 1
        assert s.table.statistics().live_keys == 6
        s.clear(long1)
        assert s.get(long1) == 0 and s.get(long2) == 1
        # a literal key with a digest's bytes is another key (a digest is not UTF-8)
        stored = s.table._encode(long2)[0]
        assert stored != long2.encode() and len(stored) <= 16
        assert stored[:1] == b"\xff"  # a byte no UTF-8 text (surrogates included) has


def test_sliding_window_keys_match_limits() -> None:
    for at in (0.5, 1738576292.6631825, 17e8 + 0.999):
        for expiry in (1, 60, 3600):
            assert RateLimitTable.sliding_window_keys(
                "k", expiry, at
            ) == TimestampedSlidingWindow.sliding_window_keys("k", expiry, at)


# -- limits' own scenarios, against MemoryStorage and shm:// ------------------------------------
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_hit_test_stats_clear(storage: Any, strategy: str) -> None:
    limiter = STRATEGIES[strategy](storage)
    item = RateLimitItemPerMinute(5)
    assert limiter.test(item, "a")
    assert limiter.get_window_stats(item, "a").remaining == 5
    assert [limiter.hit(item, "a") for _ in range(7)] == [True] * 5 + [False] * 2
    assert not limiter.test(item, "a")
    stats = limiter.get_window_stats(item, "a")
    assert stats.remaining == 0
    assert time.time() < stats.reset_time <= time.time() + 120
    assert limiter.hit(item, "b")  # another identifier, its own window
    limiter.clear(item, "a")
    assert limiter.test(item, "a")
    assert limiter.get_window_stats(item, "a").remaining == 5
    assert limiter.hit(item, "a", cost=5)
    assert not limiter.hit(item, "a")
    assert not limiter.hit(RateLimitItemPerMinute(2), "c", cost=3)  # cost > limit


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_amounts(storage: Any, strategy: str) -> None:
    limiter = STRATEGIES[strategy](storage)
    item = RateLimitItemPerMinute(10)
    assert limiter.hit(item, "k", cost=3)
    assert limiter.hit(item, "k", cost=4)
    assert limiter.test(item, "k", cost=3)
    assert not limiter.test(item, "k", cost=4)
    assert limiter.get_window_stats(item, "k").remaining == 3
    assert not limiter.hit(item, "k", cost=4)
    if strategy == "fixed-window":  # limits counts refused hits in a fixed window
        assert not limiter.hit(item, "k", cost=3)
    else:
        assert limiter.hit(item, "k", cost=3)
        assert not limiter.hit(item, "k")


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_expiry_with_a_real_clock(storage: Any, strategy: str) -> None:
    limiter = STRATEGIES[strategy](storage)
    item = RateLimitItemPerSecond(2)
    assert limiter.hit(item, "e") and limiter.hit(item, "e")
    assert not limiter.hit(item, "e")
    # Fixed/moving windows free up after 1 s; the sliding counter weighs the previous
    # second, so it may take up to 2 s to be back to the full limit.
    deadline = time.monotonic() + 3.5
    while not limiter.test(item, "e", cost=2):
        assert time.monotonic() < deadline, "the limit never expired"
        time.sleep(0.05)
    assert limiter.hit(item, "e", cost=2)
    assert not limiter.hit(item, "e")


def test_fixed_window_storage_calls(storage: Any) -> None:
    assert storage.get("k") == 0
    before = time.time()
    assert storage.incr("k", 30) == 1
    assert storage.incr("k", 30, amount=4) == 5
    assert before + 30 <= storage.get_expiry("k") <= time.time() + 30
    assert storage.get("k") == 5
    assert storage.decr("k", 2) == 3
    assert storage.decr("k", 10) == 0
    storage.clear("k")
    assert storage.get("k") == 0
    assert storage.incr("k", 30) == 1
    assert storage.acquire_entry("m", 3, 30)
    start, count = storage.get_moving_window("m", 3, 30)
    assert count == 1 and before <= start <= time.time()
    assert storage.reset() == 1  # MemoryStorage: max(counters, windows)
    assert storage.get("k") == 0
    assert storage.get_moving_window("m", 3, 30)[1] == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.25

    def __call__(self) -> float:
        return self.now


@given(
    strategy=st.sampled_from(STRATEGY_NAMES),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["hit", "test", "stats", "clear", "wait"]),
            st.sampled_from(["a", "b"]),
            st.integers(1, 4),
            st.sampled_from([0.05, 0.3, 0.7, 1.0, 2.5]),
        ),
        max_size=40,
    ),
)
def test_same_answers_as_memory_storage(strategy: str, steps: list[Any]) -> None:
    """Differential: one fake clock, the same calls, the same answers as MemoryStorage."""
    clock = FakeClock()
    real_time = time.time
    time.time = clock  # limits, MemoryStorage and the table all call time.time()
    name = f"d{os.getpid()}-{threading.get_ident() % 10000}"
    memory = MemoryStorage()
    try:
        with shm_storage(name, "?keys=8&entries=64") as shm:
            limiters = [STRATEGIES[strategy](memory), STRATEGIES[strategy](shm)]
            item = parse("5/2 seconds")
            for op, who, cost, wait in steps:
                if op == "wait":
                    clock.now += wait
                    continue
                answers = []
                for lim in limiters:
                    if op == "hit":
                        answers.append(lim.hit(item, who, cost=cost))
                    elif op == "test":
                        answers.append(lim.test(item, who, cost=cost))
                    elif op == "stats":
                        # The reset time of an empty window depends on when MemoryStorage's
                        # timer thread last ran: compare it only while something is held.
                        s = lim.get_window_stats(item, who)
                        answers.append((s.remaining, s.reset_time if s.remaining < 5 else 0))
                    else:
                        answers.append(lim.clear(item, who))
                assert answers[0] == answers[1], (op, who, cost, answers)
    finally:
        time.time = real_time
        memory.timer.cancel()


def test_clock_stepped_back_does_not_revive_an_expired_counter(
    storage: Any, monkeypatch: Any
) -> None:
    """As memory:// forgets a counter seen expired, so does shm://: a clock stepped back
    (NTP) afterwards does not bring the old count back."""
    clock = FakeClock()
    monkeypatch.setattr(time, "time", clock)
    storage.incr("k", 1, 5)
    clock.now += 2
    assert storage.get("k") == 0
    clock.now -= 1.5
    assert storage.get("k") == 0
    assert storage.incr("k", 1) == 1


# -- capacity: reuse of expired keys, typed errors when truly full --------------------------
def test_full_table_refuses_then_reuses_expired_keys(name: str, monkeypatch: Any) -> None:
    clock = FakeClock()
    monkeypatch.setattr(time, "time", clock)
    with shm_storage(name, "?keys=4&entries=16") as s:
        keys = [f"k{i}" for i in range(8)]  # room for at least 4, at most 2 x 4
        for k in keys:
            s.incr(k, 10)
        with pytest.raises(RateLimitTableFullError, match="keys="):
            s.incr("e", 10)
        assert s.get("e") == 0 and s.get("k0") == 1  # nothing changed
        assert s.table.statistics().full_errors == 1
        clock.now += 10.5
        s.incr("e", 10)  # an expired key's slot is reused
        assert s.get("e") == 1 and s.get("k0") == 0
        assert s.table.statistics().slots_ever_used == 8


def _unkeyed_home(key: str, nslots: int) -> int:
    """Where the table placed a key before its hash was keyed (crc32, a public hash)."""
    h = zlib.crc32(key.encode()) + 1
    return ((h * 0x9E3779B97F4A7C15) >> 17) % nslots


def test_keys_crafted_for_one_home_are_all_accepted(name: str) -> None:
    """Slot placement is keyed by a random per-table seed: keys chosen offline to share a
    home (an attacker controls addresses, user names, paths) spread like random ones."""
    with shm_storage(name, "?keys=1024&entries=16") as s:
        nslots = 2 * 1024
        crafted = [k for k in (f"10.{i}" for i in range(150000)) if _unkeyed_home(k, nslots) < 8]
        crafted = crafted[:400]
        assert len(crafted) == 400
        for k in crafted:
            s.incr(k, 60)
        assert s.table.statistics().live_keys == 400
        assert s.table.statistics().full_errors == 0
        other = RateLimitTable.create(keys=1024)
        try:
            # Each table has its own seed; a handle attached later reads the same one.
            assert other._seed != s.table._seed and len(other._seed) == 16
            again = RateLimitTable.attach(name)
            assert again._seed == s.table._seed and again.get(crafted[0]) == 1
            again.close()
        finally:
            other.close()
            other.unlink()


def test_old_layout_refused(name: str, monkeypatch: Any) -> None:
    layout = RateLimitTable._LAYOUT
    assert layout >= 2
    monkeypatch.setattr(RateLimitTable, "_LAYOUT", 1)
    old = RateLimitTable.create(name=name, keys=4)
    monkeypatch.setattr(RateLimitTable, "_LAYOUT", layout)
    with pytest.raises(safeshm.IncompatibleSegmentError, match=rf"layout 1\b.*layout {layout}"):
        RateLimitTable.attach(name)
    with pytest.raises(safeshm.IncompatibleSegmentError):
        storage_from_string(f"shm://{name}")
    old.close()
    old.unlink()


def test_moving_window_arena_full_and_reclaimed(name: str, monkeypatch: Any) -> None:
    clock = FakeClock()
    monkeypatch.setattr(time, "time", clock)
    with shm_storage(name, "?keys=16&entries=16") as s:
        for _ in range(8):
            assert s.acquire_entry("a", 8, 10)  # rings of 1, 2, 4, then 8 pairs
        for _ in range(5):
            assert s.acquire_entry("b", 5, 20)  # 1, 2, 4, then 8: the other half
        with pytest.raises(RateLimitTableFullError, match="entries="):
            s.acquire_entry("c", 5, 20)  # needs one pair: the arena has none
        assert s.get_moving_window("c", 5, 20)[1] == 0  # nothing changed
        assert s.table.statistics().full_errors == 1
        assert not s.table.acquire_entry("a", 8, 10, 9)  # over the limit: refused, no error
        assert not s.acquire_entry("b", 5, 20)
        clock.now += 10.5  # "a"'s entries expire: its ring is reclaimed for "c"
        for _ in range(5):
            assert s.acquire_entry("c", 5, 20)
        assert s.get_moving_window("c", 5, 20)[1] == 5
        assert not s.acquire_entry("c", 5, 20)
        s.table.check_consistency()
        # A key whose limit grows keeps its entries and uses the room its ring has.
        assert s.acquire_entry("b", 6, 20)
        assert s.get_moving_window("b", 6, 20)[1] == 6
        assert not s.acquire_entry("b", 6, 20)


def test_moving_window_rings_hold_what_is_used(name: str, monkeypatch: Any) -> None:
    """A ring starts at one pair and doubles while its pairs are all in the window, up
    to the limit: capacity is what keys use, not what their limits would allow."""
    clock = FakeClock()
    monkeypatch.setattr(time, "time", clock)
    with shm_storage(name, "?keys=64&entries=512") as s:
        for i in range(64):  # "1000/hour" per client would have reserved 1024 pairs each
            assert s.acquire_entry(f"client-{i}", 1000, 3600)
        assert s.table.statistics().entries_reserved == 64
        for _ in range(100):
            clock.now += 0.001
            assert s.acquire_entry("client-0", 1000, 3600)
        assert s.get_moving_window("client-0", 1000, 3600)[1] == 101
        assert s.table.statistics().entries_reserved <= 64 + 254  # rings of 2 .. 128
        # A limit far beyond entries works while the acquisitions in its window fit.
        s.clear("client-1")
        assert s.acquire_entry("client-1", 10**6, 3600, 5)
        # A ring stops growing at the limit; it refuses beyond it as before.
        s.clear("client-2")
        for _ in range(5):
            assert s.acquire_entry("client-2", 5, 3600)
        assert not s.acquire_entry("client-2", 5, 3600)
        # Pairs that left the window are overwritten: a steady trickle keeps one pair.
        s.clear("client-3")
        assert s.acquire_entry("client-3", 1000, 1)
        before = s.table.statistics().entries_reserved
        for _ in range(10):
            clock.now += 1.5
            assert s.acquire_entry("client-3", 1000, 1)
        clock.now += 1.5
        assert s.table.statistics().entries_reserved == before
        assert s.get_moving_window("client-3", 1000, 1)[1] == 0


def test_expired_rings_merge_back(name: str, monkeypatch: Any) -> None:
    """Review R1b-1: freed blocks were never merged, so after 64 one-pair rings expired a
    new client's second hit was refused on an all but empty arena."""
    clock = FakeClock()
    monkeypatch.setattr(time, "time", clock)
    with shm_storage(name, "?keys=256&entries=64") as s:
        for i in range(64):
            assert s.acquire_entry(f"c{i}", 100, 10)
        with pytest.raises(RateLimitTableFullError):
            s.acquire_entry("new", 100, 10)
        clock.now += 60  # all expired
        for _ in range(64):  # the whole arena again, as one ring of 64
            assert s.acquire_entry("new", 64, 10)
        assert not s.acquire_entry("new", 64, 10)
        s.table.check_consistency()
        stats = s.table.statistics()
        assert (stats.entries_reserved, stats.full_errors) == (64, 1)


@pytest.mark.parametrize(("entries", "limit"), [(64, 64), (1024, 1024), (1024, 600), (1000, 300)])
def test_one_key_grows_to_the_largest_ring(
    name: str, monkeypatch: Any, entries: int, limit: int
) -> None:
    """Review R1b-1: a ring moved to a new block to double, so one key was refused at
    half the arena. A full ring whose buddy is free now doubles in place."""
    clock = FakeClock()
    monkeypatch.setattr(time, "time", clock)
    with shm_storage(name, f"?keys=16&entries={entries}") as s:
        for i in range(limit):
            clock.now += 0.001
            assert s.acquire_entry("one", limit, 3600), i
        assert not s.acquire_entry("one", limit, 3600)
        assert s.get_moving_window("one", limit, 3600) == (1_700_000_000.25 + 0.001, limit)
        s.table.check_consistency()
        assert s.table.statistics().full_errors == 0


def test_reset_frees_the_old_rings_when_room_is_needed(name: str) -> None:
    with shm_storage(name, "?keys=16&entries=128") as s:
        for _ in range(100):
            assert s.acquire_entry("a", 100, 60)
        s.reset()  # the generation moves on; "a"'s ring is freed when room is needed
        assert s.get_moving_window("a", 100, 60)[1] == 0
        for _ in range(128):  # needs the whole arena: "a"'s ring of 128 is freed first
            assert s.acquire_entry("b", 128, 60)
        s.table.check_consistency()
        assert s.table.statistics().entries_reserved == 128
        s.reset()
        s.clear("b")  # a key of an older generation: nothing to clear
        for _ in range(5):
            assert s.acquire_entry("b", 5, 60)
        s.table.check_consistency()


@settings(max_examples=200)  # about 250 refusals in all: each one checked
@given(rng=st.randoms(use_true_random=False))
def test_arena_refuses_only_when_no_block_fits(rng: random.Random) -> None:
    """Random moving-window traffic on a small arena: after every operation the arena is
    consistent (free blocks and rings tile it, buddies merged), and a hit is refused
    only when, after freeing what expired, every aligned block of the size the key's
    ring needs holds a live pair. (Steps come from a seeded generator, not a list
    strategy: hypothesis' short lists seldom filled the arena.)"""
    clock = FakeClock()
    saved = time.time
    time.time = clock  # (hypothesis: no function-scoped monkeypatch)
    table = RateLimitTable.create(keys=16, entries=12)
    try:
        for _ in range(150):
            op = rng.choice(["hit"] * 6 + ["clear", "wait", "wait", "reset"])
            k, amount = rng.randint(0, 5), rng.randint(1, 3)
            limit = rng.choice([1, 2, 3, 5, 8, 16, 40])
            key, expiry = f"k{k}", float(2 + k % 4 * 6)  # one expiry per key
            if op == "hit":
                try:
                    table.acquire_entry(key, limit, expiry, amount)
                except RateLimitTableFullError:
                    _assert_no_block_fits(table, key, limit, clock.now)
            elif op == "clear":
                table.clear(key)
            elif op == "reset":
                table.reset()
            else:
                clock.now += 0.3 * amount
            table.check_consistency()
    finally:
        time.time = saved
        table.unlink()


def _assert_no_block_fits(table: RateLimitTable, key: str, limit: int, now: float) -> None:
    """Every aligned block of the size ``key``'s next ring needs holds a live pair: no
    allocator could place it there (the buddy allocator's bound)."""
    t, q, d = _table, table._q, table._d
    w = table._find(*table._encode(key))
    cap = q[w + t._RCAP] if w >= 0 and q[w + t._RING] else 0
    assert cap < limit or cap == 0  # a ring at its limit never needs more room
    need = 1 if cap == 0 else 2 * cap
    live = []
    for s in range(table._nslots):
        v = table._slots_w + s * table._slot_words
        if q[v] and q[v + t._RING]:  # nothing expired is still held
            assert q[v + t._SGEN] == q[t._GEN] and d[v + t._REXP] > now
            live.append((q[v + t._RING] - 1, q[v + t._RCAP]))
    for at in range(0, table._entries - need + 1, need):
        assert any(at < b + n and b < at + need for b, n in live), (key, need, at, live)


@pytest.mark.parametrize("where", ["head", "next", "prev", "tag"])
def test_damaged_free_lists_raise_typed_errors_and_change_nothing(name: str, where: str) -> None:
    """A free list's link or a block tag overwritten (a stray write into the segment):
    the operation that follows it raises SegmentCorruptedError and rolls back, never an
    IndexError or a write through a bad link."""
    t = _table
    with shm_storage(name, "?keys=8&entries=64") as s:
        table = s.table
        q, b = table._q, table._b
        assert s.acquire_entry("a", 8, 60)  # block 0; free: 1, 2, 4, 8, 16 and 32
        assert s.acquire_entry("b", 8, 60)  # block 1
        assert q[t._FREE + 1] == 2 + 1  # the free block of 2 at 2, alone on its list
        word, byte = {
            "head": (t._FREE + 1, None),
            "next": (table._pair(2, 0), None),
            "prev": (table._pair(2, 0) + 1, None),
            "tag": (None, table._tags + 1),  # "b"'s ring tagged free: its pair read as links
        }[where]
        if word is not None:
            good = q[word]
            q[word] = {"head": 5 + 1, "next": 10**9, "prev": 7 + 1}[where]
        else:
            assert byte is not None
            b[byte] = 1
        op = (
            (lambda: s.clear("a"))  # merges with the "free" buddy at 1
            if where == "tag"
            else (lambda: s.acquire_entry("c", 8, 60))  # no block of 1 free: takes the 2
        )
        state = slice(table._slots_w * 8, None)  # slots, arena and tags
        control = slice(t._CONTROL * 8, t._JOURNAL * 8)
        before = bytes(b[control]), bytes(b[state])
        with pytest.raises(safeshm.SegmentCorruptedError, match="damaged"):
            op()
        assert (bytes(b[control]), bytes(b[state])) == before  # rolled back
        if word is not None:  # repaired: the table works on
            q[word] = good
        else:
            b[byte] = 0
        op()
        assert s.get_moving_window("b", 8, 60)[1] == 1


@pytest.mark.timeout(20)
@pytest.mark.parametrize("where", ["journal", "longest probe", "ring size", "ring block", "pairs"])
def test_damaged_control_and_slot_words_raise_typed_errors(name: str, where: str) -> None:
    """Review R1c: a damaged journal count looped under the lock (every process hung),
    a damaged longest-probe word made lookups loop, and damaged ring fields raised
    ZeroDivisionError or IndexError, which limits' wrapper and flask-limiter's fallback
    do not catch. Each is a SafeShmError now, raised before anything is written."""
    t = _table
    with shm_storage(name, "?keys=1&entries=64") as s:  # keys=1: two slots, both used
        table = s.table
        q = table._q
        assert s.acquire_entry("a", 100, 60)
        assert s.acquire_entry("a", 100, 60)
        assert s.acquire_entry("b", 100, 60)
        w = table._find(*table._encode("a"))
        word = {
            "journal": t._JCOUNT,
            "longest probe": t._MAXPROBE,
            "ring size": w + t._RCAP,
            "ring block": w + t._RING,
            "pairs": w + t._NP,
        }[where]
        good = q[word]
        if where == "journal":
            q[t._JOURNAL : t._JOURNAL + 2] = memoryview(struct.pack("=qq", 0, -2)).cast("q")
        q[word] = {"ring size": 0, "ring block": 1 << 40}.get(where, 1 << 60)
        key = "absent" if where == "longest probe" else "a"  # absent: a full probe
        with pytest.raises(safeshm.SafeShmError):
            s.acquire_entry(key, 100, 60)
        q[word] = 0 if where == "journal" else good  # repaired: the table works on
        assert s.acquire_entry("a", 100, 60)
        assert s.get_moving_window("a", 100, 60)[1] == 3


def test_refused_hits_do_not_rescan_a_full_table(name: str, monkeypatch: Any) -> None:
    """When every key and every ring is live, refused hits are refused at once: the
    table is scanned for expired ones again only once something may have expired."""
    clock = FakeClock()
    monkeypatch.setattr(time, "time", clock)
    with shm_storage(name, "?keys=32&entries=8") as s:
        for i in range(8):
            assert s.acquire_entry(f"m{i}", 5, 10)  # 8 rings of one pair: the arena is full
        for i in range(8, 64):
            s.incr(f"f{i}", 20)  # every slot (2 x keys) is live
        reclaims: list[float] = []
        visits = [0]
        real_reclaim, real_dead = RateLimitTable._reclaim_rings, RateLimitTable._dead

        def reclaim(self: RateLimitTable, now: float) -> None:
            reclaims.append(now)
            real_reclaim(self, now)

        def dead(self: RateLimitTable, w: int, now: float) -> bool:
            visits[0] += 1
            return real_dead(self, w, now)

        monkeypatch.setattr(RateLimitTable, "_reclaim_rings", reclaim)
        monkeypatch.setattr(RateLimitTable, "_dead", dead)
        for _ in range(50):
            clock.now += 0.1
            with pytest.raises(RateLimitTableFullError, match="entries="):
                s.acquire_entry("m0", 5, 10)  # its ring must double: no room
            with pytest.raises(RateLimitTableFullError, match="keys="):
                s.incr("new", 20)  # no slot
        assert len(reclaims) <= 1, len(reclaims)
        assert visits[0] <= 64, visits[0]
        clock.now += 5.1  # the moving windows (and so their keys) have expired
        assert s.acquire_entry("m0", 5, 10)
        assert s.incr("new", 20) == 1
        assert s.table.statistics().full_errors == 100


def test_full_table_hints_follow_changes(name: str, monkeypatch: Any) -> None:
    """What frees room after a full scan (a clear, a counter taken to zero, a window with a
    shorter expiry) is used at once: the "nothing expires before" notes stay true."""
    clock = FakeClock()
    monkeypatch.setattr(time, "time", clock)
    with shm_storage(name, "?keys=16&entries=8") as s:
        for i in range(8):
            assert s.acquire_entry(f"m{i}", 5, 100)  # the arena is full until +100 s
        for i in range(8, 32):
            s.incr(f"f{i}", 100)  # so is every slot
        with pytest.raises(RateLimitTableFullError, match="entries="):
            s.acquire_entry("m0", 5, 100)
        with pytest.raises(RateLimitTableFullError, match="keys="):
            s.incr("new", 100)
        s.clear("f8")
        assert s.incr("new", 100) == 1  # the cleared key's slot
        s.decr("f9", 1)
        assert s.incr("new2", 100) == 1  # a counter at zero holds nothing
        s.clear("m1")
        assert s.acquire_entry("f10", 5, 1)  # m1's ring, for a window of one second
        assert s.incr("new3", 100) == 1  # m1's slot
        with pytest.raises(RateLimitTableFullError, match="keys="):
            s.incr("new4", 100)
        clock.now += 2  # f10's window has expired: its ring is reclaimed
        assert s.acquire_entry("f11", 5, 100)
        s.clear("f12")
        assert s.incr("f12", 1) == 1  # a one-second window
        with pytest.raises(RateLimitTableFullError, match="keys="):
            s.incr("new4", 100)
        clock.now += 2
        assert s.incr("new4", 100) == 1  # in f12's slot
        s.reset()
        assert s.incr("new5", 100) == 1


def test_many_keys_churn(name: str, monkeypatch: Any) -> None:
    """Keys come and go far beyond the capacity: expired ones are reused, lookups stay
    exact, the probe length stays bounded."""
    clock = FakeClock()
    monkeypatch.setattr(time, "time", clock)
    with shm_storage(name, "?keys=64&entries=512") as s:
        for rnd in range(20):
            keys = [f"LIMITER/10.0.{rnd}.{i}/route/3/1/second" for i in range(40)]
            for k in keys:
                assert s.incr(k, 1) == 1
                assert s.acquire_entry(k, 3, 1)
            for k in keys:
                assert s.get(k) == 1
                assert s.get_moving_window(k, 3, 1)[1] == 1
            clock.now += 1.01
        st_ = s.table.statistics()
        assert st_.slots_ever_used <= 128
        assert st_.longest_probe < 128


# -- crash safety ------------------------------------------------------------------------------
def _words(table: RateLimitTable) -> bytes:
    """The state: control words, slots, the rings they use, the free lists' links and the
    block tags (not the header, the mutex block, which counts recoveries, the journal's
    scratch space or the contents of free arena blocks)."""
    t, q, b = _table, table._q, table._b
    out = [
        bytes(b[t._CONTROL * 8 : t._JOURNAL * 8]),
        bytes(b[table._slots_w * 8 : table._arena_w * 8]),
        bytes(b[table._tags : table._tags + table._entries]),
    ]
    for s in range(table._nslots):
        w = table._slots_w + s * table._slot_words
        if q[w] and q[w + t._RING]:  # older generations' rings too: held until freed
            p = table._pair(q[w + t._RING] - 1, 0)
            out.append(bytes(b[p * 8 : (p + 2 * q[w + t._RCAP]) * 8]))
    for c in range(t._NCLASSES):
        head = q[t._FREE + c]
        while head:
            p = table._pair(head - 1, 0)
            out.append(bytes(b[p * 8 : (p + 2) * 8]))
            head = q[p]
    return b"".join(out)


def _ops(s: SharedMemoryStorage) -> list[Callable[[], Any]]:
    return [
        lambda: s.incr("fresh", 60, 2),
        lambda: s.incr("old", 60),
        lambda: s.acquire_entry("mw", 4, 60, 2),  # 1 pair to 2, in place (buddy free)
        lambda: s.acquire_entry("full", 2, 60),  # overwrites its oldest pair
        lambda: s.acquire_entry("grow", 9, 60),  # 2 pairs to 4, in place (buddy free)
        # 4 pairs to 8 in a block split from a free one (its buddy is "g"'s ring): the
        # copy overwrites the free block's links
        lambda: s.acquire_entry("moves", 8, 60),
        lambda: s.acquire_entry("g", 8, 60),  # in place: its buddy was "moves"' ring
        lambda: s.acquire_sliding_window_entry("sw", 10, 60, 3),
        lambda: s.clear("mw"),
        lambda: s.clear("grow"),
        lambda: s.clear("full"),  # its block merges with "mw"'s, then with "grow"'s
        lambda: s.reset(),
        lambda: s.acquire_entry("after", 64, 60, 64),  # a hit after a reset
    ]


def test_sigkill_at_every_store_rolls_back(name: str) -> None:
    """A child dies (SIGKILL) at each journal step of each operation in turn; the next
    locker finds the table exactly as it was before that operation."""
    with shm_storage(name, "?keys=8&entries=64") as s:
        s.incr("old", 60)
        s.acquire_entry("mw", 4, 60)
        s.acquire_entry("full", 2, 60)
        s.acquire_entry("full", 2, 60)
        s.acquire_entry("grow", 4, 60)
        s.acquire_entry("grow", 4, 60)
        for _ in range(8):
            s.acquire_entry("spare", 8, 60)
        s.clear("spare")  # its ring of 8 goes on a free list
        for _ in range(4):
            s.acquire_entry("g", 4, 60)  # a full ring of 4, all in the window
        for _ in range(4):
            s.acquire_entry("moves", 8, 60)  # a full ring of 4, "g"'s buddy
        time.sleep(0.001)
        ops = _ops(s)
        real_save = RateLimitTable._save
        for index in range(len(ops)):
            for step in range(1, 1000):
                before = _words(s.table)
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child
                    calls = 0

                    def dying_save(self: RateLimitTable, w: int, n: int) -> None:
                        nonlocal calls
                        calls += 1
                        real_save(self, w, n)
                        if calls == step:  # noqa: B023 - the child runs one step
                            # Some of the change made, the rest not: die holding the lock.
                            self._q[w : w + n] = memoryview(b"\xa5" * 8 * n).cast("q")
                            os.kill(os.getpid(), signal.SIGKILL)

                    RateLimitTable._save = dying_save  # type: ignore[method-assign]
                    ops[index]()
                    os._exit(0)
                _, status = os.waitpid(pid, 0)
                s.table.check_consistency()  # takes the lock: rolls back if needed
                if os.WIFEXITED(status):  # the operation had fewer steps: it completed
                    assert os.WEXITSTATUS(status) == 0
                    break
                assert os.WTERMSIG(status) == signal.SIGKILL
                assert _words(s.table) == before, (index, step)
            else:
                pytest.fail(f"operation {index} has more steps than the test tries")
            ops[index]()  # now for real, so that the next operation starts from its effect
        assert s.table.statistics().recoveries > 10


def test_exception_mid_operation_rolls_back(name: str, monkeypatch: Any) -> None:
    with shm_storage(name, "?keys=8&entries=64") as s:
        s.acquire_entry("full", 2, 60)
        s.acquire_entry("full", 2, 60)
        before = _words(s.table)
        real = RateLimitTable._free_ring

        def boom(self: RateLimitTable, block: int, cap: int) -> None:
            real(self, block, cap)
            raise KeyboardInterrupt

        monkeypatch.setattr(RateLimitTable, "_free_ring", boom)
        with pytest.raises(KeyboardInterrupt):
            s.clear("full")
        assert _words(s.table) == before
        monkeypatch.undo()
        assert s.get_moving_window("full", 2, 60)[1] == 2


@contextlib.contextmanager
def _stopped_lock_holder(name: str) -> Iterator[int]:
    """A child process that holds ``name``'s table lock, SIGSTOPped (as by a debugger or
    a cgroup freezer); continued and reaped at the end."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            t = RateLimitTable.attach(name)
            t._mutex.acquire()
            os.write(w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        os.close(w)
        ready, _, _ = select.select([r], [], [], JOIN_TIMEOUT)
        assert ready and os.read(r, 1) == b"x", "the child did not take the lock"
        os.kill(pid, signal.SIGSTOP)
        yield pid
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGCONT)
        os.waitpid(pid, 0)


def test_stopped_lock_holder_times_out(name: str) -> None:
    """A process frozen while holding the table's lock must not block the others
    forever: each operation waits ``lock_timeout`` seconds, then raises a typed error
    that is in the storage's ``base_exceptions``."""
    import limits.errors

    with shm_storage(name, "?keys=8&lock_timeout=0.25") as s:
        s.incr("k", 60)
        assert s.table.lock_timeout == 0.25
        wrapped = storage_from_string(f"shm://{name}", wrap_exceptions=True, lock_timeout=0.1)
        outcome: list[BaseException | float] = []

        def probe() -> None:
            t0 = time.monotonic()
            try:
                s.incr("k", 60)
            except BaseException as e:  # noqa: BLE001 - reported to the test
                outcome.append(e)
            outcome.append(time.monotonic() - t0)

        with _stopped_lock_holder(name):
            thread = threading.Thread(target=probe, daemon=True)
            thread.start()
            thread.join(JOIN_TIMEOUT)
            assert not thread.is_alive(), "a hit waited forever for a stopped lock holder"
            err, waited = outcome
            assert isinstance(err, safeshm.LockTimeoutError), err
            assert isinstance(err, s.base_exceptions) and isinstance(err, TimeoutError)
            assert 0.2 <= waited < 0.25 + 5  # type: ignore[operator]
            with pytest.raises(limits.errors.StorageError):
                wrapped.acquire_entry("k", 3, 60)
        wrapped.close()
        assert s.incr("k", 60) == 2  # the holder died: recovered, nothing lost


def _hammer(name: str, done: Any, slot: int, ready: Any) -> None:
    s = storage_from_string(f"shm://{name}")
    ready.set()
    while True:
        s.incr("fixed", 3600)
        s.acquire_entry("moving", 1 << 16, 3600)
        done[slot] += 1  # this worker's own word: no lock a SIGKILL could leave held


def test_sigkill_workers_hammering(name: str) -> None:
    """SIGKILL workers at random points while they hit: the table stays consistent and
    holds each completed hit, plus at most the one in flight in each killed worker."""
    ctx = multiprocessing.get_context("fork")
    done = ctx.RawArray("q", 64)
    with shm_storage(name, "?keys=8&entries=65536") as s:
        killed = 0
        for rnd in range(6):
            ready = [ctx.Event(), ctx.Event()]
            procs = [
                ctx.Process(target=_hammer, args=(name, done, killed + i, ready[i]))
                for i in range(2)
            ]
            for p in procs:
                p.start()
            for r in ready:
                assert r.wait(JOIN_TIMEOUT)
            time.sleep(0.02 + rnd * 0.013)
            for p in procs:
                os.kill(p.pid, signal.SIGKILL)
            for p in procs:
                p.join(JOIN_TIMEOUT)
                assert p.exitcode == -signal.SIGKILL
                killed += 1
            s.table.check_consistency()
            completed = sum(done)
            fixed = s.get("fixed")
            moving = s.get_moving_window("moving", 1 << 16, 3600)[1]
            # per worker: at most one of incr/acquire_entry done but not yet counted
            assert completed <= fixed <= completed + killed
            assert completed <= moving <= completed + killed
            assert moving <= fixed <= moving + killed
        assert 100 < sum(done) < 60000  # (the moving window holds 65536)
        assert s.table.statistics().recoveries >= 1  # some kills landed inside the lock


# -- exact across processes and threads ---------------------------------------------------------
PROCS, THREADS, ATTEMPTS, LIMIT = 4, 3, 1500, 9000


def _contender(name: str, strategy: str, barrier: Any, won: Any) -> None:
    s = storage_from_string(f"shm://{name}")
    limiter = STRATEGIES[strategy](s)
    item = RateLimitItemPerMinute(LIMIT)
    mine = 0
    lock = threading.Lock()

    def run() -> None:
        nonlocal mine
        barrier.wait(JOIN_TIMEOUT)
        n = sum(limiter.hit(item, "shared") for _ in range(ATTEMPTS))
        with lock:
            mine += n

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    with won.get_lock():
        won.value += mine


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_exactly_limit_succeed_across_processes(name: str, strategy: str) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCS * THREADS)
    won = ctx.Value("q", 0)
    with shm_storage(name) as s:
        procs = [
            ctx.Process(target=_contender, args=(name, strategy, barrier, won))
            for _ in range(PROCS)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(JOIN_TIMEOUT)
        assert [p.exitcode for p in procs] == [0] * PROCS
        assert won.value == LIMIT  # of PROCS * THREADS * ATTEMPTS = 18000 attempts
        assert (
            STRATEGIES[strategy](s).get_window_stats(RateLimitItemPerMinute(LIMIT), "shared")[1]
            == 0
        )


def test_table_repr_and_statistics(name: str) -> None:
    with RateLimitTable.create(name=name, keys=4) as t:
        t.incr("a", 60)
        assert "live_keys=1" in repr(t)
        st_ = t.statistics()
        assert (st_.keys, st_.live_keys, st_.key_bytes) == (4, 1, 256)
        # pickles by reference
        import pickle

        again = pickle.loads(pickle.dumps(t))
        assert again.get("a") == 1
        again.close()
    with pytest.raises(ValueError, match="keys must be between"):
        RateLimitTable.create(keys=0)
    with pytest.raises(TypeError):
        RateLimitTable.create(keys=1.5)  # type: ignore[arg-type]
