"""The counter benchmark: the multiprocessing idioms vs safeshm's counters, side by side.

Four ways to count from many processes:

1. ``multiprocessing.Value('q', 0)`` used the way users write it:
   ``with v.get_lock(): v.value += 1``;
2. ``multiprocessing.Lock()`` guarding a ``multiprocessing.RawValue('q', 0)``;
3. :meth:`safeshm.SafeCounter.add` (exact, lock-free compare-and-swap);
4. :meth:`safeshm.ShardedCounter.add` (one cache-line slot per thread).

The final count is checked against ``P * n`` after every run. The safeshm counters are
measured with each implementation (native and ctypes, see ``harness.Agents``).
"""

from __future__ import annotations

import ctypes
import time
from typing import TYPE_CHECKING, Any, Final

from safeshm._counter import SafeCounter
from safeshm._sharded import ShardedCounter

from .chart import Ratio
from .harness import (
    BARRIER_TIMEOUT_S,
    Agents,
    Cell,
    Contender,
    Progress,
    Run,
    drop,
    measure_cells,
    nothing,
    plural,
    ratio,
    record,
    step_weights,
    tagged,
    with_variants,
)
from .report import print_rate_table, rate_rows

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized
    from multiprocessing.synchronize import Barrier, Lock

    from .harness import Context
    from .options import Settings

IDIOM: Final = "mp.Value idiom"
RAW_LOCK: Final = "mp.Lock + RawValue"
SAFE: Final = "SafeCounter"
SHARDED: Final = "ShardedCounter"
IMPLEMENTATIONS: Final = (IDIOM, RAW_LOCK, SAFE, SHARDED)
SAFESHM: Final = (SAFE, SHARDED)
"""The contenders measured once per implementation (native, ctypes)."""


def contenders(variants: tuple[str, ...]) -> tuple[str, ...]:
    """Every contender, the safeshm ones once per implementation in ``variants``."""
    return with_variants(IMPLEMENTATIONS, SAFESHM, variants)


DESCRIPTIONS: Final = {
    IDIOM: "with v.get_lock(): v.value += 1   (v = multiprocessing.Value('q', 0))",
    RAW_LOCK: "with lock: rv.value += 1   (multiprocessing.Lock + RawValue('q', 0))",
    SAFE: "add(1)   (safeshm.SafeCounter: exact, lock-free compare-and-swap)",
    SHARDED: "add(1)   (safeshm.ShardedCounter: one slot per thread)",
}


def _worker_value_idiom(
    v: Synchronized[int],
    n: int,
    *,
    barrier: Barrier,
    times: ctypes.Array[ctypes.c_double],
    index: int,
) -> None:
    """The idiom exactly as written in user code, ``get_lock()`` call included."""
    barrier.wait(BARRIER_TIMEOUT_S)
    start = time.perf_counter()
    for _ in range(n):
        with v.get_lock():
            v.value += 1
    end = time.perf_counter()
    record(times, index, start, end)


def _worker_raw_lock(
    rv: ctypes.c_int64,
    lock: Lock,
    n: int,
    *,
    barrier: Barrier,
    times: ctypes.Array[ctypes.c_double],
    index: int,
) -> None:
    """A plain lock around an unsynchronized shared value."""
    barrier.wait(BARRIER_TIMEOUT_S)
    start = time.perf_counter()
    for _ in range(n):
        with lock:
            rv.value += 1
    end = time.perf_counter()
    record(times, index, start, end)


def _worker_safeshm(
    counter: SafeCounter | ShardedCounter,
    n: int,
    *,
    barrier: Barrier,
    times: ctypes.Array[ctypes.c_double],
    index: int,
) -> None:
    """``add(1)`` through a hoisted bound method, as a hot loop in user code would do."""
    try:
        add = counter.add
        # Pay one-time costs outside the timed region -- ShardedCounter claims its slot
        # on the first add -- without changing the count, so every contender is timed
        # in its steady state.
        add(0)
        barrier.wait(BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        for _ in range(n):
            add(1)
        end = time.perf_counter()
        record(times, index, start, end)
    finally:
        counter.close()


# Operations per worker in the warm-up run, and the first calibration run (or, with
# --quick, every run).
_WARMUP_OPS: Final = 5_000
_START_OPS: Final = 20_000
_QUICK_OPS: Final = 50_000
"""Operations per worker in every --quick run (no calibration): long enough to time."""


def prepare(ctx: Context, implementation: str, n: int) -> Contender:
    """A fresh counter for ``implementation``, with its worker's target and arguments."""
    if implementation == IDIOM:
        v = ctx.Value("q", 0)
        return Contender(_worker_value_idiom, (v, n), lambda: v.value, "final count", nothing)
    if implementation == RAW_LOCK:
        rv = ctx.RawValue("q", 0)
        return Contender(
            _worker_raw_lock, (rv, ctx.Lock(), n), lambda: rv.value, "final count", nothing
        )
    if implementation in (SAFE, SHARDED):
        counter = SafeCounter.create() if implementation == SAFE else ShardedCounter.create()
        return Contender(
            _worker_safeshm,
            (counter, n),
            lambda: counter.value,
            "final count",
            lambda: drop(counter),
        )
    raise ValueError(f"unknown counter implementation {implementation!r}")


def weights(settings: Settings, variants: tuple[str, ...]) -> list[float]:
    """The progress steps :func:`measure_all` takes, weighed (see ``Progress``)."""
    return step_weights(settings, len(contenders(variants)) * len(settings.processes))


def measure_all(
    ctx: Context, settings: Settings, progress: Progress, agents: Agents
) -> dict[tuple[str, int], Cell]:
    """Every counter contender at every process count."""

    def one(impl: str, p: int, n: int) -> Run:
        return agents.measure(ctx, prepare, impl, p, n, time_limit_s=settings.time_limit_s)

    return measure_cells(
        contenders(agents.variants),
        settings,
        progress,
        part="counter",
        measure_one=one,
        warmup_ops=_WARMUP_OPS,
        start_ops=_START_OPS,
        quick_ops=_QUICK_OPS,
    )


def rows(cells: dict[tuple[str, int], Cell]) -> list[dict[str, Any]]:
    """The table's rows, as ``--json`` prints them under ``"results"``."""
    return rate_rows(cells, IDIOM, (SAFE, SHARDED), DESCRIPTIONS)


PANEL: Final = "SafeCounter & ShardedCounter"


def ratios(
    cells: dict[tuple[str, int], Cell], processes: list[int], variants: tuple[str, ...]
) -> list[Ratio]:
    """The chart's ratios: each safeshm counter, with each implementation, against each
    idiom, per process count (labelled ``SafeCounter.add, 1 process, native``)."""
    out = []
    for impl in SAFESHM:
        for p in processes:
            for variant in variants:
                for alt in (IDIOM, RAW_LOCK):
                    value = ratio(cells, (tagged(impl, variant), p), (alt, p))
                    if value is not None:
                        out.append(Ratio(PANEL, f"{impl}.add, {plural(p)}, {variant}", alt, value))
    return out


def print_section(rows: list[dict[str, Any]]) -> None:
    """The counter tables, from what ``--json`` prints under ``"results"``."""
    print("SafeCounter and ShardedCounter: P processes incrementing one shared int64 counter")
    print("  safeshm rows: each implementation (native, ctypes) side by side")
    print()
    print("Implementations")
    for impl in IMPLEMENTATIONS:
        print(f"  {impl:<20}  {DESCRIPTIONS[impl]}")
    print()
    print_rate_table(rows, "mp.Value")
