"""SafeArray: array.array semantics, atomic elements, consistent snapshots, locked() views."""

from __future__ import annotations

import array
import math
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import safeshm

from ._helpers import (
    JOIN_TIMEOUT,
    PROMPT,
    START_METHODS,
    Remote,
    array_adds_worker,
    die_inside_locked_worker,
    hold_stripe_then_die_worker,
    kill_and_reap,
    numpy_write_worker,
    processes,
    run_all,
    snapshot_reader_worker,
    uniform_writer_worker,
)

TYPECODES = "bBhHiIlLqQfd"
INT_TYPECODES = "bBhHiIlLqQ"


def bounds(tc: str) -> tuple[int, int]:
    bits = array.array(tc).itemsize * 8
    return (0, 2**bits - 1) if tc.isupper() else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def values_for(tc: str) -> st.SearchStrategy[Any]:
    if tc == "f":
        # float32-representable values, so the model (a Python float) matches exactly.
        return st.floats(width=32, allow_nan=False)
    if tc == "d":
        return st.floats(allow_nan=False)
    lo, hi = bounds(tc)
    return st.integers(lo, hi)


def outcome(f: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", f())
    except Exception as e:  # noqa: BLE001 - comparing behaviours, whatever they are
        return ("err", type(e))


@pytest.fixture
def make(cleanup: Any) -> Callable[..., safeshm.SafeArray[Any]]:
    def factory(*args: Any, **kwargs: Any) -> safeshm.SafeArray[Any]:
        return cleanup(safeshm.SafeArray.create(*args, **kwargs))  # type: ignore[no-any-return]

    return factory


# -- basics -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tc", TYPECODES)
def test_basic_operations(tc: str, make: Any) -> None:
    a = make(tc, 5)
    ref = array.array(tc, [0] * 5)
    assert len(a) == 5
    assert a.typecode == tc
    assert a.itemsize == ref.itemsize
    assert a.to_list() == ref.tolist() == list(a)
    a[1] = 3
    a[-1] = 4
    ref[1] = 3
    ref[-1] = 4
    assert a[1] == 3 and a[-1] == 4 and a[4] == 4
    assert a.add(1, 2) == 5
    ref[1] += 2
    assert a.compare_and_set(1, 5, 1) is True
    assert a.compare_and_set(1, 5, 2) is False
    ref[1] = 1
    a[0:2] = [7, 8]
    ref[0:2] = array.array(tc, [7, 8])
    a[::2] = (9, 9, 9)
    ref[::2] = array.array(tc, [9, 9, 9])
    assert a.to_list() == ref.tolist()
    assert a[1:4] == ref[1:4].tolist()
    assert a[::-1] == ref[::-1].tolist()
    a.fill(2)
    assert a.to_list() == [2] * 5


@pytest.mark.parametrize("tc", TYPECODES)
def test_initializer(tc: str, make: Any) -> None:
    vals = [1, 2, 3]
    a = make(tc, vals)
    assert a.to_list() == array.array(tc, vals).tolist()
    b = make(tc, array.array(tc, vals))
    assert b.to_list() == a.to_list()
    c = make(tc, (v for v in vals))
    assert c.to_list() == a.to_list()


def test_empty_array(make: Any) -> None:
    a = make("d", 0)
    assert len(a) == 0
    assert a.to_list() == []
    a.fill(1.0)
    with a.locked() as view:
        assert view.shape == (0,)
    with pytest.raises(IndexError):
        a[0]


def test_float_specifics(make: Any) -> None:
    f = make("f", [1.5])
    assert f.add(0, 0.1) == array.array("f", [1.6])[0]  # returns the stored float32
    d = make("d", [math.nan, 1.0])
    assert d.compare_and_set(0, math.nan, 2.0) is False  # NaN never compares equal
    d[1] = 3  # ints are accepted, as by array.array
    assert d[1] == 3.0 and isinstance(d[1], float)
    f[0] = 1e300  # too big for float32: stored as inf, as by array.array
    assert f[0] == math.inf


def test_attach_and_open_check_typecode_and_length(make: Any, name: str) -> None:
    a = make("q", 4, name=name, stripes=2)
    b = safeshm.SafeArray.attach(name)
    c = safeshm.SafeArray.attach(name, "q")
    d = safeshm.SafeArray.open(name, "q", 4)
    try:
        assert b.typecode == c.typecode == d.typecode == "q"
        d.add(3, 1)
        assert a[3] == 1
    finally:
        for h in (b, c, d):
            h.close()
    with pytest.raises(safeshm.IncompatibleSegmentError, match="typecode 'q'"):
        safeshm.SafeArray.attach(name, "d")
    with pytest.raises(safeshm.IncompatibleSegmentError, match="length 5"):
        safeshm.SafeArray.open(name, "q", 5)
    with pytest.raises(safeshm.IncompatibleSegmentError, match="3 stripes"):
        safeshm.SafeArray.open(name, "q", 4, stripes=3)
    safeshm.SafeArray.open(name, "q", 4, stripes=2).close()
    with pytest.raises(safeshm.IncompatibleSegmentError):
        safeshm.SafeArray.open(name, "i", 4)
    with pytest.raises(safeshm.IncompatibleSegmentError, match="SafeArray"):
        safeshm.SafeCounter.attach(name)


def test_open_with_initializer_creates_once(name: str, cleanup: Any) -> None:
    a = cleanup(safeshm.SafeArray.open(name, "i", [1, 2, 3]))
    b = safeshm.SafeArray.open(name, "i", [9, 9, 9])
    try:
        assert b.to_list() == [1, 2, 3]
    finally:
        b.close()
    assert a.to_list() == [1, 2, 3]


# -- bad input: array.array's errors, and nothing changed ----------------------------------------
BAD_VALUES = [1.5, "1", None, [1], 2**70, -(2**70), 2**2000, -1, 256, 2**31, 2**63, 2**64, True]


@pytest.mark.parametrize("tc", TYPECODES)
@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_element_errors_match_array_array(tc: str, value: Any, make: Any) -> None:
    a = make(tc, [1, 2, 3])

    def fresh() -> array.array[Any]:
        return array.array(tc, [1, 2, 3])

    def create_and_remove() -> None:
        made = safeshm.SafeArray.create(tc, [value])  # type: ignore[call-overload]
        made.close()
        made.unlink()

    for op_ours, op_ref in [
        (lambda: a.__setitem__(0, value), lambda: fresh().__setitem__(0, value)),
        (lambda: a.fill(value), lambda: array.array(tc, [value] * 3)),
        (lambda: a.compare_and_set(0, 1, value), lambda: fresh().__setitem__(0, value)),
        (create_and_remove, lambda: array.array(tc, [value])),
    ]:
        ours, theirs = outcome(op_ours), outcome(op_ref)
        assert ours[0] == theirs[0], (ours, theirs)
        if theirs[0] == "err":
            assert issubclass(ours[1], theirs[1]), (ours, theirs)
            assert a.to_list() == [1, 2, 3]  # a failed call changed nothing
        else:
            a[:] = [1, 2, 3]


@pytest.mark.parametrize("tc", INT_TYPECODES)
def test_add_overflow_changes_nothing(tc: str, make: Any) -> None:
    lo, hi = bounds(tc)
    a = make(tc, [hi, lo])
    with pytest.raises(OverflowError):
        a.add(0, 1)
    with pytest.raises(OverflowError):
        a.add(1, -1)
    with pytest.raises(TypeError):
        a.add(0, 0.5)
    with pytest.raises(TypeError):
        a.add(0, "1")
    assert a.to_list() == [hi, lo]


@pytest.mark.parametrize("index", [5, -6, 100, 2**70])
def test_index_errors(index: int, make: Any) -> None:
    a = make("q", 5)
    ref = array.array("q", [0] * 5)
    with pytest.raises(IndexError, match="array index out of range"):
        a[index]
    with pytest.raises(IndexError, match="array assignment index out of range"):
        a[index] = 1
    with pytest.raises(IndexError):
        a.add(index, 1)
    with pytest.raises(IndexError):
        a.compare_and_set(index, 0, 1)
    with pytest.raises(IndexError):
        ref[index]
    assert a.to_list() == [0] * 5


@pytest.mark.parametrize("index", [1.0, "0", None, [0]])
def test_index_type_errors(index: Any, make: Any) -> None:
    a = make("q", 5)
    for op in (
        lambda: a[index],
        lambda: a.__setitem__(index, 1),
        lambda: a.add(index, 1),
        lambda: a.compare_and_set(index, 0, 1),
    ):
        with pytest.raises(TypeError, match="array indices must be integers"):
            op()
    assert a.to_list() == [0] * 5


def test_numpy_and_bool_indices(make: Any) -> None:
    np = pytest.importorskip("numpy")
    a = make("q", 5)
    a[np.int64(2)] = 3
    assert a.add(np.int32(2), 1) == 4
    assert a[True] == 0
    assert a[np.int16(-3)] == 4


def test_slice_assignment_length_must_match(make: Any) -> None:
    a = make("q", [1, 2, 3, 4])
    for sl, vals in [
        (slice(0, 2), [1, 2, 3]),
        (slice(None), [1]),
        (slice(0, 4, 2), [1, 2, 3]),
        (slice(0, 0), [1]),
    ]:
        with pytest.raises(ValueError, match="length is fixed"):
            a[sl] = vals
    with pytest.raises(OverflowError):
        a[0:2] = [1, 2**70]
    with pytest.raises(TypeError):
        a[0:2] = [1, "x"]
    with pytest.raises(TypeError):
        a[0:2] = 5  # type: ignore[call-overload]
    assert a.to_list() == [1, 2, 3, 4]


def test_slice_assignment_from_buffers(make: Any) -> None:
    np = pytest.importorskip("numpy")
    a = make("q", 6)
    a[:] = np.arange(6)  # numpy int64 has format 'l': relabelled, not converted
    assert a.to_list() == [0, 1, 2, 3, 4, 5]
    a[::2] = np.array([7, 8, 9], dtype=np.int64)
    assert a.to_list() == [7, 1, 8, 3, 9, 5]


def test_float_buffer_into_int_array_is_refused(make: Any) -> None:
    np = pytest.importorskip("numpy")
    a = make("q", 3)
    with pytest.raises(TypeError):
        a[:] = np.array([1.0, 2.0, 3.0])
    assert a.to_list() == [0, 0, 0]


@pytest.mark.parametrize("bad", ["x", "qq", "u", "c", "", 1, None])
def test_bad_typecodes(bad: Any) -> None:
    with pytest.raises(ValueError, match="bad typecode"):
        safeshm.SafeArray.create(bad, 3)


@pytest.mark.parametrize(
    ("arg", "exc"),
    [(-1, ValueError), (True, TypeError), (1.5, TypeError), ("abc", TypeError), (None, TypeError)],
)
def test_bad_lengths(arg: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        safeshm.SafeArray.create("q", arg)


@pytest.mark.parametrize("bad", [0, 65, -1])
def test_bad_stripe_counts(bad: int) -> None:
    with pytest.raises(ValueError, match="stripes"):
        safeshm.SafeArray.create("q", 10, stripes=bad)


# -- locked() --------------------------------------------------------------------------------------
def test_locked_view_is_the_whole_array_zero_copy(make: Any) -> None:
    np = pytest.importorskip("numpy")
    for tc, dtype in [
        ("q", np.int64),
        ("d", np.float64),
        ("f", np.float32),
        ("B", np.uint8),
        ("h", np.int16),
    ]:
        a = make(tc, 1000)
        with a.locked() as view:
            assert view.format == tc
            assert view.shape == (1000,)
            assert not view.readonly
            x = np.asarray(view)
            assert x.dtype == dtype
            assert not x.flags.owndata  # a view of the segment, not a copy
            x[:] = np.arange(1000) % 100
            del x
        assert a.to_list() == [
            float(v) if tc in "fd" else v for v in [k % 100 for k in range(1000)]
        ]


def test_locked_view_is_unusable_after_the_block(make: Any) -> None:
    a = make("q", 4)
    with a.locked() as view:
        view[0] = 1
    with pytest.raises(ValueError, match="released"):
        view[0]
    with pytest.raises(ValueError, match="released"):
        view[0] = 2
    assert a[0] == 1


def test_leaked_numpy_reference_is_reported_and_lock_released(make: Any) -> None:
    np = pytest.importorskip("numpy")
    a = make("q", 4)
    with pytest.raises(safeshm.LockedViewLeakedError, match="still referenced"), a.locked() as view:
        kept = np.asarray(view)
    kept[0] = 1  # still valid memory (no crash), just no longer protected
    assert isinstance(safeshm.LockedViewLeakedError("x"), BufferError)
    a.add(0, 1)  # the lock was released
    del kept


def test_locked_excludes_other_writers_and_readers(make: Any) -> None:
    a = make("q", 8)
    events: list[str] = []

    def other() -> None:
        a.add(3, 1)
        events.append("add")
        events.append(f"snapshot {a.to_list()[0]}")

    with a.locked() as view:
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.2)
        events.append("block")
        view[0] = 5
    t.join(timeout=JOIN_TIMEOUT)
    assert events == ["block", "add", "snapshot 5"]


def test_reentry_is_an_error_not_a_deadlock(make: Any) -> None:
    a = make("q", 4)
    with a.locked():
        with pytest.raises(safeshm.LockReentryError), a.locked():
            pass
        with pytest.raises(safeshm.LockReentryError):
            a.add(0, 1)
        with pytest.raises(safeshm.LockReentryError):
            a.to_list()
    assert a.add(0, 1) == 1


def test_exception_in_locked_block_releases_and_is_not_a_death(make: Any) -> None:
    a = make("q", 4)

    def fail_mid_block() -> None:
        with a.locked() as view:
            view[0] = 9
            raise KeyError

    with pytest.raises(KeyError):
        fail_mid_block()
    assert not a.partial_update_suspected
    assert a.to_list() == [9, 0, 0, 0]  # no warning: nobody died


# -- concurrency --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", START_METHODS)
@settings(max_examples=5)
@given(data=st.data())
def test_stress_adds_at_random_indices(method: str, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 200), label="length")
    tc = data.draw(st.sampled_from("iqd"), label="typecode")
    workers = data.draw(st.integers(2, 4), label="workers")
    ops = [
        data.draw(
            st.lists(
                st.tuples(st.integers(0, n - 1), st.integers(-50, 50)), min_size=100, max_size=1500
            ),
            label=f"ops{w}",
        )
        for w in range(workers)
    ]
    a = safeshm.SafeArray.create(tc, n)
    try:
        barrier = multiprocessing.get_context(method).Barrier(workers)
        run_all(method, array_adds_worker, [(a, barrier, w_ops) for w_ops in ops])
        expected = [0] * n
        for w_ops in ops:
            for i, d in w_ops:
                expected[i] += d
        assert a.to_list() == expected
    finally:
        a.close()
        a.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("use_locked", [True, False], ids=["locked", "fill"])
def test_snapshots_are_never_torn(use_locked: bool, make: Any) -> None:
    a = make("q", 256, stripes=16)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    torn = ctx.RawValue("q", 0)
    reads = ctx.RawValue("q", 0)
    with processes("fork", snapshot_reader_worker, [(a, stop, torn, reads)]) as (reader,):
        run_all("fork", uniform_writer_worker, [(a, use_locked, reads, 300, 20)])
        stop.set()
        reader.join(timeout=JOIN_TIMEOUT)
        assert reader.exitcode == 0
    assert reads.value >= 20, "the reader starved for the whole timeout"
    assert torn.value == 0


def test_elements_in_different_stripes_do_not_wait(make: Any) -> None:
    """Another process holding one stripe does not stop writes to other stripes."""
    a = make("q", 64)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with processes("fork", hold_stripe_then_die_worker, [(a.name, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        t0 = time.monotonic()
        for i in range(1, 64):
            a.add(i, 1)
        assert time.monotonic() - t0 < PROMPT
        kill_and_reap(p)
    assert a.add(0, 1) == 1  # its stripe recovered: an element write leaves nothing partial


@pytest.mark.parametrize("method", START_METHODS)
def test_numpy_writes_are_seen_by_another_process(method: str, make: Any) -> None:
    pytest.importorskip("numpy")
    a = make("d", 1000)
    run_all(method, numpy_write_worker, [(a.name, 2.5)])
    assert a.to_list() == [2.5] * 1000


# -- crashes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", START_METHODS)
def test_death_inside_locked_is_reported_to_the_next_holder(method: str, make: Any) -> None:
    a = make("q", [7] * 10)
    ctx = multiprocessing.get_context(method)
    ready = ctx.Event()
    with processes(method, die_inside_locked_worker, [(a.name, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        kill_and_reap(p)
    assert a.partial_update_suspected
    t0 = time.monotonic()
    left: list[int] = []

    def repair() -> None:
        with a.locked() as view:
            left.extend(view)  # what the dead holder left
            view[5:] = memoryview(bytes(8 * 5)).cast("q")

    with pytest.warns(safeshm.HolderDiedWarning, match="partial update"):
        repair()
    assert left == [-1] * 5 + [7] * 5
    assert time.monotonic() - t0 < PROMPT
    assert not a.partial_update_suspected  # a completed bulk write clears it
    assert a.to_list() == [-1] * 5 + [0] * 5
    assert a.statistics().recoveries >= 1


def test_death_inside_locked_is_reported_once(make: Any) -> None:
    """Warn once per recovery (issue 11), not at every snapshot until a bulk write; the
    flag stays set all the same."""
    import warnings

    a = make("q", [7] * 8, stripes=4)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with processes("fork", die_inside_locked_worker, [(a.name, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        kill_and_reap(p)
    with pytest.warns(safeshm.HolderDiedWarning, match="partial update"):
        assert a.add(5, 1) == 8  # recovers one stripe and tells
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert a.to_list() == [-1] * 4 + [7, 8, 7, 7]  # recovers the others: no new warning
        assert a.to_list() == [-1] * 4 + [7, 8, 7, 7]
        assert a.partial_update_suspected
        assert a.statistics().partial_update_suspected
        a.fill(0)
    assert not a.partial_update_suspected


def test_death_holding_one_stripe_is_not_a_partial_update(make: Any) -> None:
    a = make("q", 4, stripes=1)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with processes("fork", hold_stripe_then_die_worker, [(a.name, ready)]) as (p,):
        assert ready.wait(JOIN_TIMEOUT)
        kill_and_reap(p)
    assert a.add(1, 1) == 1  # no warning: an element write is all or nothing
    assert not a.partial_update_suspected
    assert a.to_list() == [0, 1, 0, 0]


# -- a model-based state machine ------------------------------------------------------------------
class ArrayMachine(RuleBasedStateMachine):
    """A SafeArray (one typecode per run) with a handle in a server process, against a list."""

    remote: Remote | None = None

    def __init__(self) -> None:
        super().__init__()
        self.a: safeshm.SafeArray[Any] | None = None
        self.model: list[Any] = []
        self.tc = "q"

    @initialize(data=st.data())
    def create(self, data: st.DataObject) -> None:
        self.tc = data.draw(st.sampled_from(TYPECODES), label="typecode")
        self.model = data.draw(st.lists(values_for(self.tc), max_size=12), label="initial")
        stripes = data.draw(st.integers(1, max(1, len(self.model))), label="stripes")
        self.a = safeshm.SafeArray.create(self.tc, self.model, stripes=stripes)  # type: ignore[call-overload]
        self.model = array.array(self.tc, self.model).tolist()
        assert self.remote is not None
        self.remote.attach("SafeArray", self.a.name)

    def _target(self, remote: bool, method: str, *args: Any) -> Any:
        assert self.a is not None and self.remote is not None
        if remote:
            return self.remote.call(self.a.name, method, *args)
        return getattr(self.a, method)(*args)

    @rule(data=st.data(), remote=st.booleans())
    def set_item(self, data: st.DataObject, remote: bool) -> None:
        i = data.draw(st.integers(-len(self.model) - 2, len(self.model) + 1), label="index")
        v = data.draw(values_for(self.tc), label="value")
        expected = outcome(lambda: array.array(self.tc, self.model).__setitem__(i, v))
        got = outcome(lambda: self._target(remote, "__setitem__", i, v))
        assert got[0] == expected[0]
        if got[0] == "ok":
            ref = array.array(self.tc, self.model)
            ref[i] = v
            self.model = ref.tolist()

    @rule(data=st.data(), remote=st.booleans())
    def add(self, data: st.DataObject, remote: bool) -> None:
        if not self.model:
            return
        i = data.draw(st.integers(-len(self.model), len(self.model) - 1), label="index")
        d = data.draw(values_for(self.tc), label="delta")
        ref = array.array(self.tc, self.model)
        expected = outcome(lambda: ref.__setitem__(i, ref[i] + d))
        got = outcome(lambda: self._target(remote, "add", i, d))
        assert got[0] == expected[0], (got, expected)
        if got[0] == "ok":
            assert got[1] == ref[i] or (math.isnan(got[1]) and math.isnan(ref[i]))
            self.model = ref.tolist()

    @rule(data=st.data(), remote=st.booleans(), hit=st.booleans())
    def compare_and_set(self, data: st.DataObject, remote: bool, hit: bool) -> None:
        if not self.model:
            return
        i = data.draw(st.integers(0, len(self.model) - 1), label="index")
        new = data.draw(values_for(self.tc), label="new")
        expected = self.model[i] if hit else data.draw(values_for(self.tc), label="expected")
        ok = self._target(remote, "compare_and_set", i, expected, new)
        assert ok == (self.model[i] == expected)
        if ok:
            ref = array.array(self.tc, self.model)
            ref[i] = new
            self.model = ref.tolist()

    @rule(data=st.data())
    def set_slice(self, data: st.DataObject) -> None:
        n = len(self.model)
        start = data.draw(st.integers(-n - 1, n + 1), label="start")
        stop = data.draw(st.integers(-n - 1, n + 1), label="stop")
        step = data.draw(st.sampled_from([None, 1, 2, -1, 3]), label="step")
        sl = slice(start, stop, step)
        size = len(range(*sl.indices(n)))
        vals = data.draw(st.lists(values_for(self.tc), min_size=size, max_size=size))
        assert self.a is not None
        self.a[sl] = vals
        ref = array.array(self.tc, self.model)
        ref[sl] = array.array(self.tc, vals)
        self.model = ref.tolist()

    @rule(v=st.data())
    def fill(self, v: st.DataObject) -> None:
        value = v.draw(values_for(self.tc))
        assert self.a is not None
        self.a.fill(value)
        self.model = array.array(self.tc, [value] * len(self.model)).tolist()

    @invariant()
    def agree(self) -> None:
        if self.a is None:
            return
        assert self.a.to_list() == self.model
        assert list(self.a) == self.model
        assert self.a[::-1] == self.model[::-1]
        assert len(self.a) == len(self.model)
        assert self.remote is not None
        assert self.remote.call(self.a.name, "to_list") == self.model

    def teardown(self) -> None:
        if self.a is not None:
            assert self.remote is not None
            self.remote.detach(self.a.name)
            self.a.close()
            self.a.unlink()


def test_state_machine(remote: Remote) -> None:
    ArrayMachine.remote = remote
    try:
        ArrayMachine.TestCase.settings = settings(stateful_step_count=25, max_examples=60)
        ArrayMachine.TestCase().runTest()
    finally:
        ArrayMachine.remote = None
