"""The ``--plot`` chart: safeshm's speed ratios against the alternatives, one panel per
structure.

:func:`plot_ratios` draws any list of :class:`Ratio` and knows nothing else about the
benchmarks. matplotlib is optional (the ``plot`` extra) and imported only here, only when
a chart is drawn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclasses.dataclass(frozen=True)
class Ratio:
    """One bar of the ``--plot`` chart: how many times faster safeshm is than an alternative.

    ``safeshm bench --json`` lists every ratio measured under the top-level key
    ``"ratios"``, each as a JSON object with exactly these fields, in drawing order::

        {"structure": "SafeQueue", "label": "small items, 2P/2C",
         "versus": "mp.Queue", "ratio": 2.47, "goal": 2.0}

    :func:`plot_ratios` draws whatever that list holds and knows nothing else about the
    benchmarks: a benchmark added for another structure appends its own ratios (say
    ``Ratio("SafeFileStore", "set, 2P", "diskcache", 3.1, None)``) and gets its own panel,
    with no change to the plotting code.

    Attributes:
        structure: the panel the ratio is drawn in, titled with this text; panels come in
            the order of their first ratio.
        label: the row within the panel -- what safeshm did, at which process count; rows
            come in the order of their first ratio, and hold one bar per ``versus``.
        versus: the alternative compared with; each alternative has its own colour,
            explained in the panel's legend.
        ratio: safeshm's speed divided by the alternative's, from the medians (for times,
            such as a latency, the alternative's time divided by safeshm's): above 1,
            safeshm is faster.
        goal: a goal for this ratio, as a speed ratio, drawn as a mark across the bar;
            ``None`` for none. ``safeshm bench`` sets none: the project's own goals are
            marked by its ``benchmarks/`` scripts.
    """

    structure: str
    label: str
    versus: str
    ratio: float
    goal: float | None = None


# --- the chart ------------------------------------------------------------------------------
PLOT_NEEDS_MATPLOTLIB: Final = "safeshm bench --plot needs matplotlib: pip install 'safeshm[plot]'"

_TIMES: Final = "\N{MULTIPLICATION SIGN}"
# Colour-blind-safe (Okabe-Ito, without its yellow, too pale on white); in each panel, one
# per alternative in order of first appearance, so the main alternative is always blue.
_PALETTE: Final = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#999999",
    "#000000",
)
_MISSED: Final = "#B2182B"
"""The colour of a ratio's figure when it misses its goal."""

# Geometry, in inches.
_FIG_WIDTH: Final = 12.0
_BAR_PITCH: Final = 0.25
"""Height of one bar's slot (the bar is 80 per cent of it)."""
_ROW_GAP: Final = 0.6
"""Space between two rows of bars, in bar slots."""
_PANEL_GAP: Final = 0.65
_HEADER: Final = 0.8
_FOOTER: Final = 1.15
_LEFT: Final = 3.0
_RIGHT: Final = 2.3
_MARGIN: Final = 0.15
"""Where the title and footnote start, from the figure's left edge."""


def plot_problem(path: str) -> str | None:
    """Why ``--plot path`` cannot work, checked before anything is measured; ``None`` if
    it can."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 - optional: only --plot needs it
    except ImportError:
        return PLOT_NEEDS_MATPLOTLIB
    if os.path.isdir(path):
        return f"--plot {path!r} is a directory; give a file name such as chart.png"
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        return f"--plot {path!r}: there is no directory {directory!r} to write it in"
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"--plot {path!r}: permission denied"
    formats = Figure().canvas.get_supported_filetypes()
    if _suffix(path) not in formats:
        return (
            f"--plot {path!r}: the name must end in .png (or another format matplotlib "
            f"writes: {', '.join('.' + f for f in sorted(formats))})"
        )
    return None


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lstrip(".").lower()


def _times(x: float) -> str:
    """A ratio as the chart writes it: 0.83x, 2.47x, 12.3x."""
    return f"{x:.1f}{_TIMES}" if x >= 9.95 else f"{x:.2f}{_TIMES}"


def _goal_text(x: float) -> str:
    """A goal as the chart writes it: 3x, 1.2x, 0.67x."""
    return f"{x:.2f}".rstrip("0").rstrip(".") + _TIMES


def _axis_ticks(lo: float, hi: float) -> list[float]:
    """Round ratios from ``lo`` to ``hi``: 0.5, 1, 2, 5, 10, ... over a span of a few
    decades; over a wider one, powers of ten only (1, 10, 100, ...), as 500x, 1000x and
    2000x side by side would print over each other."""
    decades = math.log10(hi / lo)
    steps = (1, 2, 5) if decades <= 3 else (1,)
    ticks = [m * 10.0**e for e in range(-4, 7) for m in steps]
    return [t for t in ticks if lo <= t <= hi]


# The width of a bar's figure, per character, in points (fontsize 9.5): for making room
# for the longest figure between the bars and the legend. A generous estimate: a figure
# drawn narrower than estimated only leaves some white space.
_LABEL_CHAR_PT: Final = 6.0
_LABEL_OFFSET_PT: Final = 5.0


def _label_text(r: Ratio) -> str:
    """The figure written after a bar that grows rightwards (see :func:`_label_bar`)."""
    missed = r.goal is not None and r.ratio < r.goal
    return _times(r.ratio) + (
        f"  (goal {_goal_text(r.goal)})" if missed and r.goal is not None else ""
    )


def _x_limits(
    ratios: Sequence[Ratio], *, log: bool, lo: float, hi: float, plot_pt: float
) -> tuple[float, float]:
    """The x axis's limits: a margin below ``lo``, and on the right room for every bar's
    figure to end inside the axes (``plot_pt`` points wide), never in the legend beside
    them, however far a huge ratio reaches."""
    xmin = lo / 1.6 if log else 0.0

    def position(x: float) -> float:  # along the axis: log or linear
        return math.log(x) if log else x

    left = position(xmin)
    right = position(hi * (1.3 if log else 1.15))
    for r in ratios:
        # A figure starts at its bar's end (or its goal mark, if further right) and takes
        # `need` of the axes' width: that start must lie at most 1 - need of the way across.
        start = max(r.ratio, r.goal or 0.0, 1.0 if log else 0.0)
        text_pt = _LABEL_OFFSET_PT + _LABEL_CHAR_PT * len(_label_text(r)) + 4
        need = min(text_pt / plot_pt, 0.5)
        right = max(right, left + (position(start) - left) / (1 - need))
    return xmin, (math.exp(right) if log else right)


@dataclasses.dataclass
class _Panel:
    """One structure's ratios, laid out: each bar's slot (0 at the top, one per bar) and
    each row's centre and label."""

    title: str
    bars: list[tuple[float, Ratio]] = dataclasses.field(default_factory=list)
    rows: list[tuple[float, float, str]] = dataclasses.field(default_factory=list)
    """Per row: its first and last slot, and its label."""
    slots: float = 0.0
    """Height in bar slots."""


def _panels(ratios: Sequence[Ratio]) -> list[_Panel]:
    """Group ``ratios`` into panels and rows, in order of first appearance."""
    panels: dict[str, _Panel] = {}
    for structure in dict.fromkeys(r.structure for r in ratios):
        panel = panels[structure] = _Panel(structure)
        members = [r for r in ratios if r.structure == structure]
        y = 0.0
        for label in dict.fromkeys(r.label for r in members):
            row = [r for r in members if r.label == label]
            panel.rows.append((y, y + len(row) - 1, label))
            for r in row:
                panel.bars.append((y, r))
                y += 1
            y += _ROW_GAP
        panel.slots = y - _ROW_GAP
    return list(panels.values())


def _draw_panel(ax: Axes, panel: _Panel, *, log: bool) -> None:
    """One structure's bars, figures, goal marks, rows and legend."""
    from matplotlib.lines import Line2D  # noqa: PLC0415 - optional dependency
    from matplotlib.patches import Patch  # noqa: PLC0415 - optional dependency

    versus = dict.fromkeys(r.versus for _, r in panel.bars)
    colours = {v: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(versus)}
    # On a log axis a bar runs from the 1x line to the ratio, so that its length is how
    # much faster (to the right) or slower (to the left) safeshm is, and 2x faster and 2x
    # slower look alike; on a linear axis, from 0 as usual.
    base = 1.0 if log else 0.0

    for i, (first, last, _) in enumerate(panel.rows):
        if i % 2:  # banded rows: each row's bars stand apart from its neighbours'
            ax.axhspan(
                first - 0.5 - _ROW_GAP / 2,
                last + 0.5 + _ROW_GAP / 2,
                color="#F4F4F4",
                zorder=0,
                lw=0,
            )
    for y, r in panel.bars:
        ax.barh(y, r.ratio - base, left=base, height=0.8, color=colours[r.versus], zorder=3)
        if r.goal is not None:
            ax.plot(
                [r.goal, r.goal],
                [y - 0.5, y + 0.5],
                color="black",
                lw=2.2,
                solid_capstyle="butt",
                zorder=4,
            )
        _label_bar(ax, y, r, base)
    ax.axvline(1.0, color="#333333", lw=1.2, zorder=4)
    ax.set_yticks(
        [(first + last) / 2 for first, last, _ in panel.rows],
        [label for _, _, label in panel.rows],
        fontsize=11,
    )
    ax.set_ylim(panel.slots - 0.5 + 0.3, -0.5 - 0.3)
    ax.tick_params(axis="y", length=0, pad=8)
    ax.tick_params(axis="x", labelbottom=False, length=0)
    ax.grid(axis="x", color="#DDDDDD", lw=0.8, zorder=0)
    ax.grid(axis="x", which="minor", color="#EEEEEE", lw=0.6, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.spines["bottom"].set_color("#BBBBBB")
    handles: list[Patch | Line2D] = [Patch(color=colours[v], label=v) for v in versus]
    if any(r.goal is not None for _, r in panel.bars):
        handles.append(Line2D([], [], color="black", lw=2.2, label="goal"))
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        fontsize=10,
        title="safeshm vs",
        title_fontsize=10,
        alignment="left",
        borderaxespad=0.0,
    )


def _label_bar(ax: Axes, y: float, r: Ratio, base: float) -> None:
    """Write ``r``'s figure at the end of its bar, beyond its goal mark if the mark lies
    that way (never across it); a missed goal is said in red."""
    missed = r.goal is not None and r.ratio < r.goal
    style: dict[str, Any] = {
        "textcoords": "offset points",
        "va": "center",
        "zorder": 5,
        "fontsize": 9.5,
        "color": _MISSED if missed else "#222222",
        "fontweight": "bold" if missed else "normal",
    }
    if r.ratio >= base:  # the bar grows rightwards
        at = r.ratio if r.goal is None else max(r.ratio, r.goal)
        ax.annotate(_label_text(r), (at, y), xytext=(_LABEL_OFFSET_PT, 0), ha="left", **style)
        return
    at = r.ratio if r.goal is None else min(r.ratio, r.goal)
    ax.annotate(_times(r.ratio), (at, y), xytext=(-5, 0), ha="right", **style)
    if missed and r.goal is not None:
        # The goal lies to the right, at or beyond the 1x line: said there.
        style.update(fontsize=8.5, fontweight="normal")
        ax.annotate(
            f"goal {_goal_text(r.goal)}", (max(r.goal, base), y), xytext=(5, 0), ha="left", **style
        )


def plot_ratios(
    ratios: Sequence[Ratio], path: str, *, title: str, subtitle: str, footnote: str
) -> None:
    """Draw ``ratios`` as a bar chart into ``path`` (its format from its extension).

    One panel per :attr:`Ratio.structure`; in each, one row per :attr:`Ratio.label`
    holding one horizontal bar per alternative, from the 1x line (as fast as the
    alternative) to the ratio, labelled with its value; a black mark across the bar where
    the ratio has a goal (a ratio that misses its goal is labelled in red). The x
    axis, shared by the panels, is logarithmic when the ratios span more than 10x.

    Uses matplotlib's Agg renderer directly (no pyplot, no display, no global state), and
    writes the file atomically: a failure leaves no half-written chart.

    Raises:
        ValueError: ``ratios`` is empty.
        OSError: the file could not be written.
    """
    # Optional dependency: imported here, after plot_problem has said it is there.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.ticker import (  # noqa: PLC0415
        FixedLocator,
        FuncFormatter,
        NullFormatter,
        NullLocator,
    )

    if not ratios:
        raise ValueError("nothing to plot: no ratio was measured")
    panels = _panels(ratios)
    values = [r.ratio for r in ratios] + [r.goal for r in ratios if r.goal is not None]
    lo, hi = min([*values, 1.0]), max([*values, 1.0])
    log = hi / lo > 10
    plot_width = _FIG_WIDTH - _LEFT - _RIGHT
    xlim = _x_limits(ratios, log=log, lo=lo, hi=hi, plot_pt=72 * plot_width)

    height = (
        _HEADER + _FOOTER + _PANEL_GAP * len(panels) + _BAR_PITCH * sum(p.slots for p in panels)
    )
    fig = Figure(figsize=(_FIG_WIDTH, height), dpi=150, facecolor="white")
    FigureCanvasAgg(fig)
    fig.text(
        _MARGIN / _FIG_WIDTH,
        1 - 0.3 / height,
        title,
        fontsize=17,
        fontweight="bold",
        va="baseline",
        ha="left",
        color="#111111",
    )
    fig.text(
        _MARGIN / _FIG_WIDTH,
        1 - 0.58 / height,
        subtitle,
        fontsize=10.5,
        va="baseline",
        ha="left",
        color="#555555",
    )
    top = height - _HEADER
    axes: list[Axes] = []
    for panel in panels:
        top -= _PANEL_GAP
        h = panel.slots * _BAR_PITCH
        top -= h
        ax = fig.add_axes((_LEFT / _FIG_WIDTH, top / height, plot_width / _FIG_WIDTH, h / height))
        if axes:
            ax.sharex(axes[0])
        axes.append(ax)
        ax.set_title(
            panel.title,
            loc="left",
            fontsize=13.5,
            fontweight="bold",
            pad=8,
            x=(_MARGIN - _LEFT) / plot_width,
            color="#111111",
        )
        _draw_panel(ax, panel, log=log)

    first, last = axes[0], axes[-1]
    first.set_xscale("log" if log else "linear")
    first.set_xlim(*xlim)
    if log:
        major = _axis_ticks(*xlim)
        first.xaxis.set_major_locator(FixedLocator(major))
        # Powers of ten only: unlabelled marks at 2x and 5x between them keep the bars
        # readable against the grid.
        minor = [m * 10.0**e for e in range(-4, 7) for m in (2, 5)]
        minor = [t for t in minor if xlim[0] <= t <= xlim[1] and t not in major]
        first.xaxis.set_minor_locator(FixedLocator(minor) if minor else NullLocator())
        first.xaxis.set_minor_formatter(NullFormatter())
    first.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}{_TIMES}"))
    last.tick_params(axis="x", labelbottom=True, labelsize=10.5, length=3, color="#BBBBBB")
    last.set_xlabel(
        f"safeshm's speed \N{DIVISION SIGN} the alternative's   (higher is "
        f"better; 1{_TIMES} = as fast)",
        fontsize=11,
        labelpad=8,
    )
    fig.text(
        _MARGIN / _FIG_WIDTH,
        0.1 / height,
        footnote,
        fontsize=9,
        color="#555555",
        va="bottom",
        ha="left",
        wrap=True,
    )
    _save(fig, path)


def _save(fig: Any, path: str) -> None:
    """``fig.savefig(path)`` through a temporary file renamed over ``path`` at the end."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            # "tight": the saved image grows or shrinks to what was drawn (long labels
            # and legends included), with an even margin around it.
            fig.savefig(
                f, format=_suffix(name), facecolor="white", bbox_inches="tight", pad_inches=0.25
            )
        # mkstemp makes the file 0600; a chart is no secret (as for any file the user
        # writes, the umask decides).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _chart_texts(results: dict[str, Any]) -> tuple[str, str, str]:
    """The chart's title, subtitle (the machine) and footnote (the method), from what
    ``--json`` prints."""
    env, config = results.get("environment", {}), results.get("config", {})
    cpus, usable = env.get("cpu_count"), env.get("cpus_usable")
    python = (
        f"{env.get('python_implementation', 'Python')} "
        f"{str(env.get('python', '?')).split(' ', 1)[0]}"
    )
    if env.get("gil_enabled") is False:
        python += " (free-threaded)"
    system = str(env.get("platform", "")).split("-", 1)[0]
    machine = " \N{MIDDLE DOT} ".join(
        str(part)
        for part in (
            env.get("cpu_model", "unknown CPU"),
            f"{cpus} CPUs" if usable in (None, cpus) else f"{cpus} CPUs ({usable} usable)",
            python,
            f"{system} {env.get('kernel', '')} {env.get('machine', '')}".strip(),
            f"safeshm {env.get('safeshm', '?')}",
        )
    )
    title = "safeshm vs what you use today: how many times faster"
    repeats, seconds = config.get("repeats", "?"), config.get("seconds", "?")
    if config.get("quick"):
        first = (
            f"Median of {repeats} quick (fixed-size) measurements"
            if repeats != 1
            else "One quick (fixed-size) measurement each"
        )
    else:
        first = (
            f"Median of {repeats} measurements of about {seconds} s each"
            if repeats != 1
            else f"One measurement of about {seconds} s each"
        )
    notes = [
        first,
        "every contender measured in the same run; N processes: N worker processes "
        f"(started with {env.get('start_method', 'spawn')!r}) on one structure.",
    ]
    if config.get("variants"):
        notes.append(
            "safeshm measured with each of its implementations ("
            + ", ".join(config["variants"])
            + "), each in worker processes of its own."
        )
    if "queue" in config.get("structures", []):
        notes.append(
            "SafeQueue: N producers and N consumers; in batches, mp.Queue (which has "
            "no batch calls) puts and gets one item at a time; round trip: a "
            "ping-pong with both processes pinned to one CPU."
        )
    if any(isinstance(r, dict) and r.get("goal") is not None for r in results.get("ratios", [])):
        notes.append("Black marks: the project's goals (its benchmarks/ scripts check them).")
    return title, machine, ", ".join(notes[:2]) + " " + " ".join(notes[2:])


def plot(results: dict[str, Any], path: str) -> None:
    """Chart ``results["ratios"]`` (see :class:`Ratio`) into ``path``, titled with the
    machine from ``results["environment"]``.

    Raises:
        ValueError: ``results`` has no ratios, or they are not :class:`Ratio` objects.
        OSError: the file could not be written.
    """
    title, subtitle, footnote = _chart_texts(results)
    plot_ratios(load_ratios(results), path, title=title, subtitle=subtitle, footnote=footnote)


def load_ratios(results: dict[str, Any]) -> list[Ratio]:
    """``results["ratios"]`` as :class:`Ratio` objects, checked field by field."""
    raw = results.get("ratios")
    if not isinstance(raw, list):
        raise ValueError("no 'ratios' list (was it written by `safeshm bench --json`?)")
    fields = [f.name for f in dataclasses.fields(Ratio)]
    out = []
    for item in raw:
        ok = (
            isinstance(item, dict)
            and sorted(item) == sorted(fields)
            and all(isinstance(item[k], str) for k in ("structure", "label", "versus"))
            and all(
                _positive_number(item[k])
                for k in ("ratio", "goal")
                if k == "ratio" or item[k] is not None
            )
        )
        if not ok:
            raise ValueError(f"not a ratio: {item!r}")
        out.append(Ratio(**item))
    return out


def _positive_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0
