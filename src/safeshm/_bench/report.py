"""What the tables share: ratios as printed, the environment, the rate tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .harness import Cell, ratio


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
    ``vs_own_1_process`` is given for the implementations in ``scaled``."""
    rows = []
    for (impl, p), cell in cells.items():
        scaling = ratio(cells, (impl, p), (impl, 1)) if impl in scaled else None
        rows.append(
            {
                "implementation": impl,
                "code": descriptions[impl],
                "processes": p,
                "ops_per_worker": cell.ops_per_worker,
                "median_ops_per_s": cell.median,
                "min_ops_per_s": min(cell.samples),
                "max_ops_per_s": max(cell.samples),
                "samples_ops_per_s": list(cell.samples),
                "vs_idiom_same_processes": ratio(cells, (impl, p), (baseline, p)),
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


def print_rate_table(rows: list[dict[str, Any]], baseline: str) -> None:
    """The rates, their ratio to ``baseline`` (named in the header, as the queue tables
    name theirs) at the same process count, and to the same implementation's 1-process
    rate."""
    vs = f"vs {baseline}"
    header = (
        f"{'implementation':<20} {'procs':>5} {'median Mops/s':>13} "
        f"{'range (min-max)':>17} {vs:>{max(9, len(vs))}} {'vs own 1P':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        rng = f"{r['min_ops_per_s'] / 1e6:.3f}-{r['max_ops_per_s'] / 1e6:.3f}"
        print(
            f"{r['implementation']:<20} {r['processes']:>5} "
            f"{r['median_ops_per_s'] / 1e6:>13.3f} {rng:>17} "
            f"{fmt_ratio(r['vs_idiom_same_processes']):>{max(9, len(vs))}} "
            f"{fmt_ratio(r['vs_own_1_process']):>9}"
        )
