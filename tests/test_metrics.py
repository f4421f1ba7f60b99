"""safeshm.metrics in one process: the API, validation, remove/revive, cardinality,
the collector's output and the registry's lifecycle."""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import safeshm
import safeshm.metrics
from safeshm.metrics import (
    CardinalityError,
    Collector,
    Counter,
    Gauge,
    Histogram,
    MetricConflictError,
    MetricsRegistry,
    NotConfiguredError,
)
from safeshm.metrics import _metrics as metrics_module

from ._metrics_helpers import fork, reap, value, values

prometheus_client = pytest.importorskip("prometheus_client")


@pytest.fixture
def reg(cleanup: Any) -> MetricsRegistry:
    return cleanup(MetricsRegistry.create(series=32, rows=8))  # type: ignore[no-any-return]


@pytest.fixture
def configured(name: str) -> Iterator[MetricsRegistry]:
    saved = metrics_module._default
    r = safeshm.metrics.configure(name, series=64, rows=8)
    try:
        yield r
    finally:
        metrics_module._default = saved
        r.close()
        r.unlink()


def expose(reg: MetricsRegistry | None = None) -> str:
    pc = prometheus_client.CollectorRegistry()
    pc.register(Collector(reg))
    return prometheus_client.generate_latest(pc).decode()  # type: ignore[no-any-return]


def parsed(
    reg: MetricsRegistry | None = None,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(expose(reg))
        for s in fam.samples
    }


# -- the basics -------------------------------------------------------------------------------
def test_counter_gauge_histogram_exposition(reg: MetricsRegistry) -> None:
    c = Counter("http_requests_total", "Requests served", ["method", "code"], registry=reg)
    g = Gauge("inflight", "In flight", registry=reg, multiprocess_mode="sum")
    h = Histogram("latency", "Latency", ["route"], unit="seconds", registry=reg, buckets=[0.1, 1])
    c.labels("GET", "200").inc()
    c.labels(method="GET", code=200).inc(2.5)
    c.labels("POST", "500").inc(0)
    g.inc(3)
    g.dec(1)
    h.labels("/").observe(0.05)
    h.labels("/").observe(0.5)
    h.labels("/").observe(7)
    h.labels("/").observe(-1)
    got = parsed(reg)
    assert got[("http_requests_total", (("code", "200"), ("method", "GET")))] == 3.5
    assert got[("http_requests_total", (("code", "500"), ("method", "POST")))] == 0
    assert got[("inflight", ())] == 2
    b = "latency_seconds_bucket"
    assert got[(b, (("le", "0.1"), ("route", "/")))] == 2
    assert got[(b, (("le", "1.0"), ("route", "/")))] == 3
    assert got[(b, (("le", "+Inf"), ("route", "/")))] == 4
    assert got[("latency_seconds_count", (("route", "/"),))] == 4
    assert got[("latency_seconds_sum", (("route", "/"),))] == pytest.approx(6.55)
    text = expose(reg)
    assert "# HELP http_requests_total Requests served" in text
    assert "# TYPE latency_seconds histogram" in text


def test_unlabelled_metrics_export_zero_at_definition(reg: MetricsRegistry) -> None:
    Counter("jobs", "Jobs", registry=reg)
    Gauge("temp", "T", registry=reg)
    Histogram("size", "S", registry=reg)
    got = parsed(reg)
    assert got[("jobs_total", ())] == 0
    assert got[("temp", ())] == 0
    assert got[("size_count", ())] == 0
    assert got[("size_bucket", (("le", "+Inf"),))] == 0


def test_an_exporter_that_defined_nothing_exports_everything(reg: MetricsRegistry) -> None:
    Counter("a", "help of a", ["x"], registry=reg).labels("1").inc(5)
    Histogram("b", "help of b", registry=reg, buckets=[1, 2]).observe(1.5)
    other = MetricsRegistry.attach(reg.name)
    try:
        text = expose(other)
    finally:
        other.close()
    assert '# HELP a_total help of a\n# TYPE a_total counter\na_total{x="1"} 5.0' in text
    assert 'b_bucket{le="2.0"} 1.0' in text


def test_metric_collect_is_its_family_over_all_processes(reg: MetricsRegistry) -> None:
    """``metric.collect()`` (what test suites read prometheus_client metrics with) gives
    this metric's family as a scrape shows it: other processes' counts included."""
    c = Counter("jobs", "jobs done", ["queue"], registry=reg)
    h = Histogram("latency", "l", registry=reg, buckets=[1, 2])
    Gauge("other", "o", registry=reg).set(3)
    c.labels("a").inc(2)
    h.observe(1.5)
    pid = fork(lambda: (c.labels("a").inc(5), c.labels("b").inc(), h.observe(0.5)))
    reap(pid)
    (family,) = c.collect()
    assert (family.name, family.type, family.documentation) == ("jobs", "counter", "jobs done")
    got = {(s.name, tuple(s.labels.items())): s.value for s in family.samples}
    assert got == {("jobs_total", (("queue", "a"),)): 7.0, ("jobs_total", (("queue", "b"),)): 1.0}
    assert c.labels("a").collect()[0].samples == family.samples  # a child: the family
    (hist,) = h.collect()
    assert {s.labels.get("le"): s.value for s in hist.samples if s.name == "latency_bucket"} == {
        "1.0": 1.0,
        "2.0": 2.0,
        "+Inf": 2.0,
    }
    exported = {f.name: f for f in safeshm.metrics.Collector(reg).collect()}
    assert exported["jobs"].samples == family.samples
    # prometheus_client's private counter._value.get(), which test suites use
    assert c.labels("a")._value.get() == 7.0
    assert c.labels("never")._value.get() == 0.0
    with pytest.raises(ValueError, match="has labels"):
        c._value.get()
    g = Gauge("workers", "w", registry=reg, multiprocess_mode="sum")
    g.inc(2)
    reap(fork(lambda: g.inc(3)))
    assert (g._value.get(), g._own_value()) == (5.0, 2.0)
    assert exported["latency"].samples == hist.samples


def test_names_like_prometheus_client(reg: MetricsRegistry) -> None:
    c = Counter("req", "r", namespace="app", subsystem="http", unit="bytes", registry=reg)
    c.inc()
    assert ("app_http_req_bytes", ()) in values(reg)
    assert "app_http_req_bytes_total 1.0" in expose(reg)
    Gauge("mem_bytes", "m", unit="bytes", registry=reg)
    assert ("mem_bytes", ()) in values(reg)


def test_child_api(reg: MetricsRegistry) -> None:
    c = Counter("c", "c", ["a", "b"], registry=reg)
    child = c.labels("x", "y")
    assert c.labels("x", "y") is child
    assert c.labels(b="y", a="x") is child
    assert isinstance(child, Counter)
    assert "labels={'a': 'x', 'b': 'y'}" in repr(child)
    with pytest.raises(ValueError, match="already has labels"):
        child.labels("x", "y")
    with pytest.raises(ValueError, match="missing label values"):
        c.inc()
    with pytest.raises(ValueError, match="Incorrect label count"):
        c.labels("x")
    with pytest.raises(ValueError, match="Incorrect label names"):
        c.labels(a="x", c="y")
    with pytest.raises(ValueError, match="both"):
        c.labels("x", b="y")
    u = Counter("u", "u", registry=reg)
    with pytest.raises(ValueError, match="No label names"):
        u.labels()
    with pytest.raises(ValueError, match="No label names"):
        u.remove()
    with pytest.raises(ValueError, match="Incorrect label count"):
        c.remove("x")
    assert values(reg)[("c", ("x", "y"))] == [0.0]


def test_bad_writes_change_nothing(reg: MetricsRegistry) -> None:
    c = Counter("c", "c", registry=reg)
    g = Gauge("g", "g", registry=reg)
    h = Histogram("h", "h", registry=reg, buckets=[1])
    c.inc(2)
    g.set(4)
    h.observe(0.5)
    before = values(reg)
    with pytest.raises(ValueError, match="non-negative"):
        c.inc(-1)
    for bad in ("x", None, [1]):
        with pytest.raises(TypeError):
            c.inc(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            g.set(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            g.inc(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            h.observe(bad)  # type: ignore[arg-type]
    assert values(reg) == before


def test_nan_like_prometheus_client(reg: MetricsRegistry) -> None:
    h = Histogram("h", "h", registry=reg, buckets=[1])
    h.observe(float("nan"))
    cells = values(reg)[("h", ())]
    assert cells[:2] == [0.0, 0.0]
    assert math.isnan(cells[2])
    c = Counter("c", "c", registry=reg)
    c.inc(math.inf)
    assert value(reg, "c") == math.inf


def test_gauge_methods(reg: MetricsRegistry) -> None:
    g = Gauge("g", "g", registry=reg)
    g.set(10)
    g.inc()
    g.dec(3)
    assert g._own_value() == 8
    g.set_to_current_time()
    assert abs(g._own_value() - __import__("time").time()) < 60
    with g.track_inprogress():
        g.set(0)
        g.inc(0)
        assert g._own_value() == 0
    assert g._own_value() == -1  # dec after the block

    @g.track_inprogress()
    def work() -> float:
        return g._own_value()

    g.set(0)
    assert work() == 1
    assert g._own_value() == 0
    with g.time():
        pass
    assert 0 <= g._own_value() < 5
    recent = Gauge("r", "r", registry=reg, multiprocess_mode="mostrecent")
    recent.set(2)
    with pytest.raises(RuntimeError, match="mostrecent"):
        recent.inc()
    with pytest.raises(RuntimeError, match="mostrecent"):
        recent.dec()
    assert value(reg, "r") == 2


def test_counter_count_exceptions_and_histogram_time(reg: MetricsRegistry) -> None:
    c = Counter("errors", "e", registry=reg)
    with pytest.raises(KeyError), c.count_exceptions(KeyError):
        raise KeyError
    with pytest.raises(ZeroDivisionError), c.count_exceptions(KeyError):
        raise ZeroDivisionError
    with c.count_exceptions():
        pass

    @c.count_exceptions()
    def boom() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        boom()
    assert value(reg, "errors") == 2
    h = Histogram("t", "t", registry=reg, buckets=[100])
    with h.time():
        pass

    @h.time()
    def f(x: int) -> int:
        return x + 1

    assert f(1) == 2
    assert values(reg)[("t", ())][:2] == [2.0, 0.0]


# -- validation: typed errors, nothing changed ------------------------------------------------
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("", "d"), {}, ValueError, "empty"),
        (("1abc", "d"), {}, ValueError, "Invalid metric name"),
        (("a-b", "d"), {}, ValueError, "Invalid metric name"),
        (("ok", "d", ["a-b"]), {}, ValueError, "Invalid label"),
        (("ok", "d", ["__x"]), {}, ValueError, "Reserved"),
        (("ok", "d", ["a", "a"]), {}, ValueError, "Duplicate"),
        (("ok", "d", "method"), {}, TypeError, "sequence of names"),
        (("ok", 3), {}, TypeError, "documentation"),
        (("ok", "d"), {"max_series": 0}, ValueError, "max_series"),
        (("ok", "d"), {"overflow": True}, ValueError, "overflow=True needs label"),
        (("ok", "d"), {"registry": object()}, TypeError, "MetricsRegistry"),
    ],
)
def test_invalid_definitions(
    reg: MetricsRegistry, args: tuple[Any, ...], kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        Counter(*args, **{"registry": reg, **kwargs})
    assert reg.statistics().families == 0


def test_prometheus_registry_refused() -> None:
    with pytest.raises(TypeError, match=r"register\s+safeshm.metrics.Collector"):
        Counter("a", "a", registry=prometheus_client.CollectorRegistry())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("buckets", "match"),
    [
        ([2, 1], "sorted"),
        ([1, 1], "distinct"),
        ([float("nan")], "NaN"),
        ([], "at least two"),
        ([math.inf], "at least two"),
        ("12", "sequence"),
    ],
)
def test_invalid_buckets(reg: MetricsRegistry, buckets: Any, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        Histogram("h", "h", registry=reg, buckets=buckets)
    with pytest.raises(ValueError, match="le"):
        Histogram("h", "h", ["le"], registry=reg)
    assert reg.statistics().families == 0


def test_gauge_modes_validated(reg: MetricsRegistry) -> None:
    for mode in ("all", "liveall"):
        with pytest.raises(ValueError, match="churn"):
            Gauge("g", "g", registry=reg, multiprocess_mode=mode)
    with pytest.raises(ValueError, match="Invalid multiprocess mode"):
        Gauge("g", "g", registry=reg, multiprocess_mode="average")
    assert reg.statistics().families == 0


def test_redefinition(reg: MetricsRegistry) -> None:
    a = Counter("a", "first help", ["x"], registry=reg)
    a.labels("1").inc()
    same = Counter("a", "other help is fine", ["x"], registry=reg)
    same.labels("1").inc()
    assert value(reg, "a", ("1",)) == 2
    Counter("b_seconds", "b", unit="seconds", registry=reg)
    before = reg.statistics()
    for bad in (
        lambda: Gauge("a", "a", ["x"], registry=reg),
        lambda: Counter("a", "a", ["y"], registry=reg),
        lambda: Counter("a", "a", registry=reg),
        lambda: Counter("b_seconds", "b", registry=reg),
    ):
        with pytest.raises(MetricConflictError):
            bad()
    Histogram("h", "h", registry=reg, buckets=[1, 2])
    with pytest.raises(MetricConflictError, match="buckets"):
        Histogram("h", "h", registry=reg, buckets=[1, 3])
    Gauge("g", "g", registry=reg, multiprocess_mode="max")
    with pytest.raises(MetricConflictError, match="mode"):
        Gauge("g", "g", registry=reg, multiprocess_mode="min")
    assert reg.statistics().families == before.families + 2
    assert "first help" in expose(reg)


# -- remove, clear, revive --------------------------------------------------------------------
def test_remove_and_revive(reg: MetricsRegistry) -> None:
    c = Counter("c", "c", ["k"], registry=reg)
    h = Histogram("h", "h", ["k"], registry=reg, buckets=[1])
    g = Gauge("g", "g", ["k"], registry=reg, multiprocess_mode="sum")
    kept = c.labels("a")
    kept.inc(5)
    c.labels("b").inc(1)
    h.labels("a").observe(0.5)
    g.labels("a").set(7)
    c.remove("a")
    h.remove("a")
    g.remove("a")
    c.remove("never-used")  # nothing to do
    got = values(reg)
    assert ("c", ("a",)) not in got
    assert got[("c", ("b",))] == [1.0]
    assert ("h", ("a",)) not in got
    assert ("g", ("a",)) not in got
    used = reg.statistics().series
    kept.inc(2)  # the cached child revives the same entry, from zero
    assert value(reg, "c", ("a",)) == 2
    h.labels("a").observe(3)
    assert values(reg)[("h", ("a",))] == [0.0, 1.0, 3.0]
    assert g.labels("a")._own_value() == 0  # the old value is ignored after revival
    g.labels("a").inc(1)
    assert value(reg, "g", ("a",)) == 1
    assert reg.statistics().series == used  # revived in place: no new capacity used
    c.clear()
    h.clear()
    assert [k for k in values(reg) if k[0] in ("c", "h")] == []
    c.labels("b").inc(4)
    assert value(reg, "c", ("b",)) == 4


def test_remove_from_another_process_handle(reg: MetricsRegistry) -> None:
    c = Counter("c", "c", ["k"], registry=reg)
    child = c.labels("a")
    child.inc(3)
    other = MetricsRegistry.attach(reg.name)
    try:
        Counter("c", "c", ["k"], registry=other).remove("a")
        assert ("c", ("a",)) not in values(reg)
        child.inc()  # sees the generation change: revived from zero
        assert value(other, "c", ("a",)) == 1
    finally:
        other.close()


def test_unlabelled_clear_revives_on_use(reg: MetricsRegistry) -> None:
    c = Counter("c", "c", registry=reg)
    c.inc(3)
    c.clear()
    assert ("c", ()) not in values(reg)
    c.inc()
    assert value(reg, "c") == 1


# -- cardinality ------------------------------------------------------------------------------
def test_registry_full_raises_and_changes_nothing(cleanup: Any) -> None:
    reg = cleanup(MetricsRegistry.create(series=4, rows=2))
    c = Counter("c", "c", ["k"], registry=reg)
    for i in range(4):
        c.labels(str(i)).inc()
    before = reg.statistics()
    with pytest.raises(CardinalityError, match="full") as info:
        c.labels("4")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, safeshm.SafeShmError)
    with pytest.raises(CardinalityError):
        Counter("d", "d", registry=reg)
    assert reg.statistics() == before
    c.remove("0")
    with pytest.raises(CardinalityError):  # removed entries keep their capacity...
        c.labels("4")
    c.labels("0").inc()  # ...for their own label set
    assert value(reg, "c", ("0",)) == 1


def test_cells_full(cleanup: Any) -> None:
    reg = cleanup(MetricsRegistry.create(series=100, rows=2, cells=20))
    h = Histogram("h", "h", ["k"], registry=reg)  # 16 cells a series
    h.labels("a").observe(1)
    with pytest.raises(CardinalityError, match="cells"):
        h.labels("b")
    Counter("c", "c", registry=reg).inc()  # 1 cell still fits


def test_max_series_and_overflow(reg: MetricsRegistry) -> None:
    c = Counter("c", "c", ["path"], registry=reg, max_series=2)
    c.labels("/a").inc()
    c.labels("/b").inc()
    with pytest.raises(CardinalityError, match="max_series=2"):
        c.labels("/c")
    c.remove("/a")
    c.labels("/c").inc()  # max_series counts active label sets
    o = Counter("o", "o", ["path", "m"], registry=reg, max_series=2, overflow=True)
    assert values(reg)[("o", ("__overflow__", "__overflow__"))] == [0.0]
    o.labels("/a", "GET").inc()
    o.labels("/b", "GET").inc()
    for i in range(20):
        o.labels(f"/x{i}", "GET").inc()
    got = values(reg)
    assert got[("o", ("__overflow__", "__overflow__"))] == [20.0]
    assert len([k for k in got if k[0] == "o"]) == 3
    assert set(o._children) == {("/a", "GET"), ("/b", "GET"), ("__overflow__",) * 2}
    o.clear()
    o.labels("/z", "GET").inc()  # the overflow series is revived when needed
    assert values(reg)[("o", ("/z", "GET"))] == [1.0]


def test_overflow_when_registry_full(cleanup: Any) -> None:
    reg = cleanup(MetricsRegistry.create(series=3, rows=2))
    o = Histogram("o", "o", ["k"], registry=reg, overflow=True, buckets=[1])
    for i in range(10):
        o.labels(str(i)).observe(0.5)
    got = values(reg)
    assert got[("o", ("__overflow__",))][0] == 8
    assert sum(1 for k in got if k[0] == "o") == 3


# -- configure and the default registry -------------------------------------------------------
def test_not_configured(name: str) -> None:
    saved = metrics_module._default
    metrics_module._default = None
    try:
        c = Counter("lazy", "lazy")
        with pytest.raises(NotConfiguredError, match=r"configure\("):
            c.inc()
        with pytest.raises(NotConfiguredError):
            Collector().collect().__next__()
        assert safeshm.metrics.configured() is None
    finally:
        metrics_module._default = saved


def test_defined_before_configure_binds_lazily(name: str) -> None:
    saved = metrics_module._default
    metrics_module._default = None
    c = Counter("early", "early", ["k"])
    g = Gauge("early_g", "g")
    child = c.labels("a")
    reg = safeshm.metrics.configure(name, series=16, rows=4)
    try:
        assert safeshm.metrics.configure(name) is reg
        with pytest.raises(safeshm.IncompatibleSegmentError):
            safeshm.metrics.configure(name, series=17)
        assert safeshm.metrics.configured() is reg
        child.inc()
        c.labels("a").inc()
        g.set(3)
        assert "early_total" in expose()
        assert value(reg, "early", ("a",)) == 2
        assert value(reg, "early_g") == 3
        # switching registries rebinds the metrics defined without registry=
        other = safeshm.metrics.configure(name + "b", series=16, rows=4)
        try:
            child.inc(10)
            assert value(other, "early", ("a",)) == 10
            assert value(reg, "early", ("a",)) == 2
        finally:
            other.close()
            other.unlink()
    finally:
        metrics_module._default = saved
        reg.close()
        reg.unlink()


def test_configured_metric_defined_after(configured: MetricsRegistry) -> None:
    c = Counter("after", "a")
    c.inc()
    assert value(configured, "after") == 1


# -- the registry's lifecycle -----------------------------------------------------------------
def test_registry_lifecycle(name: str) -> None:
    with MetricsRegistry.create(name=name, series=8, rows=2, cells=10) as reg:
        assert reg.name == name
        st = reg.statistics()
        assert (st.series_capacity, st.rows, st.cells_capacity) == (8, 2, 10)
        assert "series=0/8" in repr(reg)
        same = MetricsRegistry.open(name, series=8)
        same.close()
        with pytest.raises(safeshm.IncompatibleSegmentError, match="rows=2"):
            MetricsRegistry.open(name, rows=3)
        with pytest.raises(safeshm.IncompatibleSegmentError):
            safeshm.SafeCounter.attach(name)
        c = Counter("c", "c", registry=reg)
        c.inc()
    assert reg.closed
    assert "closed=True" in repr(reg)
    with pytest.raises(safeshm.SegmentClosedError):
        c.inc()
    with pytest.raises(safeshm.SegmentClosedError):
        reg.statistics()
    with pytest.raises(safeshm.SegmentNotFoundError):
        MetricsRegistry.attach(name)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"series": 0}, ValueError),
        ({"rows": 1 << 17}, ValueError),
        ({"cells": 0}, ValueError),
        ({"series": 1.5}, TypeError),
        ({"rows": True}, TypeError),
    ],
)
def test_bad_capacities(kwargs: dict[str, Any], error: type, name: str) -> None:
    with pytest.raises(error):
        MetricsRegistry.create(**kwargs)
    with pytest.raises(error):
        MetricsRegistry.open(name, **kwargs)


def test_default_capacities(cleanup: Any) -> None:
    reg = cleanup(MetricsRegistry.create())
    st = reg.statistics()
    assert (st.series_capacity, st.rows, st.cells_capacity) == (1024, 256, 4096)


def test_close_from_another_thread_keeps_its_rows_until_it_ends(reg: MetricsRegistry) -> None:
    c = Counter("c", "c", registry=reg)
    go, done = threading.Event(), threading.Event()

    def worker() -> None:
        c.inc()
        go.set()
        done.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    assert go.wait(10)
    c.inc()
    assert reg.statistics().rows_in_use == 2
    other = MetricsRegistry.attach(reg.name)
    reg.close()
    assert other.statistics().rows_in_use == 1  # this thread's row was released at close
    done.set()
    t.join(10)
    assert other.statistics().rows_in_use == 0
    assert value(other, "c") == 2
    other.close()


def test_threads_exact_and_rows_reused(reg: MetricsRegistry) -> None:
    c = Counter("c", "c", ["k"], registry=reg)
    h = Histogram("h", "h", registry=reg, buckets=[1])
    child = c.labels("x")

    def work() -> None:
        for _ in range(2000):
            child.inc()
            h.observe(2)

    for _ in range(5):  # 20 threads over time, 4 at once: rows are reused
        ts = [threading.Thread(target=work) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
    assert value(reg, "c", ("x",)) == 40000
    assert values(reg)[("h", ())] == [0.0, 40000.0, 80000.0]
    assert reg.statistics().rows_ever_used <= 5


def test_rows_full_fall_back_to_the_locked_base(cleanup: Any) -> None:
    reg = cleanup(MetricsRegistry.create(series=8, rows=1))
    c = Counter("c", "c", registry=reg)
    g = Gauge("g", "g", registry=reg, multiprocess_mode="sum")
    c.inc()  # this thread takes the only row
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                for _ in range(100):
                    c.inc()
                g.set(5)  # no row for the process's gauges either
            assert any(issubclass(x.category, safeshm.SafeShmWarning) for x in w)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert not errors
    assert value(reg, "c") == 101
    assert value(reg, "g") == 5
    assert reg.statistics().locked_adds >= 100


def test_fork_child_gets_its_own_row(reg: MetricsRegistry) -> None:
    c = Counter("c", "c", registry=reg)
    c.inc()
    parent_row = reg._tls.lease.w
    r, w = os.pipe()

    def child() -> None:
        assert not hasattr(reg._tls, "row")
        for _ in range(5000):
            c.inc()
        os.write(w, str(reg._tls.lease.w).encode())

    pid = fork(child)
    for _ in range(5000):
        c.inc()
    assert reap(pid) == 0
    assert int(os.read(r, 64)) != parent_row
    os.close(r)
    os.close(w)
    assert value(reg, "c") == 10001


def test_collector_describe_is_empty_and_import_is_light() -> None:
    assert Collector.describe(Collector()) == []  # type: ignore[arg-type]
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import safeshm.metrics as m\n"
        "try:\n    m.Collector()\nexcept ImportError as e:\n    print(e)\n"
        "assert not any(k.startswith('prometheus_client.') for k in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "safeshm[prometheus]" in out.stdout


def test_collect_through_standard_exposition(configured: MetricsRegistry) -> None:
    c = Counter("served", "Served", ["code"])
    c.labels("200").inc(3)
    app = prometheus_client.make_wsgi_app(registry=_pc_registry())
    body: list[bytes] = []

    def start(status: str, headers: list[tuple[str, str]]) -> None:
        assert status.startswith("200")

    body.extend(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}, start))
    assert b'served_total{code="200"} 3.0' in b"".join(body)


def _pc_registry() -> Any:
    pc = prometheus_client.CollectorRegistry()
    pc.register(Collector())
    return pc


def test_removed_gauge_ignores_other_writers_old_values(reg: MetricsRegistry) -> None:
    other = MetricsRegistry.attach(reg.name)  # another writer (its own gauge row)
    try:
        for mode in ("sum", "max", "mostrecent"):
            mine = Gauge(f"g_{mode}", "g", ["k"], registry=reg, multiprocess_mode=mode)
            theirs = Gauge(f"g_{mode}", "g", ["k"], registry=other, multiprocess_mode=mode)
            theirs.labels("a").set(100)
            mine.labels("a").set(1)
            assert value(reg, f"g_{mode}", ("a",)) == (
                101 if mode == "sum" else 100 if mode == "max" else 1
            )
            mine.remove("a")
            mine.labels("a").set(2)
            assert value(reg, f"g_{mode}", ("a",)) == 2
    finally:
        other.close()
    assert value(reg, "g_sum", ("a",)) == 2  # the other handle's row, released: still ignored


# -- damage -----------------------------------------------------------------------------------
def _damage_fixture(reg: MetricsRegistry) -> Counter:
    c = Counter("c", "c", ["a"], registry=reg)
    for i in range(5):
        c.labels(str(i)).inc(i + 1)
    c.remove("4")
    Counter("u", "u", registry=reg).inc(100)
    return c


@pytest.mark.parametrize("damage", ["ncells", "first", "fam", "state", "labels", "definition"])
def test_a_damaged_directory_entry_or_definition_is_refused(cleanup: Any, damage: str) -> None:
    from safeshm.metrics import _registry as r

    reg = cleanup(MetricsRegistry.create(series=32, rows=8))
    c = _damage_fixture(reg)
    geo = reg._geo
    mm = reg._seg.mm
    q = reg._q
    w = reg._dir_w(reg._sindex[(0, ("4",))])
    if damage == "ncells":  # review r2 F1: revive wrote -sum far past the base row
        q[w + r._D_NCELLS] = 200_000
    elif damage == "first":  # series '4' points at series '1''s cell
        q[w + r._D_FIRST] = q[reg._dir_w(1) + r._D_FIRST]
    elif damage == "fam":
        q[w + r._D_FAM] = 77
    elif damage == "state":
        q[w + r._D_STATE] = 5
    elif damage == "labels":
        mm[geo.blob_offset + q[w + r._D_OFF] + q[w + r._D_LEN] - 2] ^= 0x20
    else:
        fw = (r._FAM_OFFSET + 0 * r._ENTRY) // 8
        mm[geo.blob_offset + q[fw + r._F_OFF] + q[fw + r._F_LEN] // 2] ^= 0x01
    values_area = bytes(mm[geo.base_offset : geo.total])
    fresh = cleanup(MetricsRegistry.attach(reg.name))  # a process that has read nothing yet
    with pytest.raises(safeshm.SegmentCorruptedError, match=reg.name):
        values(fresh)
    with pytest.raises(safeshm.SegmentCorruptedError):
        Counter("c", "c", ["a"], registry=fresh).labels("4").inc()
    if damage in {"ncells", "first", "fam", "state"}:  # the handle that cached the entry
        with pytest.raises(safeshm.SegmentCorruptedError):
            c.labels("4").inc()
    assert bytes(mm[geo.base_offset : geo.total]) == values_area  # nothing written


@pytest.mark.parametrize(
    "damage", ["rows mark", "cells", "journal cell", "stale journal", "epoch", "generation"]
)
def test_damaged_control_words_are_refused_or_harmless(cleanup: Any, damage: str) -> None:
    """Review R2c, one damaged control word each: a lowered rows mark made a scrape drop
    rows (counters went backwards) and a new thread take a live row; a lowered cells
    count made the collector raise IndexError; a fold journal naming cell -1, or a stale
    one marked active again, made recovery write outside its cell or undo a finished
    fold; a huge epoch or generation made remove() raise ValueError half-way. Each is a
    SegmentCorruptedError now, or wraps harmlessly."""
    from safeshm.metrics import _registry as r

    reg = cleanup(MetricsRegistry.create(series=16, rows=4, cells=64))
    q, d = reg._q, reg._d
    ctrl = r._CTRL
    c = Counter("c", "c", ["l"], registry=reg)
    g = Gauge("g", "g", registry=reg, multiprocess_mode="sum")
    c.labels("a").inc(5)
    assert reap(fork(lambda: g.set(7))) == 0  # its row has a dead owner now
    assert reap(fork(lambda: g.set(1))) == 0  # claims it: folds 7 (a journaled fold)
    assert value(reg, "g") == 8
    expect_corrupt = True
    if damage == "rows mark":
        q[ctrl + r._C_HIGH] = 0  # this process's live row 0 is past it now
    elif damage == "cells":
        q[ctrl + r._C_CELLS] = 0
    elif damage in {"journal cell", "stale journal"}:
        if damage == "journal cell":
            q[ctrl + r._C_JROW], q[ctrl + r._C_JCELL] = 0, -1
            d[ctrl + r._C_JOLDV] = 1234.5
        q[ctrl + r._C_JACTIVE] = 1
        assert reap(fork(lambda: reg._mutex.acquire() and os._exit(0))) == 0  # dies holding it
    else:
        word = (
            ctrl + r._C_EPOCH
            if damage == "epoch"
            else reg._dir_w(reg._sindex[(0, ("a",))]) + r._D_GEN
        )
        q[word] = (1 << 63) - 1
        expect_corrupt = False
    before = bytes(reg._seg.mm[reg._geo.base_offset : reg._geo.total])
    if expect_corrupt:
        with pytest.raises(safeshm.SegmentCorruptedError, match=reg.name):
            values(reg)  # (a journal is reported by the recovery, once)
        if "journal" not in damage:
            with pytest.raises(safeshm.SegmentCorruptedError):
                threading_claim(c)
        assert bytes(reg._seg.mm[reg._geo.base_offset : reg._geo.total]) == before
    else:
        c.remove("a")  # wraps: no ValueError after the state changed
        assert values(reg).get(("c_total", ("a",))) is None
        c.labels("a").inc(2)
        assert value(reg, "c", ("a",)) == 2


def threading_claim(c: Counter) -> None:
    """An inc from a new thread (which claims a row), re-raising its error here."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            c.labels("b").inc()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    if errors:
        raise errors[0]


def _fuzz(seed: int, trials: int) -> None:  # pragma: no cover - runs in a child
    import random

    from safeshm._segment import HEADER_SIZE
    from safeshm.metrics import _registry as r

    rng = random.Random(seed)
    outcomes = {"typed": 0, "unchanged": 0}
    for _ in range(trials):
        reg = MetricsRegistry.create(series=16, rows=4)
        try:
            c = Counter("c", "help c", ["a"], registry=reg)
            g = Gauge("g", "help g", ["a"], registry=reg, multiprocess_mode="max")
            Histogram("h", "help h", registry=reg, buckets=(1, 2)).observe(1.5)
            for i in range(3):
                c.labels(str(i)).inc(i + 1)
                g.labels(str(i)).set(i + 10)
            c.remove("2")
            expected = values(reg)
            geo = reg._geo
            q = reg._q
            regions = {
                "header": (0, HEADER_SIZE),
                "families": (r._FAM_OFFSET, r._FAM_OFFSET + q[r._CTRL + r._C_NFAM] * r._ENTRY),
                "directory": (geo.dir_offset, geo.dir_offset + q[r._CTRL + r._C_NSERIES] * 64),
                "definitions": (geo.blob_offset, geo.blob_offset + q[r._CTRL + r._C_BLOB]),
            }
            where = rng.choice(sorted(regions))
            pos = rng.randrange(*regions[where])
            reg._seg.mm[pos] ^= rng.randrange(1, 256)
            try:
                fresh = MetricsRegistry.attach(reg.name)
            except safeshm.IncompatibleSegmentError:
                outcomes["typed"] = outcomes.get("typed", 0) + 1
            else:
                outcomes[_fuzz_use(fresh, expected, (where, pos))] += 1
        finally:
            reg.close()
            reg.unlink()
    print("fuzz outcomes:", outcomes)


def _fuzz_use(  # pragma: no cover - runs in a child
    fresh: MetricsRegistry, expected: dict[Any, list[float]], where: Any
) -> str:
    try:
        assert values(fresh) == expected, where
        c2 = Counter("c", "help c", ["a"], registry=fresh)
        g2 = Gauge("g", "help g", ["a"], registry=fresh, multiprocess_mode="max")
        c2.labels("0").inc()
        c2.labels("2").inc()
        c2.labels("new").inc(7)
        g2.labels("new").set(5)
        got = values(fresh)
        expected[("c", ("0",))] = [2.0]
        expected[("c", ("2",))] = [1.0]
        expected[("c", ("new",))] = [7.0]
        expected[("g", ("new",))] = [5.0]
        assert got == expected, (where, got)
        return "unchanged"
    except safeshm.SegmentCorruptedError:
        return "typed"
    finally:
        fresh.close()


def test_byte_flips_outside_the_values_give_a_typed_error_or_the_right_values() -> None:
    """Review r2 F2: one damaged byte in the header, family table, directory or
    definitions must give SegmentCorruptedError or the unchanged values: never another
    exception, never a hang, never a write outside a series' cells."""
    pid = fork(lambda: _fuzz(seed=14, trials=300))
    assert reap(pid, timeout=20) == 0


def test_unencodable_or_huge_label_values_are_refused(reg: MetricsRegistry) -> None:
    """Review r2 F6/F7: a lone surrogate stored once broke every scrape; a huge value ate
    the definition space and was echoed whole in the error."""
    from safeshm.metrics import LabelValueError

    c = Counter("c", "c", ["f"], registry=reg)
    before = reg.statistics()
    with pytest.raises(LabelValueError, match="'f'") as info:
        c.labels(os.fsdecode(b"caf\xe9.txt"))
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, safeshm.SafeShmError)
    with pytest.raises(LabelValueError) as info:
        c.labels("x" * 100_000)
    assert len(str(info.value)) < 400
    assert reg.statistics() == before
    assert "c_total" in expose(reg)  # the scrape still works
    c.labels("é" * 300).inc()  # long but within the bound


def test_capacity_errors_say_what_ran_out(cleanup: Any) -> None:
    reg = cleanup(MetricsRegistry.create(series=8, rows=2))
    c = Counter("c", "c", ["k"], registry=reg)
    for i in range(6):
        c.labels(("v" * 1020) + str(i))  # the definitions space runs out first
    with pytest.raises(CardinalityError, match="definitions space") as info:
        c.labels(("v" * 1020) + "x")
    assert len(str(info.value)) < 600
    assert "series are used" not in str(info.value)
    small = cleanup(MetricsRegistry.create(series=2, rows=2))
    d = Counter("d", "d", ["k"], registry=small)
    d.labels("a")
    d.labels("b")
    with pytest.raises(CardinalityError, match="all 2 series are used"):
        d.labels("c")


def test_excess_label_sets_skip_the_mutex_once_overflowing(reg: MetricsRegistry) -> None:
    """Review r2 F8: hostile label values routed to __overflow__ took the registry mutex
    on every call."""
    o = Counter("o", "o", ["path"], registry=reg, max_series=2, overflow=True)
    o.labels("/a").inc()
    o.labels("/b").inc()
    o.labels("/x0").inc()  # the first excess label set: decided under the mutex
    calls = 0
    held = reg._held

    def counting() -> Any:
        nonlocal calls
        calls += 1
        return held()

    reg._held = counting  # type: ignore[method-assign]
    try:
        for i in range(1, 200):
            o.labels(f"/x{i}").inc()
        assert calls == 0
    finally:
        del reg._held
    assert values(reg)[("o", ("__overflow__",))] == [200.0]
    assert len(o._children) == 3  # memory does not grow
    o.remove("/a")  # room again: a new label set gets its own series
    o.labels("/new").inc()
    assert values(reg)[("o", ("/new",))] == [1.0]


def test_amounts_must_be_numbers_like_prometheus_client(reg: MetricsRegistry) -> None:
    """Review r2 F9: observe("0.3") was accepted; prometheus_client raises TypeError."""
    c = Counter("c", "c", registry=reg)
    g = Gauge("g", "g", registry=reg)
    h = Histogram("h", "h", registry=reg, buckets=[1])
    bad: Any = "0.3"
    for call in (h.observe, c.inc, g.inc, g.dec):
        with pytest.raises(TypeError):
            call(bad)
    pc = prometheus_client.CollectorRegistry()
    with pytest.raises(TypeError):
        prometheus_client.Histogram("h", "h", registry=pc).observe(bad)
    g.set(bad)  # float() as prometheus_client's Gauge.set
    assert values(reg)[("h", ())] == [0.0, 0.0, 0.0]
    assert value(reg, "c") == 0
    assert value(reg, "g") == 0.3


def test_a_conflict_says_how_to_redeploy(reg: MetricsRegistry) -> None:
    """Review r2 F5: a new version that changes buckets finds the old registry."""
    Histogram("h", "h", registry=reg, buckets=[1, 2])
    with pytest.raises(MetricConflictError, match=r"python -m safeshm rm .*new registry name"):
        Histogram("h", "h", registry=reg, buckets=[1, 2, 3])


def test_scrapes_while_another_thread_adds_label_sets(cleanup: Any) -> None:
    """A scrape reads the series it saw under the registry's lock; a label set another
    thread adds meanwhile is in the next scrape, never an IndexError in this one."""
    reg = cleanup(MetricsRegistry.create(series=4096, rows=8))
    c = Counter("race_total", "labels added during scrapes", ["k"], registry=reg)
    stop = threading.Event()

    def add() -> None:
        for i in range(3000):
            if stop.is_set():
                return
            c.labels(str(i)).inc()

    t = threading.Thread(target=add)
    t.start()
    try:
        scrapes = 0
        while t.is_alive() or scrapes == 0:
            families = reg.snapshot()
            for _, samples in families:
                assert all(v in ([0.0], [1.0]) for _, v in samples), samples[:3]
            scrapes += 1
    finally:
        stop.set()
        t.join(timeout=30)
    assert not t.is_alive()
    assert [len(s) for _, s in reg.snapshot()] == [3000]


def test_a_gauge_used_while_this_thread_writes_one_is_refused(reg: MetricsRegistry) -> None:
    """What a signal handler (or a GC callback) that sets a gauge meets when the code it
    interrupted is writing one: LockReentryError, not a deadlock; the gauge still works."""
    g = Gauge("reentered", "x", registry=reg, multiprocess_mode="livesum")
    g.set(1)
    with reg._glock:  # as the interrupted write holds it
        with pytest.raises(safeshm.LockReentryError):
            g.inc()
        with pytest.raises(safeshm.LockReentryError):
            g.set(5)
    g.inc(2)
    assert value(reg, "reentered") == 3
