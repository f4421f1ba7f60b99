"""safeshm's own performance goals, and the benchmark scripts that check them.

Not part of the installed package: a user's ``safeshm bench`` prints measurements and
ratios only. These scripts run the very same benchmark, with the same options (see
``safeshm bench --help``), and then say how the measured ratios compare with the goals
this project has set itself. A missed goal is a goal missed, not a failed test: the
scripts exit 0 unless ``--check-goals`` is given (then 3 when a goal is missed). A
benchmark that measures a wrong result (a lost update, a lost item) fails either way,
with exit status 1.

Usage::

    python benchmarks/goals.py [safeshm bench options] [--check-goals]   # every structure
    python benchmarks/bench_counter.py [options] [--check-goals]         # one structure
    python benchmarks/goals.py --from-json results.json --check-goals    # saved results
    python benchmarks/goals.py --from-json py313.json --compare-with py311.json --check-goals

With ``--json`` the document gets a ``"goals"`` list; with ``--plot`` the chart marks each
goal across its bar.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from safeshm._bench import array, command, counter, lock, options, queue, store
from safeshm._bench.harness import CTYPES, NATIVE, plural, procs_label

Results = dict[str, Any]

GOALS_MISSED = 3
"""The exit status of ``--check-goals`` when a goal was missed (1: a benchmark failed)."""


@dataclasses.dataclass(frozen=True)
class Goal:
    """A ratio this project wants safeshm to reach (or, ``at_most``, stay under)."""

    structure: str
    """The ``--structures`` choice that measures it: only those run are reported."""
    description: str
    required: float
    measured: Callable[[Results], float | None]
    """The ratio, read from the results as ``--json`` prints them; ``None`` when what it
    needs was not measured (a process count not asked for, an optional contender that is
    not installed)."""
    at_most: bool = False
    """A time ratio, which must be at most ``required`` (else a speed ratio, at least)."""
    mark: Callable[[dict[str, Any]], bool] | None = None
    """Which of the chart's ratios the goal is drawn on (as a speed ratio)."""

    def status(self, results: Results) -> tuple[float | None, str]:
        """The measured ratio and ``met``, ``MISSED`` or ``not measured``."""
        value = self.measured(results)
        if value is None:
            return None, "not measured"
        met = value <= self.required if self.at_most else value >= self.required
        return value, "met" if met else "MISSED"


def _ratio(structure: str, label: str, versus: str) -> Callable[[Results], float | None]:
    def read(results: Results) -> float | None:
        for r in results.get("ratios", []):
            if (r["structure"], r["label"], r["versus"]) == (structure, label, versus):
                return float(r["ratio"])
        return None

    return read


def _on(structure: str, label: str, versus: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: (r["structure"], r["label"], r["versus"]) == (structure, label, versus)


def _row(
    section: Callable[[Results], list[dict[str, Any]] | None], field: str, **match: Any
) -> Callable[[Results], float | None]:
    """``field`` of the table row whose fields equal ``match``."""

    def read(results: Results) -> float | None:
        for row in section(results) or []:
            if all(row.get(k) == v for k, v in match.items()):
                value = row.get(field)
                return None if value is None else float(value)
        return None

    return read


_PARTS = {
    counter.PANEL: "counter",
    lock.PANEL: "lock",
    array.PANEL: "array",
    queue.PANEL: "queue",
    store.PANEL: "store",
}


def _speed(structure: str, label: str, versus: str, required: float, description: str) -> Goal:
    """A goal on one of the chart's speed ratios (drawn in ``structure``'s panel)."""
    return Goal(
        _PARTS[structure],
        description,
        required,
        _ratio(structure, label, versus),
        mark=_on(structure, label, versus),
    )


B = TypeVar("B")


def _stricter(
    bars: list[B], *, key: Callable[[B], object], required: Callable[[B], float]
) -> list[B]:
    """``bars`` without those a stricter bar on the same ratio (``key``) makes redundant:
    the compiled core's bars replace, in place, the ctypes bars they imply."""
    out: list[B] = []
    where: dict[object, int] = {}
    for b in bars:
        k = key(b)
        if k not in where:
            where[k] = len(out)
            out.append(b)
        elif required(b) > required(out[where[k]]):
            out[where[k]] = b
    return out


def _counter_goals(variant: str, *, native: bool) -> list[Goal]:
    """The counters' goals for one implementation: the ctypes bars (every implementation
    keeps them), and with ``native`` the compiled core's (issue 12)."""
    out = []
    bars: list[tuple[str, int, str, float]] = [
        (counter.SAFE, 1, counter.IDIOM, 1.2),
        (counter.SAFE, 2, counter.IDIOM, 3.0),
        (counter.SHARDED, 1, counter.IDIOM, 4.0),
    ]
    if native:
        bars += [
            (counter.SAFE, 1, counter.IDIOM, 8.0),
            (counter.SAFE, 1, counter.RAW_LOCK, 3.0),
            (counter.SAFE, 2, counter.IDIOM, 8.0),
            (counter.SHARDED, 1, counter.IDIOM, 12.0),
        ]
    names = {counter.IDIOM: "the mp.Value idiom", counter.RAW_LOCK: "mp.Lock + RawValue"}
    bars = _stricter(bars, key=lambda b: b[:3], required=lambda b: b[3])
    for impl, p, versus, required in bars:
        out.append(
            _speed(
                counter.PANEL,
                f"{impl}.add, {plural(p)}, {variant}",
                versus,
                required,
                f"[{variant}] {impl} add, {plural(p)}, vs {names[versus]} ({plural(p)})",
            )
        )
    out.append(
        Goal(
            "counter",
            f"[{variant}] ShardedCounter add, 2 processes, vs its own 1-process rate",
            1.8 if native else 1.7,
            _row(
                lambda r: r.get("results"),
                "vs_own_1_process",
                implementation=counter.SHARDED,
                variant=variant,
                processes=2,
            ),
        )
    )
    return out


def _lock_goals(variant: str, *, native: bool) -> list[Goal]:
    """``with SafeLock:`` uncontended: the compiled core's bar (none for ctypes, which
    had no lock goal before)."""
    if not native:
        return []
    return [
        _speed(
            lock.PANEL,
            f"with SafeLock, 1 process, {variant}",
            lock.MP_LOCK,
            2.0,
            f"[{variant}] `with SafeLock:` uncontended (1 process), vs "
            "`with multiprocessing.Lock():`",
        )
    ]


def _array_goals(variant: str, *, native: bool) -> list[Goal]:
    bars = [(1, 1.2, "element add"), (2, 3.0, "element add at random indices")]
    if native:
        bars.append((1, 6.0, "element add at random indices"))
    return [
        _speed(
            array.PANEL,
            f"add(i, 1), {plural(p)}, {variant}",
            array.ARRAY_IDIOM,
            required,
            f"[{variant}] SafeArray {what}, {plural(p)}, vs the mp.Array idiom ({plural(p)})",
        )
        for p, required, what in _stricter(bars, key=lambda b: b[0], required=lambda b: b[1])
    ]


def _queue_goals(variant: str, *, native: bool) -> list[Goal]:
    labels = {
        "small": "small items",
        "batches": f"batches of {queue.QUEUE_BATCH}",
        "bytes": f"{queue.QUEUE_ITEM_BYTES // 1024} KiB bytes items",
    }
    batches = f"put_many/get_many in batches of {queue.QUEUE_BATCH}"
    bars: list[tuple[str, str, float, str, str]] = [
        ("small", queue.Q_MP, 2.0, "small items", "mp.Queue"),
        ("batches", queue.Q_MP, 5.0, batches, "mp.Queue single put/get"),
        ("bytes", queue.Q_MP, 4.0, "raw 64 KiB bytes items", "mp.Queue"),
        ("bytes", queue.Q_FF, 1.0, "raw 64 KiB bytes items", "faster_fifo"),
    ]
    if native:
        bars += [
            ("small", queue.Q_MP, 3.0, "small items", "mp.Queue"),
            ("small", queue.Q_FF, 1.5, "small items", "faster_fifo"),
            ("batches", queue.Q_MP, 10.0, batches, "mp.Queue single put/get"),
        ]
    out = []
    bars = _stricter(bars, key=lambda b: b[:2], required=lambda b: b[2])
    for workload, versus, required, what, alternative in bars:
        for p in (1, 2):
            pc = procs_label(p, pairs=True)
            out.append(
                _speed(
                    queue.PANEL,
                    f"{labels[workload]}, {pc}, {variant}",
                    versus,
                    required,
                    f"[{variant}] SafeQueue {what}, {pc}, vs {alternative} ({pc})",
                )
            )
    out.append(
        Goal(
            "queue",
            f"[{variant}] SafeQueue round trip pinned to one CPU, median, time vs mp.SimpleQueue",
            1.0,
            _row(
                lambda r: r.get("queue", {}).get("latency"),
                "time_vs_simple_queue",
                implementation=queue.Q_SAFE,
                variant=variant,
            ),
            at_most=True,
            mark=_on(queue.PANEL, f"round trip, both on 1 CPU, {variant}", queue.Q_SIMPLE),
        )
    )
    return out


def _goals() -> list[Goal]:
    """Every goal. The ctypes implementation keeps every bar it met before the compiled
    core came (no regression); the compiled core (native) keeps them too, and has the bars
    of issue 12 on top. Where a ratio has two goals, the chart marks the higher."""
    out = []
    for variant in (CTYPES, NATIVE):
        native = variant == NATIVE
        out += _counter_goals(variant, native=native)
        out += _lock_goals(variant, native=native)
        out += _array_goals(variant, native=native)
    out.append(
        Goal(
            "array",
            "bulk sum via SafeArray.locked() + numpy, time vs numpy on a private array",
            1.5,
            _row(
                lambda r: r.get("array", {}).get("bulk_sum"),
                "time_vs_private",
                implementation=array.BULK_SAFE,
            ),
            at_most=True,
            mark=lambda r: (
                r["structure"] == array.PANEL
                and r["label"].startswith("locked() + numpy sum")
                and r["versus"] == array.BULK_PRIVATE
            ),
        )
    )
    for variant in (CTYPES, NATIVE):
        out += _queue_goals(variant, native=variant == NATIVE)
    for workload in ("set", "durable set", "get"):
        out.append(
            _speed(
                store.PANEL,
                workload,
                store.DISKCACHE,
                1.0,
                f"SafeFileStore {workload} vs diskcache",
            )
        )
    for durable in ("not durable", "durable"):
        out.append(
            _speed(
                store.PANEL,
                f"2 writers ({durable})",
                "1 writer",
                0.8,
                f"SafeFileStore ({durable}): 2 writers' total rate vs 1 writer's",
            )
        )
    return out


GOALS: list[Goal] = _goals()


def evaluate(results: Results) -> list[dict[str, Any]]:
    """Every goal of the structures measured in ``results``, as the JSON document's
    ``"goals"`` lists them."""
    measured = results.get("config", {}).get("structures", options.STRUCTURES)
    out = []
    for goal in (g for g in GOALS if g.structure in measured):
        value, status = goal.status(results)
        out.append(
            {
                "description": goal.description,
                "required": goal.required,
                "comparison": "<=" if goal.at_most else ">=",
                "measured": value,
                "status": status,
            }
        )
    return out


CROSS_PYTHON_FLOOR = 0.8
"""No safeshm figure on a newer Python below the same figure on an older one by more than
20 %: each ratio measured on the newer Python must be at least this times the same ratio
measured on the older one (issue 12: 3.13 against 3.11)."""


def python_version(results: Results) -> tuple[int, ...] | None:
    """The ``(major, minor, micro)`` of the Python that measured ``results``, if it says."""
    text = str(results.get("environment", {}).get("python", "")).split(" ", 1)[0]
    try:
        return tuple(int(part) for part in text.split(".")[:3])
    except ValueError:
        return None


def compare_pythons(results: Results, other: Results) -> list[dict[str, Any]]:
    """The cross-Python goals of two saved results, from different Pythons: every ratio of
    the chart (``"ratios"``: safeshm against an alternative, per implementation) measured
    in both, the newer Python's over the older's, at least :data:`CROSS_PYTHON_FLOOR`.
    A ratio measured in one of them only is listed as not measured.

    Raises:
        ValueError: the two come from the same Python version, or one does not say which.
    """
    mine, theirs = python_version(results), python_version(other)
    if mine is None or theirs is None:
        raise ValueError("--compare-with: a result does not say which Python measured it")
    if mine[:2] == theirs[:2]:
        raise ValueError(
            f"--compare-with: both results come from Python {mine[0]}.{mine[1]}; "
            "compare results from two Pythons (say 3.11 and 3.13)"
        )
    newer, older = (results, other) if mine > theirs else (other, results)
    new_v, old_v = (mine, theirs) if mine > theirs else (theirs, mine)

    def ratios(r: Results) -> dict[tuple[str, str, str], float]:
        return {
            (x["structure"], x["label"], x["versus"]): float(x["ratio"])
            for x in r.get("ratios", [])
        }

    new_r, old_r = ratios(newer), ratios(older)
    # Only the structures both runs measured: the others are not "not measured", just
    # not asked for.
    both = set(newer.get("config", {}).get("structures", options.STRUCTURES)) & set(
        older.get("config", {}).get("structures", options.STRUCTURES)
    )
    out = []
    for key in [*new_r, *(k for k in old_r if k not in new_r)]:
        structure, label, versus = key
        if _PARTS.get(structure) not in both:
            continue
        value = new_r[key] / old_r[key] if key in new_r and key in old_r else None
        if value is None:
            status = "not measured"
        else:
            status = "met" if value >= CROSS_PYTHON_FLOOR else "MISSED"
        out.append(
            {
                "description": (
                    f"{structure}: {label} vs {versus}, Python {new_v[0]}.{new_v[1]} "
                    f"over Python {old_v[0]}.{old_v[1]}"
                    + ("" if value is None else f" ({new_r[key]:.2f}x / {old_r[key]:.2f}x)")
                ),
                "required": CROSS_PYTHON_FLOOR,
                "comparison": ">=",
                "measured": value,
                "status": status,
            }
        )
    return out


def mark(results: Results) -> None:
    """Set each chart ratio's ``goal`` (as a speed ratio) where a goal applies to it."""
    for r in results.get("ratios", []):
        r["goal"] = None
        for goal in GOALS:
            if goal.mark is not None and goal.mark(r):
                speed = 1 / goal.required if goal.at_most else goal.required
                r["goal"] = speed if r["goal"] is None else max(r["goal"], speed)


_GOALS_TITLE = (
    "Goals: the safeshm project's own targets, from the ratios of the medians above "
    "(not test results)"
)
CROSS_PYTHON_TITLE = (
    "Goals across Pythons: each ratio on the newer Python over the same ratio on the older "
    f"(at least {CROSS_PYTHON_FLOOR:g}: no figure more than "
    f"{100 - round(100 * CROSS_PYTHON_FLOOR)} % lower)"
)


def print_goals(
    checked: list[dict[str, Any]], stream: Any = None, *, title: str = _GOALS_TITLE
) -> None:
    """The goals as a table: the project's targets, not test results."""
    out = sys.stdout if stream is None else stream
    print(title, file=out)
    for g in checked:
        # Three decimals: a ratio just under its goal must not print as if it met it.
        got = "-" if g["measured"] is None else f"{g['measured']:.3f}x"
        print(
            f"  [{g['status']}] {g['description']}: {got} "
            f"(goal {g['comparison']} {g['required']:g}x)",
            file=out,
        )
    missed = sum(g["status"] == "MISSED" for g in checked)
    measured = sum(g["status"] != "not measured" for g in checked)
    print(
        f"  {measured - missed} of {measured} goals measured here met"
        + (f"; {missed} missed" if missed else ""),
        file=out,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="safeshm bench, and how its ratios compare with the project's goals "
        "(benchmarks/goals.py)."
    )
    options.add_arguments(parser)
    parser.add_argument(
        "--check-goals",
        action="store_true",
        help=f"exit with status {GOALS_MISSED} when a goal is missed "
        "(a goal not measured is not missed)",
    )
    parser.add_argument(
        "--compare-with",
        metavar="FILE",
        help="also compare with the results another Python saved in FILE (`--json`): "
        "every ratio measured on the newer Python must be at least "
        f"{CROSS_PYTHON_FLOOR:g} times the same ratio on the older one",
    )
    return parser


def _read_other(args: argparse.Namespace) -> Results | int | None:
    """The ``--compare-with`` results (``None`` without it), or the exit status, its
    message printed, if they cannot serve -- found before anything is measured."""
    if args.compare_with is None:
        return None
    try:
        other = command.read_results(args.compare_with, "--compare-with")
        if args.from_json is None:  # measuring here, with this Python
            compare_pythons({"environment": {"python": sys.version}}, other)
    except ValueError as e:
        return command.error(str(e))
    return other


def _output(
    results: Results,
    checked: list[dict[str, Any]],
    across: list[dict[str, Any]] | None,
    args: argparse.Namespace,
) -> int:
    """Print (or chart) ``results`` with their goals; the exit status."""
    mark(results)
    if args.json:
        results["goals"] = checked
        if across is not None:
            results["cross_python_goals"] = across
    status = command.emit(results, args)
    if status != 0:
        return status
    if not args.json:
        print()
        print_goals(checked)
        if across is not None:
            print()
            print_goals(across, title=CROSS_PYTHON_TITLE)
        sys.stdout.flush()
    if args.plot is not None:
        status = command.write_chart(results, args.plot, quiet=args.quiet)
        if status != 0:
            return status
    if args.check_goals and any(g["status"] == "MISSED" for g in checked + (across or [])):
        return GOALS_MISSED
    return 0


def main(structures: Sequence[str] | None = None, argv: Sequence[str] | None = None) -> int:
    """Run ``safeshm bench`` (only ``structures``, unless ``--structures`` is given) with
    ``argv``, then report the goals (with ``--compare-with``, also across two Pythons).
    The exit status: that of the benchmark, else 3 with ``--check-goals`` when a goal was
    missed, else 0."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if structures and args.structures is None and args.from_json is None:
        args.structures = list(structures)
    other = _read_other(args)
    if isinstance(other, int):
        return other
    results = command.collect(args)
    if isinstance(results, int):
        return results
    across = None
    if other is not None:
        try:
            across = compare_pythons(results, other)
        except ValueError as e:
            return command.error(str(e))
    return _output(results, evaluate(results), across, args)


# Guarded: spawn-started workers re-import this script as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main())
