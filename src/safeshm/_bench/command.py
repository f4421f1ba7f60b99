"""``safeshm bench``: measure (or read saved results), print them, and chart them.

The pieces -- :func:`collect`, :func:`emit`, :func:`write_chart` -- are also what the
project's own scripts in ``benchmarks/`` put together, with their goals added.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Any

from . import array, counter, lock, options, queue, store
from .chart import load_ratios, plot, plot_problem
from .harness import CTYPES, VARIANTS, Agents, BenchError, Cell, Progress, context, environment
from .report import print_environment

if TYPE_CHECKING:
    from .harness import Context


def error(message: str) -> int:
    """Report a problem with the arguments or the input, as every subcommand does: one
    line on stderr; the exit status 2."""
    print(
        message if message.startswith("safeshm") else f"safeshm: {message}",
        file=sys.stderr,
        flush=True,
    )
    return 2


def read_results(path: str, option: str = "--from-json") -> dict[str, Any]:
    """The results a ``safeshm bench --json`` run saved in ``path`` (given with ``option``,
    which the messages name).

    Raises:
        ValueError: the file cannot be read, or is not such results (said in one line).
    """
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {option} {path!r}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{option} {path!r} is not JSON: {e}") from None
    if not isinstance(results, dict) or not isinstance(results.get("environment"), dict):
        raise ValueError(f"{option} {path!r} is not the output of `safeshm bench --json`")
    return upgrade_legacy(results)


LEGACY_IMPLEMENTATIONS = "ctypes (a result saved before safeshm had a compiled core)"


def upgrade_legacy(results: dict[str, Any]) -> dict[str, Any]:
    """Results saved before ``safeshm bench`` measured each implementation (no
    ``config.variants``) as today's layout: every safeshm figure then was the ctypes
    implementation's, so its rows get ``"variant": "ctypes"`` and its ratios' labels end
    in ``, ctypes`` (the bulk sum and the store, measured in one process, stay as they
    are). Anything else is returned unchanged; so is whatever does not look as expected
    (the tables then say what is missing)."""
    config = results.get("config")
    if not isinstance(config, dict) or "variants" in config:
        return results
    config["variants"] = [CTYPES]
    results["environment"].setdefault("implementations", LEGACY_IMPLEMENTATIONS)
    safeshm_rows = {
        *counter.SAFESHM,
        *lock.SAFESHM,
        *array.SAFESHM,
        *queue.QUEUE_SAFESHM,
    }
    tables: list[Any] = [results.get("results"), results.get("lock")]
    if isinstance(results.get("array"), dict):
        tables.append(results["array"].get("element_add"))
    if isinstance(results.get("queue"), dict):
        tables += [results["queue"].get(w) for w in (*queue.QUEUE_WORKLOADS, queue.LATENCY)]
    for table in tables:
        for row in table if isinstance(table, list) else []:
            if isinstance(row, dict):
                row.setdefault(
                    "variant", CTYPES if row.get("implementation") in safeshm_rows else None
                )
    panels = {counter.PANEL, lock.PANEL, array.PANEL, queue.PANEL}
    for r in results.get("ratios", []) if isinstance(results.get("ratios"), list) else []:
        if (
            isinstance(r, dict)
            and r.get("structure") in panels
            and isinstance(r.get("label"), str)
            and not r["label"].startswith("locked()")
        ):
            r["label"] += f", {CTYPES}"
    return results


def run(args: argparse.Namespace) -> int:
    """``safeshm bench``: measure (or read saved results), print them, and chart them.

    Args:
        args: the command line as parsed by :func:`safeshm._bench.options.add_arguments`:
            the measuring options (``None`` when not given), ``json``, ``plot``,
            ``from_json`` and ``quiet``.

    Returns:
        0 when every measurement completed with a correct result and the chart, if asked
        for, was written; 1 when a measurement failed (a worker failed or hung, or a
        structure lost or damaged data) or the chart could not be written; 2 for a
        problem with the arguments, which is found before anything is measured; 130 when
        interrupted.
    """
    results = collect(args)
    if isinstance(results, int):
        return results
    status = emit(results, args)
    if status != 0 or args.plot is None:
        return status
    return write_chart(results, args.plot, quiet=args.quiet)


def collect(args: argparse.Namespace) -> dict[str, Any] | int:
    """The results ``args`` ask for -- measured, or read with ``--from-json`` -- as
    ``--json`` prints them; or the exit status, its message printed, if that could not be
    done. The arguments (``--plot`` included) are checked before anything is measured."""
    problem = options.argument_problem(args)
    if problem is None and args.plot is not None:
        problem = plot_problem(args.plot)
    if problem is not None:
        return error(problem)
    if args.from_json is None:
        return _measure(options.settings(args), quiet=args.quiet, json_output=args.json)
    try:
        results = read_results(args.from_json)
        if args.plot is not None:
            load_ratios(results)  # a bad file is said so before anything is printed
    except ValueError as e:
        return error(str(e))
    return results


def emit(results: dict[str, Any], args: argparse.Namespace) -> int:
    """Print ``results``: as JSON with ``--json``, else as tables. The exit status."""
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        try:
            print_report(results)
        except (KeyError, TypeError, ValueError) as e:
            # Only saved results can lack what the tables need.
            return error(
                f"--from-json {args.from_json!r} lacks what the tables need "
                f"({type(e).__name__}: {e}); --json prints it as it is"
            )
    sys.stdout.flush()
    return 0


def print_report(results: dict[str, Any]) -> None:
    """The tables, from the same data ``--json`` prints."""
    config = results["config"]
    print_environment(results["environment"], config)
    if "results" in results:
        print()
        counter.print_section(results["results"])
    if "lock" in results:
        print()
        lock.print_section(results["lock"])
    if "array" in results:
        print()
        array.print_section(results["array"])
    if "queue" in results:
        print()
        queue.print_section(results["queue"])
    if "store" in results:
        section = results["store"]
        print()
        print(
            store.report(
                store.cells_from_json(section["cells"]),
                keys=section.get("keys", store.KEYS),
                durable_keys=section.get("durable_keys", store.DURABLE_KEYS),
            )
        )


def write_chart(results: dict[str, Any], path: str, *, quiet: bool) -> int:
    """``--plot``: the chart of ``results`` into ``path``; the exit status."""
    try:
        plot(results, path)
    except ValueError as e:
        return error(str(e))
    except OSError as e:
        print(f"safeshm: cannot write the chart to {path!r}: {e.strerror or e}", file=sys.stderr)
        return 1
    if not quiet:
        print(f"chart written to {path}", file=sys.stderr)
    return 0


@dataclasses.dataclass
class _Measured:
    """Everything measured, part by part (a part not asked for stays empty)."""

    counter_cells: dict[tuple[str, int], Cell] = dataclasses.field(default_factory=dict)
    lock_cells: dict[tuple[str, int], Cell] = dataclasses.field(default_factory=dict)
    array_cells: dict[tuple[str, int], Cell] = dataclasses.field(default_factory=dict)
    bulk: dict[str, array.BulkCell] = dataclasses.field(default_factory=dict)
    queue_cells: dict[str, dict[tuple[str, int], Cell]] = dataclasses.field(default_factory=dict)
    """Per queue workload, its cells."""
    latency: dict[str, queue.LatencyCell] = dataclasses.field(default_factory=dict)
    store_cells: list[store.StoreCell] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Plans:
    """What can run here (numpy and faster_fifo are optional; so is the compiled core)."""

    array_plan: array.Plan
    queue_plan: queue.Plan
    variants: tuple[str, ...] = VARIANTS
    """The implementations every safeshm row is measured with."""

    @classmethod
    def for_(cls, settings: options.Settings, variants: tuple[str, ...] = VARIANTS) -> _Plans:
        return cls(
            array.plan()
            if "array" in settings.structures
            else array.Plan(None, (), bulk=False, notes=[]),
            queue.plan() if "queue" in settings.structures else queue.Plan(None, {}, notes=[]),
            variants,
        )

    def weights(self, settings: options.Settings) -> list[float]:
        """Every progress step :func:`_measure_all` takes, weighed, in order."""
        out: list[float] = []
        if "counter" in settings.structures:
            out += counter.weights(settings, self.variants)
        if "lock" in settings.structures:
            out += lock.weights(settings, self.variants)
        if "array" in settings.structures:
            out += array.weights(settings, self.array_plan, self.variants)
        if "queue" in settings.structures:
            out += queue.weights(settings, self.queue_plan, self.variants)
        if "store" in settings.structures:
            out += store.weights(settings.repeats, quick=settings.quick)
        return out


def _measure(settings: options.Settings, *, quiet: bool, json_output: bool) -> dict[str, Any] | int:
    """Measure what ``settings`` ask for: the results as ``--json`` prints them, or the exit
    status (its message printed) if that could not be done."""
    plans = _Plans.for_(settings)
    problem = array.bulk_problem(settings.bulk_elements) if plans.array_plan.bulk else None
    if problem is not None:
        return error(problem)
    if json_output:
        # The tables show notes; stdout must stay pure JSON here.
        for text in plans.array_plan.notes + plans.queue_plan.notes:
            print(f"note: {text}", file=sys.stderr, flush=True)
    # The store is measured here only (with this process's implementation): no agents.
    agents = Agents(quick=settings.quick, variants=VARIANTS if _uses_agents(settings) else ())
    progress = Progress([], None)
    if agents.wanted and not quiet:
        print(
            f"starting a measuring process per implementation ({', '.join(agents.wanted)}) ...",
            file=sys.stderr,
            flush=True,
        )
    try:
        with agents:
            plans = dataclasses.replace(plans, variants=agents.variants)
            progress = Progress(plans.weights(settings), None if quiet else sys.stderr)
            ctx = context(quick=settings.quick)
            env = environment(ctx.get_start_method(), agents.variants, agents.unavailable)
            measured = _measure_all(ctx, settings, plans, progress, agents)
    except BenchError as e:
        progress.interrupt()
        print(f"\n*** BENCHMARK FAILED: {e} ***\n", file=sys.stderr, flush=True)
        return 1
    except MemoryError:
        progress.interrupt()
        error("out of memory (a smaller --bulk-elements needs less)")
        return 1
    except KeyboardInterrupt:
        progress.interrupt()
        print("interrupted", file=sys.stderr)
        return 130
    progress.finish()
    return _results(env, settings, plans, measured)


def _uses_agents(settings: options.Settings) -> bool:
    """Whether anything asked for is measured per implementation (all but the store)."""
    return any(s != "store" for s in settings.structures)


def _measure_all(
    ctx: Context, settings: options.Settings, plans: _Plans, progress: Progress, agents: Agents
) -> _Measured:
    """Measure every part ``settings.structures`` asks for, in the order they print."""
    m = _Measured()
    if "counter" in settings.structures:
        m.counter_cells = counter.measure_all(ctx, settings, progress, agents)
    if "lock" in settings.structures:
        m.lock_cells = lock.measure_all(ctx, settings, progress, agents)
    if "array" in settings.structures:
        m.array_cells = array.measure_elements(ctx, settings, plans.array_plan, progress, agents)
        if plans.array_plan.bulk:
            m.bulk = array.measure_bulk(settings, progress)
    if "queue" in settings.structures:
        m.queue_cells, m.latency = queue.measure_all(
            ctx, settings, plans.queue_plan, progress, agents
        )
    if "store" in settings.structures:
        m.store_cells = store.measure(
            ctx, settings.repeats, settings.store_dir, progress.step, quick=settings.quick
        )
    return m


def _results(
    env: dict[str, Any], settings: options.Settings, plans: _Plans, m: _Measured
) -> dict[str, Any]:
    """Everything measured, as printed by ``--json`` (and rendered as tables without)."""
    config: dict[str, Any] = {
        "processes": settings.processes,
        "seconds": settings.seconds,
        "repeats": settings.repeats,
        "structures": settings.structures,
        "variants": list(plans.variants),
    }
    if settings.quick:
        config["quick"] = True
    out: dict[str, Any] = {"environment": env, "config": config}
    ratios = []
    if "counter" in settings.structures:
        out["results"] = counter.rows(m.counter_cells)
        ratios += counter.ratios(m.counter_cells, settings.processes, plans.variants)
    if "lock" in settings.structures:
        out["lock"] = lock.rows(m.lock_cells)
        ratios += lock.ratios(m.lock_cells, settings.processes, plans.variants)
    if "array" in settings.structures:
        config["bulk_elements"] = settings.bulk_elements
        out["array"] = array.section(settings, plans.array_plan, m.array_cells, m.bulk)
        ratios += array.ratios(m.array_cells, m.bulk, settings.processes, settings.bulk_elements)
    if "queue" in settings.structures:
        config["queue_capacity"] = queue.QUEUE_CAPACITY
        out["queue"] = queue.section(plans.queue_plan, m.queue_cells, m.latency)
        ratios += queue.ratios(m.queue_cells, m.latency, settings.processes)
    if "store" in settings.structures:
        out["store"] = store.section(m.store_cells, quick=settings.quick)
        ratios += store.ratios(m.store_cells)
    out["ratios"] = [dataclasses.asdict(r) for r in ratios]
    return out
