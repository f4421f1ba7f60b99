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

With ``--json`` the document gets a ``"goals"`` list; with ``--plot`` the chart marks each
goal across its bar.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

from safeshm._bench import array, command, counter, options, queue, store
from safeshm._bench.harness import plural, procs_label

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


def _goals() -> list[Goal]:
    out = []
    for impl, p, required in (
        ("SafeCounter", 1, 1.2),
        ("SafeCounter", 2, 3.0),
        ("ShardedCounter", 1, 4.0),
    ):
        out.append(
            _speed(
                counter.PANEL,
                f"{impl}.add, {plural(p)}",
                counter.IDIOM,
                required,
                f"{impl} add, {plural(p)}, vs the mp.Value idiom ({plural(p)})",
            )
        )
    out.append(
        Goal(
            "counter",
            "ShardedCounter add, 2 processes, vs its own 1-process rate",
            1.7,
            _row(
                lambda r: r.get("results"),
                "vs_own_1_process",
                implementation=counter.SHARDED,
                processes=2,
            ),
        )
    )
    # The descriptions are those the bars had in `safeshm bench` before the goals moved here.
    for p, required, what in ((1, 1.2, "element add"), (2, 3.0, "element add at random indices")):
        out.append(
            _speed(
                array.PANEL,
                f"add(i, 1), {plural(p)}",
                array.ARRAY_IDIOM,
                required,
                f"SafeArray {what}, {plural(p)}, vs the mp.Array idiom ({plural(p)})",
            )
        )
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
    labels = {
        "small": "small items",
        "batches": f"batches of {queue.QUEUE_BATCH}",
        "bytes": f"{queue.QUEUE_ITEM_BYTES // 1024} KiB bytes items",
    }
    for workload, versus, required, what, alternative in (
        ("small", queue.Q_MP, 2.0, "small items", "mp.Queue"),
        (
            "batches",
            queue.Q_MP,
            5.0,
            f"put_many/get_many in batches of {queue.QUEUE_BATCH}",
            "mp.Queue single put/get",
        ),
        ("bytes", queue.Q_MP, 4.0, "raw 64 KiB bytes items", "mp.Queue"),
        ("bytes", queue.Q_FF, 1.0, "raw 64 KiB bytes items", "faster_fifo"),
    ):
        for p in (1, 2):
            pc = procs_label(p, pairs=True)
            out.append(
                _speed(
                    queue.PANEL,
                    f"{labels[workload]}, {pc}",
                    versus,
                    required,
                    f"SafeQueue {what}, {pc}, vs {alternative} ({pc})",
                )
            )
    out.append(
        Goal(
            "queue",
            "SafeQueue round trip pinned to one CPU, median, time vs mp.SimpleQueue",
            1.0,
            _row(
                lambda r: r.get("queue", {}).get("latency"),
                "time_vs_simple_queue",
                implementation=queue.Q_SAFE,
            ),
            at_most=True,
            mark=_on(queue.PANEL, "round trip, both on 1 CPU", queue.Q_SIMPLE),
        )
    )
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


def mark(results: Results) -> None:
    """Set each chart ratio's ``goal`` (as a speed ratio) where a goal applies to it."""
    for r in results.get("ratios", []):
        r["goal"] = None
        for goal in GOALS:
            if goal.mark is not None and goal.mark(r):
                r["goal"] = 1 / goal.required if goal.at_most else goal.required


def print_goals(checked: list[dict[str, Any]], stream: Any = None) -> None:
    """The goals as a table: the project's targets, not test results."""
    out = sys.stdout if stream is None else stream
    print(
        "Goals: the safeshm project's own targets, from the ratios of the medians above "
        "(not test results)",
        file=out,
    )
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


def main(structures: Sequence[str] | None = None, argv: Sequence[str] | None = None) -> int:
    """Run ``safeshm bench`` (only ``structures``, unless ``--structures`` is given) with
    ``argv``, then report the goals. The exit status: that of the benchmark, else 3 with
    ``--check-goals`` when a goal was missed, else 0."""
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
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if structures and args.structures is None and args.from_json is None:
        args.structures = list(structures)
    results = command.collect(args)
    if isinstance(results, int):
        return results
    checked = evaluate(results)
    mark(results)
    if args.json:
        results["goals"] = checked
    status = command.emit(results, args)
    if status != 0:
        return status
    if not args.json:
        print()
        print_goals(checked)
        sys.stdout.flush()
    if args.plot is not None:
        status = command.write_chart(results, args.plot, quiet=args.quiet)
        if status != 0:
            return status
    if args.check_goals and any(g["status"] == "MISSED" for g in checked):
        return GOALS_MISSED
    return 0


# Guarded: spawn-started workers re-import this script as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main())
