"""The kill campaign's harness: workers that log what they do, and a killer that SIGKILLs them.

Every worker incarnation owns a few words of a shared log (a ``RawArray`` made before the
workers start, so it travels to ``fork`` and ``spawn`` children alike). Before each
operation a worker stores "started = k + 1" and after it returns "done = k + 1", each one
aligned 8-byte store, so a SIGKILL leaves the log saying exactly which operations were
acknowledged (done) and which one, at most, was in flight (started > done). The checker
then knows what the structure must show: every acknowledged effect, plus at most the
in-flight ones.

Worker functions live at module level so that spawn-started children can import them.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import safeshm

from ._helpers import JOIN_TIMEOUT

# -- the log ----------------------------------------------------------------------------------
W = 16  # words per incarnation
PID, STARTED, DONE, HOLDER_WARNINGS, OTHER_WARNINGS, VIOLATION = range(6)
AUX = 6  # words AUX.. are the role's own (W - AUX of them)
STOP = 0  # global word 0 (incarnation 0 is never used): "finish the current op and exit"


def slot(inc: int, word: int) -> int:
    return inc * W + word


def mark_violation(log: Any, inc: int, code: int) -> None:
    """Record the first invariant a worker saw broken (the checker fails the test on it)."""
    if not log[slot(inc, VIOLATION)]:
        log[slot(inc, VIOLATION)] = code


def install_warning_log(log: Any, inc: int) -> list[int]:
    """Count warnings in the log the moment they are issued (inside the call that issues
    them), not after the call returns: a kill between the two would hide a report.

    The test session turns warnings into errors, and forked workers inherit that; here a
    warning is data to check, so it is logged instead. Returns a one-element list that the
    worker can watch for "a HolderDiedWarning was issued during this call".
    """
    seen = [0]

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, safeshm.HolderDiedWarning):
            log[slot(inc, HOLDER_WARNINGS)] += 1
            seen[0] += 1
        else:
            log[slot(inc, OTHER_WARNINGS)] += 1

    warnings.resetwarnings()
    warnings.simplefilter("always")
    warnings.showwarning = show
    return seen


def worker_prologue(log: Any, inc: int) -> list[int]:
    # Default SIGINT/SIGTERM handling: a worker is only ever stopped by the STOP word or
    # SIGKILL; pytest's handlers inherited through fork have no business here.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    seen = install_warning_log(log, inc)
    log[slot(inc, PID)] = os.getpid()
    return seen


# -- the killer -------------------------------------------------------------------------------
@dataclass
class Role:
    """One kind of worker: ``target(log, inc, *args)``, started with ``method``."""

    target: Callable[..., None]
    args: tuple[Any, ...]
    method: str = "fork"
    # A worker of this role may end by itself with exit code 0 (its log area is full);
    # it is then replaced like a killed one.
    may_finish: bool = False
    # Killed only on every n-th round: a spawned interpreter takes a second or more to
    # start on a loaded machine, and the campaign waits for it.
    every: int = 1


@dataclass
class Death:
    inc: int
    role: int
    started: int
    done: int
    killed: bool  # False: it finished by itself (a role with may_finish)

    @property
    def in_flight(self) -> bool:
        return self.started > self.done


@dataclass
class Outcome:
    deaths: list[Death] = field(default_factory=list)
    survivors: list[tuple[int, int]] = field(default_factory=list)  # (inc, role), stopped cleanly
    incarnations: dict[int, int] = field(default_factory=dict)  # inc -> role
    seconds: float = 0.0

    @property
    def kills(self) -> int:
        return sum(d.killed for d in self.deaths)

    def killed_in_flight(self, role: int | None = None) -> list[Death]:
        return [
            d for d in self.deaths if d.killed and d.in_flight and (role is None or d.role == role)
        ]


def new_log(incarnations: int) -> Any:
    # fork's context: a RawArray lives in an mmap'd arena that spawn children receive
    # by fd when it is passed as a Process argument, and fork children inherit.
    return multiprocessing.get_context("fork").RawArray("q", (incarnations + 1) * W)


def new_items_log(incarnations: int) -> Any:
    """Where queue consumers record the tags they took: REGION words per incarnation."""
    return multiprocessing.get_context("fork").RawArray("q", (incarnations + 1) * REGION)


def run_campaign(
    log: Any,
    roles: Sequence[Role],
    kills: int,
    seed: int,
    *,
    max_delay: float,
    on_death: Callable[[Death], None] | None = None,
    out: Outcome | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[Outcome], None] | None = None,
    time_limit: float = 240.0,
) -> Outcome:
    """Keep one worker per role running; SIGKILL them in turn at random instants after
    each has begun its operations, replacing each one killed, until ``kills`` kills.
    Then set STOP, let the live ones finish their operation and exit (bounded), and
    return what happened. ``on_death`` runs after each death is reaped, before the
    replacement starts (nothing of that role runs then); ``out``, if given, is filled
    as the campaign goes (its ``incarnations`` tell ``on_death`` who wrote what). Every
    ``checkpoint_every`` kills, every worker is stopped, ``on_checkpoint`` runs with
    nothing running, and fresh workers start.
    """
    rng = random.Random(seed)
    capacity = len(log) // W - 1
    out = Outcome() if out is None else out
    began = time.monotonic()
    limit = began + time_limit
    live: list[tuple[Any, int]] = []  # per role: (process, inc)
    next_inc = 1

    def start(role_index: int) -> tuple[Any, int]:
        nonlocal next_inc
        if next_inc > capacity:
            raise AssertionError(f"campaign log too small ({capacity} incarnations)")
        inc = next_inc
        next_inc += 1
        role = roles[role_index]
        ctx = multiprocessing.get_context(role.method)
        p = ctx.Process(target=role.target, args=(log, inc, *role.args), daemon=True)
        p.start()
        out.incarnations[inc] = role_index
        return p, inc

    def reap_all() -> None:
        for p, _ in live:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)

    try:
        for r in range(len(roles)):
            live.append(start(r))
        turn = 0
        while out.kills < kills:
            r = turn % len(roles)
            turn += 1
            if (turn // len(roles)) % roles[r].every:
                continue
            p, inc = live[r]
            # Wait (bounded) until it is inside its loop of operations: a kill during
            # interpreter start-up or attach tests nothing.
            while log[slot(inc, STARTED)] < 1 and p.is_alive():
                if time.monotonic() > limit:
                    raise AssertionError(
                        f"worker {inc} (role {r}) made no progress: deadlock? "
                        f"{out.kills} kills so far"
                    )
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, max_delay))
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=10)
            if p.is_alive():  # pragma: no cover
                raise AssertionError(f"process {p.pid} survived SIGKILL")
            killed = p.exitcode == -signal.SIGKILL
            if not killed and not (p.exitcode == 0 and roles[r].may_finish):
                raise AssertionError(
                    f"worker {inc} (role {r}: {roles[r].target.__name__}) failed by itself "
                    f"with exit code {p.exitcode}"
                )
            death = Death(inc, r, log[slot(inc, STARTED)], log[slot(inc, DONE)], killed)
            out.deaths.append(death)
            if on_death is not None:
                on_death(death)
            live[r] = start(r)
            if checkpoint_every and out.kills % checkpoint_every == 0 and out.kills < kills:
                _stop(log, live)
                out.deaths += [
                    Death(
                        inc,
                        out.incarnations[inc],
                        log[slot(inc, STARTED)],
                        log[slot(inc, DONE)],
                        killed=False,
                    )
                    for _, inc in live
                ]
                if on_checkpoint is not None:
                    on_checkpoint(out)
                log[STOP] = 0
                live[:] = [start(r) for r in range(len(roles))]
        _stop(log, live)
        out.survivors = [(inc, out.incarnations[inc]) for _, inc in live]
    finally:
        reap_all()
    out.seconds = time.monotonic() - began
    return out


def _stop(log: Any, live: list[tuple[Any, int]]) -> None:
    """Each live worker finishes its operation and exits; a hang here is a deadlock the
    kills left behind."""
    log[STOP] = 1
    deadline = time.monotonic() + JOIN_TIMEOUT
    for p, _ in live:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [inc for p, inc in live if p.is_alive()]
    if stuck:
        raise AssertionError(
            f"workers {stuck} did not stop within {JOIN_TIMEOUT} s after the campaign (deadlock?)"
        )
    bad = [(inc, p.exitcode) for p, inc in live if p.exitcode != 0]
    if bad:
        raise AssertionError(f"workers failed when stopped: {bad}")


def violations(log: Any, out: Outcome) -> dict[int, str]:
    """{inc: what} of every incarnation that logged a broken invariant."""
    return {
        inc: VIOLATIONS.get(log[slot(inc, VIOLATION)], str(log[slot(inc, VIOLATION)]))
        for inc in out.incarnations
        if log[slot(inc, VIOLATION)]
    }


def subset_sum_reachable(target: int, parts: Sequence[int]) -> bool:
    """Whether ``target`` is the sum of some subset of the non-negative ``parts`` (each
    in-flight operation took effect or did not). A bitset over the sums: parts are small."""
    if target < 0 or target > sum(parts):
        return False
    reach = 1
    mask = (1 << (target + 1)) - 1
    for p in parts:
        reach = (reach | (reach << p)) & mask
    return bool(reach >> target & 1)


def shm_files(names: Sequence[str]) -> list[str]:
    from safeshm import _compat

    return [
        n for n in names if os.path.exists(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + n))
    ]


# -- SafeCounter / ShardedCounter ----------------------------------------------------------
_P: Final = 1_048_573  # a prime just under 2**20


def add_delta(inc: int, k: int) -> int:
    """The k-th add of incarnation ``inc``: positive, so "at most the in-flight ones" is a
    subset sum the checker can decide, and spread over 2**20 values, so that the subset
    sums of a checkpoint's dozen or so in-flight adds are sparse: an in-flight add applied
    twice, or half, lands on a value no subset makes."""
    return 1 + (inc * 7919 + k * 104729) % _P


def _floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum((a * i + b) // m for i in range(n)), in O(log m) steps."""
    total = 0
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y = a * n + b
        if y < m:
            return total
        n, b = divmod(y, m)
        m, a = a, m


def add_deltas_sum(inc: int, n: int) -> int:
    """sum(add_delta(inc, k) for k in range(n)), in closed form (millions of adds)."""
    c, b = inc * 7919, 104729
    return n + n * c + b * n * (n - 1) // 2 - _P * _floor_sum(n, _P, b, c)


def counter_worker(log: Any, inc: int, cls_name: str, name: str) -> None:
    """add() (and, on a SafeCounter, compare_and_set() loops) until STOP."""
    worker_prologue(log, inc)
    counter = getattr(safeshm, cls_name).attach(name)
    cas = cls_name == "SafeCounter"
    k = 0
    while not log[STOP]:
        d = add_delta(inc, k)
        log[slot(inc, STARTED)] = k + 1
        if cas and k % 3 == 2:
            while True:  # the classic lock-free read-modify-write
                cur = counter.value
                if counter.compare_and_set(cur, cur + d):
                    break
        else:
            counter.add(d)
        log[slot(inc, DONE)] = k + 1
        k += 1
    counter.close()


class CounterChecker:
    """At each checkpoint (every worker stopped) and at the end: the value is the initial
    one plus every acknowledged add plus, since the last checkpoint, a subset of the adds
    the workers killed meanwhile had in flight (earlier ones were settled then)."""

    def __init__(self, counter: Any, initial: int, log: Any) -> None:
        self.counter, self.initial, self.log = counter, initial, log
        self.settled = 0  # in-flight adds found applied at earlier checkpoints
        self.seen = 0  # deaths already settled
        self.in_flight = 0
        self.checkpoints = 0

    def __call__(self, out: Outcome) -> None:
        log = self.log
        acked = sum(add_deltas_sum(inc, log[slot(inc, DONE)]) for inc in out.incarnations)
        extra = self.counter.value - self.initial - acked - self.settled
        parts = [
            add_delta(d.inc, d.done) for d in out.deaths[self.seen :] if d.killed and d.in_flight
        ]
        if not subset_sum_reachable(extra, parts):
            raise AssertionError(
                f"checkpoint {self.checkpoints}: the value is the acknowledged adds "
                f"+ {extra}, which no subset of the {len(parts)} adds in flight when their "
                f"workers were killed makes: {parts}"
            )
        self.settled += extra
        self.seen = len(out.deaths)
        self.in_flight += len(parts)
        self.checkpoints += 1


def element_delta(inc: int, k: int) -> int:
    """An element add: small (elements see a few in-flight adds each)."""
    return 1 + (inc * 7919 + k * 104729) % 997


# -- SafeArray --------------------------------------------------------------------------------
ACC_LEN = 12  # element adds
PAT_LEN = 1024  # bulk writes of one pattern value to every element
INSIDE = AUX  # the bulk writer is inside locked(), between its first and last store
V_TORN_SNAPSHOT = 1


def pattern(inc: int, k: int) -> int:
    """A value no torn store can forge: incarnation, op number and a check byte."""
    return (inc << 40) | ((k & 0xFFFFFFFF) << 8) | ((inc * 31 + k * 7 + 1) & 0xFF)


def unpattern(v: int) -> tuple[int, int] | None:
    inc, k = v >> 40, (v >> 8) & 0xFFFFFFFF
    return (inc, k) if v > 0 and v == pattern(inc, k) else None


def array_adder_worker(log: Any, inc: int, name: str) -> None:
    """Element adds into ``acc``, with a consistent snapshot (every stripe) now and then."""
    worker_prologue(log, inc)
    acc = safeshm.SafeArray.attach(name, "q")
    k = 0
    while not log[STOP]:
        log[slot(inc, STARTED)] = k + 1
        if k % 8 == 7:
            acc.to_list()
        else:
            acc.add((inc * 5 + k) % ACC_LEN, element_delta(inc, k))
        log[slot(inc, DONE)] = k + 1
        k += 1
    acc.close()


def array_bulk_worker(log: Any, inc: int, name: str) -> None:
    """Bulk writes of one pattern value to every element of ``pat``: fill(), a slice
    assignment, or element by element inside locked(); each preceded by a snapshot that
    must be uniform unless this very call was told of a dead bulk writer, or the array
    still says it may hold a partial update (HolderDiedWarning comes once per death; the
    flag stays until a bulk write completes, and only this worker writes in bulk)."""
    seen = worker_prologue(log, inc)
    pat = safeshm.SafeArray.attach(name, "q")
    n = len(pat)
    k = 0
    while not log[STOP]:
        v = pattern(inc, k)
        log[slot(inc, STARTED)] = k + 1
        before = seen[0]
        snap = pat.to_list()
        if len(set(snap)) > 1 and seen[0] == before and not pat.partial_update_suspected:
            mark_violation(log, inc, V_TORN_SNAPSHOT)
        how = k % 3
        if how == 0:
            pat.fill(v)
        elif how == 1:
            pat[:] = [v] * n
        else:
            with pat.locked() as view:
                log[slot(inc, INSIDE)] = 1
                for j in range(n):
                    view[j] = v
                log[slot(inc, INSIDE)] = 0
        log[slot(inc, DONE)] = k + 1
        k += 1
    pat.close()


# -- SafeQueue --------------------------------------------------------------------------------
Q_END = AUX  # producer: items with seq < this were handed to put (in flight or done)
Q_ACKED = AUX + 1  # producer: items with seq < this were acknowledged (put returned)
Q_MAX = AUX  # consumer: max_items of the current get
Q_COUNT = AUX + 1  # consumer: items recorded in its region of the item log
V_BAD_ITEM = 2
REGION = 2048  # items a consumer incarnation records before it retires


def q_tag(inc: int, seq: int) -> int:
    return inc << 32 | seq


def q_item(inc: int, seq: int, raw: bool) -> Any:
    """A tagged item of varying size (so the ring wraps at every offset)."""
    size = (inc * 7 + seq * 13) % 300
    tag = q_tag(inc, seq)
    if raw:
        head = tag.to_bytes(8, "little")
        return head + bytes([(tag + j) % 251 for j in range(size)]) + head
    return (inc, seq, b"x" * size)


def q_record_size(tag: int, raw: bool) -> int:
    """Bytes the item takes in the ring (header + payload, 8-aligned): the queue's head
    word advances by exactly this when the item is taken."""
    import pickle

    item = q_item(tag >> 32, tag & 0xFFFFFFFF, raw)
    n = len(item) if raw else len(pickle.dumps(item, pickle.HIGHEST_PROTOCOL))
    return (n + 15) & ~7


def q_head(q: Any) -> int:
    """The queue's head word: total bytes ever taken (white box: the commit word of every
    get, moved by a single store, so a reading is exact whenever no consumer is alive)."""
    from safeshm._queue import _HEAD

    return int(q._state[_HEAD])


def q_untag(item: Any, raw: bool) -> int | None:
    """The tag of a well-formed item; None for a torn or foreign one."""
    if raw:
        if not isinstance(item, bytes) or len(item) < 16:
            return None
        tag = int.from_bytes(item[:8], "little")
    else:
        if not (isinstance(item, tuple) and len(item) == 3):
            return None
        tag = q_tag(item[0], item[1])
    return tag if item == q_item(tag >> 32, tag & 0xFFFFFFFF, raw) else None


def _q_quick_tag(item: Any, raw: bool) -> int:
    try:
        return int.from_bytes(item[:8], "little") if raw else q_tag(item[0], item[1])
    except Exception:  # noqa: BLE001 - a malformed item: the full check marks it
        return -1


def queue_producer_worker(log: Any, inc: int, name: str, raw: bool) -> None:
    """put() and put_many() of tagged items, in seq order, until STOP."""
    import queue

    worker_prologue(log, inc)
    q = safeshm.SafeQueue.attach(name)
    seq = 0
    k = 0
    while not log[STOP]:
        b = 1 if k % 2 == 0 else 1 + (k // 2) % 5
        log[slot(inc, Q_END)] = seq + b
        log[slot(inc, STARTED)] = k + 1
        try:
            if b == 1:
                q.put(q_item(inc, seq, raw), timeout=0.1)
            else:
                q.put_many([q_item(inc, s, raw) for s in range(seq, seq + b)], timeout=0.1)
        except queue.Full:
            continue  # nothing was put: try the same items again (or stop)
        seq += b
        log[slot(inc, Q_ACKED)] = seq
        log[slot(inc, DONE)] = k + 1
        k += 1
    q.close()


def queue_consumer_worker(log: Any, inc: int, name: str, raw: bool, items: Any) -> None:
    """get() and get_many(), recording each item's tag in this incarnation's region of
    ``items`` before counting it; retires (exit 0) when the region is nearly full."""
    import queue

    worker_prologue(log, inc)
    q = safeshm.SafeQueue.attach(name)
    base = inc * REGION
    count = 0
    k = 0
    while not log[STOP] and count + 8 <= REGION:
        m = 1 if k % 2 == 0 else 1 + (k // 2) % 5
        log[slot(inc, Q_MAX)] = m
        log[slot(inc, STARTED)] = k + 1
        try:
            got = [q.get(timeout=0.1)] if m == 1 else q.get_many(m, timeout=0.1)
        except queue.Empty:
            got = []
        # Record at once (the window in which a kill loses items taken is the budget the
        # checker allows); check the items in full only after, outside that window.
        for j, item in enumerate(got):
            items[base + count + j] = _q_quick_tag(item, raw)
        count += len(got)
        log[slot(inc, Q_COUNT)] = count
        log[slot(inc, DONE)] = k + 1
        k += 1
        for item in got:
            if q_untag(item, raw) is None:
                mark_violation(log, inc, V_BAD_ITEM)
    q.close()


# -- SafeLock ---------------------------------------------------------------------------------
EXCL = 1  # global word 1: +1 on entering the critical section, -1 on leaving
STATE = AUX
FOUND_DEAD = AUX + 1  # times this worker found a dead holder's +1 in EXCL
IDLE, ACQUIRING, HELD, RELEASING = range(4)
V_NOT_EXCLUSIVE, V_UNREPORTED_DEATH, V_TIMEOUT, V_BAD_WORD = 3, 4, 5, 6
VIOLATIONS = {
    V_TORN_SNAPSHOT: "a non-uniform snapshot of a bulk-written array without a "
    "HolderDiedWarning or partial_update_suspected",
    V_BAD_ITEM: "a torn or malformed queue item",
    V_NOT_EXCLUSIVE: "two holders inside the lock's critical section at once",
    V_UNREPORTED_DEATH: "a dead holder's half-done critical section found without a "
    "HolderDiedWarning",
    V_TIMEOUT: f"SafeLock.acquire timed out after {JOIN_TIMEOUT} s",
    V_BAD_WORD: "the exclusion word was neither 0 nor 1 after a recovery",
}


def lock_worker(log: Any, inc: int, name: str) -> None:
    """acquire()/release() and ``with lock:`` around a critical section that checks it is
    alone there, until STOP."""
    seen = worker_prologue(log, inc)
    lock = safeshm.SafeLock.attach(name)
    k = 0
    while not log[STOP]:
        log[slot(inc, STATE)] = ACQUIRING
        log[slot(inc, STARTED)] = k + 1
        before = seen[0]
        if k % 2:
            with lock:
                log[slot(inc, STATE)] = HELD
                _critical_section(log, inc, seen[0] != before)
                log[slot(inc, STATE)] = RELEASING
        else:
            if not lock.acquire(timeout=JOIN_TIMEOUT):
                mark_violation(log, inc, V_TIMEOUT)
                break
            log[slot(inc, STATE)] = HELD
            _critical_section(log, inc, seen[0] != before)
            log[slot(inc, STATE)] = RELEASING
            lock.release()
        log[slot(inc, STATE)] = IDLE
        log[slot(inc, DONE)] = k + 1
        k += 1
    lock.close()


def _critical_section(log: Any, inc: int, recovered: bool) -> None:
    w = log[EXCL]
    if w:
        # A holder died between its +1 and its -1: it died holding the lock, so this
        # acquire must have recovered it -- and said so with a HolderDiedWarning.
        if not recovered:
            mark_violation(log, inc, V_UNREPORTED_DEATH)
        elif w != 1:
            mark_violation(log, inc, V_BAD_WORD)
        log[slot(inc, FOUND_DEAD)] += 1
        log[EXCL] = 0
    log[EXCL] = log[EXCL] + 1  # a read-modify-write: only the lock makes it exact
    for _ in range(20):
        if log[EXCL] != 1:
            mark_violation(log, inc, V_NOT_EXCLUSIVE)
    log[EXCL] = log[EXCL] - 1
