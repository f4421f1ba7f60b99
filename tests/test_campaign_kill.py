"""The adversarial kill campaign, bounded: hundreds of SIGKILLs at random instants of
workers using each structure, then exact accounting.

Each worker logs, before and after every operation, what it is doing (see
``tests/_campaign.py``), so after the campaign the checker knows which operations were
acknowledged and which one, at most, each killed worker had in flight. It then demands:
counters equal the acknowledged adds plus some subset of the in-flight ones; queue items
are neither duplicated nor torn nor lost -- the only items missing are exactly those a
consumer killed between taking them and recording them took, counted in bytes from the
queue's head word -- and arrive in FIFO order per producer, a put_many all or nothing; a
lock is never held by two at once and every dead holder found is reported with a
HolderDiedWarning; an array has no torn element, a death inside locked() always sets
``partial_update_suspected``, and a partial bulk write is never seen unreported. And
afterwards the structure still works (bounded waits) and nothing is left in /dev/shm.

Kill counts (150-360 per test) keep each test within about 10-30 s on a loaded 2-CPU
machine; each prints its figures (run with ``-s``). ``SAFESHM_CAMPAIGN_SEED`` replays
the kill instants (the scheduling, of course, differs).
"""

from __future__ import annotations

import os
import queue
import random
import re
import warnings
from collections import Counter as Multiset
from typing import Any

import pytest

import safeshm
from safeshm import _compat

from . import _campaign as cp
from ._helpers import PROMPT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("SAFESHM_CAMPAIGN_SEED", random.randrange(1 << 30)))
    print(f"\nSAFESHM_CAMPAIGN_SEED={s}")
    return s


def _no_violations(log: Any, out: cp.Outcome) -> None:
    bad = cp.violations(log, out)
    assert not bad, f"workers saw broken invariants: {bad}"


def _report(what: str, out: cp.Outcome, roles: list[cp.Role], **figures: Any) -> None:
    extra = ", ".join(f"{k}={v}" for k, v in figures.items())
    spawned = sum(d.killed and roles[d.role].method == "spawn" for d in out.deaths)
    print(
        f"{what}: {out.kills} kills ({len(out.killed_in_flight())} with an operation in "
        f"flight, {spawned} of spawned workers), {len(out.incarnations)} workers, "
        f"{out.seconds:.1f} s; {extra}"
    )


# -- counters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["atomic", "locked"])
def test_safecounter_survives_kills(
    impl: str, seed: int, unique: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four adders (three forked, one spawned: the start methods meet on one counter) are
    killed in turn; every 20 kills all stop, and the value must be exactly the
    acknowledged adds plus a subset of the adds in flight in the workers killed since the
    last checkpoint. ``locked``: the robust-lock implementation, killed holding its lock."""
    if impl == "locked":
        monkeypatch.setattr(_compat, "compare_exchange", None)
    elif _compat.compare_exchange is None:  # pragma: no cover
        pytest.skip("libatomic not available")
    name = unique()
    counter = safeshm.SafeCounter.create(1000, name=name)
    monkeypatch.undo()  # children attach and follow the implementation the segment records
    try:
        log = cp.new_log(500)
        role = ("SafeCounter", name)
        roles = [cp.Role(cp.counter_worker, role) for _ in range(3)]
        roles.append(cp.Role(cp.counter_worker, role, method="spawn", every=3))
        check = cp.CounterChecker(counter, 1000, log)
        out = cp.run_campaign(
            log,
            roles,
            kills=200,
            seed=seed,
            max_delay=0.02,
            checkpoint_every=20,
            on_checkpoint=check,
        )
        _no_violations(log, out)
        check(out)
        _report(
            f"SafeCounter ({impl})",
            out,
            roles,
            acknowledged_adds=sum(log[cp.slot(i, cp.DONE)] for i in out.incarnations),
            checkpoints=check.checkpoints,
            in_flight_adds=check.in_flight,
        )
        # Still works, in both directions, with nobody else around.
        before = counter.value
        assert counter.add(-5) == before - 5
        assert counter.compare_and_set(before - 5, 7)
        assert counter.value == 7
    finally:
        counter.close()
        counter.unlink()
    assert not cp.shm_files([name])


@pytest.mark.parametrize("slots", [4, 1], ids=["slot-reuse", "slots-exhausted"])
def test_shardedcounter_survives_kills(slots: int, seed: int, unique: Any) -> None:
    """Three adders killed in turn on a counter with few slots: each replacement claims a
    dead worker's slot (``slot-reuse``: hundreds of workers through 4 slots), or, with one
    slot, the others fall back to the locked shared word and are killed holding its lock
    (``slots-exhausted``). The value is checked every 20 kills as for SafeCounter."""
    name = unique()
    counter = safeshm.ShardedCounter.create(1000, name=name, slots=slots)
    try:
        log = cp.new_log(500)
        roles = [cp.Role(cp.counter_worker, ("ShardedCounter", name)) for _ in range(3)]
        check = cp.CounterChecker(counter, 1000, log)
        out = cp.run_campaign(
            log,
            roles,
            kills=300,
            seed=seed,
            max_delay=0.02,
            checkpoint_every=20,
            on_checkpoint=check,
        )
        _no_violations(log, out)
        check(out)
        stats = counter.statistics()
        fallbacks = sum(log[cp.slot(i, cp.OTHER_WARNINGS)] for i in out.incarnations)
        _report(
            f"ShardedCounter (slots={slots})",
            out,
            roles,
            acknowledged_adds=sum(log[cp.slot(i, cp.DONE)] for i in out.incarnations),
            checkpoints=check.checkpoints,
            in_flight_adds=check.in_flight,
            slots_ever_used=stats.slots_ever_used,
            workers_warned_slots_full=fallbacks,
        )
        assert stats.slots_ever_used <= slots
        # Killed workers' slots are free for the taking, stopped ones released theirs.
        assert stats.slots_in_use == 0, stats
        if slots == 1:
            # The fallback was exercised: some workers found the only slot taken.
            assert fallbacks > 0
        else:
            assert fallbacks == 0  # 3 live workers never exhaust 4 slots if dead ones are reused
        before = counter.value
        counter.add(5)
        assert counter.exchange(0) == before + 5
        assert counter.value == 0
    finally:
        counter.close()
        counter.unlink()
    assert not cp.shm_files([name])


# -- SafeArray --------------------------------------------------------------------------------
def test_safearray_survives_kills(seed: int, unique: Any) -> None:
    """Two element adders (with snapshots) on one array and a bulk writer (fill, slice
    assignment, element stores inside locked()) on another, killed in turn. After each
    death of the bulk writer: no element is torn; a non-uniform snapshot comes with
    ``partial_update_suspected``; a death inside locked() sets it and the next snapshot
    is told (HolderDiedWarning, once per death); it is never set without a death that
    could have left a partial write. At the end
    every element add is accounted for."""
    acc_name, pat_name = unique(), unique()
    acc = safeshm.SafeArray.create("q", cp.ACC_LEN, name=acc_name)
    pat = safeshm.SafeArray.create("q", cp.PAT_LEN, name=pat_name)
    log = cp.new_log(500)
    figures = {"bulk_deaths": 0, "partial_flagged": 0, "inside_locked": 0, "non_uniform": 0}
    pending = False  # a bulk writer died in flight and no bulk write has completed since

    def check_pattern(death: cp.Death) -> None:
        nonlocal pending
        if death.role != 2:
            return
        figures["bulk_deaths"] += 1
        pending = death.in_flight or (pending and death.done == 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            snap = pat.to_list()
            flag = pat.partial_update_suspected
        warned = any(issubclass(w.category, safeshm.HolderDiedWarning) for w in caught)
        for v in snap:
            decoded = cp.unpattern(v)
            assert v == 0 or decoded is not None, f"torn element {v:#x} in {snap}"
            if decoded is not None:
                inc, k = decoded
                assert out.incarnations.get(inc) == 2 and k < log[cp.slot(inc, cp.STARTED)], (
                    f"element {v:#x} was never written"
                )
        if len(set(snap)) > 1:
            figures["non_uniform"] += 1
            assert flag, "a partial bulk write went unreported"
        if log[cp.slot(death.inc, cp.INSIDE)]:
            # It died holding every stripe: this snapshot is the first to lock after it,
            # so it recovers them and is told (once per death, not at every snapshot).
            figures["inside_locked"] += 1
            assert flag, "killed inside locked(), yet partial_update_suspected is not set"
            assert warned, "killed inside locked(), yet the next to_list() did not warn"
        if flag:
            figures["partial_flagged"] += 1
            assert pending, "partial_update_suspected with no interrupted bulk write"

    out = cp.Outcome()  # filled as the campaign goes: the checker needs each writer's role
    try:
        roles = [
            cp.Role(cp.array_adder_worker, (acc_name,)),
            cp.Role(cp.array_adder_worker, (acc_name,)),
            cp.Role(cp.array_bulk_worker, (pat_name,)),
        ]
        out = cp.run_campaign(
            log, roles, kills=360, seed=seed, max_delay=0.02, on_death=check_pattern, out=out
        )
        _no_violations(log, out)
        # Element adds: each element is its acknowledged adds plus some in-flight ones.
        acked = [0] * cp.ACC_LEN
        in_flight: list[list[int]] = [[] for _ in range(cp.ACC_LEN)]
        adds = 0
        for inc, role in out.incarnations.items():
            if role == 2:
                continue
            for k in range(log[cp.slot(inc, cp.DONE)]):
                if k % 8 != 7:
                    acked[(inc * 5 + k) % cp.ACC_LEN] += cp.element_delta(inc, k)
                    adds += 1
        for d in out.killed_in_flight():
            if d.role != 2 and d.done % 8 != 7:
                in_flight[(d.inc * 5 + d.done) % cp.ACC_LEN].append(cp.element_delta(d.inc, d.done))
        final = acc.to_list()
        for i in range(cp.ACC_LEN):
            assert cp.subset_sum_reachable(final[i] - acked[i], in_flight[i]), (
                f"element {i}: {final[i]} = acknowledged {acked[i]} + "
                f"{final[i] - acked[i]}, no subset of in-flight {in_flight[i]}"
            )
        _report("SafeArray", out, roles, element_adds=adds, **figures)
        assert figures["partial_flagged"] > 0, "no bulk write was ever interrupted: kill more"
        # Still works: a completed bulk write clears the flag.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", safeshm.HolderDiedWarning)
            pat.fill(3)
        assert not pat.partial_update_suspected
        assert pat.to_list() == [3] * cp.PAT_LEN
        assert acc.add(0, 1) == final[0] + 1
    finally:
        for a in (acc, pat):
            a.close()
            a.unlink()
    assert not cp.shm_files([acc_name, pat_name])


# -- SafeQueue --------------------------------------------------------------------------------
def _producer_accounting(
    log: Any, out: cp.Outcome, taken: Multiset[int], raw: bool
) -> tuple[int, int, int, list[int]]:
    """(acknowledged puts, in-flight put items, bytes of committed items nobody recorded,
    bytes of each in-flight put of which nothing arrived); fails on a never-put item."""
    acked = in_flight_puts = 0
    missing_bytes = 0  # of items known to have been committed, yet recorded by nobody
    absent_batches: list[int] = []  # bytes of in-flight puts of which nothing arrived
    for inc, role in out.incarnations.items():
        if role == 2:
            continue
        a, end = log[cp.slot(inc, cp.Q_ACKED)], log[cp.slot(inc, cp.Q_END)]
        acked += a
        missing_bytes += sum(
            cp.q_record_size(cp.q_tag(inc, s), raw)
            for s in range(a)
            if cp.q_tag(inc, s) not in taken
        )
        # An in-flight put or put_many commits all of its items or none: if any of
        # them arrived, the others were committed too.
        absent = [s for s in range(a, end) if cp.q_tag(inc, s) not in taken]
        size = sum(cp.q_record_size(cp.q_tag(inc, s), raw) for s in absent)
        in_flight_puts += end - a
        if len(absent) < end - a:
            missing_bytes += size
        elif absent:
            absent_batches.append(size)
        never = [t & 0xFFFFFFFF for t in taken if t >> 32 == inc and t & 0xFFFFFFFF >= end]
        assert not never, f"items producer {inc} never put: {never[:5]}"
    return acked, in_flight_puts, missing_bytes, absent_batches


def _drain(q: Any, raw: bool, consumer_pids: set[int]) -> list[int]:
    """The tags of the items left in ``q``. This process's first get may free the records
    of dead consumers: each HolderDiedWarning it gives must name one of ``consumer_pids``
    (all dead by now), and must be the only kind of warning."""
    drained: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            tag = cp.q_untag(item, raw)
            assert tag is not None, f"torn item {item!r}"
            drained.append(tag)
    for w in caught:
        assert issubclass(w.category, safeshm.HolderDiedWarning), w
        m = re.search(r"consumer process (\d+) died", str(w.message))
        assert m is not None and int(m.group(1)) in consumer_pids, (
            f"{w.message} (consumers: {sorted(consumer_pids)})"
        )
    return drained


@pytest.mark.parametrize("raw", [False, True], ids=["pickled", "raw"])
def test_safequeue_survives_kills(raw: bool, seed: int, unique: Any) -> None:
    """Two producers (put, put_many) and one consumer at a time (get, get_many) on a small
    ring, killed in turn. Every item is tagged (producer, seq): no duplicate, no torn or
    never-put item, FIFO per producer, a put_many all or nothing, and no item lost except
    by a consumer killed between taking it and recording it -- counted exactly: with one
    consumer alive at a time, the head word read at each consumer's death says how many
    bytes it took, and what it recorded must account for all of them unless it died in
    flight; the bytes of the items missing must then be exactly those bytes."""
    name = unique()
    # One consumer record: each consumer's first get frees its killed predecessor's record
    # (telling of its unfinished tasks), and so does the final drain.
    q: Any = safeshm.SafeQueue.create(4096, name=name, raw=raw, processes=1)
    log = cp.new_log(1200)
    items = cp.new_items_log(1200)
    heads: dict[int, tuple[int, int]] = {}  # consumer inc -> head word at its start, death
    head = 0

    def note_head(death: cp.Death) -> None:
        nonlocal head
        if death.role == 2:  # no consumer is alive now: the head word is still
            now = cp.q_head(q)
            heads[death.inc] = (head, now)
            head = now

    try:
        roles = [
            cp.Role(cp.queue_producer_worker, (name, raw)),
            cp.Role(cp.queue_producer_worker, (name, raw)),
            cp.Role(cp.queue_consumer_worker, (name, raw, items), may_finish=True),
        ]
        out = cp.run_campaign(log, roles, kills=300, seed=seed, max_delay=0.02, on_death=note_head)
        _no_violations(log, out)
        for inc, role in out.survivors:
            if role == 2:
                note_head(cp.Death(inc, role, 0, 0, killed=False))
        drained = _drain(
            q, raw, {log[cp.slot(i, cp.PID)] for i, r in out.incarnations.items() if r == 2}
        )
        assert cp.q_head(q) - head == sum(cp.q_record_size(t, raw) for t in drained)
        sequences = []
        lost_bytes = 0
        for inc, role in sorted(out.incarnations.items()):
            if role != 2:
                continue
            base = inc * cp.REGION
            got = list(items[base : base + log[cp.slot(inc, cp.Q_COUNT)]])
            sequences.append(got)
            start, end = heads[inc]
            lost = end - start - sum(cp.q_record_size(t, raw) for t in got if t >= 0)
            in_flight = log[cp.slot(inc, cp.STARTED)] > log[cp.slot(inc, cp.DONE)]
            assert lost >= 0 and (lost == 0 or in_flight), (
                f"consumer {inc} took {end - start} bytes of items but recorded "
                f"{end - start - lost} (in flight when killed: {in_flight})"
            )
            lost_bytes += lost
        sequences.append(drained)
        taken = Multiset(t for s in sequences for t in s)
        dups = [t for t, n in taken.items() if n > 1]
        assert not dups, f"items delivered twice: {[(t >> 32, t & 0xFFFFFFFF) for t in dups]}"
        # FIFO per producer over the whole run: one consumer at a time, each started after
        # the one before died, then the final drain -- this is the order of the gets.
        last: dict[int, int] = {}
        for t in (t for s in sequences for t in s):
            p, sq = t >> 32, t & 0xFFFFFFFF
            assert sq > last.get(p, -1), f"producer {p}: seq {sq} after {last[p]}"
            last[p] = sq
        acked, in_flight_puts, missing_bytes, absent_batches = _producer_accounting(
            log, out, taken, raw
        )
        foreign = [t for t in taken if out.incarnations.get(t >> 32, 2) == 2]
        assert not foreign, f"items no producer made: {foreign[:5]}"
        _report(
            f"SafeQueue ({'raw' if raw else 'pickled'})",
            out,
            roles,
            items_checked=sum(taken.values()),
            acknowledged_puts=acked,
            in_flight_put_items=in_flight_puts,
            bytes_taken_unrecorded=lost_bytes,
            bytes_committed_missing=missing_bytes,
        )
        # The items missing are exactly what killed consumers took and did not record
        # (plus, perhaps, whole in-flight puts that they took entirely).
        assert cp.subset_sum_reachable(lost_bytes - missing_bytes, absent_batches), (
            f"{missing_bytes} bytes of committed items missing, but consumers killed "
            f"mid-get took {lost_bytes} bytes unrecorded"
        )
        # Still works, and is empty and consistent.
        stats = q.statistics()
        assert stats.items == 0 and stats.bytes_used == 0, stats
        q.put_many([b"a", b"b"] if raw else ["a", "b"], timeout=PROMPT)
        assert q.get_many(5, timeout=PROMPT) == ([b"a", b"b"] if raw else ["a", "b"])
    finally:
        q.close()
        q.unlink()
    assert not cp.shm_files([name])


# -- SafeLock ---------------------------------------------------------------------------------
def test_safelock_survives_kills(seed: int, unique: Any) -> None:
    """Four workers (three forked, one spawned) take the lock in turn and check inside that
    they are alone; they are killed in turn, often holding it. Mutual exclusion is never
    violated, every acquirer that finds a dead holder's half-done critical section got a
    HolderDiedWarning, recoveries only follow deaths, and the lock still works."""
    name = unique()
    lock = safeshm.SafeLock.create(name=name)
    log = cp.new_log(500)
    try:
        roles = [cp.Role(cp.lock_worker, (name,)) for _ in range(3)]
        roles.append(cp.Role(cp.lock_worker, (name,), method="spawn", every=3))
        out = cp.run_campaign(log, roles, kills=200, seed=seed, max_delay=0.02)
        _no_violations(log, out)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert lock.acquire(timeout=PROMPT), "the lock is stuck after the campaign"
        try:
            final_warned = sum(issubclass(w.category, safeshm.HolderDiedWarning) for w in caught)
            assert log[cp.EXCL] == 0 or final_warned, "a dead holder went unreported"
        finally:
            lock.release()
        incs = list(out.incarnations)
        warned = final_warned + sum(log[cp.slot(i, cp.HOLDER_WARNINGS)] for i in incs)
        found_dead = sum(log[cp.slot(i, cp.FOUND_DEAD)] for i in incs)
        states = Multiset(log[cp.slot(d.inc, cp.STATE)] for d in out.deaths if d.killed)
        could_hold = states[cp.ACQUIRING] + states[cp.HELD] + states[cp.RELEASING]
        recoveries = lock.statistics().recoveries
        _report(
            "SafeLock",
            out,
            roles,
            critical_sections=sum(log[cp.slot(i, cp.DONE)] for i in incs),
            killed_holding=states[cp.HELD],
            killed_acquiring=states[cp.ACQUIRING],
            killed_releasing=states[cp.RELEASING],
            recoveries=recoveries,
            warnings=warned,
            found_dead_holder_inside=found_dead,
        )
        assert found_dead <= warned <= recoveries <= could_hold
        assert states[cp.HELD] > 0, "no worker was killed holding the lock: kill more"
        # Each death holding the lock is recovered by the next acquirer -- unless that one
        # is killed in turn before counting it, while still in ACQUIRING.
        assert recoveries + states[cp.ACQUIRING] >= states[cp.HELD]
        assert not lock.locked()
        with lock.acquired(timeout=PROMPT):
            assert lock.locked()
    finally:
        lock.close()
        lock.unlink()
    assert not cp.shm_files([name])
