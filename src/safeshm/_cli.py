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
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

from . import _compat
from ._array import SafeArray
from ._counter import SafeCounter, ShardedCounter
from ._errors import SafeShmError
from ._lock import SafeLock
from ._queue import SafeQueue
from ._segment import (
    Header,
    Kind,
    SharedStructure,
    describe_kind,
    read_header,
    segment_path,
    validate_name,
)
from ._store import SafeFileStore
from ._store_cli import add_store_parser

_CLASSES: dict[int, type[SharedStructure]] = {
    Kind.COUNTER: SafeCounter,
    Kind.SHARDED_COUNTER: ShardedCounter,
    Kind.LOCK: SafeLock,
    Kind.ARRAY: SafeArray,
    Kind.QUEUE: SafeQueue,
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


def _summary(stats: Any) -> str:
    fields = dataclasses.asdict(stats)
    fields.pop("name", None)
    fields.pop("creator_pid", None)
    return " ".join(f"{k}={v}" for k, v in fields.items())


def _entry(filename: str) -> _Entry | None:
    path = os.path.join(_compat.SHM_DIR, filename)
    if filename.startswith(_compat.TMP_PREFIX):
        try:
            size = os.stat(path, follow_symlinks=False).st_size
        except OSError:
            return None
        return _Entry(filename, "incomplete", size, None, None, _in_use(path),
                      "a create that never finished (its creator died)", None)
    name = filename[len(_compat.FILE_PREFIX):]
    try:
        header, st = read_header(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return _Entry(name, "?", 0, None, None, None, f"unreadable: {e.strerror}", None)
    if header is None:
        return _Entry(name, "not safeshm", st.st_size, None, None, None,
                      "no safeshm header", None)
    return _describe(name, header, st.st_size, path)


def _describe(name: str, header: Header, size: int, path: str) -> _Entry:
    alive = _compat.process_alive(header.creator_pid, header.creator_start,
                                  _compat.pid_namespace())
    cls = _CLASSES.get(header.kind)
    kind = describe_kind(header.kind, header.layout)[2:]
    summary = ""
    stats = None
    if cls is not None:
        try:
            handle = cls.attach(name)
        except (OSError, SafeShmError) as e:
            summary = f"cannot attach: {e}"
        else:
            try:
                st = handle.statistics()
                stats = dataclasses.asdict(st)
                summary = _summary(st)
            finally:
                handle.close()
    return _Entry(name, kind, size, header.creator_pid, alive, _in_use(path), summary, stats)


def _entries() -> list[_Entry]:
    try:
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
        creator = "-" if e.creator_pid is None else (
            f"{e.creator_pid} ({'alive' if e.creator_alive else 'exited'})")
        in_use = {True: "yes", False: "no", None: "?"}[e.in_use]
        rows.append((e.name, e.kind, str(e.size), creator, in_use, e.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    name = validate_name(args.name)
    path = segment_path(name)
    try:
        header, st = read_header(path)
    except FileNotFoundError:
        print(f"safeshm: no segment named {name!r}", file=sys.stderr)
        return 1
    if header is None:
        print(f"safeshm: {name!r} is not a safeshm segment", file=sys.stderr)
        return 1
    entry = _describe(name, header, st.st_size, path)
    info: dict[str, Any] = {
        "name": name,
        "kind": entry.kind,
        "size": st.st_size,
        "path": path,
        "creator_pid": header.creator_pid,
        "creator_alive": entry.creator_alive,
        "in_use": entry.in_use,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(header.created_ns / 1e9)),
        "statistics": entry.stats,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "statistics" and isinstance(value, dict):
            for k, v in value.items():
                print(f"  {k:>16}: {v}")
        else:
            print(f"{key:>18}: {value}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    targets: list[str] = []
    if args.stale:
        targets = [e.name for e in _entries()
                   if e.in_use is False and e.kind not in ("not safeshm", "?")]
    for name in args.names:
        validate_name(name)
        targets.append(name)
    if not targets:
        print("nothing to remove")
        return 0
    status = 0
    for name in targets:
        filename = name if name.startswith(_compat.TMP_PREFIX) else _compat.FILE_PREFIX + name
        path = os.path.join(_compat.SHM_DIR, filename)
        if not name.startswith(_compat.TMP_PREFIX):
            try:
                header, _ = read_header(path)
            except FileNotFoundError:
                print(f"safeshm: no segment named {name!r}", file=sys.stderr)
                status = 1
                continue
            if header is None:
                print(f"safeshm: {name!r} is not a safeshm segment; left alone", file=sys.stderr)
                status = 1
                continue
        if not args.yes:
            try:
                answer = input(f"remove {name!r}? [y/N] ")
            except EOFError:  # stdin closed or not a terminal: nobody can answer
                print(f"\nsafeshm: no answer on stdin; {name!r} left alone "
                      "(--yes removes without asking)", file=sys.stderr)
                status = 1
                continue
            if answer.strip().lower() not in ("y", "yes"):
                continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            print(f"safeshm: {name!r} is already gone", file=sys.stderr)
            status = 1
        else:
            print(f"removed {name}")
    return status


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


_DEMO_ITEMS = 500
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


def _demo_worker(shared: _DemoShared, worker: int, method: str) -> None:
    exact, sharded, lock, under_lock, slots, jobs, store = shared
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
    print(f"safeshm demo: {workers} worker processes per start method, sharing counters, "
          "an array, a queue, a lock and a durable store")
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
        store.update({f"account:{i}": 100 for i in range(_DEMO_ACCOUNTS)})
        return _demo(workers, _DemoShared(exact, sharded, lock, under_lock, slots, jobs,
                                          store))


def _demo(workers: int, shared: _DemoShared) -> int:
    exact, sharded, _lock, under_lock, slots, jobs, store = shared
    failures = 0
    print(f"  SafeCounter implementation: {exact.implementation}")
    total_procs = 0
    for ctx in (multiprocessing.get_context("spawn"), multiprocessing.get_context("fork")):
        method = ctx.get_start_method()
        t0 = time.perf_counter()
        procs = [ctx.Process(target=_demo_worker, args=(shared, w, method))
                 for w in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        total_procs += workers
        print(f"  {workers} {method} workers done in {time.perf_counter() - t0:.2f} s"
              + (f" -- {len(bad)} failed (exit codes {bad})" if bad else ""))
        received: list[tuple[int, int]] = []
        while not jobs.empty():
            received.extend(jobs.get_many(1 << 16, timeout=5))
        in_order = all([s for w, s in received if w == worker] == list(range(_DEMO_ITEMS))
                       for worker in range(workers))
        ok = in_order and len(received) == workers * _DEMO_ITEMS
        failures += not ok
        print(f"  [{'ok' if ok else 'FAIL'}] SafeQueue ({method}): {len(received)} items, "
              f"each worker's in order: {in_order} (expected {workers * _DEMO_ITEMS})")
        failures += len(bad)
    per_method = [0] * workers  # what one start method's workers add to each element
    for w in range(workers):
        for k in range(0, _DEMO_ADDS, 10):
            per_method[w] += 1
            per_method[k % workers] += 1
    checks = [
        ("SafeCounter total", exact.value,
         total_procs * _DEMO_ADDS + 2 * sum(range(workers))),
        ("ShardedCounter total", sharded.value, total_procs * _DEMO_ADDS),
        ("read-modify-writes under SafeLock", under_lock.value, total_procs * 200),
        ("SafeArray elements", slots.to_list(), [2 * v for v in per_method]),
        ("SafeFileStore modify() updates", store.get("updates"),
         total_procs * _DEMO_STORE_OPS),
        ("SafeFileStore total over accounts after transactions",
         sum(store[f"account:{i}"] for i in range(_DEMO_ACCOUNTS)), 100 * _DEMO_ACCOUNTS),
        ("SafeFileStore workers' own keys",
         len([k for k in store if k.startswith("worker:")]), total_procs),
    ]
    for label, got, want in checks:
        ok = got == want
        failures += not ok
        print(f"  [{'ok' if ok else 'FAIL'}] {label}: {got} (expected {want})")
    stats = store.statistics()
    print(f"  SafeFileStore: {stats.keys} keys, log {stats.log_bytes} bytes, durable "
          f"(every write fdatasync'ed)")
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
    p = argparse.ArgumentParser(prog="safeshm", description=(
        "Inspect and manage safeshm shared-memory segments, run the demo or the benchmark."))
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
    rm.add_argument("--stale", action="store_true",
                    help="also remove every segment that no process has open")
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    rm.set_defaults(func=cmd_rm)

    add_store_parser(sub)

    demo = sub.add_parser("demo", help="worker processes sharing counters, an array and a lock, "
                                       "checked")
    demo.add_argument("--workers", type=_int_in(1, _MAX_PROCESSES), default=4,
                      help="worker processes per start method (default: 4)")
    demo.set_defaults(func=cmd_demo)

    # The options only (a light module): the measuring code is imported when `bench` runs.
    from ._bench import options as bench_options  # noqa: PLC0415

    bench = sub.add_parser("bench", help="benchmark safeshm against the alternatives",
                           description=bench_options.DESCRIPTION)
    bench_options.add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high``, or a one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (SafeShmError, ValueError, TypeError) as e:
        print(f"safeshm: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.EPIPE:  # pragma: no cover - output piped into `head`
            return 0
        print(f"safeshm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        return 130
