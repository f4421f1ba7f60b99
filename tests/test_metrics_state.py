"""A hypothesis state machine: several handles on one MetricsRegistry against a model,
with remove/clear/revive and handles closed and reopened."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from safeshm.metrics import Counter, Gauge, Histogram, MetricsRegistry

from ._metrics_helpers import values

HANDLES = 3
LABELS = st.sampled_from(["a", "b", "c"])
BUCKETS = (1.0, 2.0)
AMOUNTS = st.integers(min_value=0, max_value=5)


class MetricsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.reg = MetricsRegistry.create(series=32, rows=16)
        self.handles: list[MetricsRegistry | None] = [None] * HANDLES
        self.metrics: list[dict[str, Any]] = [{} for _ in range(HANDLES)]
        self.writer = [0] * HANDLES  # gauge writer id per handle (a new one per reopen)
        self.next_writer = 0
        # model
        self.counter: dict[str, float] = {}
        self.hist: dict[str, list[float]] = {}
        self.gauges: dict[str, dict[str, dict[int, float]]] = {"sum": {}, "max": {}}
        for i in range(HANDLES):
            self._open(i)

    def _open(self, i: int) -> None:
        h = MetricsRegistry.attach(self.reg.name)
        self.handles[i] = h
        self.metrics[i] = {
            "c": Counter("c", "c", ["k"], registry=h),
            "h": Histogram("h", "h", ["k"], registry=h, buckets=BUCKETS),
            "sum": Gauge("gs", "g", ["k"], registry=h, multiprocess_mode="sum"),
            "max": Gauge("gm", "g", ["k"], registry=h, multiprocess_mode="max"),
        }
        self.next_writer += 1
        self.writer[i] = self.next_writer

    @rule(i=st.integers(0, HANDLES - 1), k=LABELS, n=AMOUNTS)
    def inc(self, i: int, k: str, n: int) -> None:
        self.metrics[i]["c"].labels(k).inc(n)
        self.counter[k] = self.counter.get(k, 0.0) + n

    @rule(i=st.integers(0, HANDLES - 1), k=LABELS, x=st.sampled_from([0.5, 1.0, 1.5, 3.0]))
    def observe(self, i: int, k: str, x: float) -> None:
        self.metrics[i]["h"].labels(k).observe(x)
        cells = self.hist.setdefault(k, [0.0, 0.0, 0.0, 0.0])
        cells[0 if x <= 1 else 1 if x <= 2 else 2] += 1
        cells[3] += x

    @rule(
        i=st.integers(0, HANDLES - 1),
        k=LABELS,
        mode=st.sampled_from(["sum", "max"]),
        v=st.integers(-3, 9),
        add=st.booleans(),
    )
    def gauge(self, i: int, k: str, mode: str, v: int, add: bool) -> None:
        g = self.metrics[i][mode].labels(k)
        mine = self.gauges[mode].setdefault(k, {})
        w = self.writer[i]
        if add:
            g.inc(v)
            mine[w] = mine.get(w, 0.0) + v
        else:
            g.set(v)
            mine[w] = float(v)

    @rule(i=st.integers(0, HANDLES - 1), k=LABELS, which=st.sampled_from(["c", "h", "sum", "max"]))
    def remove(self, i: int, k: str, which: str) -> None:
        self.metrics[i][which].remove(k)
        self._forget(which, k)

    @rule(i=st.integers(0, HANDLES - 1), which=st.sampled_from(["c", "h", "sum", "max"]))
    def clear(self, i: int, which: str) -> None:
        self.metrics[i][which].clear()
        for k in "abc":
            self._forget(which, k)

    def _forget(self, which: str, k: str) -> None:
        if which == "c":
            self.counter.pop(k, None)
        elif which == "h":
            self.hist.pop(k, None)
        else:
            self.gauges[which].pop(k, None)

    @precondition(lambda self: any(h is not None for h in self.handles))
    @rule(i=st.integers(0, HANDLES - 1))
    def reopen(self, i: int) -> None:
        h = self.handles[i]
        assert h is not None
        h.close()
        self._open(i)

    @invariant()
    def matches_model(self) -> None:
        got = values(self.reg)
        expected: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        for k, v in self.counter.items():
            expected[("c", (k,))] = [v]
        for k, cells in self.hist.items():
            expected[("h", (k,))] = cells
        for mode, name in (("sum", "gs"), ("max", "gm")):
            for k, writers in self.gauges[mode].items():
                vs = list(writers.values())
                expected[(name, (k,))] = [sum(vs) if mode == "sum" else max(vs)]
        # series created by labels() without a write are exported with zeros: compare the
        # written ones exactly and require the others to be zero
        for key, cells in got.items():
            if key in expected:
                assert cells == expected[key], key
            else:
                assert all(x == 0 for x in cells), (key, cells)
        assert set(expected) <= set(got)

    def teardown(self) -> None:
        for h in self.handles:
            if h is not None:
                h.close()
        self.reg.close()
        self.reg.unlink()


MetricsMachine.TestCase.settings = settings(
    MetricsMachine.TestCase.settings, stateful_step_count=30
)
TestMetricsMachine = MetricsMachine.TestCase
