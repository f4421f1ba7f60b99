"""``safeshm.metrics`` against prometheus_client's multiprocess mode, under worker churn.

Usage::

    PYTHONPATH=src python benchmarks/bench_metrics.py [--restarts N] [--quick] [--json FILE]

Three measurements, the ratios printed at the end of the one run:

* **Scrape time after churn.** A "worker restart" is a real short-lived process: the
  benchmark forks it (``--parallel`` at a time, like that many workers), the child
  defines a Counter (labelled), a Gauge (``livesum``) and a Histogram the way an app
  module does, increments each once, and leaves with ``os._exit`` (no clean-up of any
  kind, as a SIGKILLed worker). The scrape -- ``generate_latest`` of a
  ``CollectorRegistry`` holding the exporter -- is timed on a fresh start (after
  ``--parallel`` processes) and again after ``--restarts`` of them (10,000 by default).
  For safeshm the two are timed in turn, after the churn, on two registries (one given
  only the fresh start), so that a machine's drift during the churn does not count.
  ``safeshm.metrics`` (goal: at most 1.2x the fresh scrape) against prometheus_client's
  multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` in a temporary directory,
  ``MultiProcessCollector``), whose counter and histogram files of dead processes are
  kept for good; its run calls ``multiprocess.mark_process_dead(pid)`` for every process
  that exits, as its documented gunicorn ``child_exit`` hook does, which removes only the
  live-gauge files.
* **Bytes after churn.** safeshm: the registry segment's size and the memory it occupies
  (its allocated tmpfs pages), before and after: the goal is zero growth. Multiprocess
  mode: the files in its directory, their apparent size (each file is created with
  64 KiB) and the disk blocks they occupy.
* **``inc()`` cost**, in this process, 1, 2 and 4 threads incrementing one counter:
  ``safeshm.metrics.Counter.inc`` against multiprocess mode's ``Counter.inc`` (one
  process-wide lock, an mmap write) and plain single-process prometheus_client's
  ``Counter.inc`` (a lock per value, no sharing across processes: the reference for what
  an in-process counter costs). Goal: at least 2x multiprocess mode. Threads share the
  GIL on a regular CPython build, so no contender scales with threads there; the figures
  show what a lock costs under that contention.

prometheus_client decides on multiprocess mode when it is imported, so the multiprocess
figures come from a child interpreter (this script, run with ``PROMETHEUS_MULTIPROC_DIR``
set) and the others from this process. Every measurement checks its counts, so a broken
counter cannot report a fast time. Ratios above 1 mean safeshm is better.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "src"))

# Our segments go to a private directory, as the test suite's do.
if "SAFESHM_DIR" not in os.environ:
    os.environ["SAFESHM_DIR"] = _own_dir = tempfile.mkdtemp(prefix="safeshm-bench-", dir="/dev/shm")
    # Removed however the run ends (a failed check, a usage error); the forked churn
    # processes leave with os._exit, which skips it.
    atexit.register(shutil.rmtree, _own_dir, ignore_errors=True)

import prometheus_client  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import safeshm  # noqa: E402

THREADS = (1, 2, 4)
BUCKETS = (0.01, 0.1, 1.0)
_PROMETHEUS_PART = "--_prometheus-multiprocess-part"  # how the child interpreter is run

Result = dict[str, Any]


# -- helpers --------------------------------------------------------------------------------


def _fmt(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e9:.0f} ns"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _churn(restarts: int, parallel: int, child: Callable[[], None]) -> float:
    """Fork ``restarts`` processes, ``parallel`` at a time, each running ``child`` and
    leaving with ``os._exit``; seconds taken. Exits on a child that failed."""
    t0 = time.perf_counter()
    done = 0
    while done < restarts:
        wave = min(parallel, restarts - done)
        pids = []
        for _ in range(wave):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                status = 0
                try:
                    child()
                except BaseException:  # noqa: BLE001 - reported through the status
                    import traceback

                    traceback.print_exc()
                    status = 1
                os._exit(status)
            pids.append(pid)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise SystemExit(f"a churn process failed (wait status {status})")
            _reaped(pid)
        done += wave
    return time.perf_counter() - t0


_reaped: Callable[[int], None] = lambda pid: None  # noqa: E731 - replaced by the mp part


def _scrape_time(registry: CollectorRegistry, repeat: int) -> tuple[float, bytes]:
    """Median seconds of ``generate_latest(registry)``, and the last exposition."""
    times = []
    text = b""
    for _ in range(repeat):
        t0 = time.perf_counter()
        text = generate_latest(registry)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), text


def _in_turn(
    a: CollectorRegistry, b: CollectorRegistry, repeat: int
) -> tuple[tuple[float, bytes], tuple[float, bytes]]:
    """:func:`_scrape_time` of ``a`` and of ``b``, timed alternately."""
    times: tuple[list[float], list[float]] = ([], [])
    texts = [b"", b""]
    for _ in range(repeat):
        for k, registry in enumerate((a, b)):
            t, texts[k] = _scrape_time(registry, 1)
            times[k].append(t)
    return (statistics.median(times[0]), texts[0]), (statistics.median(times[1]), texts[1])


def _values(text: bytes) -> dict[str, float]:
    """Sample name (with labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _check_churn(text: bytes, processes: int) -> None:
    """Every process counted once in the counter and the histogram, no gauge left."""
    values = _values(text)
    expected = {
        "requests_total{code=200,method=GET}": processes,
        "latency_seconds_count{}": processes,
        "latency_seconds_bucket{le=0.1}": processes,
        "inflight{}": 0,
    }
    got = {k: values.get(k) for k in expected}
    got["inflight{}"] = values.get("inflight{}", 0)  # multiprocess mode: no live process
    if got != expected:
        raise SystemExit(f"WRONG COUNTS after {processes} processes: {got} != {expected}")


def _inc_time(inc: Callable[[], None], threads: int, n: int, rounds: int) -> float:
    """Median seconds per ``inc()`` with ``threads`` threads doing ``n`` each."""
    per_inc = []
    for _ in range(rounds):
        barrier = threading.Barrier(threads + 1)

        def work(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            for _ in range(n):
                inc()

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for t in workers:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in workers:
            t.join()
        per_inc.append((time.perf_counter() - t0) / (threads * n))
    return statistics.median(per_inc)


def _dir_usage(path: str) -> tuple[int, int, int]:
    """Files, apparent bytes and allocated bytes under ``path``."""
    files = apparent = allocated = 0
    for entry in os.scandir(path):
        st = entry.stat(follow_symlinks=False)
        files += 1
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return files, apparent, allocated


# -- safeshm.metrics, in this process ---------------------------------------------------------


def _safeshm_part(restarts: int, parallel: int, repeat: int, incs: int, rounds: int) -> Result:
    import safeshm.metrics
    from safeshm import _compat
    from safeshm.metrics import Collector, Counter, Gauge, Histogram, MetricsRegistry

    name = f"bench-metrics-{os.getpid()}"
    registry = safeshm.metrics.configure(name)
    # A second registry given only the fresh start: its scrapes are timed in turn with the
    # churned one's, so both figures see the same machine (a loaded CI box drifts).
    fresh_registry = MetricsRegistry.create(name=f"{name}-fresh")
    path = os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name)

    def child(into: MetricsRegistry | None = None) -> None:
        # What a worker's app module does at import, then its first request.
        requests = Counter("requests", "Requests", ["method", "code"], registry=into)
        inflight = Gauge("inflight", "In flight", multiprocess_mode="livesum", registry=into)
        latency = Histogram("latency_seconds", "Latency", buckets=BUCKETS, registry=into)
        requests.labels("GET", "200").inc()
        inflight.inc()  # dies "in flight": livesum must drop it
        latency.observe(0.05)

    def segment() -> tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_blocks * 512

    try:
        exposition = CollectorRegistry(auto_describe=True)
        exposition.register(Collector())
        fresh_exposition = CollectorRegistry(auto_describe=True)
        fresh_exposition.register(Collector(fresh_registry))
        res: Result = {}
        _churn(parallel, parallel, child)
        _churn(parallel, parallel, lambda: child(fresh_registry))
        res["fresh_before_churn_scrape_s"], text = _scrape_time(exposition, repeat)
        _check_churn(text, parallel)
        res["fresh_size"], res["fresh_allocated"] = segment()
        res["fresh_rows"] = registry.statistics().rows_ever_used
        res["churn_s"] = _churn(restarts, parallel, child)
        (res["fresh_scrape_s"], fresh_text), (res["churned_scrape_s"], text) = _in_turn(
            fresh_exposition, exposition, repeat
        )
        _check_churn(fresh_text, parallel)
        _check_churn(text, parallel + restarts)
        res["churned_size"], res["churned_allocated"] = segment()
        res["churned_rows"] = registry.statistics().rows_ever_used

        counter = Counter("bench_incs", "inc() benchmark")
        expected = 0
        res["inc_s"] = {}
        for threads in THREADS:
            res["inc_s"][threads] = _inc_time(counter.inc, threads, incs, rounds)
            expected += threads * incs * rounds
        got = _values(generate_latest(exposition)).get("bench_incs_total{}")
        if got != expected:
            raise SystemExit(f"WRONG COUNT: safeshm counter {got} != {expected}")
        return res
    finally:
        for r in (registry, fresh_registry):
            r.close()
            with contextlib.suppress(FileNotFoundError):
                r.unlink()


# -- plain single-process prometheus_client, in this process ---------------------------------


def _plain_part(incs: int, rounds: int) -> Result:
    counter = prometheus_client.Counter("bench_incs", "inc() benchmark", registry=None)
    res: Result = {"inc_s": {}}
    expected = 0
    for threads in THREADS:
        res["inc_s"][threads] = _inc_time(counter.inc, threads, incs, rounds)
        expected += threads * incs * rounds
    if counter._value.get() != expected:
        raise SystemExit(f"WRONG COUNT: plain counter {counter._value.get()} != {expected}")
    return res


# -- prometheus_client multiprocess mode, in a child interpreter ------------------------------


def _prometheus_part(restarts: int, parallel: int, repeat: int, incs: int, rounds: int) -> Result:
    """Runs in the child interpreter, with PROMETHEUS_MULTIPROC_DIR set before import."""
    global _reaped  # noqa: PLW0603 - the documented child_exit hook, per reaped process
    from prometheus_client import Counter, Gauge, Histogram, multiprocess

    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    _reaped = multiprocess.mark_process_dead

    def child() -> None:
        requests = Counter("requests", "Requests", ["method", "code"], registry=None)
        inflight = Gauge("inflight", "In flight", multiprocess_mode="livesum", registry=None)
        latency = Histogram("latency_seconds", "Latency", buckets=BUCKETS, registry=None)
        requests.labels("GET", "200").inc()
        inflight.inc()
        latency.observe(0.05)

    exposition = CollectorRegistry()
    multiprocess.MultiProcessCollector(exposition)  # type: ignore[no-untyped-call]
    res: Result = {}
    _churn(parallel, parallel, child)
    res["fresh_scrape_s"], text = _scrape_time(exposition, repeat)
    _check_churn(text, parallel)
    res["fresh_files"], res["fresh_size"], res["fresh_allocated"] = _dir_usage(directory)
    res["churn_s"] = _churn(restarts, parallel, child)
    res["churned_scrape_s"], text = _scrape_time(exposition, max(1, repeat // 4))
    _check_churn(text, parallel + restarts)
    res["churned_files"], res["churned_size"], res["churned_allocated"] = _dir_usage(directory)

    counter = Counter("bench_incs", "inc() benchmark", registry=None)
    res["inc_s"] = {}
    expected = 0
    for threads in THREADS:
        res["inc_s"][threads] = _inc_time(counter.inc, threads, incs, rounds)
        expected += threads * incs * rounds
    if counter._value.get() != expected:
        raise SystemExit(f"WRONG COUNT: multiprocess counter {counter._value.get()} != {expected}")
    return res


def _run_prometheus_part(args: argparse.Namespace, incs: int, rounds: int) -> Result:
    directory = tempfile.mkdtemp(prefix="prometheus-multiproc-", dir=args.prometheus_dir)
    try:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
        cmd = [sys.executable, os.path.abspath(__file__), _PROMETHEUS_PART]
        cmd += [str(x) for x in (args.restarts, args.parallel, args.repeat, incs, rounds)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"the multiprocess-mode run failed:\n{out.stdout}\n{out.stderr}")
        res: Result = json.loads(out.stdout)
        res["inc_s"] = {int(k): v for k, v in res["inc_s"].items()}
        res["directory"] = directory
        return res
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- report -----------------------------------------------------------------------------------


def _goal(met: bool) -> str:
    return "met" if met else "MISSED"


def _report(args: argparse.Namespace, shm: Result, mp: Result, plain: Result) -> Result:
    n, p = args.restarts, args.parallel
    print(f"\nscrape time (generate_latest, median), fresh ({p} processes) vs after {n:,} more")
    print(f"{'':<26}{'fresh':>12}{'after churn':>14}{'growth':>10}{'churn took':>13}")
    for label, r in (("safeshm.metrics", shm), ("multiprocess mode", mp)):
        growth = r["churned_scrape_s"] / r["fresh_scrape_s"]
        print(
            f"{label:<26}{_fmt(r['fresh_scrape_s']):>12}{_fmt(r['churned_scrape_s']):>14}"
            f"{growth:>9.2f}x{r['churn_s']:>11.1f} s"
        )

    print(f"\nbytes, fresh vs after {n:,} restarts")
    print(
        f"  safeshm registry segment: size {_bytes(shm['fresh_size'])} -> "
        f"{_bytes(shm['churned_size'])}; memory (allocated pages) "
        f"{_bytes(shm['fresh_allocated'])} -> {_bytes(shm['churned_allocated'])}; "
        f"rows ever used (what a scrape reads) {shm['fresh_rows']} -> {shm['churned_rows']}"
    )
    per_pid = (mp["churned_size"] - mp["fresh_size"]) / n
    per_pid_alloc = (mp["churned_allocated"] - mp["fresh_allocated"]) / n
    print(
        f"  multiprocess directory:   {mp['fresh_files']} -> {mp['churned_files']:,} files; "
        f"apparent {_bytes(mp['fresh_size'])} -> {_bytes(mp['churned_size'])} "
        f"({_bytes(per_pid)} per dead process); allocated {_bytes(mp['fresh_allocated'])} -> "
        f"{_bytes(mp['churned_allocated'])} ({_bytes(per_pid_alloc)} per dead process)"
    )

    print("\ninc() of one counter, median per call (all threads together)")
    print(f"{'threads':<9}{'safeshm':>11}{'multiproc':>11}{'plain':>11}{'vs multiproc':>14}")
    for t in THREADS:
        s, m, pl = shm["inc_s"][t], mp["inc_s"][t], plain["inc_s"][t]
        print(f"{t:<9}{_fmt(s):>11}{_fmt(m):>11}{_fmt(pl):>11}{m / s:>13.2f}x")

    ratios: Result = {
        "safeshm scrape after churn / fresh": shm["churned_scrape_s"] / shm["fresh_scrape_s"],
        "multiprocess scrape after churn / fresh": mp["churned_scrape_s"] / mp["fresh_scrape_s"],
        "scrape after churn, multiprocess / safeshm": mp["churned_scrape_s"]
        / shm["churned_scrape_s"],
        "safeshm segment growth (bytes)": max(
            shm["churned_size"] - shm["fresh_size"],
            shm["churned_allocated"] - shm["fresh_allocated"],
        ),
    }
    for t in THREADS:
        ratios[f"inc(), {t} thread(s), multiprocess / safeshm"] = mp["inc_s"][t] / shm["inc_s"][t]
        ratios[f"inc(), {t} thread(s), plain / safeshm"] = plain["inc_s"][t] / shm["inc_s"][t]
    goals = {
        "scrape after churn <= 1.2x fresh": ratios["safeshm scrape after churn / fresh"] <= 1.2,
        "zero bytes of growth": ratios["safeshm segment growth (bytes)"] == 0,
        "inc() >= 2x multiprocess mode (1 thread)": ratios[
            "inc(), 1 thread(s), multiprocess / safeshm"
        ]
        >= 2.0,
    }
    print("\nratios (above 1: safeshm is better)")
    for k, v in ratios.items():
        print(f"  {k:<48}{v:>10.2f}" + ("" if "bytes" in k else "x"))
    print("\ngoals")
    for k, ok in goals.items():
        print(f"  {k:<48}{_goal(ok):>10}")
    return {"safeshm": shm, "multiprocess": mp, "plain": plain, "ratios": ratios, "goals": goals}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_PROMETHEUS_PART]:
        restarts, parallel, repeat, incs, rounds = map(int, argv[1:])
        print(json.dumps(_prometheus_part(restarts, parallel, repeat, incs, rounds)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--restarts", type=int, default=10_000, help="worker restarts [10000]")
    ap.add_argument("--parallel", type=int, default=4, help="processes at a time [4]")
    ap.add_argument("--repeat", type=int, default=20, help="scrapes timed per state [20]")
    ap.add_argument(
        "--prometheus-dir",
        metavar="DIR",
        help="where multiprocess mode's directory is made [the system's temporary directory]",
    )
    ap.add_argument("--quick", action="store_true", help="a few seconds: a smoke run for CI")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        ap.error("unset PROMETHEUS_MULTIPROC_DIR: the benchmark sets its own")
    if args.quick:
        args.restarts, args.repeat = min(args.restarts, 200), min(args.repeat, 15)
    incs, rounds = (2_000, 3) if args.quick else (50_000, 5)

    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"prometheus_client {version('prometheus_client')}; safeshm {safeshm.implementation()}")
    print(
        f"{args.restarts:,} restarts, {args.parallel} at a time; {args.repeat} scrapes timed "
        f"per state; inc(): {rounds} rounds of {incs:,} per thread"
    )
    shm = _safeshm_part(args.restarts, args.parallel, args.repeat, incs, rounds)
    plain = _plain_part(incs, rounds)
    mp = _run_prometheus_part(args, incs, rounds)
    print(f"multiprocess mode's directory: {mp['directory']} (removed)")
    result = _report(args, shm, mp, plain)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
