"""``python -m safeshm`` / ``safeshm``: list, inspect and remove segments; demo; bench."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

from . import _compat
from ._array import SafeArray
from ._barrier import SafeBarrier
from ._condition import SafeCondition
from ._counter import SafeCounter
from ._errors import SafeShmError, SegmentCorruptedError
from ._event import SafeEvent
from ._lock import SafeLock
from ._queue import SafeQueue
from ._rlock import SafeRLock
from ._rwlock import SafeRWLock
from ._segment import (
    HEADER_SIZE,
    Header,
    Kind,
    SharedStructure,
    check_directory,
    describe_kind,
    read_header,
    segment_path,
    validate_name,
)
from ._semaphore import SafeSemaphore
from ._sharded import ShardedCounter
from ._store import SafeFileStore
from ._store_cli import add_store_parser
from .metrics._registry import MetricsRegistry
from .ratelimit._table import RateLimitTable

_CLASSES: dict[int, type[SharedStructure]] = {
    Kind.COUNTER: SafeCounter,
    Kind.SHARDED_COUNTER: ShardedCounter,
    Kind.LOCK: SafeLock,
    Kind.ARRAY: SafeArray,
    Kind.QUEUE: SafeQueue,
    Kind.EVENT: SafeEvent,
    Kind.SEMAPHORE: SafeSemaphore,
    Kind.BARRIER: SafeBarrier,
    Kind.CONDITION: SafeCondition,
    Kind.RLOCK: SafeRLock,
    Kind.RWLOCK: SafeRWLock,
    Kind.METRICS: MetricsRegistry,
    Kind.RATE_LIMITS: RateLimitTable,
}


@dataclasses.dataclass
class _Entry:
    name: str
    kind: str
    size: int
    creator_pid: int | None
    creator_alive: bool | None
    in_use: bool | None
    summary: str
    stats: dict[str, Any] | None
    damaged: bool = False

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _in_use(path: str) -> bool | None:
    """Whether any process holds the segment open (each handle keeps a shared flock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # closing drops the probe lock, if we got it
    return False


def _users(st: os.stat_result) -> tuple[int, list[int]]:
    """How many handles have the file open, and the pids that opened them (sorted).

    Every open handle holds a shared flock on its own descriptor, and ``/proc/locks``
    lists each flock with the pid that took it (as seen from our pid namespace; 0 for a
    process outside it). A forked child that inherited a handle shares its lock and is
    not listed separately. Waiters for a lock (``->`` lines) hold nothing and are skipped.
    """
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            return _flocks_on(f, dev)
    except OSError:  # pragma: no cover - no /proc
        return 0, []


def _flocks_on(lines: Iterable[str], dev: str) -> tuple[int, list[int]]:
    """The flocks on ``dev`` (``major:minor:inode``) among ``/proc/locks``' ``lines``.
    The loop is a function of its own, called inside a ``with``: on 3.13 an exception
    from a signal handler at a loop's back edge can skip the with's exit (CPython
    gh-130279; tests/test_async_loops.py)."""
    count = 0
    pids: set[int] = set()
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[5] != dev:
            continue
        count += 1
        with contextlib.suppress(ValueError):
            if int(fields[4]) > 0:
                pids.add(int(fields[4]))
    return count, sorted(pids)


def _describe_users(st: os.stat_result) -> str:
    count, pids = _users(st)
    if not count:
        return "in use by another process"
    who = f" (pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))})" if pids else ""
    return f"in use by {count} open handle{'s' if count > 1 else ''}{who}"


def _summary(stats: Any) -> str:
    fields = dataclasses.asdict(stats)
    fields.pop("name", None)
    fields.pop("creator_pid", None)
    if fields.pop("holder_died", False):
        # A lock whose holder died: say so, rather than a lock held by nobody.
        fields.pop("holder_pid", None)
        state = (
            "holder died (the next acquire recovers it)"
            if not fields.pop("locked", False)
            else "holder died (its thread is gone; never marked dead)"
        )
        return " ".join([state, *(f"{k}={v}" for k, v in fields.items())])
    return " ".join(f"{k}={v}" for k, v in fields.items())


def _entry(filename: str) -> _Entry | None:
    path = os.path.join(_compat.SHM_DIR, filename)
    if filename.startswith(_compat.TMP_PREFIX):
        try:
            size = os.stat(path, follow_symlinks=False).st_size
        except OSError:
            return None
        return _Entry(
            filename,
            "incomplete",
            size,
            None,
            None,
            _in_use(path),
            "a create that never finished (its creator died)",
            None,
        )
    name = filename[len(_compat.FILE_PREFIX) :]
    try:
        header, st = read_header(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return _Entry(name, "?", 0, None, None, None, f"unreadable: {e.strerror}", None)
    if header is None:
        return _Entry(name, "not safeshm", st.st_size, None, None, None, "no safeshm header", None)
    return _describe(name, header, st.st_size, path)


def _describe(name: str, header: Header, size: int, path: str) -> _Entry:
    if not header.intact:  # nothing it says can be trusted, not even its kind
        return _Entry(
            name,
            "damaged",
            size,
            None,
            None,
            _in_use(path),
            "DAMAGED: its header's checksum does not match",
            None,
            True,
        )
    alive = _compat.process_alive(header.creator_pid, header.creator_start, _compat.pid_namespace())
    cls = _CLASSES.get(header.kind)
    kind = describe_kind(header.kind, header.layout)[2:]
    summary = ""
    stats = None
    damaged = False
    if cls is not None:
        try:
            handle = cls.attach(name)
        except SegmentCorruptedError as e:
            summary, damaged = f"DAMAGED: {e}", True
        except (OSError, SafeShmError) as e:
            summary = f"cannot attach: {e}"
        else:
            try:
                st = handle.statistics()
                stats = dataclasses.asdict(st)
                summary = _summary(st)
            except SegmentCorruptedError as e:
                # One damaged segment must not hide the others: say so, and go on.
                summary, damaged = f"DAMAGED: {e}", True
            finally:
                handle.close()
    return _Entry(
        name, kind, size, header.creator_pid, alive, _in_use(path), summary, stats, damaged
    )


def _entries() -> list[_Entry]:
    try:
        # Refuse to list (and `rm --stale` to remove from) a directory in which other
        # users could have swapped the files.
        check_directory(os.stat(_compat.SHM_DIR), _compat.SHM_DIR)
        names = sorted(os.listdir(_compat.SHM_DIR))
    except FileNotFoundError:
        return []
    out = []
    for filename in names:
        if filename.startswith(_compat.FILE_PREFIX):
            entry = _entry(filename)
            if entry is not None:
                out.append(entry)
    return out


def cmd_ls(args: argparse.Namespace) -> int:
    entries = _entries()
    if args.json:
        print(json.dumps([e.as_json() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no safeshm segments in {_compat.SHM_DIR}")
        return 0
    rows = [("NAME", "KIND", "SIZE", "CREATOR", "IN USE", "SUMMARY")]
    for e in entries:
        creator = (
            "-"
            if e.creator_pid is None
            else (f"{e.creator_pid} ({'alive' if e.creator_alive else 'exited'})")
        )
        in_use = {True: "yes", False: "no", None: "?"}[e.in_use]
        rows.append((e.name, e.kind, str(e.size), creator, in_use, e.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    return 0


def _created(ns: int) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ns / 1e9))
    except (OverflowError, ValueError, OSError):  # a damaged header's time
        return f"? ({ns} ns since the epoch)"


def cmd_inspect(args: argparse.Namespace) -> int:
    name = validate_name(args.name)
    path = segment_path(name)
    check_directory(os.stat(_compat.SHM_DIR), _compat.SHM_DIR)
    try:
        header, st = read_header(path)
    except FileNotFoundError:
        print(f"safeshm: no segment named {name!r}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"safeshm: cannot read segment {name!r}: {e.strerror}", file=sys.stderr)
        return 1
    if header is None:
        print(f"safeshm: {name!r} is not a safeshm segment", file=sys.stderr)
        return 1
    entry = _describe(name, header, st.st_size, path)
    stats = entry.stats
    if stats is not None:  # the name and the creator are shown once, above them
        stats = {k: v for k, v in stats.items() if k not in ("name", "creator_pid")}
    info: dict[str, Any] = {
        "name": name,
        "kind": entry.kind,
        "size": st.st_size,
        "path": path,
        "creator_pid": header.creator_pid,
        "creator_alive": entry.creator_alive,
        "in_use": entry.in_use,
        "created": _created(header.created_ns),
        "damaged": entry.damaged,
        # This process's, not the segment's: processes of both kinds share every segment.
        "implementation": _compat.implementation(),
        "statistics": stats,
    }
    if entry.summary and stats is None:  # why there are no statistics
        info["problem"] = entry.summary
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "statistics" and isinstance(value, dict):
            for k, v in value.items():
                print(f"  {k:>16}: {v}")
        elif key == "implementation":
            print(f"{key:>18}: {value} (this process's; both kinds share every segment)")
        else:
            print(f"{key:>18}: {value}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    if not args.names and not args.stale:
        print("safeshm rm: name the segments to remove, or give --stale", file=sys.stderr)
        return 2
    targets: list[str] = []
    if args.stale:
        targets = [
            e.name for e in _entries() if e.in_use is False and e.kind not in ("not safeshm", "?")
        ]
    for name in args.names:
        validate_name(name)
        targets.append(name)
    if not targets:
        print("nothing to remove")
        return 0
    if not args.stale:
        check_directory(os.stat(_compat.SHM_DIR), _compat.SHM_DIR)
    status = 0
    for name in targets:
        filename = name if name.startswith(_compat.TMP_PREFIX) else _compat.FILE_PREFIX + name
        path = os.path.join(_compat.SHM_DIR, filename)
        if not _remove(name, path, args):
            status = 1
    return status


def _remove(name: str, path: str, args: argparse.Namespace) -> bool:
    """Remove one segment, asking first (unless ``--yes``). False if it was not removed
    (missing, not ours, in use and left alone); True if removed or if the user said no."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        print(f"safeshm: no segment named {name!r}", file=sys.stderr)
        return False
    except OSError as e:
        print(f"safeshm: cannot open {name!r}: {e.strerror}; left alone", file=sys.stderr)
        return False
    try:
        problem = None if name.startswith(_compat.TMP_PREFIX) else _not_ours(fd)
        if problem:
            print(f"safeshm: {name!r} {problem}; left alone", file=sys.stderr)
            return False
        st = os.fstat(fd)
        busy = _in_use(path) is True
        answer = _confirm(name, st, busy, args)
        if answer is not True:
            return answer is None
        # The user was told it was in use and wants it gone (or said --force).
        return _unlink_if_unused(fd, name, path, st, force=busy)
    finally:
        os.close(fd)  # and with it the exclusive flock, if taken


def _not_ours(fd: int) -> str | None:
    """Why the open file ``fd`` is not a safeshm segment; ``None`` if it is one."""
    try:
        ours = Header.parse(os.pread(fd, HEADER_SIZE, 0)) is not None
    except OSError as e:  # EISDIR: a directory at a segment's name
        return f"cannot be read: {e.strerror}"
    return None if ours else "is not a safeshm segment"


def _confirm(name: str, st: os.stat_result, busy: bool, args: argparse.Namespace) -> bool | None:
    """Whether to go on: True yes, None the user said no, False refused (said why)."""
    if busy and not args.force:
        if args.yes:
            print(
                f"safeshm: {name!r} is {_describe_users(st)}; left alone (--force "
                "removes a segment in use)",
                file=sys.stderr,
            )
            return False
        question = (
            f"{name!r} is {_describe_users(st)}: removing it splits them from every "
            "later open(), which creates a new segment under this name. Remove it "
            "anyway? [y/N] "
        )
    else:
        question = f"remove {name!r}? [y/N] "
    if args.yes or args.force:
        return True
    try:
        answer = input(question)
    except EOFError:  # stdin closed or not a terminal: nobody can answer
        print(
            f"\nsafeshm: no answer on stdin; {name!r} left alone (--yes removes without asking)",
            file=sys.stderr,
        )
        return False
    return True if answer.strip().lower() in ("y", "yes") else None


def _unlink_if_unused(fd: int, name: str, path: str, st: os.stat_result, *, force: bool) -> bool:
    """Unlink ``path`` (open as ``fd``, ``st``) if nobody uses it, or ``force``.

    Decides again at the moment of unlinking, under the same exclusion as attach: attach
    takes a shared flock and then checks that the name still is its file, so while we
    hold the exclusive flock nobody can start using the segment, and whoever attaches
    after the unlink finds the name gone (``open()`` then creates a new one). Without
    this, a service that attached between the decision (or the question) and the unlink
    would keep using the removed file while later ``open()`` calls create another: two
    segments under one name.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not force:
            print(f"safeshm: {name!r} is now {_describe_users(st)}; left alone", file=sys.stderr)
            return False
    _before_unlink_hook(name)
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        print(f"safeshm: {name!r} is already gone", file=sys.stderr)
        return False
    os.unlink(path)
    print(f"removed {name}")
    return True


def _before_unlink_hook(name: str) -> None:
    """Called by ``rm`` holding the exclusive flock, just before the unlink: tests use it to
    race an attach against the removal deterministically."""


# -- demo ----------------------------------------------------------------------------------
_DEMO_ADDS = 20_000


class _DemoShared(NamedTuple):
    """What the demo's workers share (a tuple of handles pickles by reference)."""

    exact: SafeCounter
    sharded: ShardedCounter
    lock: SafeLock
    under_lock: SafeCounter
    slots: SafeArray[int]
    jobs: SafeQueue[tuple[int, int]]
    store: SafeFileStore[Any]
    start: SafeEvent
    gate: SafeSemaphore
    inside: SafeCounter
    peak: SafeCounter


_DEMO_ITEMS = 500
_DEMO_GATE = 2  # workers allowed inside the gated section at once
_DEMO_GATED = 50  # times each worker passes through it
_DEMO_STORE_OPS = 20
_DEMO_ACCOUNTS = 4


def _demo_store_work(store: SafeFileStore[Any], method: str, worker: int) -> None:
    for k in range(_DEMO_STORE_OPS):
        store.modify("updates", lambda n: n + 1, default=0)
        with store.transaction() as tx:  # move 1 between accounts: the total never changes
            a, b = f"account:{(worker + k) % _DEMO_ACCOUNTS}", f"account:{k % _DEMO_ACCOUNTS}"
            tx[a] -= 1
            tx[b] += 1
    store[f"worker:{method}:{worker}"] = {"pid": os.getpid(), "ops": _DEMO_STORE_OPS}


def _raise_to(peak: SafeCounter, now: int) -> None:
    """``peak = max(peak, now)``, lock-free (called holding the gate: see _flocks_on)."""
    while True:
        seen = peak.value
        if now <= seen or peak.compare_and_set(seen, now):
            return


def _demo_gated(gate: SafeSemaphore, inside: SafeCounter, peak: SafeCounter) -> None:
    """Pass through a section that at most ``_DEMO_GATE`` workers may be in at once,
    recording the most ever seen inside together."""
    for _ in range(_DEMO_GATED):
        with gate:
            _raise_to(peak, inside.add(1))
            time.sleep(0.001)  # long enough for the others to queue up at the gate
            inside.add(-1)


def _demo_worker(shared: _DemoShared, worker: int, method: str) -> None:
    exact, sharded, lock, under_lock, slots, jobs, store, start, gate, inside, peak = shared
    # Every worker starts at the same moment: the parent sets the event once all run.
    if not start.wait(timeout=120):
        sys.exit(3)
    _demo_gated(gate, inside, peak)
    _demo_store_work(store, method, worker)
    for seq in range(_DEMO_ITEMS):
        jobs.put((worker, seq), timeout=60)
    for k in range(_DEMO_ADDS):
        exact.add()
        sharded.add()
        if k % 10 == 0:
            slots.add(worker, 1)  # this worker's own element
            slots.add(k % len(slots), 1)  # and one shared with every worker
    for _ in range(200):
        with lock:
            # A read-modify-write that is only safe under the lock.
            under_lock.set(under_lock.value + 1)
    exact.add(worker)  # distinct per worker: a lost or duplicated add shows in the total


def cmd_demo(args: argparse.Namespace) -> int:
    workers = args.workers
    print(
        f"safeshm demo: {workers} worker processes per start method, sharing counters, "
        "an array, a queue, a lock, an event, a semaphore and a durable store"
    )
    with contextlib.ExitStack() as stack:
        # Every segment is unlinked and the store's directory removed, whatever happens.
        def segment(handle: Any) -> Any:
            stack.callback(handle.unlink)
            stack.callback(handle.close)
            return handle

        exact = segment(SafeCounter.create())
        sharded = segment(ShardedCounter.create())
        lock = segment(SafeLock.create())
        under_lock = segment(SafeCounter.create())
        slots = segment(SafeArray.create("q", workers))
        jobs = segment(SafeQueue.create(1 << 20))
        directory = tempfile.mkdtemp(prefix="safeshm-demo-")
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        store = stack.enter_context(SafeFileStore(os.path.join(directory, "store")))
        store.update(dict.fromkeys(map("account:{}".format, range(_DEMO_ACCOUNTS)), 100))
        start = segment(SafeEvent.create())
        gate = segment(SafeSemaphore.create(_DEMO_GATE))
        inside = segment(SafeCounter.create())
        peak = segment(SafeCounter.create())
        return _demo(
            workers,
            _DemoShared(
                exact, sharded, lock, under_lock, slots, jobs, store, start, gate, inside, peak
            ),
        )


def _demo(workers: int, shared: _DemoShared) -> int:
    exact, sharded, _lock, under_lock, slots, jobs, store, start, gate, inside, peak = shared
    failures = 0
    print(f"  safeshm implementation: {_compat.implementation()} (this process and its workers)")
    print(f"  SafeCounter implementation: {exact.implementation}")
    total_procs = 0
    for ctx in (multiprocessing.get_context("spawn"), multiprocessing.get_context("fork")):
        method = ctx.get_start_method()
        t0 = time.perf_counter()
        procs = [ctx.Process(target=_demo_worker, args=(shared, w, method)) for w in range(workers)]
        for p in procs:
            p.start()
        start.set()  # the workers wait for this: they all start together
        for p in procs:
            p.join(timeout=120)
        start.clear()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        total_procs += workers
        print(
            f"  {workers} {method} workers done in {time.perf_counter() - t0:.2f} s"
            + (f" -- {len(bad)} failed (exit codes {bad})" if bad else "")
        )
        received: list[tuple[int, int]] = []
        while not jobs.empty():
            received.extend(jobs.get_many(1 << 16, timeout=5))
        in_order = all(
            [s for w, s in received if w == worker] == list(range(_DEMO_ITEMS))
            for worker in range(workers)
        )
        ok = in_order and len(received) == workers * _DEMO_ITEMS
        failures += not ok
        print(
            f"  [{'ok' if ok else 'FAIL'}] SafeQueue ({method}): {len(received)} items, "
            f"each worker's in order: {in_order} (expected {workers * _DEMO_ITEMS})"
        )
        failures += len(bad)
    per_method = [0] * workers  # what one start method's workers add to each element
    for w in range(workers):
        for k in range(0, _DEMO_ADDS, 10):
            per_method[w] += 1
            per_method[k % workers] += 1
    checks = [
        ("SafeCounter total", exact.value, total_procs * _DEMO_ADDS + 2 * sum(range(workers))),
        ("ShardedCounter total", sharded.value, total_procs * _DEMO_ADDS),
        ("read-modify-writes under SafeLock", under_lock.value, total_procs * 200),
        ("SafeArray elements", slots.to_list(), [2 * v for v in per_method]),
        ("SafeFileStore modify() updates", store.get("updates"), total_procs * _DEMO_STORE_OPS),
        (
            "SafeFileStore total over accounts after transactions",
            sum(store[f"account:{i}"] for i in range(_DEMO_ACCOUNTS)),
            100 * _DEMO_ACCOUNTS,
        ),
        (
            "SafeFileStore workers' own keys",
            len([k for k in store if k.startswith("worker:")]),
            total_procs,
        ),
        (
            f"SafeSemaphore({_DEMO_GATE}) gate: never more than {_DEMO_GATE} workers "
            f"inside (most seen: {peak.value}), none left inside, every permit back",
            (peak.value <= _DEMO_GATE, inside.value, gate.value),
            (True, 0, _DEMO_GATE),
        ),
    ]
    for label, got, want in checks:
        ok = got == want
        failures += not ok
        print(f"  [{'ok' if ok else 'FAIL'}] {label}: {got} (expected {want})")
    stats = store.statistics()
    print(
        f"  SafeFileStore: {stats.keys} keys, log {stats.log_bytes} bytes, durable "
        f"(every write fdatasync'ed)"
    )
    print("demo passed" if not failures else f"demo FAILED ({failures} problems)")
    return 1 if failures else 0


def cmd_bench(args: argparse.Namespace) -> int:
    # Only `bench` needs the measuring code (and it is slow to import).
    from ._bench.command import run  # noqa: PLC0415

    return run(args)


# A sanity limit on the demo's workers: beyond it a value is a typo (`--workers 10000`
# would start 10,000 interpreters) rather than a wish.
_MAX_PROCESSES: Final = 256


def _parser() -> argparse.ArgumentParser:
    from . import __version__  # noqa: PLC0415 - the package's one version source

    p = argparse.ArgumentParser(
        prog="safeshm",
        description=(
            "Inspect and manage safeshm shared-memory segments, run the demo or the benchmark."
        ),
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"safeshm {__version__} ({_compat.implementation()} implementation)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", help="list every safeshm segment on this machine")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)

    ins = sub.add_parser("inspect", help="show everything known about one segment")
    ins.add_argument("name")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.set_defaults(func=cmd_inspect)

    rm = sub.add_parser("rm", help="remove segments (only safeshm's own)")
    rm.add_argument("names", nargs="*", metavar="NAME")
    rm.add_argument(
        "--stale", action="store_true", help="also remove every segment that no process has open"
    )
    rm.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do not ask for confirmation (a segment in use is left alone)",
    )
    rm.add_argument(
        "--force",
        action="store_true",
        help="remove even segments that processes are using, without asking "
        "(they keep their copy; a later open() creates a new segment)",
    )
    rm.set_defaults(func=cmd_rm)

    add_store_parser(sub)

    # The options only (a light module): the measuring code is imported when `bench` runs.
    from ._bench import options as bench_options  # noqa: PLC0415

    demo = sub.add_parser(
        "demo",
        help="worker processes sharing every structure, checked at the end",
        description="Start worker processes (with spawn, then fork) that share a SafeCounter, "
        "a ShardedCounter, a SafeLock guarding a read-modify-write, a SafeArray, "
        "a SafeQueue, a SafeFileStore, a SafeEvent that starts them together and a "
        "SafeSemaphore gating a section, then check every total exactly. "
        "Everything it creates is removed at the end.",
    )
    demo.add_argument(
        "--workers",
        type=bench_options.int_in(1, _MAX_PROCESSES),
        default=4,
        help="worker processes per start method (default: 4)",
    )
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="benchmark safeshm against the alternatives",
        description=bench_options.DESCRIPTION,
    )
    bench_options.add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return p


# What the machine or the user's input can cause, as opposed to a bug in safeshm: these
# are reported in one line. Any other OSError (EBADF, EINVAL, EFAULT, ...) means our code
# is wrong, and shows its traceback like any other bug.
_ENVIRONMENT_ERRNOS: Final = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EEXIST,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.EBUSY,
        errno.ENOTEMPTY,
        errno.EIO,
        errno.EXDEV,
    }
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``safeshm`` command line; return its exit status.

    Problems a user can act on -- a bad argument (exit 2), an error safeshm raises on
    purpose (exit 2), a file or system-resource problem (exit 1) -- are printed in one line.
    Anything else is a bug in safeshm and propagates with its traceback.
    """
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SafeShmError as e:
        print(f"safeshm: {e}", file=sys.stderr)
        # Nothing at that name or path is a fact about the machine (1), as a missing file
        # always was here; what safeshm refuses is 2.
        return 1 if isinstance(e, FileNotFoundError) else 2
    except BrokenPipeError:  # pragma: no cover - output piped into `head`
        return 0
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        print(f"safeshm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        return 130
