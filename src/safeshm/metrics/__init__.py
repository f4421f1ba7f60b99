"""Prometheus metrics shared by worker processes, on one shared-memory segment.

A drop-in for ``prometheus_client``'s multiprocess mode: the same metric constructors,
one line of setup per process, and a collector for the standard exposition::

    import safeshm.metrics
    from safeshm.metrics import Counter, Gauge, Histogram

    safeshm.metrics.configure("myapp.metrics")   # in every process; any order
    REQUESTS = Counter("http_requests", "Requests served", ["method", "code"])
    REQUESTS.labels("GET", "200").inc()

    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry()
    registry.register(safeshm.metrics.Collector())
    generate_latest(registry)

Each thread adds into its own row of the segment without any lock; a row whose thread
or process ended is reused with its values kept, so counters never go backwards, a
scrape costs the same after 10,000 worker restarts as after none, and nothing grows
with churn. Capacity is fixed when the registry is created: a label set beyond it
raises :class:`CardinalityError` (or, with ``overflow=True``, counts into an
``"__overflow__"`` series). Only :class:`Collector` needs ``prometheus_client``.
"""

from __future__ import annotations

from ._collector import Collector
from ._metrics import DEFAULT_BUCKETS, Counter, Gauge, Histogram, configure, configured
from ._registry import (
    CardinalityError,
    LabelValueError,
    MetricConflictError,
    MetricsRegistry,
    MetricsRegistryStatistics,
    NotConfiguredError,
)

__all__ = [
    "DEFAULT_BUCKETS",
    "CardinalityError",
    "Collector",
    "Counter",
    "Gauge",
    "Histogram",
    "LabelValueError",
    "MetricConflictError",
    "MetricsRegistry",
    "MetricsRegistryStatistics",
    "NotConfiguredError",
    "configure",
    "configured",
]
