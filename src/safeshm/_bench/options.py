"""The options of ``safeshm bench``, shared with the scripts in ``benchmarks/``.

Light on purpose: the CLI imports this module to build its parser on every run, and
nothing here imports the measuring code (or the CLI).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Final

STRUCTURES: Final = ("counter", "lock", "array", "queue", "store")
"""What ``--structures`` may select, in the order the benchmarks run and print."""
DEFAULT_PROCESSES: Final = (1, 2)
DEFAULT_SECONDS: Final = 1.0
DEFAULT_REPEATS: Final = 5
DEFAULT_BULK_ELEMENTS: Final = 10_000_000
"""float64 elements summed by the array benchmark's bulk part (80 MB: far larger than any
CPU cache, so every contender streams the array from memory)."""

QUICK_REPEATS: Final = 1
QUICK_BULK_ELEMENTS: Final = 1_000_000

# Sanity limits: beyond them a value is a typo (`--processes 10000` would start 10,000
# interpreters) rather than a wish.
MAX_PROCESSES: Final = 256
MAX_REPEATS: Final = 1000
MAX_SECONDS: Final = 3600.0
MAX_BULK_ELEMENTS: Final = 1 << 36

DESCRIPTION: Final = (
    "Measure safeshm's structures against what users use today (multiprocessing idioms, "
    "numpy, faster_fifo, diskcache), print the figures and ratios, and optionally chart "
    "them. The full run takes minutes; --quick gives a first look in seconds."
)

MEASURING_OPTIONS: Final = {
    "processes": "--processes",
    "seconds": "--seconds",
    "repeats": "--repeats",
    "structures": "--structures",
    "bulk_elements": "--bulk-elements",
    "store_dir": "--store-dir",
    "quick": "--quick",
}
"""The options that say what to measure (``--from-json`` takes none), by attribute."""


def int_in(low: int, high: int) -> Callable[[str], int]:
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


def seconds(text: str) -> float:
    """An argparse ``type``: a duration in seconds, positive and finite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    # `not value > 0` also refuses nan; inf would overflow every timeout derived from it.
    if not value > 0 or value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_SECONDS:g}, got {text}"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``safeshm bench`` (and of ``benchmarks/bench_*.py``) to ``parser``.

    Measuring options default to ``None`` so that ``--from-json``, which measures
    nothing, can tell that one was given; :func:`settings` fills in the defaults.
    """
    measuring = parser.add_argument_group("what to measure")
    measuring.add_argument(
        "--quick",
        action="store_true",
        help="a first look in seconds instead of minutes: one short measurement of a fixed "
        "size per contender (no warm-up, no calibration, "
        f"--repeats {QUICK_REPEATS} unless given), workers forked from a forkserver "
        "instead of each started as a fresh interpreter, smaller bulk and store "
        "workloads; noisier figures than a full run",
    )
    measuring.add_argument(
        "--processes",
        type=int_in(1, MAX_PROCESSES),
        nargs="+",
        metavar="N",
        help="process counts to measure (default: "
        f"{' '.join(map(str, DEFAULT_PROCESSES))}); for the queue, N processes "
        "means N producers and N consumers",
    )
    measuring.add_argument(
        "--seconds",
        type=seconds,
        metavar="S",
        help=f"approximate duration of each measurement (default: {DEFAULT_SECONDS}; "
        "not with --quick, whose measurements have a fixed size)",
    )
    measuring.add_argument(
        "--repeats",
        type=int_in(1, MAX_REPEATS),
        metavar="R",
        help="measurements per implementation and process count; the tables report their "
        f"median (default: {DEFAULT_REPEATS})",
    )
    measuring.add_argument(
        "--structures",
        nargs="+",
        choices=STRUCTURES,
        metavar="{" + ",".join(STRUCTURES) + "}",
        help=f"what to benchmark (default: {' '.join(STRUCTURES)})",
    )
    measuring.add_argument(
        "--bulk-elements",
        type=int_in(1, MAX_BULK_ELEMENTS),
        metavar="N",
        help="float64 elements summed by the array benchmark's bulk part "
        f"(default: {DEFAULT_BULK_ELEMENTS}; with --quick {QUICK_BULK_ELEMENTS})",
    )
    measuring.add_argument(
        "--store-dir",
        metavar="DIR",
        help="the directory (and so the file system) the store benchmark measures in "
        "(default: a temporary directory)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json", action="store_true", help="print the results as JSON on stdout instead of tables"
    )
    output.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw a bar chart of safeshm's speed ratios against the "
        "alternatives into FILE.png (needs matplotlib: "
        "pip install 'safeshm[plot]')",
    )
    output.add_argument(
        "--from-json",
        metavar="FILE",
        help="measure nothing: read the results a previous `safeshm bench "
        "--json` saved in FILE, and print (or --plot) them",
    )
    output.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress display on stderr (problems are still reported)",
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure: the parsed options with their defaults filled in."""

    processes: list[int]
    seconds: float
    repeats: int
    structures: list[str]
    bulk_elements: int
    quick: bool
    """Fixed-size measurements: no warm-up, no calibration, smaller workloads."""
    store_dir: str | None
    time_limit_s: float
    """How long released workers may run before they are called hung."""


def settings(args: argparse.Namespace) -> Settings:
    """The :class:`Settings` that ``args`` (parsed by :func:`add_arguments`) ask for."""
    quick = bool(args.quick)
    seconds_ = args.seconds or DEFAULT_SECONDS
    structures = args.structures or list(STRUCTURES)
    return Settings(
        processes=sorted(set(args.processes or DEFAULT_PROCESSES)),
        seconds=seconds_,
        repeats=args.repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS),
        structures=[s for s in STRUCTURES if s in structures],
        bulk_elements=args.bulk_elements
        or (QUICK_BULK_ELEMENTS if quick else DEFAULT_BULK_ELEMENTS),
        quick=quick,
        store_dir=args.store_dir,
        # Once released, a worker gets many times its expected share before it is called
        # hung: the machine may be shared and briefly much slower than during calibration.
        time_limit_s=max(30.0, 20 * seconds_),
    )


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of options, beyond what argparse checks (the
    ``--plot`` file is checked apart); ``None`` if nothing."""
    if args.from_json is not None:
        given = [flag for attr, flag in MEASURING_OPTIONS.items() if getattr(args, attr)]
        if given:
            return f"--from-json measures nothing: it cannot be combined with {', '.join(given)}"
    if args.quick and args.seconds is not None:
        return "--quick measures a fixed number of operations: it cannot be combined with --seconds"
    return None
