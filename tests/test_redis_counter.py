"""RedisCounter and FleetCounter, against real redis-server processes.

The counter contract runs over both backends (``SafeCounter`` and ``RedisCounter``):
same results, same errors, so the backends cannot drift. What differs is tested as a
difference. Faults are real: the server is SIGKILLed and restarted (AOF, appendfsync
always), clients are SIGKILLed mid-add.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeshm
from safeshm import (
    BackendUnavailableError,
    HandleClosedError,
    IncompatibleKeyError,
    OutcomeUnknownError,
    SafeShmWarning,
)
from tests._redis_server import raw_client

from ._helpers import JOIN_TIMEOUT, PROMPT, adds_then_report_worker, kill_and_reap, processes

redis = pytest.importorskip("redis")
from safeshm.redis._counter import FleetCounter, RedisCounter  # noqa: E402

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
int64s = st.integers(INT64_MIN, INT64_MAX)


def _raw(url: str) -> Any:
    """A plain redis-py client on the server of ``url`` (for looking behind the API)."""
    return raw_client(url)


def _key(url: str, part: str = "") -> str:
    name = url.partition("#")[2]
    return f"safeshm:{{{name}}}" + (f":{part}" if part else "")


def _keys(url: str) -> list[bytes]:
    return sorted(_raw(url).keys(_key(url) + "*"))


# -- the two backends ------------------------------------------------------------------------
class Backend:
    """Opens counters of one backend under one name per call of ``fresh()``."""

    def __init__(self, kind: str, make_url: Callable[[str], str] | None, name: Callable[[], str]):
        self.kind = kind
        self._make_url = make_url
        self._name = name
        self.handles: list[Any] = []

    def fresh(self) -> str:
        """A new address: a segment name, or a Redis URL."""
        if self._make_url is None:
            return self._name()
        return self._make_url("ctr")

    def open(self, where: str, initial: Any = 0) -> Any:
        c: Any
        if self.kind == "shm":
            c = safeshm.SafeCounter.open(where, initial)
        else:
            c = RedisCounter.open(where, initial)
        self.handles.append(c)
        return c

    def make(self, initial: Any = 0) -> Any:
        return self.open(self.fresh(), initial)

    def cleanup(self) -> None:
        for h in reversed(self.handles):
            with contextlib.suppress(Exception):
                h.close()
            with contextlib.suppress(FileNotFoundError):
                h.unlink()


@pytest.fixture(params=["shm", "redis"])
def backend(request: pytest.FixtureRequest, unique: Callable[[], str]) -> Iterator[Backend]:
    make_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    b = Backend(request.param, make_url, unique)
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def fleets() -> Iterator[list[FleetCounter]]:
    """FleetCounters to close and unlink (Redis keys and local segments) at teardown."""
    made: list[FleetCounter] = []
    yield made
    for f in reversed(made):
        with contextlib.suppress(Exception):
            f.close()
        f.unlink()


# -- the contract, over both backends ------------------------------------------------------------
def test_protocols_and_guarantees(backend: Backend) -> None:
    c = backend.make()
    assert isinstance(c, safeshm.SharedCounter)
    g = backend.make().guarantees
    if backend.kind == "redis":
        assert (g.backend, g.scope, g.outcome_unknown, g.exact) == ("redis", "network", True, True)
        # safeshm cannot know the server's appendfsync: it promises what every setting keeps.
        assert g.survives == "server-memory"
    else:
        assert (g.backend, g.outcome_unknown) == ("shm", False)


def test_operations(backend: Backend) -> None:
    c = backend.make()
    assert c.value == 0
    assert c.add() == 1
    assert c.add(41) == 42
    assert c.add(-50) == -8
    c.set(10)
    assert c.value == 10
    assert c.exchange(3) == 10
    assert c.value == 3
    assert c.compare_and_set(3, 7) is True
    assert c.compare_and_set(3, 9) is False
    assert c.value == 7
    assert c.set(1) is None


def test_initial_value(backend: Backend) -> None:
    assert backend.make(INT64_MIN).value == INT64_MIN
    assert backend.make(INT64_MAX).value == INT64_MAX
    assert backend.make(True).value == 1


def test_open_initial_applies_only_on_create(backend: Backend) -> None:
    where = backend.fresh()
    a = backend.open(where, 10)
    b = backend.open(where, 99)
    assert b.value == 10
    a.add(5)
    assert b.value == 15


@pytest.mark.parametrize("bad", [2**63, INT64_MIN - 1, 10**30])
def test_initial_out_of_range(backend: Backend, bad: int) -> None:
    where = backend.fresh()
    with pytest.raises(OverflowError):
        backend.open(where, bad)
    if backend.kind == "redis":
        assert _keys(where) == []  # nothing was sent: not even the kind was claimed


@pytest.mark.parametrize("bad", [1.0, "1", None, [1], 1j])
def test_initial_wrong_type(backend: Backend, bad: Any) -> None:
    where = backend.fresh()
    with pytest.raises(TypeError, match="must be an int"):
        backend.open(where, bad)
    if backend.kind == "redis":
        assert _keys(where) == []


def test_overflow_changes_nothing(backend: Backend) -> None:
    c = backend.make(INT64_MAX)
    with pytest.raises(OverflowError, match="int64"):
        c.add(1)
    assert c.value == INT64_MAX
    c.set(INT64_MIN)
    with pytest.raises(OverflowError, match="int64"):
        c.add(-1)
    assert c.value == INT64_MIN
    for bad in (2**63, INT64_MIN - 1):
        with pytest.raises(OverflowError):
            c.set(bad)
        with pytest.raises(OverflowError):
            c.exchange(bad)
        with pytest.raises(OverflowError):
            c.compare_and_set(INT64_MIN, bad)
        with pytest.raises(OverflowError):
            c.compare_and_set(bad, 0)
        with pytest.raises(OverflowError):
            c.add(bad * 4)
    assert c.value == INT64_MIN


def test_deltas_wider_than_int64(backend: Backend) -> None:
    """A delta outside int64 whose result is an int64 is applied, as ``SafeCounter`` does
    (Redis' INCRBY takes int64 arguments only: safeshm splits it inside one script)."""
    c = backend.make(INT64_MIN)
    assert c.add(2**64 - 1) == INT64_MAX
    assert c.add(-(2**64 - 1)) == INT64_MIN
    assert c.add(2**63) == 0
    c.set(-5)
    for bad in (2**64 - 1, 2**64, -(2**64), 2**63 + 5):
        with pytest.raises(OverflowError, match="int64"):
            c.add(bad)
        assert c.value == -5  # a chunk that failed undid the ones before it


@pytest.mark.parametrize("bad", [1.5, 1.0, "1", None, b"1", [1], float("nan")])
def test_wrong_types_change_nothing(backend: Backend, bad: Any) -> None:
    c = backend.make(5)
    for op in (
        c.add,
        c.set,
        c.exchange,
        lambda v: c.compare_and_set(5, v),
        lambda v: c.compare_and_set(v, 6),
    ):
        with pytest.raises(TypeError, match="must be an int"):
            op(bad)
    assert c.value == 5


def test_int_like_operands(backend: Backend) -> None:
    c = backend.make()
    assert c.add(True) == 1
    assert c.exchange(False) == 1
    assert c.compare_and_set(False, True) is True
    np = pytest.importorskip("numpy")
    assert c.add(np.int64(5)) == 6
    c.set(np.int32(7))
    assert c.value == 7
    assert c.compare_and_set(np.int64(7), np.int16(1))
    assert c.value == 1


def test_closed_handle(backend: Backend) -> None:
    c = backend.make(3)
    other = backend.open(c.name if backend.kind == "shm" else c.url)
    c.close()
    c.close()  # idempotent
    assert c.closed
    for use in (
        lambda: c.value,
        c.add,
        lambda: c.set(1),
        lambda: c.exchange(1),
        lambda: c.compare_and_set(3, 4),
        lambda: pickle.dumps(c),
    ):
        with pytest.raises(HandleClosedError):
            use()
    assert other.add() == 4  # other handles are untouched
    assert "closed" in repr(c)
    c.unlink()  # allowed after close, on both backends


def test_pickle_round_trip(backend: Backend) -> None:
    c = backend.make(7)
    d = pickle.loads(pickle.dumps(c))
    backend.handles.append(d)
    assert type(d) is type(c)
    assert d.name == c.name
    assert d.add(1) == 8
    assert c.value == 8


def test_unlink_differs(backend: Backend) -> None:
    """Tested as a difference: a segment can be unlinked once (open handles keep the old
    memory); Redis' unlink is idempotent, and open handles then count from 0."""
    c = backend.make(5)
    c.unlink()
    if backend.kind == "shm":
        assert c.value == 5
        with pytest.raises(FileNotFoundError):
            c.unlink()
    else:
        assert c.value == 0
        c.unlink()
        assert c.add() == 1
        again = backend.open(c.url, 40)  # re-created by open, with its initial
        assert again.value == 1  # the add above made the value key exist again


_ops = st.one_of(
    st.tuples(st.just("add"), st.integers(-(2**65), 2**65) | st.integers(-3, 3)),
    st.tuples(st.just("set"), int64s | st.integers(-3, 3)),
    st.tuples(st.just("exchange"), int64s),
    st.tuples(st.just("compare_and_set"), st.tuples(int64s | st.integers(-3, 3), int64s)),
    st.tuples(st.just("bad"), st.sampled_from([1.5, "x", None, 2**64, -(2**64)])),
)


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=int64s | st.integers(-5, 5), ops=st.lists(_ops, max_size=12))
def test_same_results_and_errors_on_both(
    redis_url: Callable[[str], str], unique: Callable[[], str], start: int, ops: list[Any]
) -> None:
    """Drawn operation sequences applied to a SafeCounter and a RedisCounter in lockstep:
    every result and every error type is the same, and so is the value after each."""
    shm = safeshm.SafeCounter.create(start)
    red = RedisCounter.open(redis_url("lockstep"), start)
    try:
        for op, arg in ops:
            outcomes = []
            for c in (shm, red):
                try:
                    if op == "compare_and_set":
                        r: Any = c.compare_and_set(*arg)
                    elif op == "bad":
                        r = c.set(arg)
                    else:
                        r = getattr(c, op)(arg)
                    outcomes.append(("ok", r))
                except (OverflowError, TypeError) as exc:
                    outcomes.append(("err", type(exc)))
            assert outcomes[0] == outcomes[1], (op, arg)
            assert shm.value == red.value
    finally:
        shm.close()
        shm.unlink()
        red.close()
        red.unlink()


# -- Redis only: foreign data under the name ---------------------------------------------------
def test_redis_list_at_the_kind_key(redis_url: Callable[[str], str]) -> None:
    url = redis_url("foreign")
    r = _raw(url)
    r.rpush(_key(url), "a", "b")
    with pytest.raises(IncompatibleKeyError, match="list"):
        RedisCounter.open(url, 5)
    assert r.lrange(_key(url), 0, -1) == [b"a", b"b"]
    assert _keys(url) == [_key(url).encode()]


def test_redis_list_at_the_value_key(redis_url: Callable[[str], str]) -> None:
    url = redis_url("foreign")
    r = _raw(url)
    r.rpush(_key(url, "value"), "a")
    with pytest.raises(IncompatibleKeyError, match="list"):
        RedisCounter.open(url, 5)
    # Nothing changed: not even the kind was claimed.
    assert _keys(url) == [_key(url, "value").encode()]
    assert r.lrange(_key(url, "value"), 0, -1) == [b"a"]


def test_foreign_data_after_open(redis_url: Callable[[str], str]) -> None:
    """Another program replaces the value with a list, then with text: every operation
    raises IncompatibleKeyError (never a raw redis-py error), and changes nothing."""
    url = redis_url("foreign")
    r = _raw(url)
    c = RedisCounter.open(url, 5)
    try:
        r.delete(_key(url, "value"))
        r.rpush(_key(url, "value"), "a")
        for use in (
            lambda: c.value,
            c.add,
            lambda: c.add(2**64 - 1),
            lambda: c.set(1),
            lambda: c.exchange(1),
            lambda: c.compare_and_set(0, 1),
        ):
            with pytest.raises(IncompatibleKeyError):
                use()
        assert r.lrange(_key(url, "value"), 0, -1) == [b"a"]
        r.delete(_key(url, "value"))
        r.set(_key(url, "value"), "twelve")
        with pytest.raises(IncompatibleKeyError):
            c.add()
        with pytest.raises(IncompatibleKeyError):
            _ = c.value
        for use in (lambda: c.set(1), lambda: c.exchange(1)):  # they replaced it, once
            with pytest.raises(IncompatibleKeyError):
                use()
        assert r.get(_key(url, "value")) == b"twelve"
        with pytest.raises(IncompatibleKeyError, match="not an int64"):
            RedisCounter.open(url)
    finally:
        c.close()
        c.unlink()


def test_another_safeshm_kind_under_the_name(redis_url: Callable[[str], str]) -> None:
    url = redis_url("kind")
    f = FleetCounter.open(url, flush_interval=None, local_name=url.partition("#")[2])
    try:
        before = _keys(url)
        with pytest.raises(IncompatibleKeyError, match="fleet-counter"):
            RedisCounter.open(url)
        assert _keys(url) == before
    finally:
        f.unlink()
    other = redis_url("kind")
    c = RedisCounter.open(other)
    try:
        with pytest.raises(IncompatibleKeyError, match="counter"):
            FleetCounter.open(other, flush_interval=None)
        _raw(other).hset(_key(other), "kind", "queue")
        with pytest.raises(IncompatibleKeyError, match="queue"):
            RedisCounter.open(other)
    finally:
        c.close()
        c.unlink()


def test_unreachable_server() -> None:
    from tests._redis_server import free_port

    with pytest.raises(BackendUnavailableError):
        RedisCounter.open(f"redis://127.0.0.1:{free_port()}/0#nobody")


# -- Redis only: processes and faults ---------------------------------------------------------
def _adds_worker(c: RedisCounter, barrier: Any, adds: int, out: Any) -> None:
    barrier.wait(timeout=JOIN_TIMEOUT)
    out.put([c.add() for _ in range(adds)])
    c.close()


def test_processes_add_exactly(redis_url: Callable[[str], str]) -> None:
    """Processes released together: the total is exact and every add got its own new
    value (INCRBY is linearizable: the returned values are exactly 1..N)."""
    ctx = multiprocessing.get_context("spawn")
    c = RedisCounter.open(redis_url("mp"))
    procs, adds = 4, 150
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    try:
        with processes("spawn", _adds_worker, [(c, barrier, adds, out)] * procs):
            seen = [v for _ in range(procs) for v in out.get(timeout=JOIN_TIMEOUT)]
        assert sorted(seen) == list(range(1, procs * adds + 1))
        assert c.value == procs * adds
    finally:
        c.close()
        c.unlink()


def test_client_killed_mid_add(redis_url: Callable[[str], str]) -> None:
    """A client SIGKILLed while adding: every add it saw acknowledged is counted, the one
    in flight at most once."""
    c = RedisCounter.open(redis_url("kill"))
    ctx = multiprocessing.get_context("fork")
    try:
        progress = ctx.RawValue("q", 0)
        ready = ctx.Event()
        with processes("fork", adds_then_report_worker, [(c, progress, ready)]) as (p,):
            assert ready.wait(JOIN_TIMEOUT)
            time.sleep(0.2)
            kill_and_reap(p)
        assert c.value - progress.value in (0, 1)
    finally:
        c.close()
        c.unlink()


def test_server_killed_mid_adds(fresh_redis: Any) -> None:
    """kill -9 the server while a thread adds: after a restart (AOF, appendfsync always)
    every acknowledged add is there, the add in flight raised a typed error (applied at
    most once; not at all if the error says the server was unreachable), and the same
    handle works again without being reopened."""
    c = RedisCounter.open(fresh_redis.url + "#crash")
    acked = 0
    failure: list[BaseException] = []
    going = threading.Event()

    def adder() -> None:
        nonlocal acked
        while True:
            try:
                c.add()
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                failure.append(exc)
                return
            acked += 1
            if acked == 20:
                going.set()

    t = threading.Thread(target=adder, daemon=True)
    t.start()
    try:
        assert going.wait(PROMPT)
        fresh_redis.kill()
        t.join(PROMPT)
        assert not t.is_alive()
        (exc,) = failure
        assert isinstance(exc, OutcomeUnknownError | BackendUnavailableError), repr(exc)
        assert not isinstance(exc, redis.RedisError)
        with pytest.raises(BackendUnavailableError):
            _ = c.value  # the server is down: a typed error, never a raw one
        fresh_redis.start()
        first = c.add()  # the handle reconnects by itself
        in_flight = first - 1 - acked
        assert in_flight in ((0, 1) if isinstance(exc, OutcomeUnknownError) else (0,))
        assert c.value == first
    finally:
        c.close()


# -- FleetCounter ----------------------------------------------------------------------------
def _wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - t0


def _equals(f: FleetCounter, target: int) -> bool:
    return f.value == target


def _fleet(fleets: list[FleetCounter], url: str, **kw: Any) -> FleetCounter:
    kw.setdefault("local_name", f"f{os.getpid()}-{url.rpartition('#')[2][-12:]}")
    f = FleetCounter.open(url, **kw)
    fleets.append(f)
    return f


def test_fleet_basics(redis_url: Callable[[str], str], fleets: list[FleetCounter]) -> None:
    url = redis_url("fleet")
    f = _fleet(fleets, url, initial=100, flush_interval=None, host_id="web-1")
    assert isinstance(f, safeshm.SharedShardedCounter)
    assert type(f).guarantees.exact is False
    assert f.add() is None
    f.add(9)
    assert f.local_value == 10
    assert f.value == 100  # nothing published yet: no flusher, no flush
    f.flush()
    assert f.value == 110
    assert f.hosts() == {"web-1": 10}
    g = _fleet(fleets, url, initial=5, flush_interval=None, host_id="web-1")
    assert g.value == 110  # initial applies only on create
    g.add(-3)  # the same host's local counter: one total
    g.flush()
    assert f.value == 107
    with pytest.raises(TypeError):
        f.add(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flush_interval"):
        FleetCounter.open(url, flush_interval=0)
    with pytest.raises(ValueError, match="host_id"):
        FleetCounter.open(url, host_id="@initial")


def test_fleet_add_is_the_local_add(
    redis_url: Callable[[str], str], fleets: list[FleetCounter]
) -> None:
    """No wrapper, no network: the open handle's add is the ShardedCounter's own."""
    f = _fleet(fleets, redis_url("fleet"), flush_interval=None)
    local = safeshm.ShardedCounter.attach(f._local.name)
    try:
        assert f.add == f._local.add
        f.add(3)
        assert local.value == 3
    finally:
        local.close()


def _fleet_host_worker(url: str, host: str, local: str, adds: int, done: Any) -> None:
    f = FleetCounter.open(url, flush_interval=None, host_id=host, local_name=local)
    for _ in range(adds):
        f.add()
    f.close()  # the final flush publishes
    done.put(host)
    for cls, name in ((safeshm.ShardedCounter, local), (safeshm.SafeCounter, f"{local}.flush")):
        h = cls.attach(name)
        h.unlink()
        h.close()


def test_fleet_two_hosts(redis_url: Callable[[str], str], fleets: list[FleetCounter]) -> None:
    """Two "hosts" (processes with their own local counters and host ids): the value is
    the sum of both hosts' totals, each host one field."""
    url = redis_url("fleet")
    reader = _fleet(fleets, url, initial=1000, flush_interval=None, host_id="reader")
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Queue()
    pid = os.getpid()
    args = [(url, f"h{i}", f"h{i}-{pid}-{url[-4:]}", 100 * (i + 1), done) for i in range(2)]
    with processes("spawn", _fleet_host_worker, args):
        assert {done.get(timeout=JOIN_TIMEOUT) for _ in args} == {"h0", "h1"}
    assert reader.value == 1000 + 100 + 200
    assert reader.hosts() == {"h0": 100, "h1": 200}  # the reader never flushed


def test_fleet_staleness_bounded_by_the_interval(
    redis_url: Callable[[str], str], fleets: list[FleetCounter]
) -> None:
    interval = 0.3
    f = _fleet(fleets, redis_url("fleet"), flush_interval=interval)
    for n in (7, 50):
        f.add(n)
        target = f.local_value
        took = _wait_for(functools.partial(_equals, f, target), timeout=interval + PROMPT)
        # About one interval (the thread wakes every half interval); a loaded CI
        # machine adds scheduling noise, far below the timeout a stuck flusher hits.
        assert took < interval + 1.5, took
    assert f.last_flush_error is None


def test_fleet_flush_never_goes_back(
    redis_url: Callable[[str], str], fleets: list[FleetCounter]
) -> None:
    """An older flush that reaches the server after a newer one is refused."""
    f = _fleet(fleets, redis_url("fleet"), flush_interval=None, host_id="h")
    assert f._publish(10, 2_000_000_000_000_000_000) is True  # beyond 2**53: compared exactly
    assert f._publish(5, 1_999_999_999_999_999_999) is False
    assert f._publish(6, 2_000_000_000_000_000_000) is False  # a retry of the same flush
    assert f.value == 10
    assert f._publish(12, 2_000_000_000_000_000_001) is True
    assert f.value == 12


class _ReadHook:
    """Stands in for a FleetCounter's local counter: runs ``hook`` before the first read."""

    def __init__(self, real: Any, hook: Callable[[], None]) -> None:
        self.real = real
        self.hook: Callable[[], None] | None = hook

    @property
    def value(self) -> int:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return int(self.real.value)


@pytest.mark.parametrize("periodic", [True, False])
def test_fleet_overtaken_flusher_never_publishes_an_older_reading(
    redis_url: Callable[[str], str],
    fleets: list[FleetCounter],
    monkeypatch: pytest.MonkeyPatch,
    periodic: bool,
) -> None:
    """The race the flush gate closes, made to happen: flusher A claims a number, then
    (before A reads the local total) flusher B claims a later one and reads; more adds
    come; A reads a newer total than B's. If A published it, B's older reading, arriving
    later with the higher number, would take the value back. A must notice it was
    overtaken: a periodic flush skips, an explicit one claims again."""
    url = redis_url("fleet")
    a = _fleet(fleets, url, flush_interval=None, host_id="h")
    b = _fleet(fleets, url, flush_interval=None, host_id="h")
    a.add(10)
    held: list[tuple[int, int]] = []

    def hold(total: int, seq: int) -> bool:
        held.append((total, seq))
        return True

    monkeypatch.setattr(b, "_publish", hold)

    def b_overtakes() -> None:
        b._flush(periodic=False)  # claims the later number, reads 10, "sends" (held)
        a.add(5)

    monkeypatch.setattr(a, "_local", _ReadHook(a._local, b_overtakes))
    published = a._flush(periodic=periodic)
    seen = [a.value]
    monkeypatch.undo()
    (late,) = held
    assert late[0] == 10
    b._publish(*late)  # B's reading arrives last
    seen.append(a.value)
    assert seen == sorted(seen), seen  # never backwards
    assert published is (not periodic)
    a.flush()
    assert a.value == 15


def _flush_hammer(url: str, local: str, stop: Any, adds: Any) -> None:
    f = FleetCounter.open(url, flush_interval=0.01, host_id="same", local_name=local)
    n = 0
    while not stop.is_set():
        for _ in range(50):
            f.add()
        n += 50
        f.flush()
    adds.put(n)
    f.close()


def test_fleet_concurrent_flushers_monotonic(
    redis_url: Callable[[str], str], fleets: list[FleetCounter]
) -> None:
    """Three processes of one host add and flush (their threads and explicitly) as fast as
    they can: the published value, read over and over, never goes down, and ends exact."""
    url = redis_url("fleet")
    local = f"hammer-{os.getpid()}-{url[-4:]}"
    owner = _fleet(fleets, url, flush_interval=None, host_id="same", local_name=local)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    adds = ctx.Queue()
    seen: list[int] = []
    with processes("spawn", _flush_hammer, [(url, local, stop, adds)] * 3):
        started = time.monotonic() + JOIN_TIMEOUT  # spawn is slow on a loaded machine
        while owner.value == 0:
            assert time.monotonic() < started, "no hammer process published anything"
            time.sleep(0.01)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            seen.append(owner.value)
        stop.set()
        total = sum(adds.get(timeout=JOIN_TIMEOUT) for _ in range(3))
    assert seen[-1] > 0
    regressions = [(a, b) for a, b in itertools.pairwise(seen) if b < a]
    assert regressions == []
    owner.flush()
    assert owner.value == total


def test_fleet_host_restarts_from_zero(
    redis_url: Callable[[str], str], fleets: list[FleetCounter]
) -> None:
    """A host whose shared memory was lost (a reboot) counts from zero again: its new
    local counter publishes into a new field, the old one keeps the previous total, and
    the value never drops."""
    url = redis_url("fleet")
    local = f"reboot-{os.getpid()}-{url[-4:]}"
    first = FleetCounter.open(url, flush_interval=None, host_id="web", local_name=local)
    first.add(40)
    first.close()  # flushes 40
    for cls, name in ((safeshm.ShardedCounter, local), (safeshm.SafeCounter, f"{local}.flush")):
        h = cls.attach(name)  # what a reboot does to /dev/shm
        h.unlink()
        h.close()
    after = _fleet(fleets, url, flush_interval=None, host_id="web", local_name=local)
    assert after.local_value == 0
    assert after.value == 40
    after.add(2)
    after.flush()
    assert after.value == 42
    assert after.hosts() == {"web": 42}
    assert len(_raw(url).hkeys(_key(url, "hosts"))) == 3  # two boots' fields + @initial


def test_fleet_flush_failures_are_reported_not_raised(
    fresh_redis: Any, fleets: list[FleetCounter]
) -> None:
    """With the server down the flusher thread keeps the error and carries on; an explicit
    flush raises it typed; once the server is back the next tick publishes everything."""
    url = fresh_redis.url + f"#down{os.getpid()}"
    f = _fleet(fleets, url, flush_interval=0.1)
    f.add(5)
    f.flush()
    fresh_redis.kill()
    f.add(3)
    _wait_for(lambda: f.last_flush_error is not None, timeout=PROMPT)
    assert isinstance(f.last_flush_error, BackendUnavailableError)
    f.add(1)  # adds carry on at local speed
    with pytest.raises(BackendUnavailableError):
        f.flush()
    # The server restarts from its append-only file (which holds the first flush).
    fresh_redis.start()
    _wait_for(lambda: f.last_flush_error is None, timeout=PROMPT)
    _wait_for(lambda: f.value == 9, timeout=PROMPT)


def test_fleet_close_with_server_down_warns_and_keeps_the_adds(
    fresh_redis: Any, fleets: list[FleetCounter]
) -> None:
    url = fresh_redis.url + f"#closing{os.getpid()}"
    local = f"closing-{os.getpid()}"
    f = FleetCounter.open(url, flush_interval=None, local_name=local)
    f.add(4)
    fresh_redis.kill()
    with pytest.warns(SafeShmWarning, match="final flush failed"):
        f.close()
    assert f.closed
    assert isinstance(f.last_flush_error, BackendUnavailableError)
    fresh_redis.start()
    g = _fleet(fleets, url, flush_interval=None, local_name=local)
    assert g.local_value == 4  # still in the host's shared memory
    g.flush()
    assert g.value == 4


def test_fleet_foreign_data(redis_url: Callable[[str], str]) -> None:
    url = redis_url("fleet")
    r = _raw(url)
    r.rpush(_key(url, "hosts"), "x")
    with pytest.raises(IncompatibleKeyError, match="list"):
        FleetCounter.open(url, flush_interval=None, local_name=f"ff-{os.getpid()}")
    assert _keys(url) == [_key(url, "hosts").encode()]
    assert r.lrange(_key(url, "hosts"), 0, -1) == [b"x"]
    r.delete(_key(url, "hosts"))


def test_fleet_closed_and_pickled(
    redis_url: Callable[[str], str], fleets: list[FleetCounter]
) -> None:
    url = redis_url("fleet")
    f = _fleet(fleets, url, flush_interval=None, host_id="p")
    g = pickle.loads(pickle.dumps(f))
    fleets.append(g)
    assert (g.name, g._local.name, g._host) == (f.name, f._local.name, "p")
    g.add(2)
    f.add(1)
    g.flush()
    assert f.value == 3
    g.close()
    g.close()
    for use in (g.add, lambda: g.value, g.flush, lambda: pickle.dumps(g)):
        with pytest.raises(HandleClosedError):
            use()
    assert "closed" in repr(g)
    f.add(1)  # the other handle is untouched
    f.flush()
    assert f.value == 4


def test_fleet_unlink(redis_url: Callable[[str], str]) -> None:
    url = redis_url("fleet")
    local = f"gone-{os.getpid()}-{url[-4:]}"
    f = FleetCounter.open(url, flush_interval=0.05, local_name=local)
    f.add(3)
    f.flush()
    f.unlink()
    assert f.closed
    assert _keys(url) == []
    for cls, name in ((safeshm.ShardedCounter, local), (safeshm.SafeCounter, f"{local}.flush")):
        with pytest.raises(FileNotFoundError):
            cls.attach(name)
    time.sleep(0.15)  # its flusher stopped: nothing brings the keys back
    assert _keys(url) == []
    f.unlink()  # idempotent


def test_fleet_default_local_name(redis_url: Callable[[str], str]) -> None:
    url = redis_url("x" * 48)  # a name of about 60 characters
    f = FleetCounter.open(url, flush_interval=None)
    try:
        assert f._local.name.startswith("fleet.x")
        assert len(f._local.name) + len(".flush") <= 64
        short = redis_url("fleet")
        g = FleetCounter.open(short, flush_interval=None)
        assert g._local.name.startswith("fleet." + short.partition("#")[2] + ".")
        g.unlink()
    finally:
        f.unlink()


def test_fleet_counters_of_one_name_on_two_databases_do_not_mix(
    redis_url: Callable[[str], str],
) -> None:
    """The default local counter names the server and database: a fleet counter of the
    same name in db 1 does not publish db 0's adds (it did, with ``fleet.<NAME>``)."""
    url0 = redis_url("twodb")
    base, _, name = url0.partition("#")
    url1 = f"{base.rsplit('/', 1)[0]}/1#{name}"
    a = FleetCounter.open(url0, flush_interval=None)
    b = FleetCounter.open(url1, flush_interval=None)
    try:
        a.add(5)
        a.flush()
        b.flush()
        assert (a.value, b.value) == (5, 0)
        assert a._local.name != b._local.name
    finally:
        for f in (a, b):
            f.unlink()
            f.close()


def _forked_child_flushes(f: FleetCounter) -> None:
    thread = f._thread
    if thread is None or not thread.is_alive():
        raise SystemExit(2)
    f.add(3)
    deadline = time.monotonic() + PROMPT
    while f.value != 3:  # only this child's own flusher thread can publish it
        if time.monotonic() > deadline:
            raise SystemExit(3)
        time.sleep(0.01)
    f.close()


def test_forked_child_gets_its_own_flusher(
    redis_url: Callable[[str], str], fleets: list[FleetCounter]
) -> None:
    """Threads do not survive fork: a child that inherits an open handle starts its own."""
    f = _fleet(fleets, redis_url("fleet"), flush_interval=0.05)
    f._stop_flusher()  # the parent's flusher stops: the child's must do the work
    with processes("fork", _forked_child_flushes, [(f,)]) as (p,):
        p.join(JOIN_TIMEOUT)
    assert p.exitcode == 0


def test_flusher_thread_ends_with_the_handle(
    redis_url: Callable[[str], str], fleets: list[FleetCounter]
) -> None:
    f = _fleet(fleets, redis_url("fleet"), flush_interval=0.05)
    thread = f._thread
    assert thread is not None and thread.is_alive()
    f.close()
    assert not thread.is_alive()
