"""Counter benchmark: safeshm against the ``multiprocessing`` idioms, in one process run.

Four ways to count from many processes are measured side by side:

1. ``multiprocessing.Value('q', 0)`` used the way users write it:
   ``with v.get_lock(): v.value += 1``;
2. ``multiprocessing.Lock()`` guarding a ``multiprocessing.RawValue('q', 0)``;
3. :meth:`safeshm.SafeCounter.add` (exact, lock-free compare-and-swap);
4. :meth:`safeshm.ShardedCounter.add` (one cache-line slot per thread).

Each measurement starts P fresh "spawn" worker processes on a fresh structure, releases
them together through a barrier, lets each perform the same calibrated number of
increments, and times from the first worker's start to the last worker's end. The final
count is checked against ``P * n`` after every run, so a benchmark that loses updates
fails loudly instead of reporting a fast wrong answer.

Run it as ``python -m safeshm bench`` or ``python benchmarks/bench_counter.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from . import __version__
from ._counter import SafeCounter, ShardedCounter

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext, SpawnProcess
    from multiprocessing.sharedctypes import Synchronized
    from multiprocessing.synchronize import Barrier, Lock

    from ._segment import SharedStructure

START_METHOD: Final = "spawn"
"""Fresh interpreters: nothing inherited through fork flatters or handicaps a contender,
and every object a worker uses must reach it the documented way (as a Process argument)."""

IDIOM: Final = "mp.Value idiom"
RAW_LOCK: Final = "mp.Lock + RawValue"
SAFE: Final = "SafeCounter"
SHARDED: Final = "ShardedCounter"
IMPLEMENTATIONS: Final = (IDIOM, RAW_LOCK, SAFE, SHARDED)

_DESCRIPTIONS: Final = {
    IDIOM: "with v.get_lock(): v.value += 1   (v = multiprocessing.Value('q', 0))",
    RAW_LOCK: "with lock: rv.value += 1   (multiprocessing.Lock + RawValue('q', 0))",
    SAFE: "add(1)   (safeshm.SafeCounter: exact, lock-free compare-and-swap)",
    SHARDED: "add(1)   (safeshm.ShardedCounter: one slot per thread)",
}

# Spawned children import the package before reaching the barrier; on a loaded machine
# that can take seconds, so the barrier waits generously -- but never forever.
_BARRIER_TIMEOUT_S: Final = 60.0
_KILL_GRACE_S: Final = 5.0

_WARMUP_OPS: Final = 5_000
_CALIBRATION_START_OPS: Final = 20_000
# A calibration run shorter than this fraction of the target is too noisy to scale from.
_CALIBRATION_MIN_FRACTION: Final = 0.1
_MAX_OPS_PER_WORKER: Final = 2**40


class BenchError(RuntimeError):
    """A measurement could not be made: a worker failed, hung, or the count was wrong."""


# --- workers (module level: spawn children import them by name) ---------------------------
#
# Every worker has the same shape: wait at the barrier, read the clock, run
# ``for _ in range(n): <one increment>``, read the clock, record both readings. Only the
# loop body differs between implementations, so the per-iteration overhead around it is
# identical. time.perf_counter is CLOCK_MONOTONIC on Linux: one clock for every process,
# so readings taken in different workers can be compared directly.


def _record(times: ctypes.Array[ctypes.c_double], index: int, start: float,
            end: float) -> None:
    times[2 * index] = start
    times[2 * index + 1] = end


def _worker_value_idiom(v: Synchronized[int], n: int, *, barrier: Barrier,
                        times: ctypes.Array[ctypes.c_double], index: int) -> None:
    """The idiom exactly as written in user code, ``get_lock()`` call included."""
    barrier.wait(_BARRIER_TIMEOUT_S)
    start = time.perf_counter()
    for _ in range(n):
        with v.get_lock():
            v.value += 1
    end = time.perf_counter()
    _record(times, index, start, end)


def _worker_raw_lock(rv: ctypes.c_int64, lock: Lock, n: int, *, barrier: Barrier,
                     times: ctypes.Array[ctypes.c_double], index: int) -> None:
    """A plain lock around an unsynchronized shared value."""
    barrier.wait(_BARRIER_TIMEOUT_S)
    start = time.perf_counter()
    for _ in range(n):
        with lock:
            rv.value += 1
    end = time.perf_counter()
    _record(times, index, start, end)


def _worker_safeshm(counter: SafeCounter | ShardedCounter, n: int, *, barrier: Barrier,
                    times: ctypes.Array[ctypes.c_double], index: int) -> None:
    """``add(1)`` through a hoisted bound method, as a hot loop in user code would do."""
    try:
        add = counter.add
        # Pay one-time costs outside the timed region -- ShardedCounter claims its slot
        # on the first add -- without changing the count, so every contender is timed
        # in its steady state.
        add(0)
        barrier.wait(_BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        for _ in range(n):
            add(1)
        end = time.perf_counter()
        _record(times, index, start, end)
    finally:
        counter.close()


# --- one measurement ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    """One measurement: ``processes`` workers, ``ops_per_worker`` increments each."""

    implementation: str
    processes: int
    ops_per_worker: int
    elapsed_s: float

    @property
    def ops_per_s(self) -> float:
        """Total increments per second, all workers together."""
        return self.processes * self.ops_per_worker / self.elapsed_s


def _join_all(procs: Sequence[SpawnProcess], barrier: Barrier, deadline: float) -> None:
    """Wait for every worker until ``deadline``; on any failure stop the rest and raise."""
    pending = list(procs)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{len(pending)} worker(s) still running at the deadline")
        ready = set(multiprocessing.connection.wait([p.sentinel for p in pending],
                                                    remaining))
        for p in [p for p in pending if p.sentinel in ready]:
            pending.remove(p)
            p.join()
            if p.exitcode != 0:
                # Release workers still waiting at the barrier instead of letting them
                # sit out its timeout.
                barrier.abort()
                raise BenchError(f"worker {p.name} exited with code {p.exitcode}")


def _stop_all(procs: Sequence[SpawnProcess]) -> None:
    """Kill any worker still alive and reap every one (used on success and failure)."""
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(_KILL_GRACE_S)
        if p.exitcode is not None:
            p.close()


def measure(ctx: SpawnContext, implementation: str, processes: int, n: int,
            time_limit_s: float) -> Run:
    """Run one measurement on a fresh structure and check its final count.

    Args:
        ctx: the spawn context every object and process comes from.
        implementation: one of :data:`IMPLEMENTATIONS`.
        processes: how many worker processes increment concurrently.
        n: increments per worker.
        time_limit_s: how long the workers may take once released, on top of the
            barrier's start-up allowance; stragglers are killed after it.

    Returns:
        The timing, from the earliest worker start to the latest worker end.

    Raises:
        BenchError: a worker failed or hung, or the final count is not ``processes * n``.
    """
    barrier = ctx.Barrier(processes)
    times: ctypes.Array[ctypes.c_double] = ctx.RawArray(ctypes.c_double, 2 * processes)
    structure: SharedStructure | None = None
    read_count: Callable[[], int]
    target: Callable[..., None]
    args: tuple[Any, ...]
    if implementation == IDIOM:
        v = ctx.Value("q", 0)
        target, args = _worker_value_idiom, (v, n)
        read_count = lambda: v.value  # noqa: E731
    elif implementation == RAW_LOCK:
        rv = ctx.RawValue("q", 0)
        target, args = _worker_raw_lock, (rv, ctx.Lock(), n)
        read_count = lambda: rv.value  # noqa: E731
    elif implementation in (SAFE, SHARDED):
        counter = SafeCounter.create() if implementation == SAFE else ShardedCounter.create()
        structure = counter
        target, args = _worker_safeshm, (counter, n)
        read_count = lambda: counter.value  # noqa: E731
    else:
        raise ValueError(f"unknown implementation {implementation!r}")

    procs: list[SpawnProcess] = []
    try:
        for i in range(processes):
            procs.append(ctx.Process(
                target=target, args=args,
                kwargs={"barrier": barrier, "times": times, "index": i},
                name=f"bench-{implementation}-{i}", daemon=True))
            procs[-1].start()
        _join_all(procs, barrier,
                  time.monotonic() + _BARRIER_TIMEOUT_S + time_limit_s)
        count = read_count()
        if count != processes * n:
            raise BenchError(
                f"{implementation} with {processes} process(es): final count {count}, "
                f"expected {processes * n} -- updates were lost or duplicated")
    finally:
        _stop_all(procs)
        if structure is not None:
            # Every segment this run created goes away, whatever happened above.
            structure.close()
            with contextlib.suppress(FileNotFoundError):
                structure.unlink()
    starts = times[0::2]
    ends = times[1::2]
    return Run(implementation, processes, n, max(max(ends) - min(starts), 1e-9))


def calibrate(ctx: SpawnContext, implementation: str, processes: int, seconds: float,
              time_limit_s: float) -> int:
    """Find how many increments per worker make one measurement last about ``seconds``.

    Grows a short run until it is long enough to scale from reliably, then scales.
    """
    n = _CALIBRATION_START_OPS
    while True:
        run = measure(ctx, implementation, processes, n, time_limit_s)
        if run.elapsed_s >= seconds * _CALIBRATION_MIN_FRACTION or n >= _MAX_OPS_PER_WORKER:
            break
        # Aim straight for the threshold (with margin), but never jump more than 100x on
        # the strength of one very short, very noisy timing.
        factor = 2 * seconds * _CALIBRATION_MIN_FRACTION / run.elapsed_s
        n = min(_MAX_OPS_PER_WORKER, int(n * min(100.0, max(2.0, factor))))
    return max(1, min(_MAX_OPS_PER_WORKER, round(n * seconds / run.elapsed_s)))


# --- environment --------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Processor", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Everything needed to interpret the numbers: interpreter, OS, CPU, libc, safeshm."""
    probe = SafeCounter.create()
    try:
        implementation = probe.implementation
    finally:
        probe.close()
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
    libc, libc_version = platform.libc_ver()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - Linux always has it
        usable = None
    return {
        "python": sys.version.replace("\n", " "),
        "python_implementation": platform.python_implementation(),
        "gil_enabled": getattr(sys, "_is_gil_enabled", lambda: True)(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "libc": f"{libc} {libc_version}".strip() or "unknown",
        "safeshm": __version__,
        "safecounter_implementation": implementation,
        "start_method": START_METHOD,
    }


# --- the whole benchmark ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cell:
    """All repeats of one implementation at one process count."""

    implementation: str
    processes: int
    ops_per_worker: int
    samples: tuple[float, ...]
    """Total increments per second of each repeat, in the order measured."""

    @property
    def median(self) -> float:
        """Median increments per second over the repeats."""
        return statistics.median(self.samples)


@dataclasses.dataclass(frozen=True)
class Bar:
    """One performance requirement, evaluated from measured medians."""

    description: str
    required: float
    measured: float | None
    """The measured ratio; ``None`` when the process counts it needs were not run."""

    @property
    def status(self) -> str:
        """``PASS``, ``FAIL``, or ``SKIP`` (not evaluated)."""
        if self.measured is None:
            return "SKIP"
        return "PASS" if self.measured >= self.required else "FAIL"


def _ratio(cells: dict[tuple[str, int], Cell], a: tuple[str, int],
           b: tuple[str, int]) -> float | None:
    if a not in cells or b not in cells:
        return None
    return cells[a].median / cells[b].median


def bars(cells: dict[tuple[str, int], Cell]) -> list[Bar]:
    """The bars this project must meet, computed from the medians in ``cells``."""
    return [
        Bar("SafeCounter add, 1 process, vs the mp.Value idiom (1 process)", 1.2,
            _ratio(cells, (SAFE, 1), (IDIOM, 1))),
        Bar("SafeCounter add, 2 processes, vs the mp.Value idiom (2 processes)", 3.0,
            _ratio(cells, (SAFE, 2), (IDIOM, 2))),
        Bar("ShardedCounter add, 1 process, vs the mp.Value idiom (1 process)", 4.0,
            _ratio(cells, (SHARDED, 1), (IDIOM, 1))),
        Bar("ShardedCounter add, 2 processes, vs its own 1-process rate", 1.7,
            _ratio(cells, (SHARDED, 2), (SHARDED, 1))),
    ]


def _rows(cells: dict[tuple[str, int], Cell]) -> list[dict[str, Any]]:
    rows = []
    for (impl, p), cell in cells.items():
        scaling = (_ratio(cells, (impl, p), (impl, 1))
                   if impl in (SAFE, SHARDED) else None)
        rows.append({
            "implementation": impl,
            "code": _DESCRIPTIONS[impl],
            "processes": p,
            "ops_per_worker": cell.ops_per_worker,
            "median_ops_per_s": cell.median,
            "min_ops_per_s": min(cell.samples),
            "max_ops_per_s": max(cell.samples),
            "samples_ops_per_s": list(cell.samples),
            "vs_idiom_same_processes": _ratio(cells, (impl, p), (IDIOM, p)),
            "vs_own_1_process": scaling,
        })
    return rows


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _print_report(env: dict[str, Any], config: dict[str, Any], rows: list[dict[str, Any]],
                  checks: list[Bar]) -> None:
    print("Environment")
    width = max(map(len, env))
    for key, value in env.items():
        print(f"  {key:<{width}}  {value}")
    print(f"  {'config':<{width}}  processes={config['processes']} "
          f"seconds={config['seconds']} repeats={config['repeats']}")
    print()
    print("Implementations")
    for impl in IMPLEMENTATIONS:
        print(f"  {impl:<20}  {_DESCRIPTIONS[impl]}")
    print()
    header = (f"{'implementation':<20} {'procs':>5} {'median Mops/s':>13} "
              f"{'range (min-max)':>17} {'vs idiom':>9} {'vs own 1P':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        rng = f"{r['min_ops_per_s'] / 1e6:.3f}-{r['max_ops_per_s'] / 1e6:.3f}"
        print(f"{r['implementation']:<20} {r['processes']:>5} "
              f"{r['median_ops_per_s'] / 1e6:>13.3f} {rng:>17} "
              f"{_fmt_ratio(r['vs_idiom_same_processes']):>9} "
              f"{_fmt_ratio(r['vs_own_1_process']):>9}")
    print()
    print("Bars (ratios of medians measured above)")
    for b in checks:
        # Three decimals: a ratio just under the bar must not print as if it met it.
        got = "not measured" if b.measured is None else f"{b.measured:.3f}x"
        print(f"  [{b.status}] {b.description}: {got} (required >= {b.required:g}x)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="safeshm bench",
        description="Compare counter increments: multiprocessing idioms vs safeshm.")
    p.add_argument("--processes", type=_positive_int, nargs="+", default=[1, 2],
                   metavar="N", help="process counts to measure (default: 1 2)")
    p.add_argument("--seconds", type=_positive_float, default=1.0,
                   help="approximate duration of each measurement (default: 1.0)")
    p.add_argument("--repeats", type=_positive_int, default=5,
                   help="measurements per implementation and process count (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``): ``--processes N
            [N ...]``, ``--seconds S``, ``--repeats R``, ``--json``.

    Returns:
        0 when every measurement completed with an exact count (whether or not the bars
        pass: they are a report, not a test), 1 when any measurement failed.
    """
    args = _parser().parse_args(argv)
    processes: list[int] = sorted(set(args.processes))
    seconds: float = args.seconds
    repeats: int = args.repeats
    ctx = multiprocessing.get_context(START_METHOD)
    # Once released, a worker gets many times its expected share before it is called hung:
    # the machine may be shared and briefly much slower than during calibration.
    time_limit_s = max(30.0, 20 * seconds)
    progress = sys.stderr.isatty()

    def note(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    try:
        env = environment()
        cells_order = [(impl, p) for p in processes for impl in IMPLEMENTATIONS]
        # Warm-up: one short run of each, discarded -- first-time costs (page cache,
        # bytecode caches, the resource tracker's start) land here, not in a sample.
        note("warming up")
        for impl, p in cells_order:
            measure(ctx, impl, p, _WARMUP_OPS, time_limit_s)
        note("calibrating")
        ops = {key: calibrate(ctx, *key, seconds, time_limit_s) for key in cells_order}
        samples: dict[tuple[str, int], list[float]] = {key: [] for key in cells_order}
        for r in range(repeats):
            # Round-robin, with the starting implementation rotated each repeat, so a
            # noisy stretch on a shared machine is spread over every contender instead
            # of landing on whichever one always runs at the same position.
            shift = r % len(IMPLEMENTATIONS)
            order = IMPLEMENTATIONS[shift:] + IMPLEMENTATIONS[:shift]
            for p in processes:
                for impl in order:
                    note(f"repeat {r + 1}/{repeats}: {impl}, {p} process(es)")
                    run = measure(ctx, impl, p, ops[impl, p], time_limit_s)
                    samples[impl, p].append(run.ops_per_s)
    except BenchError as e:
        print(f"\n*** BENCHMARK FAILED: {e} ***\n", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    cells = {key: Cell(key[0], key[1], ops[key], tuple(samples[key])) for key in cells_order}
    rows = _rows(cells)
    checks = bars(cells)
    config = {"processes": processes, "seconds": seconds, "repeats": repeats}
    if args.json:
        json.dump({"environment": env, "config": config, "results": rows,
                   "bars": [{"description": b.description, "required": b.required,
                             "measured": b.measured, "status": b.status} for b in checks]},
                  sys.stdout, indent=2)
        print()
    else:
        _print_report(env, config, rows, checks)
    return 0
