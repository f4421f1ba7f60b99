"""safeshm.metrics' types as users see them, checked by ``mypy --strict`` (not run by pytest)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import assert_type

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

import safeshm.metrics
from safeshm.metrics import (
    CardinalityError,
    Collector,
    Counter,
    Gauge,
    Histogram,
    MetricConflictError,
    MetricsRegistry,
    MetricsRegistryStatistics,
    NotConfiguredError,
)


def metrics() -> None:
    reg = safeshm.metrics.configure("app.metrics")
    assert_type(reg, MetricsRegistry)
    assert_type(
        safeshm.metrics.configure("app.metrics", series=10, rows=4, cells=40), MetricsRegistry
    )
    assert_type(safeshm.metrics.configured(), MetricsRegistry | None)
    assert_type(MetricsRegistry.create(), MetricsRegistry)
    assert_type(MetricsRegistry.create(name="m", series=8, rows=2, cells=16), MetricsRegistry)
    assert_type(MetricsRegistry.open("m", series=8), MetricsRegistry)
    assert_type(MetricsRegistry.attach("m"), MetricsRegistry)
    s = reg.statistics()
    assert_type(s, MetricsRegistryStatistics)
    assert_type(s.rows_ever_used, int)
    assert_type(s.series_capacity, int)

    c = Counter("requests", "Requests", ["method"], registry=reg, max_series=10, overflow=True)
    assert_type(c.labels("GET"), Counter)
    assert_type(c.labels(method="GET"), Counter)
    assert_type(c.labels("GET").inc(), None)
    assert_type(c.labels("GET").inc(2.5), None)
    with c.count_exceptions(ValueError):
        pass
    assert_type(c.remove("GET"), None)
    assert_type(c.collect(), list[Metric])
    assert_type(c.clear(), None)

    g = Gauge("inflight", "In flight", multiprocess_mode="livesum")
    assert_type(g, Gauge)
    assert_type(g.labels(), Gauge)
    g.inc()
    g.dec(2)
    g.set(1.5)
    g.set_to_current_time()
    with g.track_inprogress():
        pass
    with g.time():
        pass

    @g.track_inprogress()
    def work(x: int) -> str:
        return str(x)

    assert_type(work(1), str)

    h = Histogram("latency", "Latency", ["route"], buckets=(0.1, 1.0), unit="seconds")
    assert_type(h.labels("/"), Histogram)
    h.labels("/").observe(0.2)
    with h.labels("/").time():
        pass

    @h.labels("/").time()
    def timed() -> int:
        return 1

    assert_type(timed(), int)

    collector = Collector()
    assert_type(Collector(reg), Collector)
    assert_type(collector.collect(), Iterator[Metric])
    assert_type(collector.describe(), list[Metric])
    CollectorRegistry().register(collector)

    err: type[ValueError] = CardinalityError
    err = MetricConflictError
    rt: type[RuntimeError] = NotConfiguredError
    del err, rt
    reg.close()
    reg.unlink()
