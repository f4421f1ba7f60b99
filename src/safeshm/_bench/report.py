"""What the tables share: ratios as printed, the environment, the rate tables, and the
side-by-side layout of the two implementations."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from .harness import VARIANTS, Cell, ratio, untagged


def fmt_ratio(r: float | None) -> str:
    """A ratio in a table: ``2.47x``, or ``-`` where it was not measured."""
    return "-" if r is None else f"{r:.2f}x"


def rate_rows(
    cells: dict[tuple[str, int], Cell],
    baseline: str,
    scaled: Sequence[str],
    descriptions: dict[str, str],
) -> list[dict[str, Any]]:
    """Table rows: ``vs_idiom_same_processes`` compares with ``baseline``, and
    ``vs_own_1_process`` is given for the implementations in ``scaled``. A safeshm
    contender's rows say which implementation measured them (``variant``: ``native`` or
    ``ctypes``; ``None`` for the stdlib and the peers)."""
    rows = []
    for (name, p), cell in cells.items():
        impl, variant = untagged(name)
        scaling = ratio(cells, (name, p), (name, 1)) if impl in scaled else None
        rows.append(
            {
                "implementation": impl,
                "variant": variant,
                "code": descriptions[impl],
                "processes": p,
                "ops_per_worker": cell.ops_per_worker,
                "median_ops_per_s": cell.median,
                "min_ops_per_s": min(cell.samples),
                "max_ops_per_s": max(cell.samples),
                "samples_ops_per_s": list(cell.samples),
                "vs_idiom_same_processes": ratio(cells, (name, p), (baseline, p)),
                "vs_own_1_process": scaling,
            }
        )
    return rows


def print_environment(env: dict[str, Any], config: dict[str, Any]) -> None:
    print("Environment")
    width = max(map(len, env))
    for key, value in env.items():
        print(f"  {key:<{width}}  {value}")
    extra = f" bulk_elements={config['bulk_elements']}" if "bulk_elements" in config else ""
    if "queue_capacity" in config:
        extra += f" queue_capacity={config['queue_capacity']}"
    size = (
        "quick (fixed-size measurements)" if config.get("quick") else f"seconds={config['seconds']}"
    )
    print(
        f"  {'config':<{width}}  processes={config['processes']} "
        f"{size} repeats={config['repeats']} "
        f"structures={','.join(config['structures'])}{extra}"
    )


@dataclasses.dataclass(frozen=True)
class Column:
    """One figure of a side-by-side table: its header, its width per implementation, and
    how it is printed from a row (``None``: nothing to show)."""

    header: str
    width: int
    text: Callable[[dict[str, Any]], str | None]


def spread(low: float, high: float, median: float) -> float:
    """How far apart a cell's repeats are: (max - min) / median."""
    return (high - low) / median if median else 0.0


def print_side_by_side(
    rows: list[dict[str, Any]],
    *,
    key: Callable[[dict[str, Any]], str],
    key_header: str,
    columns: Sequence[Column],
    noise: Callable[[dict[str, Any]], float] | None = None,
    name_width: int = 20,
) -> None:
    """A table with one line per contender and process count (``key``), where a safeshm
    contender shows each implementation's figure side by side (``native``, then
    ``ctypes``), and the stdlib and the peers -- measured once -- one figure across both.

    ``noise`` adds a last column: the largest :func:`spread` of the line's cells, in %.
    Rows without a ``variant`` (saved by a safeshm that measured one implementation only)
    print as the stdlib's do.
    """
    sub = len(VARIANTS)
    groups: dict[tuple[str, str], dict[str | None, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["implementation"], key(r)), {})[r.get("variant")] = r
    top = f"{'':<{name_width}} {'':>{len(key_header)}}"
    second = f"{'implementation':<{name_width}} {key_header}"
    for c in columns:
        span = sub * c.width + (sub - 1)
        top += f"  {c.header:^{span}}"
        second += "  " + " ".join(f"{v:>{c.width}}" for v in VARIANTS)
    if noise is not None:
        top += f"  {'spread':>6}"
        second += f"  {'':>6}"
    print(top.rstrip())
    print(second.rstrip())
    print("-" * len(second))
    missing = False
    for (impl, k), by_variant in groups.items():
        line = f"{impl:<{name_width}} {k:>{len(key_header)}}"
        if None in by_variant:  # measured once: one figure across the columns
            row = by_variant[None]
            for c in columns:
                span = sub * c.width + (sub - 1)
                line += f"  {c.text(row) or '-':^{span}}"
            spreads = [noise(row)] if noise is not None else []
        else:
            for c in columns:
                cells = []
                for v in VARIANTS:
                    row_v = by_variant.get(v)
                    missing = missing or row_v is None
                    text = "n/a" if row_v is None else (c.text(row_v) or "-")
                    cells.append(f"{text:>{c.width}}")
                line += "  " + " ".join(cells)
            spreads = [noise(r) for r in by_variant.values()] if noise is not None else []
        if noise is not None:
            line += f"  {max(spreads) * 100:>5.0f}%"
        print(line)
    if missing:
        print("n/a: not measured with that implementation here (see 'implementations' above)")


def print_rate_table(rows: list[dict[str, Any]], baseline: str) -> None:
    """The rates side by side (see :func:`print_side_by_side`), their ratio to ``baseline``
    (named in the header, as the queue tables name theirs) at the same process count, and
    to the same implementation's 1-process rate."""
    print_side_by_side(
        rows,
        key=lambda r: str(r["processes"]),
        key_header="procs",
        columns=[
            Column("median Mops/s", 8, lambda r: f"{r['median_ops_per_s'] / 1e6:.3f}"),
            Column(
                f"vs {baseline}",
                max(7, (len(baseline) + 3) // 2),
                lambda r: fmt_ratio(r["vs_idiom_same_processes"]),
            ),
            Column(
                "vs own 1P",
                6,
                lambda r: (
                    None if r["vs_own_1_process"] is None else fmt_ratio(r["vs_own_1_process"])
                ),
            ),
        ],
        noise=lambda r: spread(r["min_ops_per_s"], r["max_ops_per_s"], r["median_ops_per_s"]),
    )
