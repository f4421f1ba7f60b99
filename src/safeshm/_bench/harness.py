"""The measuring harness every structure's benchmark shares.

Each element measurement starts P fresh "spawn" worker processes on a fresh structure,
releases them together through a barrier, lets each perform the same number of
operations, and times from the first worker's start to the last worker's end; the
structure's final state is checked after every run, so a benchmark that loses updates
fails loudly (:class:`BenchError`) instead of reporting a fast wrong answer. A full run
warms each contender up, calibrates how many operations last about ``--seconds``, then
takes ``--repeats`` samples round-robin; ``--quick`` takes fixed-size samples only.

Also here: the environment the figures come from, and the progress display.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import io
import multiprocessing
import multiprocessing.connection
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any, Final, TextIO, TypeVar

from safeshm import __version__, _compat
from safeshm._counter import SafeCounter

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext, SpawnContext
    from multiprocessing.process import BaseProcess
    from multiprocessing.synchronize import Barrier
    from typing import TypeAlias

    from safeshm._segment import SharedStructure

    from .options import Settings

    Context: TypeAlias = SpawnContext | ForkServerContext
    """Where a benchmark's processes and shared objects come from (see :func:`context`)."""

START_METHOD: Final = "spawn"
"""Fresh interpreters: nothing inherited through fork flatters or handicaps a contender,
and every object a worker uses must reach it the documented way (as a Process argument)."""
QUICK_START_METHOD: Final = "forkserver"
"""With ``--quick``: starting an interpreter and importing the benchmark for every worker
would take most of a quick run's time (about 0.2 s of CPU each), so workers are forked
from a server process that imported the benchmark modules once, and nothing else: still
nothing from this process, and every object still reaches a worker as a Process argument.
"""
_QUICK_PRELOAD: Final = [
    "safeshm._bench.counter",
    "safeshm._bench.lock",
    "safeshm._bench.array",
    "safeshm._bench.queue",
    "safeshm._bench.store",
    # optional: the server skips what does not import
    "numpy",
    "faster_fifo",
    "faster_fifo_reduction",
    "diskcache",
]


def context(*, quick: bool) -> Context:
    """The multiprocessing context a run's processes and shared objects come from: see
    :data:`START_METHOD` and, with ``quick``, :data:`QUICK_START_METHOD`."""
    if not quick:
        return multiprocessing.get_context(START_METHOD)
    ctx = multiprocessing.get_context(QUICK_START_METHOD)
    ctx.set_forkserver_preload(_QUICK_PRELOAD)
    return ctx


R = TypeVar("R")

# Spawned children import the package before reaching the barrier; on a loaded machine
# that can take seconds, so the barrier waits generously -- but never forever.
BARRIER_TIMEOUT_S: Final = 60.0
_KILL_GRACE_S: Final = 5.0

# A calibration run shorter than this fraction of the target is too noisy to scale from.
_CALIBRATION_MIN_FRACTION: Final = 0.1
MAX_OPS_PER_WORKER: Final = 2**40


class BenchError(RuntimeError):
    """A measurement could not be made: a worker failed, hung, or its result was wrong
    (a correctness failure of the structure measured, never a missed goal)."""


# Every worker has the same shape: wait at the barrier, read the clock, run
# ``for _ in range(n): <one operation>``, read the clock, record both readings. Only the
# loop body differs between implementations, so the per-iteration overhead around it is
# identical. time.perf_counter is CLOCK_MONOTONIC on Linux: one clock for every process,
# so readings taken in different workers can be compared directly.


def record(times: ctypes.Array[ctypes.c_double], index: int, start: float, end: float) -> None:
    """Store worker ``index``'s two clock readings in the shared ``times``."""
    times[2 * index] = start
    times[2 * index + 1] = end


@dataclasses.dataclass(frozen=True)
class Run:
    """One measurement: ``processes`` workers, ``ops_per_worker`` operations each."""

    implementation: str
    processes: int
    ops_per_worker: int
    elapsed_s: float

    @property
    def ops_per_s(self) -> float:
        """Total operations per second, all workers together."""
        return self.processes * self.ops_per_worker / self.elapsed_s


def join_all(procs: Sequence[BaseProcess], barrier: Barrier, deadline: float) -> None:
    """Wait for every worker until ``deadline``; on any failure stop the rest and raise."""
    pending = list(procs)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{len(pending)} worker(s) still running at the deadline")
        ready = set(multiprocessing.connection.wait([p.sentinel for p in pending], remaining))
        for p in [p for p in pending if p.sentinel in ready]:
            pending.remove(p)
            p.join()
            if p.exitcode != 0:
                # Release workers still waiting at the barrier instead of letting them
                # sit out its timeout.
                barrier.abort()
                raise BenchError(f"worker {p.name} exited with code {p.exitcode}")


def stop_all(procs: Sequence[BaseProcess]) -> None:
    """Kill any worker still alive and reap every one (used on success and failure)."""
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(_KILL_GRACE_S)
        if p.exitcode is not None:
            p.close()


def drop(structure: SharedStructure) -> None:
    """Close and unlink a safeshm structure this benchmark created, whatever happens."""
    try:
        structure.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            structure.unlink()


def drop_shared_memory(shm: SharedMemory) -> None:
    """Close and unlink a ``SharedMemory`` this benchmark created, whatever happens."""
    try:
        shm.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()


@dataclasses.dataclass(frozen=True)
class Contender:
    """What one measurement of one implementation needs, made fresh for each run."""

    target: Callable[..., None]
    args: tuple[Any, ...]
    read_count: Callable[[], int]
    """The count after the run: the counter's value, or the sum of all elements."""
    what: str
    """How ``read_count``'s result is named in an error message."""
    release: Callable[[], None]
    """Frees every shared resource the contender created (called in a ``finally``)."""


def nothing() -> None:
    """Nothing to release: ``multiprocessing`` objects are freed with their last handle."""


def measure(
    ctx: Context,
    prepare: Callable[[Context, str, int], Contender],
    implementation: str,
    processes: int,
    n: int,
    *,
    time_limit_s: float,
) -> Run:
    """Run one measurement on a fresh structure and check its final count.

    Args:
        ctx: the spawn context every object and process comes from.
        prepare: makes ``implementation``'s fresh structure for ``n`` operations per
            worker (a structure module's ``prepare``).
        implementation: the contender, as ``prepare`` knows it.
        processes: how many worker processes update concurrently.
        n: operations (increments, element adds) per worker.
        time_limit_s: how long the workers may take once released, on top of the
            barrier's start-up allowance; stragglers are killed after it.

    Returns:
        The timing, from the earliest worker start to the latest worker end.

    Raises:
        BenchError: a worker failed or hung, or the final count (for arrays: the sum of
            all elements) is not ``processes * n``.
    """
    barrier = ctx.Barrier(processes)
    times: ctypes.Array[ctypes.c_double] = ctx.RawArray(ctypes.c_double, 2 * processes)
    contender = prepare(ctx, implementation, n)
    procs: list[BaseProcess] = []
    try:
        for i in range(processes):
            procs.append(
                ctx.Process(
                    target=contender.target,
                    args=contender.args,
                    kwargs={"barrier": barrier, "times": times, "index": i},
                    name=f"bench-{implementation}-{i}",
                    daemon=True,
                )
            )
            procs[-1].start()
        join_all(procs, barrier, time.monotonic() + BARRIER_TIMEOUT_S + time_limit_s)
        count = contender.read_count()
        if count != processes * n:
            raise BenchError(
                f"{implementation} with {processes} process(es): {contender.what} {count}, "
                f"expected {processes * n} -- updates were lost or duplicated"
            )
    finally:
        try:
            stop_all(procs)
        finally:
            # Every segment this run created goes away, whatever happened above.
            contender.release()
    starts = times[0::2]
    ends = times[1::2]
    return Run(implementation, processes, n, max(max(ends) - min(starts), 1e-9))


def calibrated(elapsed: Callable[[int], float], seconds: float, start: int, cap: int) -> int:
    """The ``n`` for which ``elapsed(n)`` (one measurement's seconds) is about ``seconds``.

    Grows ``n`` from ``start`` until a run is long enough to scale from reliably, then
    scales linearly; never beyond ``cap``.
    """
    n = start
    while True:
        took = elapsed(n)
        if took >= seconds * _CALIBRATION_MIN_FRACTION or n >= cap:
            break
        # Aim straight for the threshold (with margin), but never jump more than 100x on
        # the strength of one very short, very noisy timing.
        factor = 2 * seconds * _CALIBRATION_MIN_FRACTION / took
        n = min(cap, int(n * min(100.0, max(2.0, factor))))
    return max(1, min(cap, round(n * seconds / took)))


@dataclasses.dataclass(frozen=True)
class Cell:
    """All repeats of one implementation at one process count."""

    implementation: str
    processes: int
    ops_per_worker: int
    samples: tuple[float, ...]
    """Total operations per second of each repeat, in the order measured."""

    @property
    def median(self) -> float:
        """Median operations per second over the repeats."""
        return statistics.median(self.samples)


def ratio(
    cells: dict[tuple[str, int], Cell], a: tuple[str, int], b: tuple[str, int]
) -> float | None:
    """Rate ratio of the medians of cells ``a`` and ``b``; ``None`` if either is missing."""
    if a not in cells or b not in cells:
        return None
    return cells[a].median / cells[b].median


# --- the two implementations: native and ctypes, side by side ---------------------------------
# Which implementation safeshm uses is chosen once per process, at import
# (``safeshm.implementation()``; ``SAFESHM_NO_EXTENSIONS=1`` selects ctypes). So every
# safeshm measurement is made by a measuring process of its own implementation -- an
# *agent*, started with the environment variable set or cleared -- whose workers (spawned,
# or forked from its own forkserver with --quick) inherit that environment. The stdlib and
# the peers are measured by this process, as before: the implementation means nothing to
# them. A safeshm contender's name carries its implementation: ``SafeCounter [native]``.
NATIVE: Final = "native"
CTYPES: Final = "ctypes"
VARIANTS: Final = (NATIVE, CTYPES)
"""The implementations every safeshm row is measured with, in the order the tables show them."""
NO_EXTENSIONS: Final = "SAFESHM_NO_EXTENSIONS"
_AGENT_START_TIMEOUT_S: Final = 120.0
_AGENT_MARGIN_S: Final = 60.0


def tagged(name: str, variant: str) -> str:
    """A safeshm contender measured with ``variant``: ``SafeCounter [native]``."""
    return f"{name} [{variant}]"


def untagged(name: str) -> tuple[str, str | None]:
    """``(contender, implementation)`` of a name made by :func:`tagged`; ``(name, None)``
    for the stdlib and the peers."""
    for variant in VARIANTS:
        suffix = f" [{variant}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], variant
    return name, None


def with_variants(
    names: Sequence[str], safeshm: Sequence[str], variants: Sequence[str]
) -> tuple[str, ...]:
    """``names`` with each of ``safeshm`` replaced by one contender per implementation."""
    out: list[str] = []
    for name in names:
        out += [tagged(name, v) for v in variants] if name in safeshm else [name]
    return tuple(out)


@contextlib.contextmanager
def _environment_for(variant: str) -> Iterator[None]:
    """This process's environment as a process that uses ``variant`` must start with (a
    spawned child copies it): ``SAFESHM_NO_EXTENSIONS`` set for ctypes, cleared for native."""
    saved = os.environ.get(NO_EXTENSIONS)
    if variant == CTYPES:
        os.environ[NO_EXTENSIONS] = "1"
    else:
        os.environ.pop(NO_EXTENSIONS, None)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(NO_EXTENSIONS, None)
        else:
            os.environ[NO_EXTENSIONS] = saved


def _why_not_native() -> str:
    """Why this process does not use the compiled core (it does not: see the caller)."""
    if os.environ.get(NO_EXTENSIONS):
        return f"{NO_EXTENSIONS} is set"
    try:
        importlib.import_module("safeshm._native")
    except ImportError as e:
        return f"the compiled core is not built or does not load ({type(e).__name__}: {e})"
    return "the compiled core is not in use"  # pragma: no cover - _compat loads it then


def _send_implementation(conn: multiprocessing.connection.Connection) -> None:
    conn.send(_compat.implementation())


def worker_implementation(ctx: Context, *, time_limit_s: float) -> str:
    """The implementation a worker started from ``ctx`` uses (as every benchmark starts
    its workers): what a measuring process checks its workers get."""
    ours, theirs = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_send_implementation, args=(theirs,), daemon=True)
    proc.start()
    theirs.close()
    try:
        if not ours.poll(BARRIER_TIMEOUT_S + time_limit_s):
            raise BenchError("a worker did not say which implementation it uses")
        impl: str = ours.recv()
    except EOFError:
        raise BenchError("a worker exited before saying which implementation it uses") from None
    finally:
        ours.close()
        stop_all([proc])
    return impl


def _agent_main(conn: multiprocessing.connection.Connection, quick: bool) -> None:
    """A measuring process: say which implementation this process got, then run every
    measurement asked for (``(function, args, kwargs)``, the function called with this
    process's context first) until told to stop (``None``) or the parent goes away."""
    try:
        ctx = context(quick=quick)
        if quick:
            # Start the forkserver now, while the parent waits for "ready", rather than
            # during the first measurement.
            from multiprocessing import forkserver  # noqa: PLC0415 - only with --quick

            forkserver.ensure_running()
        impl = _compat.implementation()
        conn.send(("ready", impl, "" if impl == NATIVE else _why_not_native()))
        while True:
            try:
                request = conn.recv()
            except EOFError:
                return
            if request is None:
                return
            fn, args, kwargs = request
            try:
                reply: tuple[str, Any] = ("ok", fn(ctx, *args, **kwargs))
            except BenchError as e:
                reply = ("failed", str(e))
            except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the run
                reply = ("failed", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            conn.send(reply)
    except KeyboardInterrupt:
        return  # the parent was interrupted too, and says so


class Agents:
    """The measuring processes, one per implementation (see :data:`VARIANTS`), started
    by :meth:`start` and stopped by :meth:`close` (or ``with``)."""

    def __init__(self, *, quick: bool, variants: Sequence[str] = VARIANTS) -> None:
        self._quick = quick
        self._wanted = tuple(variants)
        self._procs: dict[str, BaseProcess] = {}
        self._conns: dict[str, multiprocessing.connection.Connection] = {}
        self.unavailable: dict[str, str] = {}
        """Per implementation that cannot be measured here, why not."""

    @property
    def wanted(self) -> tuple[str, ...]:
        """The implementations asked for (before :meth:`start` finds which are here)."""
        return self._wanted

    @property
    def variants(self) -> tuple[str, ...]:
        """The implementations measured, in :data:`VARIANTS` order."""
        return tuple(v for v in self._wanted if v in self._conns)

    def start(self) -> None:
        """Start every measuring process, all at once, and wait until each is ready.

        Raises:
            BenchError: one did not start.
        """
        spawn = multiprocessing.get_context("spawn")
        for variant in self._wanted:
            ours, theirs = spawn.Pipe()
            proc = spawn.Process(
                target=_agent_main,
                args=(theirs, self._quick),
                name=f"bench-{variant}",
                # Not a daemon: it starts worker processes of its own. It exits when told
                # to, or when this process goes away (its end of the pipe closes).
                daemon=False,
            )
            with _environment_for(variant):
                proc.start()
            theirs.close()
            self._procs[variant] = proc
            self._conns[variant] = ours
        for variant in list(self._conns):
            status, impl, why = self._receive(variant, _AGENT_START_TIMEOUT_S)
            if status != "ready":  # pragma: no cover - the protocol's first message
                raise BenchError(f"the {variant} measuring process said {status!r}")
            if impl != variant:
                self.unavailable[variant] = why
                self._stop(variant)
        # Every benchmark's workers must use their measuring process's implementation:
        # asked of all at once, then checked.
        for conn in self._conns.values():
            conn.send((worker_implementation, (), {"time_limit_s": _AGENT_START_TIMEOUT_S}))
        for variant in list(self._conns):
            status, value = self._receive(variant, 2 * _AGENT_START_TIMEOUT_S)
            if status != "ok" or value != variant:
                raise BenchError(
                    f"the {variant} measuring process's workers use {value!r}"
                    if status == "ok"
                    else f"the {variant} measuring process could not start a worker: {value}"
                )

    def _receive(self, variant: str, timeout: float) -> Any:
        conn, proc = self._conns[variant], self._procs[variant]
        ready = multiprocessing.connection.wait([conn, proc.sentinel], timeout)
        if conn in ready:
            try:
                return conn.recv()
            except EOFError:
                pass
        elif not ready:
            raise BenchError(f"the {variant} measuring process did not answer in {timeout:.0f} s")
        proc.join(_KILL_GRACE_S)
        raise BenchError(f"the {variant} measuring process exited with code {proc.exitcode}")

    def run(
        self,
        ctx: Context,
        variant: str | None,
        fn: Callable[..., R],
        *args: Any,
        time_limit_s: float,
        **kwargs: Any,
    ) -> R:
        """``fn(ctx, *args, time_limit_s=..., **kwargs)``: here for the stdlib and the peers
        (``variant`` None), else in ``variant``'s measuring process, with its context.

        Raises:
            BenchError: the measurement failed, wherever it ran.
        """
        if variant is None:
            return fn(ctx, *args, time_limit_s=time_limit_s, **kwargs)
        if variant not in self._conns:  # pragma: no cover - the plans leave it out
            raise BenchError(f"no {variant} measuring process")
        kwargs["time_limit_s"] = time_limit_s
        try:
            self._conns[variant].send((fn, args, kwargs))
        except OSError:
            self._receive(variant, _KILL_GRACE_S)  # says how it ended
            raise
        status, value = self._receive(variant, BARRIER_TIMEOUT_S + time_limit_s + _AGENT_MARGIN_S)
        if status != "ok":
            raise BenchError(f"{variant} implementation: {value}")
        result: R = value
        return result

    def _stop(self, variant: str) -> None:
        conn, proc = self._conns.pop(variant), self._procs.pop(variant)
        with contextlib.suppress(OSError):
            conn.send(None)
        conn.close()
        proc.join(_KILL_GRACE_S)
        if proc.exitcode is None:
            proc.kill()
            proc.join(_KILL_GRACE_S)

    def close(self) -> None:
        """Stop every measuring process (each stops its own workers)."""
        for variant in list(self._conns):
            self._stop(variant)

    def measure(
        self,
        ctx: Context,
        prepare: Callable[[Context, str, int], Contender],
        name: str,
        processes: int,
        n: int,
        *,
        time_limit_s: float,
    ) -> Run:
        """:func:`measure` of a contender named as :func:`tagged` names it: a safeshm one in
        its implementation's measuring process, any other here."""
        base, variant = untagged(name)
        return self.run(
            ctx, variant, measure, prepare, base, processes, n, time_limit_s=time_limit_s
        )

    def __enter__(self) -> Agents:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- environment --------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = _model_line(f)
    except OSError:
        model = None
    return model or platform.processor() or "unknown"


def _model_line(cpuinfo: Iterable[str]) -> str | None:
    # A function of its own: no loop inside a with (tests/test_async_bytecode.py).
    for line in cpuinfo:
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Processor", "cpu model"):
            return value.strip()
    return None


def implementations_text(variants: Sequence[str], unavailable: dict[str, str]) -> str:
    """What the environment says under ``"implementations"``: the implementations every
    safeshm row was measured with, and why any other was not."""
    if not variants and not unavailable:
        return "this process's only (nothing measured per implementation)"
    shown = " and ".join(variants) + (", side by side" if len(variants) > 1 else "")
    if not variants:  # pragma: no cover - ctypes always loads
        shown = "none"
    missing = "; ".join(f"{v}: not measured, {why}" for v, why in unavailable.items())
    return f"{shown} ({missing})" if missing else shown


def environment(
    start_method: str = START_METHOD,
    variants: Sequence[str] = (),
    unavailable: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Everything needed to interpret the numbers: interpreter, OS, CPU, libc, safeshm, its
    implementations (``variants``: those measured; ``unavailable``: why not the others),
    and how worker processes are started."""
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
        "implementations": implementations_text(variants, unavailable or {}),
        "this_process_implementation": _compat.implementation(),
        "safecounter_implementation": implementation,
        "start_method": start_method,
    }


# --- the progress display -------------------------------------------------------------------
OVERHEAD_S: Final = 0.3
"""A rough cost of one multi-process measurement besides its timed part (starting the
spawned workers): with the measuring time, it weighs each step for the progress display's
estimate of the time left, which the display then scales by the actual pace."""
QUICK_OVERHEAD_S: Final = 0.1
"""The same for a ``--quick`` measurement: workers forked from the forkserver, a short
fixed-size timed part."""


class Progress:
    """What is being measured, how far along, and about how long is left, on stderr --
    never on stdout, which ``--json`` keeps for the JSON document.

    Each :meth:`step` is one measurement (a warm-up, a calibration or a repeat of one
    implementation at one process count): ``[ 7/96] 0:42 (~1:30 left) queue small items:
    SafeQueue, 2P/2C, repeat 1/3 ...``. The time left is the time taken so far scaled by
    the weight of the steps still to come (each step's rough cost, see
    :func:`step_weights`) over the weight of those done, so a slow machine is accounted for
    after the first step. On a terminal it is one line rewritten in place; anywhere else
    (a pipe, a CI log) one plain line per step. With ``stream=None`` it prints nothing.
    """

    def __init__(
        self,
        weights: Sequence[float] | int,
        stream: TextIO | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._weights = [1.0] * weights if isinstance(weights, int) else list(weights)
        self.total = len(self._weights)
        self.done = 0
        self._stream = stream
        self._tty = stream is not None and stream.isatty()
        self._clock = clock
        self._start = clock()
        self._partial = False
        """A line is on the terminal without its newline."""

    @staticmethod
    def _format(seconds: float) -> str:
        minutes, secs = divmod(int(seconds), 60)
        return f"{minutes}:{secs:02d}"

    def _left(self, elapsed: float) -> str:
        """``" (~M:SS left)"`` once a step is done; before that, no estimate."""
        done = sum(self._weights[: self.done - 1])
        if self.done < 2 or done <= 0:
            return ""
        left = elapsed * (sum(self._weights) - done) / done
        return f" (~{self._format(left + 0.5)} left)"

    def _columns(self) -> int:
        if self._stream is None:  # pragma: no cover - callers check first
            return 80
        try:
            # 0 from a pseudo-terminal nobody sized (`script`, some CI runners).
            return os.get_terminal_size(self._stream.fileno()).columns or 80
        except (OSError, ValueError, io.UnsupportedOperation):
            return 80

    def _show(self, line: str, *, final: bool) -> None:
        if self._stream is None:
            return
        if self._tty:
            # Cut to the terminal's width: a wrapped line cannot be rewritten with "\r".
            text = "\r" + line[: max(self._columns() - 1, 20)] + "\x1b[K"
            self._partial = not final
            self._stream.write(text + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def step(self, text: str) -> None:
        """Announce the measurement about to start."""
        self.done += 1
        if self.done > self.total:  # pragma: no cover - keep step_weights() honest
            raise RuntimeError(f"progress step {self.done} of {self.total}: {text}")
        width = len(str(self.total))
        elapsed = self._clock() - self._start
        self._show(
            f"[{self.done:>{width}}/{self.total}] {self._format(elapsed)}"
            f"{self._left(elapsed)} {text} ...",
            final=False,
        )

    def finish(self) -> None:
        """The last line: everything measured, and how long it took."""
        elapsed = self._clock() - self._start
        self._show(f"[{self.done}/{self.total}] {self._format(elapsed)} measured", final=True)

    def interrupt(self) -> None:
        """End a rewritten line, so a message that follows gets a line of its own (the
        last step shown says what was being measured when it went wrong)."""
        if self._partial and self._stream is not None:
            self._stream.write("\n")
            self._stream.flush()
            self._partial = False


def step_weights(settings: Settings, cells: int) -> list[float]:
    """The progress steps of :func:`measure_cells` for ``cells`` cells, each weighed by its
    rough cost in seconds, in the order they come."""
    if settings.quick:
        return [QUICK_OVERHEAD_S] * (cells * settings.repeats)
    return (
        [OVERHEAD_S] * cells  # warm-ups
        + [2 * OVERHEAD_S + 0.3 * settings.seconds] * cells  # calibrations
        + [OVERHEAD_S + settings.seconds] * (cells * settings.repeats)
    )


def plural(p: int) -> str:
    """``1 process``, ``2 processes``: a process count as the chart's labels write it."""
    return f"{p} process" if p == 1 else f"{p} processes"


def procs_label(p: int, *, pairs: bool = False) -> str:
    """A process count as the progress display and the chart write it (``pairs``: P
    producers and P consumers)."""
    return f"{p}P/{p}C" if pairs else f"{p}P"


# --- measuring every contender at every process count -----------------------------------------
def measure_cells(
    implementations: tuple[str, ...],
    settings: Settings,
    progress: Progress,
    *,
    part: str,
    measure_one: Callable[[str, int, int], Run],
    warmup_ops: int,
    start_ops: int,
    quick_ops: int | None = None,
    cap: int = MAX_OPS_PER_WORKER,
    pairs: bool = False,
) -> dict[tuple[str, int], Cell]:
    """Warm up, calibrate and measure every implementation at every process count.

    ``measure_one(implementation, processes, n)`` makes one checked measurement of ``n``
    operations per worker; ``part`` names the implementations in the progress display
    (``pairs``: a process count P means P producers and P consumers). Calibration starts
    from ``start_ops`` operations per worker and never goes beyond ``cap``. With
    ``settings.quick`` there is no warm-up and no calibration: every sample is
    ``quick_ops`` (default: ``start_ops``) operations per worker.
    """
    processes, repeats = settings.processes, settings.repeats

    def step(impl: str, p: int, what: str) -> None:
        progress.step(f"{part}: {impl}, {procs_label(p, pairs=pairs)}, {what}")

    def elapsed(impl: str, p: int) -> Callable[[int], float]:
        return lambda n: measure_one(impl, p, n).elapsed_s

    cells_order = [(impl, p) for p in processes for impl in implementations]
    ops = dict.fromkeys(cells_order, start_ops if quick_ops is None else quick_ops)
    if not settings.quick:
        # Warm-up: one short run of each, discarded -- first-time costs (page cache,
        # bytecode caches, the resource tracker's start) land here, not in a sample.
        for impl, p in cells_order:
            step(impl, p, "warm-up")
            measure_one(impl, p, warmup_ops)
        for impl, p in cells_order:
            step(impl, p, "calibrating")
            ops[impl, p] = calibrated(elapsed(impl, p), settings.seconds, start_ops, cap)
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in cells_order}
    for r in range(repeats):
        # Round-robin, with the starting implementation rotated each repeat, so a
        # noisy stretch on a shared machine is spread over every contender instead
        # of landing on whichever one always runs at the same position.
        shift = r % len(implementations)
        order = implementations[shift:] + implementations[:shift]
        for p in processes:
            for impl in order:
                step(impl, p, f"repeat {r + 1}/{repeats}")
                samples[impl, p].append(measure_one(impl, p, ops[impl, p]).ops_per_s)
    return {key: Cell(key[0], key[1], ops[key], tuple(samples[key])) for key in cells_order}
