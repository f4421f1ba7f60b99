"""The lock benchmark: ``with multiprocessing.Lock():`` vs ``with safeshm.SafeLock:``.

P processes each enter and leave one shared lock ``n`` times, with nothing inside:
the cost of the lock itself -- uncontended with one process, contended with more. Each
worker records how many times it got through, and after the run the lock must be free:
a lock left held, or a worker that stopped short, fails the run. SafeLock is measured
with each implementation (native and ctypes, see ``harness.Agents``).
"""

from __future__ import annotations

import ctypes
import time
from typing import TYPE_CHECKING, Any, Final

from safeshm._lock import SafeLock

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
from .options import MAX_PROCESSES
from .report import print_rate_table, rate_rows

if TYPE_CHECKING:
    from multiprocessing.synchronize import Barrier, Lock

    from .harness import Context
    from .options import Settings

MP_LOCK: Final = "mp.Lock"
SAFE_LOCK: Final = "SafeLock"
IMPLEMENTATIONS: Final = (MP_LOCK, SAFE_LOCK)
SAFESHM: Final = (SAFE_LOCK,)

DESCRIPTIONS: Final = {
    MP_LOCK: "with lock: pass   (lock = multiprocessing.Lock())",
    SAFE_LOCK: "with lock: pass   (lock = safeshm.SafeLock.create(): a robust futex mutex)",
}

_WARMUP_OPS: Final = 5_000
_START_OPS: Final = 20_000
_QUICK_OPS: Final = 50_000


def contenders(variants: tuple[str, ...]) -> tuple[str, ...]:
    """Every contender, SafeLock once per implementation in ``variants``."""
    return with_variants(IMPLEMENTATIONS, SAFESHM, variants)


def _worker_lock(
    lock: Lock | SafeLock,
    done: ctypes.Array[ctypes.c_longlong],
    n: int,
    *,
    barrier: Barrier,
    times: ctypes.Array[ctypes.c_double],
    index: int,
) -> None:
    """``with lock: pass`` ``n`` times, as a hot loop in user code would write it."""
    try:
        with lock:  # one-time costs (a first acquire) off the clock
            pass
        barrier.wait(BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        for _ in range(n):
            with lock:
                pass
        end = time.perf_counter()
        record(times, index, start, end)
        done[index] = n
    finally:
        if isinstance(lock, SafeLock):
            lock.close()


def _free(lock: Lock | SafeLock) -> bool:
    """Whether nobody holds ``lock`` (taken and given back at once if so)."""
    got = lock.acquire_nowait() if isinstance(lock, SafeLock) else lock.acquire(False)
    if got:
        lock.release()
    return got


def prepare(ctx: Context, implementation: str, n: int) -> Contender:
    """A fresh lock for ``implementation``, with its worker's target and arguments."""
    done: ctypes.Array[ctypes.c_longlong] = ctx.RawArray(ctypes.c_longlong, MAX_PROCESSES)

    def completed(lock: Lock | SafeLock) -> int:
        # A lock left held counts as a run that went wrong: -1 is never P * n.
        return sum(done) if _free(lock) else -1

    if implementation == MP_LOCK:
        mp_lock = ctx.Lock()
        return Contender(
            _worker_lock,
            (mp_lock, done, n),
            lambda: completed(mp_lock),
            "iterations completed with the lock left free (-1: left held)",
            nothing,
        )
    if implementation == SAFE_LOCK:
        safe = SafeLock.create()
        return Contender(
            _worker_lock,
            (safe, done, n),
            lambda: completed(safe),
            "iterations completed with the lock left free (-1: left held)",
            lambda: drop(safe),
        )
    raise ValueError(f"unknown lock implementation {implementation!r}")


def weights(settings: Settings, variants: tuple[str, ...]) -> list[float]:
    """The progress steps :func:`measure_all` takes, weighed (see ``Progress``)."""
    return step_weights(settings, len(contenders(variants)) * len(settings.processes))


def measure_all(
    ctx: Context, settings: Settings, progress: Progress, agents: Agents
) -> dict[tuple[str, int], Cell]:
    """Every lock contender at every process count."""

    def one(impl: str, p: int, n: int) -> Run:
        return agents.measure(ctx, prepare, impl, p, n, time_limit_s=settings.time_limit_s)

    return measure_cells(
        contenders(agents.variants),
        settings,
        progress,
        part="lock",
        measure_one=one,
        warmup_ops=_WARMUP_OPS,
        start_ops=_START_OPS,
        quick_ops=_QUICK_OPS,
    )


def rows(cells: dict[tuple[str, int], Cell]) -> list[dict[str, Any]]:
    """The table's rows, as ``--json`` prints them under ``"lock"``."""
    return rate_rows(cells, MP_LOCK, IMPLEMENTATIONS, DESCRIPTIONS)


PANEL: Final = "SafeLock"


def ratios(
    cells: dict[tuple[str, int], Cell], processes: list[int], variants: tuple[str, ...]
) -> list[Ratio]:
    """The chart's ratios: ``with SafeLock:``, with each implementation, against
    ``with multiprocessing.Lock():``, per process count."""
    out = []
    for p in processes:
        for variant in variants:
            value = ratio(cells, (tagged(SAFE_LOCK, variant), p), (MP_LOCK, p))
            if value is not None:
                out.append(Ratio(PANEL, f"with SafeLock, {plural(p)}, {variant}", MP_LOCK, value))
    return out


def print_section(rows: list[dict[str, Any]]) -> None:
    """The lock table, from what ``--json`` prints under ``"lock"``."""
    print(
        "SafeLock: P processes entering and leaving one lock, nothing inside "
        "(1 process: uncontended)"
    )
    print("  safeshm rows: each implementation (native, ctypes) side by side")
    print()
    print("Implementations")
    for impl in IMPLEMENTATIONS:
        print(f"  {impl:<20}  {DESCRIPTIONS[impl]}")
    print()
    print_rate_table(rows, "mp.Lock")
