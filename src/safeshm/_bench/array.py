"""The array benchmark: the multiprocessing and numpy idioms vs safeshm.SafeArray.

Element adds at random indices of a 1000-element int64 array:

1. ``multiprocessing.Array('q', 1000)`` used the way users write it:
   ``with arr.get_lock(): arr[i] += 1``;
2. numpy on a :class:`multiprocessing.shared_memory.SharedMemory` guarded by a
   ``multiprocessing.Lock()``: ``with lock: a[i] += 1``;
3. :meth:`safeshm.SafeArray.add` (one lock stripe per group of elements);

and, in this one process, summing a large float64 array with numpy: on a private array,
through :meth:`safeshm.SafeArray.locked`, and on a ``SharedMemory`` under an
``mp.Lock``. numpy is optional: without it the parts that need it are skipped, with a note.
The sum of all elements is checked after every element run, and every bulk sum against
its exact value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any, Final

from safeshm import _compat
from safeshm._array import SafeArray

from .chart import Ratio
from .harness import (
    BARRIER_TIMEOUT_S,
    VARIANTS,
    Agents,
    BenchError,
    Cell,
    Contender,
    Progress,
    Run,
    drop,
    drop_shared_memory,
    measure_cells,
    nothing,
    plural,
    ratio,
    record,
    step_weights,
    tagged,
    untagged,
    with_variants,
)
from .report import fmt_ratio, print_rate_table, rate_rows

if TYPE_CHECKING:
    import ctypes
    from multiprocessing.sharedctypes import SynchronizedArray
    from multiprocessing.synchronize import Barrier, Lock

    from .harness import Context
    from .options import Settings

ARRAY_IDIOM: Final = "mp.Array idiom"
ARRAY_NUMPY: Final = "numpy + mp.Lock"
ARRAY_SAFE: Final = "SafeArray"
ARRAY_IMPLEMENTATIONS: Final = (ARRAY_IDIOM, ARRAY_NUMPY, ARRAY_SAFE)
SAFESHM: Final = (ARRAY_SAFE,)
"""The element contenders measured once per implementation (native, ctypes)."""
ARRAY_LENGTH: Final = 1000
"""Elements (int64) in the array the element-add workers update."""

BULK_PRIVATE: Final = "numpy private"
BULK_SAFE: Final = "SafeArray.locked()"
BULK_SHM: Final = "SharedMemory + mp.Lock"
BULK_IMPLEMENTATIONS: Final = (BULK_PRIVATE, BULK_SAFE, BULK_SHM)

_ARRAY_DESCRIPTIONS: Final = {
    ARRAY_IDIOM: "with arr.get_lock(): arr[i] += 1   (arr = multiprocessing.Array('q', 1000))",
    ARRAY_NUMPY: "with lock: a[i] += 1   (a: numpy int64 view of a SharedMemory; "
    "multiprocessing.Lock)",
    ARRAY_SAFE: "add(i, 1)   (safeshm.SafeArray('q', 1000): element i locks stripe i % 64)",
}
_BULK_DESCRIPTIONS: Final = {
    BULK_PRIVATE: "np.sum(x)   (x: a private numpy float64 array)",
    BULK_SAFE: "with a.locked() as view: np.asarray(view).sum()   (safeshm.SafeArray('d', N))",
    BULK_SHM: "with lock: np.ndarray((N,), np.float64, buffer=shm.buf).sum()   "
    "(SharedMemory + multiprocessing.Lock)",
}

# Every worker draws its indices from its own generator, seeded by its worker number only,
# so worker k of every implementation updates exactly the same elements in the same order.
_INDEX_SEED: Final = 0x5AFE5111
_WARMUP_OPS: Final = 5_000
_START_OPS: Final = 20_000
_QUICK_OPS: Final = 50_000
"""Operations per worker in every --quick run (no calibration): long enough to time."""
"""Element adds per worker in the first calibration run (or, with --quick, every run)."""
# An array worker's index list costs 8 bytes per operation: 200 MB at this cap.
_MAX_OPS_PER_WORKER: Final = 25_000_000
# A bulk calibration run shorter than this fraction of the target is too noisy to scale from.
_CALIBRATION_MIN_FRACTION: Final = 0.1
_QUICK_SUMS: Final = 20
"""Back-to-back sums per bulk sample with --quick (no calibration): milliseconds, in this
process, so a quick run still sums each array once, untimed, before its sample."""


def _indices(worker: int, n: int, length: int) -> list[int]:
    """Worker ``worker``'s ``n`` random indices into an array of ``length`` elements.

    Identical for every implementation (see :data:`_INDEX_SEED`), and made before the
    barrier so that generating them is never timed. ``choices`` over a list of the
    ``length`` index objects fills the list with references to those few objects: 8 bytes
    per entry instead of a fresh int object each.
    """
    return random.Random(_INDEX_SEED + worker).choices(list(range(length)), k=n)


def _worker_array_idiom(
    arr: SynchronizedArray[int],
    length: int,
    n: int,
    *,
    barrier: Barrier,
    times: ctypes.Array[ctypes.c_double],
    index: int,
) -> None:
    """The ``multiprocessing.Array`` idiom exactly as written in user code."""
    indices = _indices(index, n, length)
    barrier.wait(BARRIER_TIMEOUT_S)
    start = time.perf_counter()
    for i in indices:
        with arr.get_lock():
            arr[i] += 1
    end = time.perf_counter()
    record(times, index, start, end)


def _attach_shared_memory(name: str) -> SharedMemory:
    """Attach, in a spawned worker, to the ``SharedMemory`` the parent created.

    The parent created the segment, so the parent's resource tracker already has it
    registered and the parent unlinks it (which unregisters it) after the workers exit.
    On 3.13+ ``track=False`` keeps the worker out of the tracker altogether. Before 3.13
    attaching always registers it again, but a spawned worker shares its parent's tracker
    (multiprocessing hands the tracker's pipe to every child), whose registry is a set: the
    second registration is a no-op, nothing is unlinked when the worker exits, and nothing
    is reported. ``resource_tracker.unregister`` here -- the usual advice for *unrelated*
    processes, each with a tracker of its own -- would be wrong: it would remove the
    parent's own registration from the shared tracker, which then prints a ``KeyError``
    traceback when the parent's ``unlink()`` unregisters the segment (seen on 3.11, 3.12
    and 3.13), and would leave the segment behind if the parent died.
    """
    # A conditional expression, not an if statement: mypy checks each Python version in
    # CI, and would call the other version's branch unreachable.
    untracked: dict[str, Any] = {"track": False} if sys.version_info >= (3, 13) else {}
    return SharedMemory(name, **untracked)


def _worker_array_numpy(
    shm_name: str,
    lock: Lock,
    length: int,
    n: int,
    *,
    barrier: Barrier,
    times: ctypes.Array[ctypes.c_double],
    index: int,
) -> None:
    """numpy over a ``SharedMemory``, with a plain lock around each read-modify-write."""
    import numpy as np  # noqa: PLC0415 - optional dependency, needed only by this worker

    shm = _attach_shared_memory(shm_name)
    try:
        a = np.ndarray((length,), np.int64, buffer=shm.buf)
        try:
            indices = _indices(index, n, length)
            barrier.wait(BARRIER_TIMEOUT_S)
            start = time.perf_counter()
            for i in indices:
                with lock:
                    a[i] += 1
            end = time.perf_counter()
            record(times, index, start, end)
        finally:
            # shm.close() raises BufferError while a numpy array still exports shm.buf,
            # even when an exception is on its way out (its traceback keeps this frame).
            del a
    finally:
        shm.close()


def _worker_array_safe(
    arr: SafeArray[int],
    length: int,
    n: int,
    *,
    barrier: Barrier,
    times: ctypes.Array[ctypes.c_double],
    index: int,
) -> None:
    """``add(i, 1)`` through a hoisted bound method, as a hot loop in user code would do."""
    try:
        add = arr.add
        indices = _indices(index, n, length)
        barrier.wait(BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        for i in indices:
            add(i, 1)
        end = time.perf_counter()
        record(times, index, start, end)
    finally:
        arr.close()


def prepare(ctx: Context, implementation: str, n: int) -> Contender:
    """A fresh array for ``implementation``, with its worker's target and arguments."""
    if implementation == ARRAY_IDIOM:
        arr = ctx.Array("q", ARRAY_LENGTH)
        return Contender(
            _worker_array_idiom,
            (arr, ARRAY_LENGTH, n),
            lambda: sum(arr.get_obj()),
            "sum of all elements",
            nothing,
        )
    if implementation == ARRAY_NUMPY:
        lock = ctx.Lock()
        # Created zero-filled (a fresh file in /dev/shm), by the parent, which also
        # unlinks it: see _attach_shared_memory for the workers' side.
        shm = SharedMemory(create=True, size=8 * ARRAY_LENGTH)

        def read_sum() -> int:
            buf = shm.buf
            if buf is None:  # pragma: no cover - only after close(), which comes later
                raise BenchError(f"SharedMemory {shm.name!r} was closed too early")
            # Read without numpy, through views released before shm.close() needs it.
            with buf[: 8 * ARRAY_LENGTH] as raw, raw.cast("q") as elements:
                return sum(elements)

        return Contender(
            _worker_array_numpy,
            (shm.name, lock, ARRAY_LENGTH, n),
            read_sum,
            "sum of all elements",
            lambda: drop_shared_memory(shm),
        )
    if implementation == ARRAY_SAFE:
        safe = SafeArray.create("q", ARRAY_LENGTH)
        return Contender(
            _worker_array_safe,
            (safe, ARRAY_LENGTH, n),
            lambda: sum(safe.to_list()),
            "sum of all elements",
            lambda: drop(safe),
        )
    raise ValueError(f"unknown array implementation {implementation!r}")


def element_contenders(plan: Plan, variants: tuple[str, ...]) -> tuple[str, ...]:
    """The element-add contenders, SafeArray once per implementation in ``variants``."""
    return with_variants(plan.element_implementations, SAFESHM, variants)


def weights(settings: Settings, plan: Plan, variants: tuple[str, ...]) -> list[float]:
    """The progress steps :func:`measure_elements` and :func:`measure_bulk` take, weighed
    (see ``Progress``)."""
    out = step_weights(settings, len(element_contenders(plan, variants)) * len(settings.processes))
    if plan.bulk:
        # In this process: no workers to start, so only the measuring time.
        n = len(BULK_IMPLEMENTATIONS)
        if settings.quick:
            return out + [0.01] * (n * settings.repeats)
        out += (
            [0.05] * n + [0.3 * settings.seconds] * n + [settings.seconds] * (n * settings.repeats)
        )
    return out


def measure_elements(
    ctx: Context, settings: Settings, plan: Plan, progress: Progress, agents: Agents
) -> dict[tuple[str, int], Cell]:
    """Every element-add contender at every process count."""

    def one(impl: str, p: int, n: int) -> Run:
        return agents.measure(ctx, prepare, impl, p, n, time_limit_s=settings.time_limit_s)

    return measure_cells(
        element_contenders(plan, agents.variants),
        settings,
        progress,
        part="array element add",
        measure_one=one,
        warmup_ops=_WARMUP_OPS,
        start_ops=_START_OPS,
        quick_ops=_QUICK_OPS,
        cap=_MAX_OPS_PER_WORKER,
    )


# --- the bulk sum: one process, no workers ---------------------------------------------------
def _bulk_expected_sum(elements: int) -> float:
    """The exact sum of the bulk array, which holds ``i % 1000`` at index ``i``.

    Every partial sum of such integers is an integer far below 2**53, exactly
    representable, so numpy's summation order cannot change the float result.
    """
    q, r = divmod(elements, 1000)
    return float(q * (999 * 1000 // 2) + r * (r - 1) // 2)


@contextlib.contextmanager
def _bulk_contenders(elements: int) -> Iterator[dict[str, Callable[[], float]]]:
    """Make the three arrays to sum, each holding the same values; free them on exit.

    Yields:
        For each of :data:`BULK_IMPLEMENTATIONS`, a function that sums its array once,
        exactly as a user would (lock taken and view made inside the function).
    """
    import numpy as np  # noqa: PLC0415 - optional dependency, needed only by this part

    private = np.arange(elements, dtype=np.float64)
    np.remainder(private, 1000.0, out=private)
    lock = multiprocessing.Lock()  # used in this process only
    safe = SafeArray.create("d", elements)
    try:
        safe[:] = private  # a float64 numpy array is taken as the source without a copy
        shm = SharedMemory(create=True, size=8 * elements)
        try:
            staged = np.ndarray((elements,), np.float64, buffer=shm.buf)
            staged[:] = private
            del staged  # shm.close() raises BufferError while a numpy array exports shm.buf

            def private_sum() -> float:
                return float(np.sum(private))

            def safe_sum() -> float:
                with safe.locked() as view:
                    a = np.asarray(view)
                    try:
                        return float(a.sum())
                    finally:
                        # locked() raises LockedViewLeakedError if an array made from the
                        # view outlives the block, and an exception's traceback would keep
                        # this frame -- and `a` -- alive.
                        del a

            def shm_sum() -> float:
                with lock:
                    a = np.ndarray((elements,), np.float64, buffer=shm.buf)
                    try:
                        return float(a.sum())
                    finally:
                        del a  # as above: shm.close() needs every export gone

            yield {BULK_PRIVATE: private_sum, BULK_SAFE: safe_sum, BULK_SHM: shm_sum}
        finally:
            drop_shared_memory(shm)
    finally:
        drop(safe)


def _time_sums(
    implementation: str, sum_once: Callable[[], float], k: int, expected: float
) -> float:
    """Seconds per sum over ``k`` back-to-back sums, each checked against ``expected``.

    Raises:
        BenchError: a sum came out wrong.
    """
    start = time.perf_counter()
    for _ in range(k):
        total = sum_once()
        # A float comparison: nanoseconds, next to milliseconds of summing.
        if total != expected:
            raise BenchError(f"{implementation}: sum {total!r}, expected {expected!r}")
    return max(time.perf_counter() - start, 1e-9) / k


def _calibrate_sums(
    implementation: str, sum_once: Callable[[], float], seconds: float, expected: float
) -> int:
    """How many back-to-back sums make one bulk measurement last about ``seconds``."""
    k = 1
    while True:
        elapsed = k * _time_sums(implementation, sum_once, k, expected)
        if elapsed >= seconds * _CALIBRATION_MIN_FRACTION:
            break
        factor = 2 * seconds * _CALIBRATION_MIN_FRACTION / elapsed
        k = int(k * min(100.0, max(2.0, factor)))
    return max(1, round(k * seconds / elapsed))


@dataclasses.dataclass(frozen=True)
class BulkCell:
    """All repeats of one bulk-sum implementation."""

    implementation: str
    elements: int
    sums_per_sample: int
    samples: tuple[float, ...]
    """Seconds per sum in each repeat (the mean over its back-to-back sums)."""

    @property
    def median(self) -> float:
        """Median seconds per sum over the repeats."""
        return statistics.median(self.samples)


def measure_bulk(settings: Settings, progress: Progress) -> dict[str, BulkCell]:
    """Warm up, calibrate and time every bulk-sum implementation, in this process
    (``settings.quick``: one untimed sum each instead of the warm-up steps, and
    :data:`_QUICK_SUMS` sums per sample without calibration)."""
    elements, seconds, repeats = settings.bulk_elements, settings.seconds, settings.repeats
    expected = _bulk_expected_sum(elements)

    def step(impl: str, what: str) -> None:
        progress.step(f"array bulk sum: {impl}, {what}")

    with _bulk_contenders(elements) as contenders:
        counts = dict.fromkeys(BULK_IMPLEMENTATIONS, _QUICK_SUMS)
        if settings.quick:
            for impl in BULK_IMPLEMENTATIONS:  # first-touch costs, off the clock
                _time_sums(impl, contenders[impl], 1, expected)
        else:
            for impl in BULK_IMPLEMENTATIONS:
                step(impl, "warm-up")
                _time_sums(impl, contenders[impl], 1, expected)
            for impl in BULK_IMPLEMENTATIONS:
                step(impl, "calibrating")
                counts[impl] = _calibrate_sums(impl, contenders[impl], seconds, expected)
        samples: dict[str, list[float]] = {impl: [] for impl in BULK_IMPLEMENTATIONS}
        for r in range(repeats):
            # Rotated round-robin, as for the element measurements.
            shift = r % len(BULK_IMPLEMENTATIONS)
            for impl in BULK_IMPLEMENTATIONS[shift:] + BULK_IMPLEMENTATIONS[:shift]:
                step(impl, f"repeat {r + 1}/{repeats}")
                samples[impl].append(_time_sums(impl, contenders[impl], counts[impl], expected))
    return {
        impl: BulkCell(impl, elements, counts[impl], tuple(samples[impl]))
        for impl in BULK_IMPLEMENTATIONS
    }


def element_rows(cells: dict[tuple[str, int], Cell]) -> list[dict[str, Any]]:
    """The element table's rows, as ``--json`` prints them."""
    return rate_rows(cells, ARRAY_IDIOM, ARRAY_IMPLEMENTATIONS, _ARRAY_DESCRIPTIONS)


def section(
    settings: Settings, plan: Plan, cells: dict[tuple[str, int], Cell], bulk: dict[str, BulkCell]
) -> dict[str, Any]:
    """What ``--json`` prints under ``"array"``."""
    return {
        "numpy": plan.numpy_version,
        "notes": plan.notes,
        "length": ARRAY_LENGTH,
        "element_implementations": list(plan.element_implementations),
        "element_add": element_rows(cells),
        "bulk_elements": settings.bulk_elements,
        # Summed in this process: with this process's implementation only.
        "bulk_implementation": _compat.implementation(),
        "bulk_sum": _bulk_rows(bulk),
    }


PANEL: Final = "SafeArray"


def ratios(
    cells: dict[tuple[str, int], Cell],
    bulk: dict[str, BulkCell],
    processes: list[int],
    bulk_elements: int,
) -> list[Ratio]:
    """The chart's ratios: SafeArray's element adds against each idiom per process count,
    and its bulk sum's speed against each alternative's."""
    out = []
    variants = [v for v in VARIANTS if any(untagged(name) == (ARRAY_SAFE, v) for name, _ in cells)]
    for p in processes:
        for variant in variants:
            for alt in (ARRAY_IDIOM, ARRAY_NUMPY):
                value = ratio(cells, (tagged(ARRAY_SAFE, variant), p), (alt, p))
                if value is not None:
                    out.append(Ratio(PANEL, f"add(i, 1), {plural(p)}, {variant}", alt, value))
    for alt in (BULK_PRIVATE, BULK_SHM):
        time_ratio = bulk_ratio(bulk, BULK_SAFE, alt)
        if time_ratio is not None:
            out.append(
                Ratio(
                    PANEL,
                    f"locked() + numpy sum of {8 * bulk_elements / 1e6:.0f} MB",
                    alt,
                    1 / time_ratio,
                )
            )
    return out


def bulk_ratio(bulk: dict[str, BulkCell], a: str, b: str) -> float | None:
    """Time ratio ``a / b`` of median seconds per sum (above 1: ``a`` is slower)."""
    if a not in bulk or b not in bulk:
        return None
    return bulk[a].median / bulk[b].median


def _bulk_rows(bulk: dict[str, BulkCell]) -> list[dict[str, Any]]:
    rows = []
    for impl, cell in bulk.items():
        rows.append(
            {
                "implementation": impl,
                "code": _BULK_DESCRIPTIONS[impl],
                "elements": cell.elements,
                "sums_per_sample": cell.sums_per_sample,
                "median_s_per_sum": cell.median,
                "min_s_per_sum": min(cell.samples),
                "max_s_per_sum": max(cell.samples),
                "samples_s_per_sum": list(cell.samples),
                "median_gb_per_s": 8 * cell.elements / cell.median / 1e9,
                "time_vs_private": bulk_ratio(bulk, impl, BULK_PRIVATE),
            }
        )
    return rows


def _print_bulk(n: int, rows: list[dict[str, Any]], implementation: str | None) -> None:
    print(f"SafeArray: summing {n:,} float64 elements ({8 * n / 1e6:.0f} MB) in one process")
    if implementation is not None:
        print(
            f"  safeshm: {implementation} (this process's implementation: the sum runs in "
            "numpy, the lock around it is all safeshm adds)"
        )
    print()
    print("Implementations")
    for impl in BULK_IMPLEMENTATIONS:
        print(f"  {impl:<22}  {_BULK_DESCRIPTIONS[impl]}")
    print()
    header = (
        f"{'implementation':<22} {'median ms/sum':>13} {'range (min-max)':>17} "
        f"{'GB/s':>6} {'time vs private':>15}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        rng = f"{r['min_s_per_sum'] * 1e3:.2f}-{r['max_s_per_sum'] * 1e3:.2f}"
        print(
            f"{r['implementation']:<22} {r['median_s_per_sum'] * 1e3:>13.2f} "
            f"{rng:>17} {r['median_gb_per_s']:>6.1f} "
            f"{fmt_ratio(r['time_vs_private']):>15}"
        )


def print_section(report: dict[str, Any]) -> None:
    print(f"SafeArray: element adds at random indices of a {report['length']}-element int64 array")
    print(f"  numpy: {report['numpy'] or 'not importable'}")
    print("  safeshm rows: each implementation (native, ctypes) side by side")
    for text in report["notes"]:
        print(f"  note: {text}")
    print()
    print("Implementations")
    for impl in report["element_implementations"]:
        print(f"  {impl:<20}  {_ARRAY_DESCRIPTIONS[impl]}")
    print()
    print_rate_table(report["element_add"], "mp.Array")
    if report["bulk_sum"]:
        print()
        _print_bulk(report["bulk_elements"], report["bulk_sum"], report.get("bulk_implementation"))


def _numpy_version() -> tuple[str | None, str]:
    """``(numpy's version, "")`` if numpy imports, else ``(None, why not)``."""
    try:
        import numpy  # noqa: PLC0415 - optional: only some array contenders need it
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return numpy.__version__, ""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which array contenders can run here: numpy is optional."""

    numpy_version: str | None
    element_implementations: tuple[str, ...]
    bulk: bool
    notes: list[str]


def plan() -> Plan:
    numpy_version, why = _numpy_version()
    if numpy_version is not None:
        return Plan(numpy_version, ARRAY_IMPLEMENTATIONS, bulk=True, notes=[])
    return Plan(
        None,
        (ARRAY_IDIOM, ARRAY_SAFE),
        bulk=False,
        notes=[
            f"numpy is not importable ({why}): skipped the '{ARRAY_NUMPY}' element add and "
            "the whole bulk-sum part"
        ],
    )


def bulk_problem(elements: int) -> str | None:
    """Why the bulk part cannot make its two shared arrays of ``elements`` float64s in
    /dev/shm, checked before anything is measured (a tmpfs that fills up while numpy
    writes into a ``SharedMemory`` kills the process with SIGBUS instead of raising)."""
    need = 2 * 8 * elements
    try:
        # Where SharedMemory puts its segment (a tmpfs, not a temporary directory).
        st = os.statvfs("/dev/shm")  # noqa: S108
    except OSError:  # pragma: no cover - no /dev/shm: the segments will say so
        return None
    free = st.f_bavail * st.f_frsize
    if need <= free:
        return None
    return (
        f"--bulk-elements {elements} needs {need / 1e6:,.0f} MB free in /dev/shm for the "
        f"array benchmark's bulk part; {free / 1e6:,.0f} MB are free"
    )
