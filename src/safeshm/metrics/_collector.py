"""The prometheus_client collector: exports a registry's families with the standard
exposition (``generate_latest``, ``start_http_server``, the WSGI/ASGI apps)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ._metrics import _default_registry
from ._registry import COUNTER, GAUGE, MetricsRegistry

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["Collector", "families"]


def _require_prometheus_client() -> None:
    try:
        import prometheus_client  # noqa: F401, PLC0415 - optional dependency
    except ImportError as e:
        raise ImportError(
            "safeshm.metrics.Collector needs prometheus_client: install the extra "
            "safeshm[prometheus] (pip install 'safeshm[prometheus]')"
        ) from e


class Collector:
    """A ``prometheus_client`` collector of every metric in a :class:`MetricsRegistry`.

    It reads the definitions stored in the segment, so an exporter process that defined
    no metric itself still exports all of them::

        from prometheus_client import CollectorRegistry, generate_latest
        reg = CollectorRegistry()
        reg.register(safeshm.metrics.Collector())
        generate_latest(reg)

    Args:
        registry: the registry to export; ``None``: the one :func:`configure` opened in
            this process, looked up at each collection.

    Raises:
        ImportError: prometheus_client is not installed (extra ``safeshm[prometheus]``).
    """

    def __init__(self, registry: MetricsRegistry | None = None) -> None:
        _require_prometheus_client()
        if registry is not None and not isinstance(registry, MetricsRegistry):
            raise TypeError(
                f"registry must be a safeshm.metrics.MetricsRegistry or None, not "
                f"{type(registry).__name__}"
            )
        self._registry = registry

    def describe(self) -> list[Metric]:
        """Nothing: registering the collector must not collect (prometheus_client calls
        ``describe()``, or ``collect()`` when there is none, at registration)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """One metric family per defined metric, with its active series."""
        yield from families(self._registry if self._registry is not None else _default_registry())


def families(reg: MetricsRegistry, name: str | None = None) -> Iterator[Metric]:
    """The families of ``reg``'s metrics (only the one called ``name``, if given), with
    their series summed over processes as a scrape shows them."""
    from prometheus_client.core import (  # noqa: PLC0415 - optional dependency
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.utils import floatToGoString  # noqa: PLC0415

    for definition, samples in reg.snapshot():
        if name is not None and definition.name != name:
            continue
        names = list(definition.labelnames)
        unit = definition.unit
        family: Metric
        if definition.type == COUNTER:
            counter = CounterMetricFamily(
                definition.name, definition.documentation, labels=names, unit=unit
            )
            for values, cells in samples:
                counter.add_metric(list(values), cells[0])
            family = counter
        elif definition.type == GAUGE:
            gauge = GaugeMetricFamily(
                definition.name, definition.documentation, labels=names, unit=unit
            )
            for values, cells in samples:
                gauge.add_metric(list(values), cells[0])
            family = gauge
        else:
            hist = HistogramMetricFamily(
                definition.name, definition.documentation, labels=names, unit=unit
            )
            for values, cells in samples:
                acc = 0.0
                buckets: list[tuple[str, float]] = []
                for bound, n in zip(definition.buckets, cells, strict=False):
                    acc += n
                    buckets.append((str(floatToGoString(bound)), acc))  # type: ignore[no-untyped-call]
                hist.add_metric(list(values), buckets, cells[-1])
            family = hist
        yield family
